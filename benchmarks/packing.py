"""Useful tokens per second: packing vs padding to max length, side by side in one process.

    python benchmarks/packing.py                 # small GPT-2, short texts, 2 x 3 rounds
    python benchmarks/packing.py --rounds 5 --steps 30

A corpus of short texts (8-120 tokens) is trained on for the same number of optimizer steps
with the same batch size, (a) padded to max_length, as a fixed-shape loader does, and (b) packed
with finetune's first-fit-decreasing packing. Useful tokens are non-padding tokens. The two
are run alternately (a, b, a, b, ...) so that a noisy machine penalises both alike; the ratio of
the medians is reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def corpus(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 1000) for _ in range(rng.randint(8, 120))] + [1] for _ in range(n)]


def batches_padded(docs, max_length, batch_size, pad_id):
    for i in range(0, len(docs), batch_size):
        chunk = [d[:max_length] for d in docs[i:i + batch_size]]
        ids = torch.full((len(chunk), max_length), pad_id)
        mask = torch.zeros_like(ids)
        for r, d in enumerate(chunk):
            ids[r, :len(d)] = torch.tensor(d)
            mask[r, :len(d)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum())


def batches_longest(docs, max_length, batch_size, pad_id):
    """finetune's default without packing: pad each batch to its longest text."""
    from finetune.data.packing import CausalCollator

    collate = CausalCollator(pad_id)
    for i in range(0, len(docs), batch_size):
        batch = collate([{"input_ids": d[:max_length]} for d in docs[i:i + batch_size]])
        yield batch, int((batch["input_ids"] != pad_id).sum())


def batches_packed(docs, max_length, batch_size, pad_id):
    import datasets

    from finetune.data.packing import CausalCollator, packed_dataset

    packed = packed_dataset(datasets.Dataset.from_dict({"input_ids": docs}), max_length)
    collate = CausalCollator(pad_id)
    rows = [packed[i] for i in range(len(packed))]
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size])
        yield batch, int((batch["input_ids"] != pad_id).sum())


def run(make_batches, model, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    useful, start = 0, time.perf_counter()
    for step, (batch, n) in enumerate(make_batches()):
        if step == steps:
            break
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        useful += n
    return useful / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1024, n_embd=256, n_layer=4, n_head=4, n_positions=args.max_length,
                        pad_token_id=0, use_cache=False)
    model = GPT2LMHeadModel(config).train()
    docs = corpus(4000)
    mean_len = statistics.mean(len(d) for d in docs)
    makers = {"padded": batches_padded, "longest": batches_longest, "packed": batches_packed}
    results = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name, maker in makers.items():
            results[name].append(run(lambda: maker(docs, args.max_length, args.batch_size, 0), model, args.steps))
    median = {name: statistics.median(v) for name, v in results.items()}
    print(f"corpus: {len(docs)} texts, mean {mean_len:.0f} tokens; max_length {args.max_length}, "
          f"batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds each, torch threads "
          f"{torch.get_num_threads()}")
    labels = {"padded": "padded to max_length", "longest": "padded to batch longest", "packed": "packed"}
    for name, values in results.items():
        print(f"{labels[name]:<24} useful tokens/s {median[name]:>9,.0f}  (rounds: "
              f"{', '.join(f'{v:,.0f}' for v in values)})")
    print(f"packed / padded to max_length:    {median['packed'] / median['padded']:.2f}x")
    print(f"packed / padded to batch longest: {median['packed'] / median['longest']:.2f}x")


if __name__ == "__main__":
    main()
