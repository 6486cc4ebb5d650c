"""SIGTERM at a random step, then --resume: how many runs end bit-exact with an uninterrupted one.

    python benchmarks/interruptions.py --trials 6                 # a tiny GPT it builds itself
    python benchmarks/interruptions.py --model DIR --data FILE    # your own (a causal LM and a text file)

Each trial starts `finetune full` (120 steps, a checkpoint every 25), waits until a random number of
steps is logged, sends SIGTERM, checks the exit code (143), resumes with `--resume` and compares the
final weights with those of one uninterrupted run, tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tiny_model_and_data(root: Path) -> tuple[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import new_tiny_gpt, toy_sentences, write_jsonl  # the test suite's tiny GPT and corpus

    model, tokenizer = new_tiny_gpt(32)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return str(root / "model"), write_jsonl(root / "train.jsonl", [{"text": t} for t in toy_sentences(200)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model")
    parser.add_argument("--data")
    args = parser.parse_args()
    from safetensors.torch import load_file

    root = Path(tempfile.mkdtemp(prefix="finetune-interruptions-"))
    model, data = (args.model, args.data) if args.model else tiny_model_and_data(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 120
    command = [sys.executable, "-m", "finetune", "full", "--model", model, "--data", data, "--max-steps", str(steps),
               "--set", "train.logging_steps=1", "--set", "train.save_steps=25", "--set", "train.batch_size=4"]
    subprocess.run([*command, "-o", str(root / "whole")], env=env, capture_output=True, check=True)
    reference = load_file(str(root / "whole" / "model.safetensors"))
    rng, exact = random.Random(args.seed), 0
    for i in range(args.trials):
        out, target = root / f"trial-{i}", rng.randint(3, steps - 20)
        proc = subprocess.Popen([*command, "-o", str(out)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        log = out / "log.jsonl"
        while proc.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < target):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate()
        stopped = json.loads((out / "run.json").read_text()).get("step") if (out / "run.json").exists() else None
        resumed = subprocess.run([sys.executable, "-m", "finetune", "full", "--resume", "-o", str(out)], env=env,
                                 capture_output=True, text=True)
        same = resumed.returncode == 0 and (out / "model.safetensors").exists() and all(
            (load_file(str(out / "model.safetensors"))[k] == v).all() for k, v in reference.items())
        exact += same
        print(f"trial {i}: SIGTERM after {target} logged steps, exit {proc.returncode}, stopped at step {stopped}, "
              f"resume exit {resumed.returncode}, bit-exact {same}", flush=True)
        if not same:
            print(stderr[-1500:] + resumed.stderr[-1500:], flush=True)
    print(f"{exact} of {args.trials} bit-exact")


if __name__ == "__main__":
    main()
