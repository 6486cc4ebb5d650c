"""A small learnable chat task for real instruct models: say whether a short review is positive or negative.

    from sentiment_chat import write_chats, write_prompts, score
    write_chats(Path("chats.jsonl"), 600, seed=0)         # {"messages": [user, assistant]}
    write_prompts(Path("prompts.jsonl"), 200, seed=1)     # {"prompt": ..., "answer": ...}
    score(Path("answers.jsonl"))                           # share of generated answers that are right

The reviews are the ones benchmarks/defaults.py classifies (the label is the last clause's sentiment,
negation flips it, filler sentences pad it out, 5% of the labels flipped): a base instruct model answers
in sentences ("The sentiment of this review is..."), a fine-tuned one in one word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from defaults import review

QUESTION = "Is the sentiment of this review positive or negative? Answer with one word.\nReview: "


def example(rng: random.Random) -> tuple[str, str]:
    r = review(rng)
    return QUESTION + r["text"], r["label"]


def write_chats(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question, answer = example(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def write_prompt_completion(path: Path, n: int, seed: int) -> Path:
    """The same conversations as write_chats, as conversational prompt/completion (trl's format for
    completion-only loss)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question, answer = example(rng)
            f.write(json.dumps({"prompt": [{"role": "user", "content": question}],
                                "completion": [{"role": "assistant", "content": answer}]}) + "\n")
    return path


def write_prompts(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question, answer = example(rng)
            f.write(json.dumps({"prompt": question, "answer": answer}) + "\n")
    return path


def score(answers: Path) -> float:
    """The share of rows whose generated text, stripped and lower-cased, starts with the answer."""
    rows = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
    return sum(r["generated"].strip().lower().startswith(r["answer"]) for r in rows) / max(1, len(rows))
