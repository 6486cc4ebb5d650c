"""Data at scale: peak memory and time to the first training step on a corpus of 1 GB of JSON Lines.

    python benchmarks/data_scale.py                          # 1 GB; the table in BENCHMARKS.md (about 1 hour)
    python benchmarks/data_scale.py --gb 0.1 --skip-old      # a quick look
    python benchmarks/data_scale.py --old-ref 213eacc        # "today's code": the commit before mixtures/streaming

The script writes its own corpus (documents of 20-2,000 words, log-normal lengths with a median near
250 words, from a Zipf-distributed vocabulary), trains a 2,000-token byte-level BPE on a sample, and
builds a 4-layer, 256-wide GPT-2. Each contender is `finetune full` on that corpus (max length 512,
batch 8, one torch thread), run in a process of its own; the parent reads the process's peak RSS
(`os.wait4`: the largest resident set of the process and the children it waited for) and the
child's clock at the end of its first training step, counted from the moment the parent started it.

Contenders:
  old        the code at --old-ref (a git worktree): tokenized rows held as Python lists, packed whole
  new        this code, an empty datasets cache: read, tokenize, pack in windows, write the cache
  new-again  this code, the same cache: the second run on the same data
  new-num_proc-2  new with data.num_proc: 2 (tokenize and pack in two processes), its own cache
  stream     this code, data.streaming: read, tokenize and pack as training asks
The old contender runs under an address-space limit (--old-limit-gib) so that it cannot take the
machine down; when it hits the limit the table says so.

Then: the packed stream's throughput (tokens/s through read + tokenize + pack, no model) against the
training throughput of the stream run, and how full the blocks are when packed in windows of
PACK_WINDOW documents against packing a large sample whole.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from words import zipf_vocabulary  # benchmarks/words.py: this script's folder is on the path

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH, BATCH = 512, 8


def write_corpus(path: Path, gb: float, seed: int = 0) -> int:
    """Documents of 20-2,000 words (log-normal, median ~250) until the file holds `gb` gigabytes."""
    rng = random.Random(seed)
    words, weights = zipf_vocabulary(rng)
    pool = []
    for _ in range(20_000):
        count = int(min(2000, max(20, rng.lognormvariate(math.log(250), 0.9))))
        pool.append(" ".join(rng.choices(words, weights, k=count)).capitalize() + ".")
    limit, size, n = int(gb * 1e9), 0, 0
    with path.open("w") as f:
        while size < limit:
            line = json.dumps({"text": f"{n} {rng.choice(pool)}"}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def build_model(root: Path, corpus: Path) -> Path:
    import itertools

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune.models.pretrained import train_bpe_tokenizer

    with corpus.open() as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, 5000)]
    tok = train_bpe_tokenizer(texts, 2000)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4, n_positions=MAX_LENGTH,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, use_cache=False))
    model.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root / "gpt2"


# ---------------------------------------------------------------------------------------
# One contender, in a process of its own


def child(spec: dict) -> None:
    """Runs in the child: `finetune full` with a callback that notes the clock at the end of step 1 and
    the tokens and seconds of the steps after it."""
    from transformers import TrainerCallback

    from finetune.recipe.load import load_recipe
    from finetune.run.lifecycle import execute

    result: dict = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            if state.global_step == 1:
                result["first_step_s"] = now - spec["t0"]
                result["start"], result["tokens0"] = now, state.num_input_tokens_seen
            elif state.global_step == spec["steps"]:
                result["train_tokens_per_s"] = (state.num_input_tokens_seen - result["tokens0"]) / (now - result["start"])
                Path(spec["result"]).write_text(json.dumps(result))

    execute(load_recipe(None, spec["overrides"]), callbacks=[Clock()])


def run_contender(name: str, code: Path, model: Path, corpus: Path, work: Path, cache: Path, steps: int,
                  extra: dict, limit_gib: float | None = None) -> dict:
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    result_file = work / f"result-{name}.json"
    result_file.unlink(missing_ok=True)
    overrides = {"method": "full", "model.name": str(model), "data.train": str(corpus), "data.max_length": MAX_LENGTH,
                 "data.max_eval_samples": 200, "data.eval_fraction": 0.001, "train.output_dir": str(out),
                 "train.max_steps": steps, "train.batch_size": BATCH, "train.save_steps": 10_000,
                 "train.logging_steps": 1, **extra}
    spec = {"t0": time.time(), "steps": steps, "result": str(result_file), "overrides": overrides}
    env = {**os.environ, "PYTHONPATH": str(code), "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def limit():
        if limit_gib:
            resource.setrlimit(resource.RLIMIT_AS, (int(limit_gib * 2**30),) * 2)

    log = (work / f"log-{name}.txt").open("w")
    start = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=str(code),
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    _, status, usage = os.wait4(proc.pid, 0)
    row = {"name": name, "peak_rss_gib": usage.ru_maxrss / 2**20, "wall_s": time.time() - start,
           "exit": os.waitstatus_to_exitcode(status)}
    if result_file.is_file():
        row.update(json.loads(result_file.read_text()))
    else:
        tail = (work / f"log-{name}.txt").read_text().splitlines()[-3:]
        row["failed"] = " | ".join(tail)[-300:]
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------------------
# The data pipeline alone


def pipeline_throughput(model: Path, corpus: Path, blocks: int = 3000) -> float:
    """Tokens per second out of the packed stream (read, tokenize, pack), no model."""
    from finetune.data import corpus as C
    from finetune.models import pretrained
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(None, {"method": "full", "model.name": str(model), "data.train": str(corpus),
                                "data.streaming": True, "train.max_steps": 1, "data.max_length": MAX_LENGTH})
    tokenizer = pretrained.load_tokenizer(recipe.model)
    stream = C.prepare(recipe, tokenizer, MAX_LENGTH, True).train
    start, tokens = time.perf_counter(), 0
    for i, row in enumerate(stream):
        tokens += len(row["input_ids"])
        if i + 1 == blocks:
            break
    return tokens / (time.perf_counter() - start)


def window_fill(model: Path, corpus: Path, docs: int = 50_000) -> tuple[float, float]:
    """Share of the block capacity filled: packing in windows of PACK_WINDOW documents, and packing
    `docs` documents at once."""
    import itertools

    from transformers import AutoTokenizer

    from finetune.data.packing import PACK_WINDOW, pack_documents

    tok = AutoTokenizer.from_pretrained(model)
    with corpus.open() as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, docs)]
    lengths = []
    for i in range(0, len(texts), 10_000):
        for ids in tok(texts[i:i + 10_000])["input_ids"]:
            n = len(ids) + 1
            lengths += [MAX_LENGTH] * (n // MAX_LENGTH) + ([n % MAX_LENGTH] if n % MAX_LENGTH else [])
    total = sum(lengths)
    windowed = sum(len(pack_documents(lengths[i:i + PACK_WINDOW], MAX_LENGTH))
                   for i in range(0, len(lengths), PACK_WINDOW))
    whole = len(pack_documents(lengths, MAX_LENGTH))
    return total / (windowed * MAX_LENGTH), total / (whole * MAX_LENGTH)


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--old-ref", default="213eacc")
    parser.add_argument("--old-limit-gib", type=float, default=16.0)
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument("--num-proc", type=int, default=2, help="data.num_proc of an extra cold run")
    parser.add_argument("--only", default=None, help="comma-separated contenders to run (old, new, new-again, "
                        "new-num_proc, stream); new-again reads the cache that new left in --work")
    parser.add_argument("--work", default=None, help="folder for the corpus, caches and runs (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    work = Path(args.work or tempfile.mkdtemp(prefix="finetune-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.is_file() or corpus.stat().st_size < args.gb * 1e9:
        start = time.time()
        n = write_corpus(corpus, args.gb)
        print(f"corpus: {n:,} documents, {corpus.stat().st_size / 1e9:.2f} GB ({time.time() - start:.0f} s)",
              flush=True)
    model = build_model(work, corpus)
    rows = []
    wanted = set(args.only.split(",")) if args.only else {"old", "new", "new-again", "new-num_proc", "stream"}
    if args.skip_old:
        wanted.discard("old")
    if "old" in wanted:
        old = work / "old-code"
        if not old.is_dir():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.old_ref], check=True)
        rows.append(run_contender("old", old, model, corpus, work, work / "cache-old", args.steps, {},
                                  args.old_limit_gib))
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
    if "new" in wanted:
        shutil.rmtree(work / "cache-new", ignore_errors=True)
        rows.append(run_contender("new", REPO, model, corpus, work, work / "cache-new", args.steps, {}))
        rows[-1]["cache_gb"] = folder_gb(work / "cache-new")
    if "new-again" in wanted:
        rows.append(run_contender("new-again", REPO, model, corpus, work, work / "cache-new", args.steps, {}))
    if "new-num_proc" in wanted and args.num_proc > 1:
        shutil.rmtree(work / "cache-new-procs", ignore_errors=True)
        rows.append(run_contender(f"new-num_proc-{args.num_proc}", REPO, model, corpus, work, work / "cache-new-procs",
                                  args.steps, {"data.num_proc": args.num_proc}))
    if "stream" in wanted:
        rows.append(run_contender("stream", REPO, model, corpus, work, work / "cache-stream", args.steps,
                                  {"data.streaming": True}))
    pipeline = pipeline_throughput(model, corpus)
    windowed, whole = window_fill(model, corpus)

    print(f"\ncorpus {corpus.stat().st_size / 1e9:.2f} GB; GPT-2 4x256, max length {MAX_LENGTH}, batch {BATCH}, "
          "one torch thread\n")
    print("| contender | time to first step (s) | peak RSS (GiB) | training tokens/s |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        if "first_step_s" in r:
            print(f"| {r['name']} | {r['first_step_s']:,.0f} | {r['peak_rss_gib']:.2f} | "
                  f"{r.get('train_tokens_per_s', float('nan')):,.0f} |")
        else:
            print(f"| {r['name']} | failed after {r['wall_s']:,.0f} s (exit {r['exit']}: {r['failed']}) | "
                  f"{r['peak_rss_gib']:.2f} | |")
    for r in rows:
        if "cache_gb" in r:
            print(f"\ndatasets cache after {r['name']}: {r['cache_gb']:.2f} GB (the JSON's Arrow and the prepared entry)")
    stream_row = next((r for r in rows if r["name"] == "stream" and "train_tokens_per_s" in r), None)
    ratio = f" ({pipeline / stream_row['train_tokens_per_s']:,.0f}x training)" if stream_row else ""
    print(f"\npacked stream alone: {pipeline:,.0f} tokens/s{ratio}")
    print(f"blocks filled: {windowed:.1%} packing windows of documents, {whole:.1%} packing 50,000 at once")
    (work / "results.json").write_text(json.dumps({"rows": rows, "pipeline_tokens_per_s": pipeline,
                                                   "fill_windowed": windowed, "fill_whole": whole}, indent=1))


if __name__ == "__main__":
    main()
