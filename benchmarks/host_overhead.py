"""Host overhead per optimizer step: a model of near-zero FLOPs, so that what a step costs is the
training loop itself (data loading, collation, callbacks, logging, guards, the optimizer's bookkeeping),
not the model. A regression in the loop shows here without a GPU.

    python benchmarks/host_overhead.py                 # the table in BENCHMARKS.md (about 2 min)
    python benchmarks/host_overhead.py --steps 300 --rounds 3

Contenders, each training the same 1-layer, 16-wide GPT-2 on the same 16-token rows, batch 8, for
`--steps` steps after `--warmup` untimed ones, in alternating rounds (median reported), CPU seconds of
this process with one torch thread (benchmarks/throughput.py's clock):
    bare      a PyTorch loop: forward, backward, AdamW step, zero_grad; nothing else
    trainer   transformers Trainer, its defaults (logging every 10 steps, no saving)
    trl       trl SFTTrainer, its defaults (fp32, no gradient checkpointing)
    finetune  `finetune full` through the task's own code: packing, our callbacks (the log, the guards'
              finiteness check and stop-signal agreement, the console, checkpoint manifests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as T  # noqa: E402  (benchmarks/throughput.py: clock, Timer, the contenders' runners)

T.MAX_LENGTH = 16


def write_rows(path: Path, n: int) -> None:
    import json
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n")


def build(root: Path, corpus: Path) -> Path:
    from datasets import load_dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune.models.pretrained import train_bpe_tokenizer

    tok = train_bpe_tokenizer(load_dataset("json", data_files=str(corpus), split="train")["text"], 128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=1, n_positions=16,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, use_cache=False))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return root / "tiny"


def run_bare(model_dir: Path, corpus: Path, out: Path, steps: int, warmup: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    rows = T.tokenized_texts(tok, corpus)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    start = 0.0
    for step in range(steps):
        if step == warmup:
            start = T.clock()
        batch = [rows[(step * T.BATCH + i) % len(rows)] for i in range(T.BATCH)]
        longest = max(map(len, batch))
        ids = torch.tensor([r + [tok.pad_token_id] * (longest - len(r)) for r in batch])
        labels = torch.tensor([r + [-100] * (longest - len(r)) for r in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return T.clock() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="host-overhead-"))
    corpus = root / "rows.jsonl"
    write_rows(corpus, 4000)
    model = build(root, corpus)
    runs = {
        "bare": lambda o: run_bare(model, corpus, o, a.steps, a.warmup),
        "trainer": lambda o: T.run_plain(model, corpus, o, a.steps, a.warmup, False)[0].seconds,
        "trl": lambda o: T.run_trl(model, corpus, o, a.steps, a.warmup, False)[0].seconds,
        "finetune": lambda o: T.run_finetune(model, corpus, o, a.steps, a.warmup)[0].seconds,
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.rounds):
        for name, run in runs.items():
            seconds[name].append(run(root / f"{name}-{r}"))
    timed = a.steps - a.warmup
    bare = statistics.median(seconds["bare"]) / timed
    print(f"\n{timed} timed steps, batch {T.BATCH} x 16 tokens, median of {a.rounds} rounds, CPU time, 1 thread")
    print(f"{'contender':10} {'ms/step':>8} {'x bare':>7} {'host ms/step over bare':>23}")
    for name, values in seconds.items():
        per = statistics.median(values) / timed
        print(f"{name:10} {per * 1e3:8.2f} {per / bare:7.2f} {(per - bare) * 1e3:23.2f}")


if __name__ == "__main__":
    main()
