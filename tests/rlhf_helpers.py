"""Synthetic preference data and a tiny "supervised" GPT for the RLHF tests.

The learnable preference: every prompt is "the <color> <animal> sat on the"; the chosen response
is a soft place (mat, bed, box) and the rejected one a hard place (roof, tree, chair). The tiny GPT
of conftest, trained for a moment on toy sentences, completes the prompt with each place about
equally often, so the share of soft places (about 1/2) has room to rise under DPO and GRPO.
"""

from __future__ import annotations

import functools
import random
import tempfile

import pytest

from conftest import ANIMALS, COLORS, PLACES, toy_sentences, write_jsonl

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and on a busy 2-core machine two threads
    per process wait on each other (measured: the RLHF tests took 13 min instead of 45 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GOOD = ("mat", "bed", "box")
BAD = tuple(p for p in PLACES if p not in GOOD)
PROMPT = "the {color} {animal} sat on the"


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [PROMPT.format(color=rng.choice(COLORS), animal=rng.choice(ANIMALS)) for _ in range(n)]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    return [{"prompt": p, "chosen": f" {rng.choice(GOOD)}.", "rejected": f" {rng.choice(BAD)}."}
            for p in prompts(n, seed)]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in preference_rows(n, seed)]


def write_preferences(path, n: int = 120, seed: int = 0) -> str:
    return write_jsonl(path, preference_rows(n, seed))


def is_good(completion: str) -> bool:
    words = completion.replace(".", " ").split()
    return bool(words) and words[0] in GOOD


def soft_place(prompts, completions):
    """The reward function the GRPO tests name as module:function: 1 for a soft place, else 0."""
    return [1.0 if is_good(c) else 0.0 for c in completions]


SIMPLE_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")


@functools.cache
def supervised_gpt(base: str) -> str:
    """`base` (the conftest tiny GPT) trained briefly on toy sentences, saved to a new directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = [t + tok.eos_token for t in toy_sentences(512, seed=3)]
    for step in range(120):
        batch = tok(texts[(step * 16) % 512:(step * 16) % 512 + 16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tempfile.mkdtemp(prefix="tiny-gpt-sft-")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def samples(model_dir: str, n: int = 64, seed: int = 0, max_new_tokens: int = 3) -> tuple[list[str], list[str]]:
    """(prompts, completions) sampled at temperature 1 from held-out prompts."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir)
    torch.manual_seed(seed)
    held_out = prompts(n, seed=99)
    enc = tok(held_out, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id)
    return held_out, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def good_rate(model_dir: str) -> float:
    """Share of sampled completions of held-out prompts that name a soft place."""
    _, completions = samples(model_dir)
    return sum(map(is_good, completions)) / len(completions)


def mean_reward(model_dir: str, reward_source: str) -> float:
    """Mean reward of sampled completions, scored by a reward source (finetune.rl.rewards.load_reward)."""
    from finetune.rl.rewards import load_reward

    scores = load_reward(reward_source)(*samples(model_dir))
    return sum(scores) / len(scores)


def load_causal_lm(model_dir: str):
    from transformers import AutoModelForCausalLM

    from finetune.models.adapters import is_adapter_dir

    if is_adapter_dir(model_dir):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(model_dir).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def logp_margin(model_dir: str, rows: list[dict]) -> float:
    """Mean log p(chosen | prompt) - log p(rejected | prompt) (responses + eos), computed here,
    independently of trl: what DPO is meant to raise."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir)

    def logp(prompt: str, response: str) -> float:
        p = tok(prompt)["input_ids"]
        ids = tok(prompt + response + tok.eos_token)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        return logits[len(p) - 1:].gather(1, targets[len(p) - 1:, None]).sum().item()

    margins = [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows]
    return sum(margins) / len(margins)


def logged(run_dir, key: str) -> list[float]:
    import json
    from pathlib import Path

    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [json.loads(ln)[key] for ln in lines if key in json.loads(ln)]


def write_prompts(path, n: int = 64, seed: int = 0) -> str:
    return write_jsonl(path, [{"prompt": p} for p in prompts(n, seed)])
