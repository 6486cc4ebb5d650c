"""Useful tokens per second: plain transformers, trl and finetune side by side, in one process.

    python benchmarks/throughput.py                       # the table in BENCHMARKS.md (about 15 min)
    python benchmarks/throughput.py --rounds 1 --steps 12 --only finetune-default,trl-default

    python benchmarks/throughput.py --cuda --rounds 2 --only trainer-max,trl-default,finetune-default  # a GPU

The script writes its own corpus (paragraphs of 8-150 tokens, log-normal lengths with a median
near 45, from a Zipf-distributed vocabulary), trains a 2,000-token byte-level BPE on it, and builds a
4-layer, 256-wide GPT-2 (and, for the QLoRA rows, a Llama of the same shape: bitsandbytes quantises
nn.Linear, and GPT-2's layers are Conv1D). Every contender trains the same model from the same
weights for `--steps` optimizer steps, batch 8, max length 256, fp32, one torch thread; the first
`--warmup` steps are not timed. Contenders run in alternating rounds (a, b, c, ..., a, b, c, ...) so
that a busy machine slows all alike, and the median of the rounds is reported.

Useful tokens are the non-padding tokens of the batches trained on (Trainer's
`include_num_input_tokens_seen="non_padding"`, on for every contender).

MFU (model FLOPs utilisation) = useful tokens/s x FLOPs per token / peak FLOP/s, with
    full fine-tuning: 6N per token (forward 2N, backward 4N)
    LoRA:             4N + 6N_lora (the frozen base gets input gradients only)
where N counts the weights that take part in matrix multiplications (the blocks' linear layers and
the LM head; not the embedding lookups, biases or norms), and attention scores (QK^T, AV: ~12 L d s
per token, under 10% here at s < 150) are left out. The peak is a 1024^3 fp32 matmul measured by
this script on one thread. QLoRA's dequantisation is not useful work and is not counted.

`--cuda` runs the same contenders on a GPU at a size where a GPU is the right tool: paragraphs 8x as
long (median near 290 tokens, at most 1,080), max length 1024, a model with Qwen2.5-0.5B's architecture
(494M parameters, random weights, the script's BPE inside its 151,936-token vocabulary; the "llama"
rows use it too), bf16 mixed precision for every contender, wall-clock time with the GPU synchronised,
and a measured 8192^3 bf16 matmul as the peak.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from words import zipf_vocabulary  # benchmarks/words.py: this script's folder is on the path

MAX_LENGTH, BATCH = 256, 8
CUDA = False  # --cuda: the GPU variant described above


# ---------------------------------------------------------------------------------------
# Corpus, tokenizer, models


def write_corpus(path: Path, n: int, seed: int = 0, scale: int = 1) -> None:
    """Paragraphs whose token counts spread over 8-150 like prose paragraphs (log-normal), `scale` times as long."""
    rng = random.Random(seed)
    words, weights = zipf_vocabulary(rng)
    with path.open("w") as f:
        for _ in range(n):
            count = int(min(135 * scale, max(7 * scale, rng.lognormvariate(math.log(36 * scale), 0.75))))
            sentence = rng.choices(words, weights, k=count)
            text = " ".join(sentence).capitalize() + "."
            f.write(json.dumps({"text": text}) + "\n")


def build_models(root: Path, corpus: Path) -> dict[str, Path]:
    from datasets import load_dataset
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from finetune.models.pretrained import train_bpe_tokenizer

    texts = load_dataset("json", data_files=str(corpus), split="train")["text"]
    tok = train_bpe_tokenizer(texts, 2000)
    torch.manual_seed(0)
    if CUDA:
        from scale_out import QWEN05  # benchmarks/scale_out.py
        from transformers import Qwen2Config, Qwen2ForCausalLM

        with torch.device("cuda"):
            qwen = Qwen2ForCausalLM(Qwen2Config(**QWEN05, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                                pad_token_id=tok.pad_token_id, use_cache=False)).to(torch.bfloat16)
        qwen.save_pretrained(root / "qwen")
        tok.save_pretrained(root / "qwen")
        return {"gpt2": root / "qwen", "llama": root / "qwen"}
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4, n_positions=MAX_LENGTH,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, use_cache=False))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=MAX_LENGTH, tie_word_embeddings=True,
                                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, use_cache=False))
    out = {}
    for name, model in (("gpt2", gpt), ("llama", llama)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def matmul_params(model) -> int:
    """Weights used in matmuls: the blocks' linear/Conv1D layers and the LM head, LoRA's own left out
    (a 4-bit layer counts the weights it stands for, not its packed bytes)."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and "lora_" not in name:
            state = getattr(m.weight, "quant_state", None)
            n += math.prod(state.shape) if state is not None else m.weight.numel()
    return n


def measure_peak_flops() -> float:
    if CUDA:  # the same 8192^3 bf16 matmul as scale_out's GPU table
        from scale_out import matmul_tflops

        return matmul_tflops("cuda") * 1e12
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = clock()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * 1024**3 / (clock() - start))
    return best


# ---------------------------------------------------------------------------------------
# Timing: a callback


def clock() -> float:
    """CPU seconds of this process. With one torch thread this is the time the run itself computed,
    and it stays fair on a machine shared with other jobs, where wall time measures the neighbours.
    On a GPU: wall time, once the queued work is done."""
    if CUDA:
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


# Timing: a callback that times steps after the warm-up and counts useful tokens


class Timer:
    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == warmup:
                    timer.start, timer.tokens0 = clock(), state.num_input_tokens_seen

            def on_train_end(self, args, state, control, **kw):
                timer.seconds = clock() - timer.start
                timer.tokens = state.num_input_tokens_seen - timer.tokens0
                timer.flops_n = None

        self.callback = Callback()
        self.start = self.tokens0 = self.seconds = self.tokens = 0


def plain_args(out: Path, steps: int, **kw):
    from transformers import TrainingArguments

    return dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=5e-5,
                logging_steps=10, save_strategy="no", report_to="none", use_cpu=not CUDA, seed=42, bf16=CUDA,
                include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0, **kw), \
        TrainingArguments


def tokenized_texts(tok, corpus: Path):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(corpus), split="train")
    eos = tok.eos_token_id
    return ds.map(lambda b: {"input_ids": [ids[:MAX_LENGTH - 1] + [eos] for ids in tok(b["text"])["input_ids"]]},
                  batched=True, remove_columns=["text"])


def run_plain(model_dir: Path, corpus: Path, out: Path, steps: int, warmup: int, pad_to_max: bool):
    """transformers Trainer with DataCollatorForLanguageModeling: padded per batch or to max length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    collator = DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=MAX_LENGTH if pad_to_max else None)
    kwargs, args_cls = plain_args(out, steps)
    timer = Timer(warmup)
    Trainer(model=model, args=args_cls(**kwargs), train_dataset=tokenized_texts(tok, corpus), data_collator=collator,
            processing_class=tok, callbacks=[timer.callback]).train()
    return timer, model


def run_trl(model_dir: Path, corpus: Path, out: Path, steps: int, warmup: int, packing: bool):
    """trl SFTTrainer with its defaults, except fp32 and no gradient checkpointing (as every contender)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    kwargs, _ = plain_args(out, steps, max_length=MAX_LENGTH, packing=packing, gradient_checkpointing=False)
    kwargs["learning_rate"] = 5e-5
    timer = Timer(warmup)
    SFTTrainer(model=model, args=SFTConfig(**kwargs), processing_class=tok, callbacks=[timer.callback],
               train_dataset=load_dataset("json", data_files=str(corpus), split="train")).train()
    return timer, model


def run_finetune(model_dir: Path, corpus: Path, out: Path, steps: int, warmup: int, method: str = "full",
                 overrides: dict | None = None):
    """`finetune full|lora --model DIR --data corpus.jsonl` through the code the command runs."""
    from finetune.recipe.load import build_recipe
    from finetune.tasks import clm

    data = {"task": "clm", "method": method, "model": {"name": str(model_dir)},
            "data": {"train": str(corpus), "max_length": MAX_LENGTH, "eval_fraction": 0.01, "max_eval_samples": 8},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": BATCH, "save_steps": 10**6}}
    recipe = build_recipe(data, {**({"train.bf16": True} if CUDA else {}), **(overrides or {})})
    timer = Timer(warmup)
    holder = {}

    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            holder["model"] = model

    clm.run(recipe, callbacks=[timer.callback, Keep()])
    return timer, holder["model"]


# ---------------------------------------------------------------------------------------


def contenders(models: dict[str, Path]):
    g, l = models["gpt2"], models["llama"]
    return {
        "trainer-max": (f"transformers Trainer, padded to {MAX_LENGTH}",
                        lambda c, o, s, w: run_plain(g, c, o, s, w, True)),
        "trainer-batch": ("transformers Trainer, padded per batch", lambda c, o, s, w: run_plain(g, c, o, s, w, False)),
        "trl-default": ("trl SFTTrainer, default", lambda c, o, s, w: run_trl(g, c, o, s, w, False)),
        "trl-packing": ("trl SFTTrainer, packing=True", lambda c, o, s, w: run_trl(g, c, o, s, w, True)),
        "finetune-random": ("finetune full, data.packing=false, train.group_by_length=false",
                            lambda c, o, s, w: run_finetune(g, c, o, s, w, "full", {"data.packing": False,
                                                                                    "train.group_by_length": False})),
        "finetune-unpacked": ("finetune full, data.packing=false",
                              lambda c, o, s, w: run_finetune(g, c, o, s, w, "full", {"data.packing": False})),
        "finetune-default": ("finetune full, default (packed)", lambda c, o, s, w: run_finetune(g, c, o, s, w, "full")),
        "finetune-compiled": ("finetune full, packed, train.torch_compile=true",
                              lambda c, o, s, w: run_finetune(g, c, o, s, w, "full", {"train.torch_compile": True})),
        "llama-full": ("Llama: finetune full", lambda c, o, s, w: run_finetune(l, c, o, s, w, "full")),
        "llama-lora": ("Llama: finetune lora (r=16, all linear)", lambda c, o, s, w: run_finetune(l, c, o, s, w, "lora")),
        "llama-qlora": ("Llama: finetune lora --quant 4bit (fp32 compute)",
                        lambda c, o, s, w: run_finetune(l, c, o, s, w, "lora",
                                                        {"quant.bits": 4, "quant.compute_dtype": "float32"})),
    }


def flops_per_token(model) -> float:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_all = matmul_params(model)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    if n_lora:  # LoRA: 4N on the frozen base + 6N_lora on the adapters
        return 4 * n_all + 6 * n_lora
    assert trainable
    return 6 * n_all


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated contender keys")
    ap.add_argument("--cuda", action="store_true", help="the GPU variant (see the docstring)")
    args = ap.parse_args()
    global CUDA, MAX_LENGTH
    if args.cuda:
        CUDA, MAX_LENGTH = True, 1024

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="finetune-throughput-"))
    corpus = root / "corpus.jsonl"
    write_corpus(corpus, args.texts, scale=8 if CUDA else 1)
    models = build_models(root, corpus)
    table = contenders(models)
    keys = [k for k in table if not args.only or k in args.only.split(",")]
    peak = measure_peak_flops()
    results: dict[str, list[float]] = {k: [] for k in keys}
    flops: dict[str, float] = {}
    for r in range(args.rounds):
        for k in keys:
            timer, model = table[k][1](corpus, root / f"run-{k}-{r}", args.steps, args.warmup)
            results[k].append(timer.tokens / timer.seconds)
            flops[k] = flops_per_token(model)
            print(f"round {r + 1} {k}: {results[k][-1]:,.0f} useful tokens/s", flush=True)

    from finetune.data.text import length_stats
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    lengths = [len(ids) + 1 for ids in tok(
        [json.loads(line)["text"] for line in corpus.read_text().splitlines()])["input_ids"]]
    stats = length_stats(lengths)
    print(f"\ncorpus: {stats['count']} texts, tokens min {stats['min']} / median {stats['p50']} / mean "
          f"{stats['mean']:.0f} / max {stats['max']}; batch {BATCH}, max length {MAX_LENGTH}, {args.steps} steps "
          f"({args.warmup} untimed), {args.rounds} alternating rounds, torch threads {torch.get_num_threads()}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s" + (f" on {torch.cuda.get_device_name()}" if CUDA else ""))
    median = {k: statistics.median(v) for k, v in results.items()}
    base = median.get("trainer-max")
    trl = median.get("trl-default")
    print(f"\n| contender | useful tok/s (median) | rounds | vs Trainer padded to {MAX_LENGTH} | vs trl default "
          "| MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in keys:
        vs_base = f"{median[k] / base:.2f}x" if base and not k.startswith("llama") else ""
        vs_trl = f"{median[k] / trl:.2f}x" if trl and not k.startswith("llama") else ""
        mfu = median[k] * flops[k] / peak
        print(f"| {table[k][0]} | {median[k]:,.0f} | {', '.join(f'{v:,.0f}' for v in results[k])} | {vs_base} | "
              f"{vs_trl} | {mfu:.0%} |")
    if "llama-full" in median and "llama-lora" in median:
        print(f"\nLoRA / full (Llama): {median['llama-lora'] / median['llama-full']:.2f}x useful tokens/s")
    if "llama-lora" in median and "llama-qlora" in median:
        print(f"QLoRA 4-bit / LoRA (Llama): {median['llama-qlora'] / median['llama-lora']:.2f}x useful tokens/s")


if __name__ == "__main__":
    main()
