"""Throughput, peak memory and MFU of QLoRA and bf16 LoRA on a 0.5B causal LM built from a config.

    python benchmarks/scale_out.py --out /tmp/bench                                   # a CUDA GPU
    python benchmarks/scale_out.py --out /tmp/bench --batch 1 --seq 128 --steps 6     # CPU (slow)

Nothing is downloaded: the model is Qwen2.5-0.5B's architecture (Qwen2Config with its sizes, 494M
parameters, random weights saved in bfloat16 as the real checkpoint is), the tokenizer a word-level one
with the same vocabulary size, and the data random words (one token each), so every example is exactly
`--seq` tokens. Each configuration runs through `finetune.tasks.clm.run` (what `finetune lora` runs),
with a callback measuring the peak of live tensors (CUDA: torch.cuda.max_memory_allocated).

MFU counts the useful training FLOPs per token: 4N for LoRA/QLoRA (forward 2N + input gradients 2N; the
frozen base gets no weight gradients; adapters add <1%), 6N for full fine-tuning, plus attention
12·L·d·s (PaLM, appendix B), against the device's dense bf16 peak (--peak-tflops; default: 989 for
H100/H200 SXM, or a measured bf16 matmul peak on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
              rope_theta=1000000.0, rms_norm_eps=1e-6)

CONFIGS = {  # name -> (recipe overrides)
    "qlora-4bit": {"quant": {"bits": 4, "compute_dtype": "bfloat16"}, "train": {"bf16": True}},
    "lora-bf16": {"model": {"dtype": "bfloat16"}, "train": {"bf16": True}},
}


def build_model(root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = root / "qwen0.5b-random"
    if (path / "tokenizer" / "tokenizer.json").exists():
        return path
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i for i in range(2, QWEN05["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = Qwen2Config(**QWEN05, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    # Its own directory: next to a config.json with model_type qwen2, AutoTokenizer would load
    # Qwen2Tokenizer's byte-level pipeline instead of this word-level one.
    tokenizer.save_pretrained(path / "tokenizer")
    return path


def build_data(root: Path, rows: int, seq: int) -> Path:
    path = root / f"random-{rows}x{seq}.jsonl"
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):  # seq - 1 words + the eos the task appends = seq tokens
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(2, 30000)}" for _ in range(seq - 1))}) + "\n")
    return path


def cpu_peak_tflops() -> float:
    """Measured bf16 matmul throughput of this CPU (a 2048^3 GEMM), as the MFU denominator."""
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    t, n = time.perf_counter(), 8
    for _ in range(n):
        a @ b
    return n * 2 * 2048**3 / (time.perf_counter() - t) / 1e12


def run_one(name: str, model_dir: Path, data: Path, out: Path, args) -> dict:
    import torch

    from peak_memory import peak_memory_callback  # benchmarks/, next to this script

    from finetune.memory import estimate
    from finetune.recipe import build_recipe
    from finetune.tasks import clm

    spec = {"method": "lora", "model": {"name": str(model_dir), "tokenizer": str(model_dir / "tokenizer")},
            "data": {"train": str(data), "max_length": args.seq, "eval_fraction": 0.0},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {"output_dir": str(out / name), "max_steps": args.steps, "batch_size": args.batch,
                      "logging_steps": 1, "save_steps": 10**6, "gradient_checkpointing": args.checkpointing,
                      "trainer_args": {"disable_tqdm": True}}}
    for section, values in CONFIGS[name].items():
        spec.setdefault(section, {}).update(values)
    recipe = build_recipe(spec)
    predicted = estimate(recipe)
    peak = peak_memory_callback()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    metrics = clm.run(recipe, callbacks=[peak])
    logs = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r][1:]  # the first step includes warm-up
    tokens_per_s = statistics.median(rates) if rates else metrics["tokens_per_s"]
    n = predicted.total_params
    d, L, s = QWEN05["hidden_size"], QWEN05["num_hidden_layers"], args.seq
    flops_per_token = 4 * n + 12 * L * d * s
    return dict(config=name, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing,
                tokens_per_s=round(tokens_per_s, 1), peak_gib=round(peak.peak / 2**30, 3),
                estimate_gib=round(predicted.peak / 2**30, 3), ratio=round(peak.peak / predicted.peak, 2),
                tflops=round(tokens_per_s * flops_per_token / 1e12, 3),
                mfu=round(tokens_per_s * flops_per_token / (args.peak_tflops * 1e12), 4),
                final_loss=metrics.get("final_train_loss"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.peak_tflops is None:
        args.peak_tflops = 989.0 if torch.cuda.is_available() else cpu_peak_tflops()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.out)
    data = build_data(args.out, rows=args.steps * args.batch + 8, seq=args.seq)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; peak {args.peak_tflops:.3g} TFLOP/s bf16", flush=True)
    results = [run_one(name, model_dir, data, args.out, args) for name in args.configs.split(",")]
    print("\n| config | batch x seq | ckpt | tokens/s | peak GiB | estimate GiB | measured/estimate | TFLOP/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['config']} | {r['batch']} x {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['tokens_per_s']} | {r['peak_gib']} | {r['estimate_gib']} | {r['ratio']} | {r['tflops']} | "
              f"{r['mfu']:.1%} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
