"""What a run attaches to its Trainer besides the per-step log: early stopping and the best
checkpoint (transformers' EarlyStoppingCallback and load_best_model_at_end), and the console.

    train.eval_steps: 50
    train.early_stopping_patience: 3     # stop after 3 evaluations without improvement
    train.keep_best: true                # the run saves the best evaluation's weights, not the last
    train.metric_for_best: eval_loss     # unset: the task's default (BEST_METRIC)

`best_model_fields(recipe)` are the TrainingArguments fields, `run_callbacks(recipe)` the callbacks a
Trainer-based task is given (`task.run(recipe, callbacks=...)`).
"""

from __future__ import annotations

from typing import Any

from finetune.recipe.schema import Recipe

# The eval metric that says "better" for each task (transformers infers the direction: *loss is lower).
BEST_METRIC = {
    "clm": "eval_loss", "mlm": "eval_loss", "classification": "eval_accuracy",
    "image-classification": "eval_accuracy", "translation": "eval_bleu", "captioning": "eval_bleu",
    "reward": "eval_accuracy", "dpo": "eval_rewards/accuracies", "grpo": "eval_reward",
}
NOT_TRAINER_TASKS = ("ppo",)  # tasks with their own loop: TrainingArguments-only keys do not apply


def keeps_best(recipe: Recipe) -> bool:
    t = recipe.train
    return bool(t.keep_best or t.early_stopping_patience or t.metric_for_best)


def best_metric(recipe: Recipe) -> str:
    name = recipe.train.metric_for_best or BEST_METRIC.get(recipe.task, "eval_loss")
    return name if name.startswith("eval_") else f"eval_{name}"


def best_problems(recipe: Recipe) -> list[str]:
    t = recipe.train
    if not keeps_best(recipe):
        return []
    key = ("train.early_stopping_patience" if t.early_stopping_patience else
           "train.keep_best" if t.keep_best else "train.metric_for_best")
    if recipe.task in NOT_TRAINER_TASKS:
        return [f"{key}: `finetune {recipe.task}` has its own training loop without evaluations to compare; drop it"]
    out = []
    if not t.eval_steps:
        out.append(f"{key}: needs evaluations to compare; set train.eval_steps=N (an evaluation every N steps)")
    if not recipe.data.eval and recipe.data.eval_fraction == 0:
        out.append(f"{key}: needs evaluation data; set data.eval, or data.eval_fraction above 0")
    return out


def best_model_fields(recipe: Recipe) -> dict[str, Any]:
    """TrainingArguments for keeping the best checkpoint: a checkpoint at every evaluation (transformers
    requires save steps to be a multiple of eval steps), the best one loaded back at the end."""
    if not keeps_best(recipe) or not recipe.train.eval_steps:
        return {}
    return {"load_best_model_at_end": True, "metric_for_best_model": best_metric(recipe),
            "save_strategy": "steps", "save_steps": recipe.train.eval_steps}


def best_callbacks(recipe: Recipe) -> list:
    from transformers import EarlyStoppingCallback, TrainerCallback

    if not keeps_best(recipe):
        return []

    class ReportBest(TrainerCallback):
        """Says which evaluation's weights the run keeps (state.best_global_step)."""

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero and state.best_global_step:
                print(f"best: step {state.best_global_step} ({args.metric_for_best_model} "
                      f"{state.best_metric:.4g}); the run saves that model", flush=True)

    out = [ReportBest()]
    if recipe.train.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))
    return out


def run_callbacks(recipe: Recipe, debug: bool = False) -> list:
    """The callbacks every Trainer-based task gets from the run lifecycle."""
    if recipe.task in NOT_TRAINER_TASKS:
        return []
    from finetune.training.console import install

    install()  # the Trainer's progress callback becomes finetune.training.console.ConsoleCallback
    return best_callbacks(recipe)
