"""What every task shares around `Trainer.train()`: the run directory, TrainingArguments from the
recipe, the per-step log, resume, metrics, the model card and the closing summary.

A run directory explains itself:

    run.json         the marker of a finetune run: task, method, base, status, step (training/rundir.py)
    recipe.yaml      the resolved recipe; `finetune <method> DIR/recipe.yaml` runs it again
    log.jsonl        one line per logging step (step, loss, learning rate, grad norm, tokens/s, time)
    metrics.json     final numbers, for the whole run across resumes (strict JSON)
    README.md        model card: base, data, recipe, metrics, how to use it
    chat.json        runs trained on conversations: the data format and template `generate`/`chat` apply
    checkpoints/     what --resume continues from, each with a manifest.json (training/checkpoints.py)
    <model files>    adapter_model.safetensors + adapter_config.json (LoRA) or model.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from finetune.errors import UserError, did_you_mean
from finetune.recipe.schema import Recipe
from finetune.training.checkpoints import checkpoint_step  # noqa: F401  (the tasks' resume step)
from finetune.training.runlog import append_log, last_logged, read_log, trim_log, whole_run


# ---------------------------------------------------------------------------------------
# Processes


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def launched_child() -> bool:
    """True inside a process started by `finetune ... --num-processes N` (the parent checked the run)."""
    return os.environ.get("FINETUNE_CHILD") == "1"


# ---------------------------------------------------------------------------------------
# Run directory (claimed by run/lifecycle.py before a task starts; see training/rundir.py and training/checkpoints.py)


def start_run(recipe: Recipe) -> Path:
    """Create the run directory and write the resolved recipe first, so even an interrupted run
    says how it was made. Only the main process writes."""
    run_dir = recipe.output_dir
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    return run_dir


def corpus_tokenizer(run_dir: Path, resume: bool, train: Callable[[], Any]):
    """A tokenizer trained on the corpus once per run.

    On --resume, the one saved with the checkpoint; with several processes, the main process trains
    it and the others load it. Training twice, even on the same corpus, can number the tokens
    differently, and the ranks or the resumed weights would then disagree about what an id means.
    """
    from transformers import AutoTokenizer

    checkpoint = resume_checkpoint(run_dir, report=False) if resume else None
    if checkpoint:
        return AutoTokenizer.from_pretrained(checkpoint)
    if world_size() == 1:
        return train()
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            tokenizer = train()
            tokenizer.save_pretrained(str(run_dir))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    return tokenizer


def resume_checkpoint(run_dir: Path, report: bool = True) -> str | None:
    """The newest complete checkpoint (printing which, and any damaged newer one skipped)."""
    from finetune.training.checkpoints import latest

    found = latest(run_dir, report=report and is_main_process())
    return str(found) if found else None


# ---------------------------------------------------------------------------------------
# Steps: small data trained long enough

MIN_STEPS = 100  # optimizer steps small data gets when train.epochs is not set: ...
MAX_AUTO_EPOCHS = 3  # ... by up to this many passes (trl's default epochs)
FEW_STEPS = 20  # fewer optimizer steps than this is worth a warning


def plan_steps(recipe: Recipe, rows: int, row_length: int | None = None) -> tuple[Recipe, list[str]]:
    """(recipe, lines to print): how many optimizer steps `rows` training rows make at this batch. When the
    recipe leaves train.epochs and train.max_steps unset and one pass is under MIN_STEPS steps, the run
    makes up to MAX_AUTO_EPOCHS passes: 600 short conversations are 52 steps per pass at the default batch,
    and more steps (not more rows per step) are what moves a LoRA adapter on so little data."""
    t = recipe.train
    per_step = t.batch_size * t.grad_accum * t.num_processes
    batches = math.ceil(rows / (t.batch_size * t.num_processes))  # per process
    per_epoch = max(1, math.ceil(batches / t.grad_accum))
    lines = []
    if t.max_steps > 0:
        steps, how = t.max_steps, f"train.max_steps, {t.max_steps / per_epoch:.2g} passes over the data"
    else:
        epochs = t.epochs
        unset = not {"epochs", "max_steps"} & t.model_fields_set
        if unset and per_epoch * epochs < MIN_STEPS and epochs < MAX_AUTO_EPOCHS:
            epochs = float(min(MAX_AUTO_EPOCHS, -(-MIN_STEPS // per_epoch)))  # >= 2: one pass is under MIN_STEPS
            recipe = recipe.model_copy(update={"train": t.model_copy(update={"epochs": epochs})})
            lines.append(f"train.epochs: {epochs:g} (unset: small data makes up to {MAX_AUTO_EPOCHS} passes to "
                         f"reach about {MIN_STEPS} optimizer steps; --epochs sets it)")
        steps, how = int(per_epoch * epochs), f"{epochs:g} epoch{'s' if epochs != 1 else ''} of {per_epoch}"
    accum = f" x {t.grad_accum} accumulated" if t.grad_accum > 1 else ""
    procs = f" x {t.num_processes} processes" if t.num_processes > 1 else ""
    tokens = f" of up to {row_length:,} tokens" if row_length else ""
    lines.insert(0, f"training: {steps:,} optimizer steps ({how}); {rows:,} rows{tokens}, {t.batch_size} per batch"
                    f"{accum}{procs} = {per_step} rows per step")
    if steps < FEW_STEPS:
        lines.append(f"warning: only {steps} optimizer steps: too few for the learning-rate warm-up and schedule to "
                     "do their work; lower train.batch_size, raise --epochs or give more data")
    return recipe, lines


# ---------------------------------------------------------------------------------------
# TrainingArguments


def training_arguments(recipe: Recipe, run_dir: Path, args_cls=None, **task_defaults: Any):
    """TrainingArguments (or a subclass such as Seq2SeqTrainingArguments / trl configs) from the
    recipe. Precedence: recipe.train fields < task defaults < recipe.train.trainer_args."""
    import torch

    if args_cls is None:
        from transformers import TrainingArguments as args_cls

    t = recipe.train
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        learning_rate=recipe.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=bool(t.bf16),
        fp16=t.fp16,
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Non-finite losses are logged as they are (the default replaces them with an average, which
        # hides a diverging run); with train.nan_patience, skipped steps' losses are left out.
        logging_nan_inf_filter=t.nan_patience > 0,
        train_sampling_strategy="group_by_length" if groups_by_length(recipe) else "random",
    )
    if recipe.method == "lora" or recipe.task == "clm":
        # Every parameter that trains takes part in each step: a LoRA adapter's, and all of a causal LM's. The
        # Trainer's default (True without gradient checkpointing) costs an extra pass over the graph per step
        # and warns on every rank. Other tasks keep it: a checkpoint's pooler, say, may never be used.
        kwargs["ddp_find_unused_parameters"] = False
    from finetune.training.extras import trainer_fields

    kwargs.update(trainer_fields(recipe, run_dir))  # trackers, kernels, best checkpoint
    kwargs.update(task_defaults)
    fields = {f.name for f in dataclasses.fields(args_cls)}
    if "activation_checkpointing" in fields:  # the transformers >= 5.2x name
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    unknown = [k for k in t.trainer_args if k not in fields]
    if unknown:
        raise UserError([f"train.trainer_args.{k}: not a {args_cls.__name__} field{did_you_mean(k, fields)}"
                         for k in unknown])
    kwargs.update(t.trainer_args)
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    try:
        return args_cls(**kwargs)
    except ValueError as e:
        raise UserError(f"train: {e}") from e


def groups_by_length(recipe: Recipe) -> bool:
    """Batches of texts of similar length (transformers' LengthGroupedSampler: shuffled groups of
    50 batches, sorted within) pad less. Not for packed rows (already full) or image tasks, and not
    by default for classification: where text length follows the label, length-sorted batches hold
    one class each and training stalls (tests/test_tasks_classification.py's text-pair task: 0.52
    accuracy grouped, >= 0.9 not)."""
    if recipe.train.group_by_length is False or recipe.data.streaming:  # a stream has no lengths to sort by
        return False
    if recipe.task == "clm":
        return recipe.data.packing is False
    if recipe.task == "mlm":
        return not recipe.data.packing
    if recipe.task == "classification":
        return recipe.train.group_by_length is True
    return recipe.task == "translation"


def longest_first(ds, column: str = "input_ids"):
    """An eval split ordered by length, longest first. Evaluation metrics do not depend on the order
    and batches of similar lengths pad less (all-MiniLM-L6-v2 on 300 short reviews: 35% fewer tokens,
    ~35% less evaluation time); the longest batch runs first, so one that cannot fit fails at once."""
    lengths = [len(x) for x in ds[column]]
    return ds.select(sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True))


# ---------------------------------------------------------------------------------------
# Logging


def callbacks(recipe: Recipe, run_dir: Path, resume_step: int = 0) -> list:
    """What every Trainer of a run gets: the log, the guards (training/guards.py), checkpoint manifests."""
    from finetune.training.checkpoints import manifest_callback
    from finetune.training.guards import guard_callback

    return [log_callback(run_dir, resume_step), guard_callback(recipe.train.nan_patience), manifest_callback()]


def finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite number is written as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def log_callback(run_dir: Path, resume_step: int = 0):
    """A TrainerCallback writing log.jsonl on the main process. On resume, lines after the
    checkpoint's step are dropped so the log reads as one uninterrupted run.

    Each line is strict JSON (a non-finite value is null, its key listed under "nonfinite");
    `loss_steps` is the number of steps a logged loss averages over and `time_s` the training
    time so far, across resumes, so that metrics.json can cover the whole run."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def __init__(self):
            self.last_time = None
            self.last_tokens = 0
            self.last_step = 0
            self.offset = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.last_step = state.global_step
            if not state.is_world_process_zero:
                return
            trim_log(run_dir, resume_step)
            self.offset = max((r.get("time_s") or 0.0 for r in read_log(run_dir)), default=0.0)
            self.started = time.perf_counter()
            self.last_time, self.last_tokens = self.started, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            record.update({k: finite(v) for k, v in numbers.items()})
            bad = [k for k, v in numbers.items() if finite(v) is None]
            if bad:
                record["nonfinite"] = bad
            if "loss" in logs:
                record["loss_steps"] = state.global_step - self.last_step
                self.last_step = state.global_step
                if self.last_time is not None:
                    tokens = state.num_input_tokens_seen
                    elapsed = max(now - self.last_time, 1e-9)
                    record["tokens_per_s"] = round((tokens - self.last_tokens) / elapsed, 1)
                    self.last_time, self.last_tokens = now, tokens
            record["time_s"] = round(self.offset + now - self.started, 3)
            append_log(run_dir, record)

    return JsonlLog()


# ---------------------------------------------------------------------------------------
# Metrics, summary (the model card: finetune/hub/card.py)


def run_metrics(trainer, train_output, eval_metrics: dict[str, float] | None, model) -> dict[str, Any]:
    from finetune.models.pretrained import count_parameters

    state = trainer.state
    run_dir = Path(trainer.args.output_dir).parent
    # After a resume the Trainer's own figures cover only the resumed part; the log covers the whole run.
    loss, seconds = whole_run(run_dir)
    runtime = max(seconds or 0.0, train_output.metrics.get("train_runtime", 0.0))
    trainable, total = count_parameters(model)
    tokens = int(state.num_input_tokens_seen)
    metrics: dict[str, Any] = {
        "train_loss": round(loss if loss is not None else train_output.training_loss, 6),
        "final_train_loss": last_logged(run_dir, "loss"),
        "steps": state.global_step,
        "epochs": round(state.epoch or 0, 4),
        "tokens_seen": tokens,
        "runtime_s": round(runtime, 2),
        "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
        "trainable_params": trainable,
        "total_params": total,
        "world_size": trainer.args.world_size,
    }
    for k, v in (eval_metrics or {}).items():
        if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith(("_runtime", "per_second")):
            metrics[k] = round(v, 6)
    if "eval_loss" in metrics:
        metrics["perplexity"] = round(math.exp(min(metrics["eval_loss"], 50.0)), 4)
    if getattr(state, "best_global_step", None) and trainer.args.load_best_model_at_end:
        metrics["best_step"] = state.best_global_step  # the weights saved (train.keep_best / early stopping)
    import torch

    if torch.cuda.is_available():  # what `finetune plan` estimates
        metrics["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    from finetune.launch.replicas import replica_state

    metrics.update(replica_state(model))  # a collective: every rank gets here
    if fingerprints := metrics.get("replica_fingerprints"):
        if len(set(fingerprints)) > 1 and is_main_process():
            print("warning: the ranks finished with different weights (replica_fingerprints in metrics.json); "
                  "data-parallel replicas should be identical", flush=True)
    return metrics


def finish_run(recipe: Recipe, run_dir: Path, metrics: dict[str, Any], usage: str, next_steps: list[str]) -> None:
    """Write metrics.json and the model card, then print where everything is and what to run next."""
    if not is_main_process():
        return
    # A pickled copy of TrainingArguments: not needed to load the model, and it would hold a Hub
    # token in plain text if one was passed.
    (run_dir / "training_args.bin").unlink(missing_ok=True)
    metrics = {k: finite(v) for k, v in metrics.items()}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    from finetune.hub.card import write_card

    write_card(recipe, run_dir, metrics, usage)
    print_summary(recipe, run_dir, metrics, next_steps)


def print_summary(recipe: Recipe, run_dir: Path, metrics: dict[str, Any], next_steps: list[str]) -> None:
    shown = ["final_train_loss", "best_step", "eval_loss", "perplexity", "eval_accuracy", "eval_f1", "eval_bleu",
             "tokens_seen", "tokens_per_s", "runtime_s", "trainable_params", "total_params"]
    lines = [f"\nfinetune {recipe.method} ({recipe.task}) finished: {run_dir}/"]
    for k in shown:
        if metrics.get(k) is not None:
            v = metrics[k]
            if k.endswith("_params"):
                v = f"{v:,}"
            elif isinstance(v, float):
                v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
            lines.append(f"  {k:<18} {v}")
    lines.append(f"  {'files':<18} {run_dir}/{{run.json, recipe.yaml, metrics.json, log.jsonl, README.md, checkpoints/}}")
    if next_steps:
        lines.append("next:")
        lines += [f"  {s}" for s in next_steps]
    print("\n".join(lines), flush=True)
