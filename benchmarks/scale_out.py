"""Throughput, peak memory and MFU of QLoRA, bf16 LoRA and full fine-tuning on a 0.5B causal LM built from a
config, with each attention implementation and Liger's kernels on and off.

    python benchmarks/scale_out.py --out /tmp/bench                                   # a CUDA GPU
    python benchmarks/scale_out.py --out /tmp/bench --configs lora-bf16 --batch 1 --seq 128 --steps 6  # CPU

Nothing is downloaded: the model is Qwen2.5-0.5B's architecture (Qwen2Config with its sizes, 494M
parameters, random weights saved in bfloat16 as the real checkpoint is), the tokenizer a word-level one
with the same vocabulary size, and the data random words (one token each), so every example is exactly
`--seq` tokens. Each configuration runs through `finetune.tasks.clm.run` (what `finetune lora` runs),
with a callback measuring the peak of live tensors (CUDA: torch.cuda.max_memory_allocated). A
configuration that cannot run here (flash-attn not installed, say) is reported with its reason and the
others go on.

MFU counts the useful training FLOPs per token: 4N for LoRA/QLoRA (forward 2N + input gradients 2N; the
frozen base gets no weight gradients; adapters add <1%), 6N for full fine-tuning, plus attention
12·L·d·s (PaLM, appendix B), against the device's dense bf16 peak (--peak-tflops; default: 989 for
H100/H200 SXM, or a measured bf16 matmul peak on CPU). On CUDA the bf16 matmul rate measured on the card
(8192^3) is reported too, and MFU against it.
"""

from __future__ import annotations

import argparse
import gc
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
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=2000)  # --tiny: the same architecture, small, to check the script in seconds

LORA = {"model": {"dtype": "bfloat16"}, "train": {"bf16": True}}
QLORA = {"quant": {"bits": 4, "compute_dtype": "bfloat16"}, "train": {"bf16": True}}
# Full fine-tuning keeps float32 master weights (and Adam states) under bf16 autocast.
FULL = {"method": "full", "model": {"dtype": "float32"}, "train": {"bf16": True}}


def variant(base: dict, **sections) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


CONFIGS = {  # name -> recipe overrides
    "qlora-4bit": QLORA,
    "lora-bf16": LORA,
    "full-bf16": FULL,
    "lora-bf16-eager": variant(LORA, model={"attn_implementation": "eager"}),
    "lora-bf16-fa2": variant(LORA, model={"attn_implementation": "flash_attention_2"}),
    "lora-bf16-liger": variant(LORA, train={"liger_kernel": True}),
    "qlora-4bit-liger": variant(QLORA, train={"liger_kernel": True}),
    "full-bf16-liger": variant(FULL, train={"liger_kernel": True}),
}
CPU_CONFIGS = "qlora-4bit,lora-bf16"


def build_model(root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = root / ("qwen-tiny-random" if QWEN05["vocab_size"] == TINY["vocab_size"] else "qwen0.5b-random")
    if (path / "tokenizer" / "tokenizer.json").exists():
        return path
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i for i in range(2, QWEN05["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = Qwen2Config(**QWEN05, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 494M on a GPU takes a second
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    # Its own directory: next to a config.json with model_type qwen2, AutoTokenizer would load
    # Qwen2Tokenizer's byte-level pipeline instead of this word-level one.
    tokenizer.save_pretrained(path / "tokenizer")
    return path


def build_data(root: Path, rows: int, seq: int) -> Path:
    path = root / f"random-{rows}x{seq}.jsonl"
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):  # seq - 1 words + the eos the task appends = seq tokens
            f.write(json.dumps({"text": " ".join(
                f"w{rng.randrange(2, min(30000, QWEN05['vocab_size']))}" for _ in range(seq - 1))}) + "\n")
    return path


def matmul_tflops(device: str) -> float:
    """Measured bf16 matmul throughput (CPU: 1024^3, CUDA: 8192^3, random data)."""
    import torch

    size, n = (8192, 20) if device == "cuda" else (1024, 4)
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return n * 2 * size**3 / (time.perf_counter() - t) / 1e12


def run_one(name: str, model_dir: Path, data: Path, out: Path, args) -> dict:
    import torch

    from peak_memory import peak_memory_callback  # benchmarks/, next to this script

    from finetune.models.memory import estimate
    from finetune.recipe.load import build_recipe
    from finetune.tasks import clm
    from finetune.training.extras import kernel_problems

    spec = {"method": "lora", "model": {"name": str(model_dir), "tokenizer": str(model_dir / "tokenizer")},
            "data": {"train": str(data), "max_length": args.seq, "eval_fraction": 0.0},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {"output_dir": str(out / name), "max_steps": args.steps, "batch_size": args.batch,
                      "logging_steps": 1, "save_steps": 10**6, "gradient_checkpointing": args.checkpointing,
                      "trainer_args": {"disable_tqdm": True}}}
    for section, values in CONFIGS[name].items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        else:
            spec[section] = values
    recipe = build_recipe(spec)
    problems = kernel_problems(recipe, cuda=torch.cuda.is_available())
    if problems:
        return dict(config=name, error="; ".join(problems))
    predicted = estimate(recipe)
    peak = peak_memory_callback()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        metrics = clm.run(recipe, callbacks=[peak])
    except Exception as e:  # one configuration failing here (a kernel's version, say) must not lose the others
        return dict(config=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    logs = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r][1:]  # the first step includes warm-up
    tokens_per_s = statistics.median(rates) if rates else metrics["tokens_per_s"]
    n = predicted.total_params
    d, L, s = QWEN05["hidden_size"], QWEN05["num_hidden_layers"], args.seq
    flops_per_token = (6 if recipe.method == "full" else 4) * n + 12 * L * d * s
    measured = (tokens_per_s * flops_per_token / (args.measured_tflops * 1e12)) if args.measured_tflops else None
    return dict(config=name, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing,
                tokens_per_s=round(tokens_per_s, 1), peak_gib=round(peak.peak / 2**30, 3),
                estimate_gib=round(predicted.peak / 2**30, 3), ratio=round(peak.peak / predicted.peak, 2),
                tflops=round(tokens_per_s * flops_per_token / 1e12, 3),
                mfu=round(tokens_per_s * flops_per_token / (args.peak_tflops * 1e12), 4),
                mfu_measured=round(measured, 4) if measured else None,
                final_loss=metrics.get("final_train_loss"))


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | not run: {r['error']} |"
    measured = f" {r['mfu_measured']:.1%} |" if r.get("mfu_measured") else ""
    return (f"| {r['config']} | {r['batch']} x {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{r['tokens_per_s']} | {r['peak_gib']} | {r['estimate_gib']} | {r['ratio']} | {r['tflops']} | "
            f"{r['mfu']:.1%} |{measured}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default=None, help=f"comma-separated, of: {', '.join(CONFIGS)} (default: all "
                        f"on CUDA, {CPU_CONFIGS} on CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide Qwen2 instead of the 0.5B")
    args = parser.parse_args()
    if args.tiny:
        QWEN05.update(TINY)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = torch.cuda.is_available()
    args.configs = args.configs or (",".join(CONFIGS) if cuda else CPU_CONFIGS)
    args.measured_tflops = matmul_tflops("cuda") if cuda else None
    if args.peak_tflops is None:
        args.peak_tflops = 989.0 if cuda else matmul_tflops("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.out)
    data = build_data(model_dir, rows=args.steps * args.batch + 8, seq=args.seq)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    measured = f"; measured bf16 matmul {args.measured_tflops:.0f} TFLOP/s" if cuda else ""
    print(f"device: {device}; peak {args.peak_tflops:.3g} TFLOP/s bf16{measured}", flush=True)
    header = "| config | batch x seq | ckpt | tokens/s | peak GiB | estimate GiB | measured/estimate | TFLOP/s | MFU |"
    header += " MFU vs measured matmul |" if cuda else ""
    results = []
    for name in args.configs.split(","):
        results.append(run_one(name, model_dir, data, args.out, args))
        print(f"result: {row(results[-1])}", flush=True)
        (args.out / "results.json").write_text(json.dumps(dict(device=device, peak_tflops=args.peak_tflops,
                                                               measured_tflops=args.measured_tflops,
                                                               results=results), indent=2))
    print("\n" + header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
