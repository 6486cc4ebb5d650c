"""Vision-language LoRA fine-tuning: finetune's vlm task and trl's SFTTrainer side by side, on CPU.

    python benchmarks/vlm.py                          # both families, 40 steps, batch 4 (under a minute, 2 cores)
    python benchmarks/vlm.py --families llava --steps 40 --warmup 5 --batch 8

The models are the tiny VLMs of tests/test_tasks_vlm.py, built from their configs (hidden 64, two layers, a
two-layer vision tower): LLaVA (16 image tokens per 16x16 image) and Qwen2-VL (4 image tokens per 16x16 image),
trained on the same shape rows (an image of a coloured shape, "what shape is this?", "a red circle."). Each
contender trains the same model from the same weights with the same LoRA (r=16, alpha=32, dropout 0, on the
language model's linear layers: `finetune.models.adapters.vlm_targets`), the same batch size, learning rate and
number of optimizer steps, fp32, no gradient checkpointing:
    finetune  rows prepared by finetune.data.vision_chat (the loss on the answers only), the VisionCollator,
              transformers' Trainer (finetune.tasks.vlm.make_trainer, as train_vlm does)
    trl       SFTTrainer with `processing_class=processor` and a dataset of PIL `images` + `messages`: its
              DataCollatorForVisionLanguageModeling renders each batch with the chat template (trl's defaults
              otherwise, except gradient checkpointing, off here as for finetune)

Each contender runs in a fresh subprocess, so that its peak resident memory (`resource.getrusage`'s max RSS,
model building and imports included) is its own. Reported:
    tokens/s     non-padding tokens of the timed steps (image tokens included) / their seconds
    s/step       the median wall time of a step after `--warmup` steps (collation included)
    peak RSS     max resident set size of the contender's process
    loss share   tokens whose label is not -100 / non-padding tokens, over the collated batches
A contender that cannot run (e.g. a family its collator cannot render offline) has its error in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny VLM builders and the shape rows of tests/test_tasks_vlm.py
sys.path.insert(0, str(ROOT))

CONTENDERS = ("finetune", "trl")
FAMILIES = ("llava", "qwen2_vl")


class Counting:
    """Wraps a collator: the non-padding tokens and the tokens carrying loss of every batch it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), int((batch["labels"] != -100).sum())))
        return batch


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def build(family: str):
    import test_tasks_vlm as tv

    return {"llava": tv.tiny_llava, "qwen2_vl": tv.tiny_qwen2_vl}[family]()


def training_args(cls, out: Path, a, **extra):
    return cls(output_dir=str(out), report_to=[], save_strategy="no", logging_steps=10, max_steps=a.steps,
               per_device_train_batch_size=a.batch, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
               seed=0, use_cpu=True, disable_tqdm=True, activation_checkpointing=False, remove_unused_columns=False,
               dataloader_num_workers=0, **extra)


def run_finetune(family: str, rows: list[dict], folder: Path, out: Path, a):
    from transformers import TrainingArguments

    from finetune.data import vision_chat as V
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import make_trainer, with_lora

    model, processor = build(family)
    examples, _ = V.prepare(processor, rows, "data.train", folder, 2048, "drop")
    model = with_lora(model, LoraSpec(r=16, alpha=32))
    clock = step_clock()
    trainer = make_trainer(model, processor, examples, None, training_args(TrainingArguments, out, a), [clock])
    trainer.data_collator = counting = Counting(trainer.data_collator)
    trainer.train()
    return clock, counting


def run_trl(family: str, rows: list[dict], folder: Path, out: Path, a):
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    from finetune.models.adapters import vlm_targets

    model, processor = build(family)
    dataset = Dataset.from_list([{"images": [Image.open(folder / p).convert("RGB") for p in r["images"]],
                                  "messages": r["messages"]} for r in rows])
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=vlm_targets(model))
    clock = step_clock()
    trainer = SFTTrainer(model=model, args=training_args(SFTConfig, out, a), train_dataset=dataset,
                         processing_class=processor, peft_config=lora, callbacks=[clock])
    trainer.data_collator = counting = Counting(trainer.data_collator)
    trainer.train()
    return clock, counting


def worker(contender: str, family: str, a) -> dict:
    import torch

    import test_tasks_vlm as tv

    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix=f"vlm-{contender}-{family}-"))
    rows = tv.shape_rows(root, a.steps * a.batch, seed=0)
    run = run_finetune if contender == "finetune" else run_trl
    clock, counting = run(family, rows, root, root / "out", a)
    seconds = [b - e for e, b in zip(clock.ends, clock.ends[1:])]
    timed = seconds[a.warmup:]
    batches = counting.batches[a.warmup:a.warmup + len(timed)]
    tokens = sum(t for t, _ in batches)
    return {"tokens_per_s": tokens / sum(timed), "s_per_step": statistics.median(timed),
            "loss_share": sum(loss for _, loss in counting.batches) / sum(t for t, _ in counting.batches),
            "tokens_per_step": tokens / len(batches), "steps": len(seconds),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(contender: str, family: str, a) -> dict:
    command = [sys.executable, __file__, "--worker", contender, "--families", family, "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--batch", str(a.batch), "--threads", str(a.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        errors = [x for x in done.stderr.strip().splitlines() if x.strip()] or ["no output"]
        return {"error": errors[-1][:120]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.families, a)), flush=True)
        return
    results = {(f, c): spawn(c, f, a) for f in a.families.split(",") for c in a.only.split(",")}
    print(f"\n{a.steps} steps ({a.warmup} untimed), batch {a.batch}, LoRA r=16 on the language model, fp32, "
          f"{a.threads} torch threads, wall time; one fresh process per contender")
    print("| family | contender | tokens/s | s/step | tokens/step | peak RSS (MB) | loss share |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (family, contender), r in results.items():
        if "error" in r:
            print(f"| {family} | {contender} | did not run: {r['error']} | | | | |")
        else:
            print(f"| {family} | {contender} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.3f} | "
                  f"{r['tokens_per_step']:.0f} | {r['peak_rss_mb']:.0f} | {r['loss_share']:.1%} |")


if __name__ == "__main__":
    main()
