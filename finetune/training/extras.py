"""Optional parts of a run and the checks that they can work here, before anything loads: trackers
(`train.report_to`), attention implementations and kernels (`model.attn_implementation`,
`train.liger_kernel`, `train.torch_compile`, `train.neftune_noise_alpha`), early stopping, LoRA
variants and `train.push_to_hub`. Each tracker is an optional extra of the distribution
(`pip install "finetune-toolkit[tensorboard]"`); a missing one is named with its install command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.hub.card import DISTRIBUTION
from finetune.recipe.schema import Recipe
from finetune.training.callbacks import NOT_TRAINER_TASKS, best_model_fields, best_problems

# tracker -> (modules, any of which will do; the extra that installs one)
TRACKER_MODULES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "trackio": ("trackio",)}
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
IMAGE_TASKS = ("image-classification", "captioning")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def trackers(recipe: Recipe) -> list[str]:
    names = [recipe.train.report_to] if isinstance(recipe.train.report_to, str) else list(recipe.train.report_to)
    return [n for n in names if n != "none"]


def tracker_problems(recipe: Recipe) -> list[str]:
    names = trackers(recipe)
    if names and recipe.task in NOT_TRAINER_TASKS:
        return [f"train.report_to: `finetune {recipe.task}` writes log.jsonl only (no trackers); drop it"]
    return [f"train.report_to: {n} is not installed; pip install \"{DISTRIBUTION}[{n}]\""
            for n in names if not any(installed(m) for m in TRACKER_MODULES[n])]


def tracker_env(run_dir: Path, names: list[str]) -> None:
    """Point each tracker at the run directory where it allows it: TensorBoard event files in
    RUN/tensorboard, an MLflow file store in RUN/mlruns, W&B's local files in RUN/wandb, trackio's
    database in RUN/trackio. A value the user set is kept; one set for an earlier run in this process
    is replaced."""
    run_dir = Path(run_dir).resolve()
    wanted = {"tensorboard": ("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard")),
              "mlflow": ("MLFLOW_TRACKING_URI", (run_dir / "mlruns").as_uri()),
              "wandb": ("WANDB_DIR", str(run_dir)),
              "trackio": ("TRACKIO_DIR", str(run_dir / "trackio"))}
    for name in names:
        key, value = wanted[name]
        if os.environ.get(key) in (None, SET_BY_US.get(key)):
            os.environ[key] = SET_BY_US[key] = value


SET_BY_US: dict[str, str] = {}


def kernel_problems(recipe: Recipe, cuda: bool) -> list[str]:
    t, out = recipe.train, []
    attn = recipe.model.attn_implementation
    if attn == "flash_attention_2":
        if not cuda:
            out.append("model.attn_implementation: flash_attention_2 needs a CUDA GPU and this machine has none; "
                       "use sdpa")
        elif not installed("flash_attn"):
            out.append("model.attn_implementation: flash_attention_2 needs the flash-attn package; pip install "
                       "flash-attn --no-build-isolation, or use sdpa")
    elif attn == "flash_attention_3":
        if not cuda:
            out.append("model.attn_implementation: flash_attention_3 needs a CUDA GPU (Hopper) and this machine has "
                       "none; use sdpa")
        elif not installed("flash_attn_interface"):
            out.append("model.attn_implementation: flash_attention_3 needs FlashAttention 3 (flash_attn_interface, "
                       "built from the hopper/ folder of flash-attention); or use flash_attention_2 / sdpa")
    elif attn and "/" in attn:
        if not installed("kernels"):
            out.append(f"model.attn_implementation: the Hub kernel '{attn}' needs the kernels package; pip install "
                       "kernels")
    elif attn and attn not in ATTENTION:
        out.append(f"model.attn_implementation: unknown '{attn}'; choose {', '.join(ATTENTION)}, or a Hub kernel "
                   "as org/repo")
    if attn and recipe.method == "pretrain":
        out.append("model.attn_implementation: applies to loaded checkpoints; pretraining builds a GPT-2 with "
                   "transformers' default attention: drop it")
    trainer_only = [k for k in ("liger_kernel", "torch_compile") if getattr(t, k)]
    trainer_only += ["neftune_noise_alpha"] if t.neftune_noise_alpha else []
    if recipe.task in NOT_TRAINER_TASKS:
        return out + [f"train.{k}: `finetune {recipe.task}` has its own training loop; drop it" for k in trainer_only]
    if t.liger_kernel:
        if not cuda:
            out.append("train.liger_kernel: Liger's kernels run on CUDA GPUs (Triton) and this machine has none; "
                       "drop it")
        elif not installed("liger_kernel"):
            out.append("train.liger_kernel: the liger-kernel package is not installed; pip install liger-kernel")
    if t.neftune_noise_alpha and recipe.task in IMAGE_TASKS:
        out.append(f"train.neftune_noise_alpha: NEFTune adds noise to token embeddings; the {recipe.task} task "
                   "trains on images: drop it")
    return out


def trainer_fields(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """TrainingArguments for trackers, kernels and the best checkpoint."""
    names = trackers(recipe)
    tracker_env(run_dir, names)
    t = recipe.train
    fields: dict[str, Any] = {"report_to": names or "none", "torch_compile": t.torch_compile,
                              "use_liger_kernel": t.liger_kernel}
    if t.neftune_noise_alpha:
        fields["neftune_noise_alpha"] = t.neftune_noise_alpha
    if names:
        fields["run_name"] = Path(run_dir).name
    return {**fields, **best_model_fields(recipe)}


def extras_problems(recipe: Recipe) -> list[str]:
    import torch

    from finetune.models.adapters import lora_problems

    out = lora_problems(recipe) + tracker_problems(recipe) + kernel_problems(recipe, torch.cuda.is_available())
    out += best_problems(recipe)
    if recipe.train.push_to_hub:
        from finetune.hub.push import push_problems

        out += push_problems("train.push_to_hub")
    if recipe.train.eval_tasks:
        out += eval_problems(recipe)
    return out


def eval_problems(recipe: Recipe) -> list[str]:
    """train.eval_tasks: a causal LM, lm-eval installed, and the local task files there (checked before
    training, so that a run does not end with an evaluation that cannot start)."""
    import importlib.util

    problems = []
    if recipe.task != "clm":
        problems.append(f"train.eval_tasks: scores causal language models (lm-eval); this run's task is "
                        f"{recipe.task}; drop it")
    if importlib.util.find_spec("lm_eval") is None:
        problems.append("train.eval_tasks: lm-evaluation-harness is not installed; pip install "
                        "'finetune-toolkit[eval]' (or lm-eval)")
    for item in recipe.train.eval_tasks or []:
        if item.endswith((".jsonl", ".yaml", ".yml")) and not Path(item).expanduser().is_file():
            problems.append(f"train.eval_tasks: no such file '{item}'")
    return problems


def check_extras(recipe: Recipe) -> None:
    """Pre-flight: every optional part of the recipe can run on this machine; all problems at once."""
    problems = extras_problems(recipe)
    if problems:
        raise UserError(problems)
