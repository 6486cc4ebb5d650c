"""The run lifecycle: every way of training goes through `execute` (the training verbs, `chain`,
`demo`, and the ranks that `accelerate launch -m finetune` starts).

    resolve     flags + --set + recipe file (or, for `--resume -o DIR`, the run's own recipe.yaml)
    preflight   everything that can fail before training: the run directory, precision, the
                distributed preset, quantisation, the model files, the data files, memory
    claim       only now is the run directory taken (rundir.Claim; --overwrite moves the old run
                aside, deleted only when the new one finishes)
    train       the task's `run` under guards (training/guards.py): SIGTERM/SIGINT save a checkpoint and stop,
                non-finite gradients stop the run; train.auto_batch_size retries on out-of-memory
    finish      run.json says finished, interrupted or failed; a failed start leaves nothing behind
"""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path
from typing import Any

from finetune.errors import Stopped, UserError
from finetune.launch.offline import use_offline_defaults as env_defaults
from finetune.recipe.schema import Recipe
from finetune.recipe.tasks import load_task, task_info
from finetune.training import checkpoints
from finetune.training import guards
from finetune.training import rundir
from finetune.training.session import is_main_process, launched_child, world_size

def command_verb(recipe: Recipe) -> str:
    """The verb that runs this recipe: a task's own (reward, dpo, ...) or the method's (lora, full, pretrain)."""
    return recipe.task if task_info(recipe.task).verb else recipe.method


# ---------------------------------------------------------------------------------------
# 1. Resolve


def resolve(method: str | None, recipe_name: str | None, overrides: dict[str, Any], sets: list[str] | None,
            resume: bool, allow_chain: bool = False) -> Recipe:
    from finetune.recipe.load import build_recipe, find_recipe, load_recipe, read_recipe_file

    overrides = {"method": method, **overrides}  # None: the recipe's own method (default lora)
    # `--resume -o DIR` alone continues DIR with the recipe it was started with.
    if recipe_name is None and resume and overrides.get("train.output_dir"):
        run_dir = Path(overrides["train.output_dir"])
        saved = run_dir / "recipe.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: '{run_dir}' holds no finetune run (no recipe.yaml); start one there "
                            "without --resume")
        return build_recipe(read_recipe_file(saved), overrides, sets)
    if recipe_name is not None:
        find_recipe(recipe_name)
    recipe = load_recipe(recipe_name, overrides, sets)
    if recipe.stages and not allow_chain:
        raise UserError(f"recipe: '{recipe_name}' is a chain (it has stages); run it with "
                        f"`finetune chain {recipe_name}`")
    return recipe


# ---------------------------------------------------------------------------------------
# 2. Pre-flight


def owns_run_dir(recipe: Recipe) -> bool:
    """The process that checks, claims and settles the run directory: machine 0's launcher, or rank 0."""
    return is_main_process() and recipe.train.machine_rank == 0 and not launched_child()


def preflight(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Everything that can fail before training, checked before anything is created or deleted."""
    from finetune.data import sources
    from finetune.launch.relaunch import check_distributed
    from finetune.models import pretrained
    from finetune.training.precision import check_precision

    if owns_run_dir(recipe):
        rundir.check(recipe.output_dir, overwrite, resume, checkpoints.latest(recipe.output_dir) is not None)
    check_precision(recipe)
    check_distributed(recipe)
    from finetune.training.extras import check_extras

    check_extras(recipe)  # LoRA variants, trackers, kernels, early stopping, push_to_hub
    if recipe.model.name:
        pretrained.check_model_files(recipe.model.name, "model.name", recipe.model.gguf_file, recipe.model.revision)
    sources.check_sources(recipe.data)
    from finetune.models.quantization import check_quantizable, skeleton

    model = None  # the model on the meta device, built once for both checks below
    if recipe.quant.bits and task_info(recipe.task).quantizable:  # the others refuse quant.bits with their reason
        model = skeleton(recipe.model, recipe.task)
        check_quantizable(recipe, model)
    if recipe.train.distributed == "ddp" and recipe.train.num_processes == 1 and recipe.train.num_machines == 1:
        print("note: --distributed ddp with one process runs without a launcher; pass --num-processes N", flush=True)
    import torch

    if torch.cuda.is_available() and recipe.model.name:
        from finetune.models.memory import estimate, fit_problems

        for p in fit_problems(recipe, estimate(recipe, model)):
            print(f"warning: {p}", flush=True)


def finished_metrics(recipe: Recipe, run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a finished run that `--resume` asks nothing more of (no more steps or epochs than it
    trained); None when there is training to do."""
    if rundir.status(run_dir) != "finished":
        return None
    try:
        done = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if recipe.train.max_steps > 0:
        more = recipe.train.max_steps > int(done.get("steps") or 0)
    else:
        more = recipe.train.epochs > float(done.get("epochs") or 0) + 1e-9
    return None if more else done


# ---------------------------------------------------------------------------------------
# 3-5. Claim, train under guards, finish


def execute(recipe: Recipe, resume: bool = False, overwrite: bool = False,
            callbacks: list | None = None) -> dict[str, Any] | None:
    """Run one training job from a resolved recipe. Returns its metrics (None on other machines' launchers
    and on ranks other than 0 of a multi-process run). `callbacks` go to the task's trainer."""
    from finetune.launch.relaunch import needs_launch
    from finetune.training.precision import resolve_precision

    env_defaults()
    requested = rundir.fingerprint(recipe.to_yaml())
    recipe = resolve_precision(recipe, say=is_main_process() and not launched_child())
    run_dir = recipe.output_dir
    owner = owns_run_dir(recipe)
    if not launched_child():
        preflight(recipe, resume, overwrite)
        done = finished_metrics(recipe, run_dir) if resume and owner else None
        if done is not None:
            print(f"'{run_dir}' holds a finished run (step {done.get('steps')}); nothing to do. To train it further, "
                  "pass --max-steps or --epochs beyond the run's own with --resume", flush=True)
            return done
    claim = None
    if owner:
        claim = rundir.Claim(run_dir, overwrite, resume, {"task": recipe.task, "method": recipe.method,
                                                           "base": recipe.model.name or recipe.model.config,
                                                           "requested": requested})
    if world_size() > 1 and not launched_child():  # `accelerate launch -m finetune`: rank 0 claimed first
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    if not launched_child() and world_size() == 1 and needs_launch(recipe):
        return launch(recipe, resume, claim)
    return train(recipe, resume, claim, callbacks)


# ---------------------------------------------------------------------------------------
# Automatic batch size


def is_out_of_memory(e: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(e) or type(e).__name__ == "OutOfMemoryError"


def halve_batch(recipe: Recipe) -> Recipe:
    """Half the micro-batch, twice the accumulation: the effective batch (and so the optimisation) is
    unchanged. The Trainer's own auto_find_batch_size shrinks by 10% per attempt and leaves the
    effective batch smaller; halving finds a fitting size in a few attempts."""
    t = recipe.train
    if t.batch_size == 1:
        raise UserError("train.auto_batch_size: out of memory even with train.batch_size=1; use "
                        "--quant 4bit, --bf16, train.gradient_checkpointing=true, a shorter data.max_length, "
                        "or more processes with --distributed fsdp")
    train = t.model_copy(update={"batch_size": t.batch_size // 2, "grad_accum": t.grad_accum * 2,
                                 "eval_batch_size": t.eval_batch_size // 2 if t.eval_batch_size else None})
    return recipe.model_copy(update={"train": train})


def run_with_auto_batch(recipe: Recipe, run):
    """`run(recipe)`, and with train.auto_batch_size again on out-of-memory with half the batch."""
    import gc

    while True:
        try:
            return run(recipe)
        except Exception as e:
            if not (recipe.train.auto_batch_size and is_out_of_memory(e)):
                raise
        smaller = halve_batch(recipe)
        print(f"out of memory with train.batch_size={recipe.train.batch_size}; starting again with "
              f"batch_size={smaller.train.batch_size} and grad_accum={smaller.train.grad_accum} "
              "(same effective batch)", flush=True)
        recipe = smaller
        gc.collect()
        free_device_cache()


def free_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(recipe: Recipe, resume: bool, claim: rundir.Claim | None,
          callbacks: list | None = None) -> dict[str, Any] | None:
    from finetune.launch.relaunch import fsdp_on_cpu
    from finetune.training.callbacks import run_callbacks

    fsdp_on_cpu()  # a rank on CPU under an FSDP config shards as on GPUs
    task = load_task(recipe.task)
    try:
        with guards.installed():
            metrics = run_with_auto_batch(recipe, lambda r: task.run(r, resume=resume,
                                                                     callbacks=[*run_callbacks(r), *(callbacks or [])]))
    except guards.Interrupted as e:
        settle(recipe, claim, "interrupted", e.step)
        raise Stopped(interrupted_lines(recipe, e.step) if is_main_process() else [], e.exit_code) from e
    except KeyboardInterrupt as e:  # the second Ctrl-C
        settle(recipe, claim, "interrupted", None)
        raise Stopped(interrupted_lines(recipe, None), 130) from e
    except guards.Diverged as e:
        settle(recipe, claim, "failed", e.step)
        raise Stopped(diverged_lines(recipe, e) if is_main_process() else [], 3) from e
    except BaseException as e:
        full = disk_full(e, recipe.output_dir)
        if full is None:
            settle(recipe, claim, "failed", None)
            raise
        dropped = checkpoints.drop_unfinished(recipe.output_dir) if is_main_process() else []
        lines = disk_full_lines(recipe, full, dropped)  # before settling: it removes a run with nothing to resume
        try:
            settle(recipe, claim, "failed", None)
        except OSError:  # still no room for run.json
            pass
        raise Stopped(lines if is_main_process() else [], 1) from e
    settle(recipe, claim, "finished", (metrics or {}).get("steps"))
    return metrics


def settle(recipe: Recipe, claim: rundir.Claim | None, outcome: str, step: int | None) -> None:
    """Record the outcome; a finished run is pushed when train.push_to_hub asks. Rank 0 of launched children
    records the outcome for the launcher to read."""
    if claim is not None:
        note = claim.close(outcome, checkpoints.latest(recipe.output_dir) is not None, step)
        if note:
            print(note, flush=True)
        if outcome == "finished":
            from finetune.hub.push import push_after_run
            from finetune.use.evaluate import evaluate_after_run

            evaluate_after_run(recipe)  # before the push: the card then carries the scores
            push_after_run(recipe)
    elif launched_child() and is_main_process() and (recipe.output_dir / rundir.MARKER).is_file():
        rundir.write_marker(recipe.output_dir, status=outcome, **({"step": step} if step is not None else {}))


def launch(recipe: Recipe, resume: bool, claim: rundir.Claim | None) -> None:
    """Several processes through `accelerate launch`, SIGTERM forwarded to them; the outcome from run.json."""
    from finetune.launch.relaunch import relaunch

    code = relaunch(recipe, resume)
    outcome = rundir.status(recipe.output_dir) if recipe.output_dir.is_dir() else "failed"
    if code == 0:
        settle(recipe, claim, "finished", None)
        return None
    if outcome == "interrupted" or code in (130, 143, -signal.SIGTERM, -signal.SIGINT):
        settle(recipe, claim, "interrupted", None)
        raise Stopped(interrupted_lines(recipe, None), 130 if code in (130, -signal.SIGINT) else 143)
    settle(recipe, claim, "failed", None)
    local = recipe.train.num_processes // recipe.train.num_machines
    raise Stopped([f"error: --num-processes: the {local} process{'es' if local > 1 else ''} on this machine "
                   f"failed (exit code {code}); the lines above say why"], 3 if outcome == "failed" else 1)


def resume_command(recipe: Recipe) -> str:
    return f"finetune {command_verb(recipe)} --resume -o {recipe.output_dir}"


def interrupted_lines(recipe: Recipe, step: int | None) -> list[str]:
    last = checkpoints.latest(recipe.output_dir)
    if last is None:
        return [f"interrupted before the first checkpoint; nothing was kept to resume from. Start again with: "
                f"finetune {command_verb(recipe)} ... -o {recipe.output_dir}"]
    at = f" at step {step}" if step is not None else ""
    return [f"interrupted{at}: saved {last}", f"continue with: {resume_command(recipe)}"]


def disk_full(e: BaseException, output_dir) -> str | None:
    """Why a failure was a full disk (or quota), else None. torch.save reports a full disk as a RuntimeError
    of its zip writer ("unexpected pos"), with the OSError, if any, further down the chain; a file system
    with no byte left is read as full too."""
    import shutil

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code, text = getattr(e, "errno", None), str(e)
        if code == errno.EDQUOT or "Disk quota exceeded" in text:
            return "the disk quota is used up"
        if code == errno.ENOSPC or "No space left on device" in text:
            return "the disk is full"
        e = e.__cause__ or e.__context__
    try:
        return "the disk is full" if shutil.disk_usage(output_dir).free < 2**16 else None
    except OSError:
        return None


def disk_full_lines(recipe: Recipe, why: str, dropped: list) -> list[str]:
    """The checkpoint being written when the disk filled up is removed; the last complete one (the Trainer
    deletes older ones only after a new one is saved) is what --resume continues from."""
    last = checkpoints.latest(recipe.output_dir)
    removed = f" (the unfinished {', '.join(d.name for d in dropped)} was removed)" if dropped else ""
    if last is None:
        return [f"error: {why} under {recipe.output_dir}: the run stopped before its first complete checkpoint, "
                "so nothing was kept",
                f"fix: free space (or choose an --output on a larger disk), then start again: finetune "
                f"{command_verb(recipe)} ... -o {recipe.output_dir}"]
    return [f"error: {why} under {recipe.output_dir}: the run stopped; its last complete checkpoint is {last} "
            f"(step {checkpoints.checkpoint_step(last)}){removed}",
            f"fix: free space, then continue with: {resume_command(recipe)}"]


def diverged_lines(recipe: Recipe, e: guards.Diverged) -> list[str]:
    last = checkpoints.latest(recipe.output_dir)
    kept = (f"the last good checkpoint is {last} (step {checkpoints.checkpoint_step(last)})" if last else
            "no checkpoint was saved before it")
    precision = ("fp16 overflows easily: use --bf16 where the device has it"
                 if recipe.train.fp16 else "try bf16 instead of fp16 on GPUs that have it")
    return [f"error: training diverged at step {e.step}: {e.what}; no model was written as the result, and "
            f"{kept}",
            f"fix: lower train.learning_rate (now {recipe.learning_rate:g}), add warm-up (train.warmup=0.05), keep "
            f"gradient clipping on (train.max_grad_norm=1.0), or {precision}; train.nan_patience=N skips up to "
            "N bad steps in a row"]
