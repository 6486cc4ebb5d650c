"""Reward sources for online RL (PPO, GRPO): a trained reward-model directory or a Python function.

    reward: runs/reward            # a run of `finetune reward` (adapter or full) or a model directory
    reward: my_rewards:length      # module:function, called as fn(prompts, completions) -> list[float]

Both give a `RewardFn(prompts, completions) -> list[float]`, the signature trl's GRPOTrainer
accepts as a reward function too.

Scoring follows the convention the reward model was trained with (trl's RewardTrainer): the text
is prompt + completion + eos, tokenized on its own and padded on the RIGHT. Left padding shifts
GPT-2's absolute positions and can flip scores.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.errors import UserError

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward(source: str, key: str = "reward", device: str | None = None) -> RewardFn:
    """A reward function from `module:function` or a reward-model directory."""
    if not source:
        raise UserError(f"{key}: empty; give a reward-model directory or module:function")
    path = Path(source).expanduser()
    if path.is_dir():
        return reward_model_fn(path, key, device)
    if ":" in source and not path.exists():
        return import_reward_fn(source, key)
    raise UserError(f"{key}: '{source}' is neither a directory with a reward model nor module:function "
                    "(for example my_rewards:length, with my_rewards.py importable from the current directory)")


def import_reward_fn(spec: str, key: str = "reward") -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{key}: '{spec}' must be module:function, for example my_rewards:length")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`, the current directory is importable
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise UserError(f"{key}: cannot import module '{module_name}' ({type(e).__name__}: {e}); "
                        "check the name and that it is importable from the current directory") from e
    fn = getattr(module, attr, None)
    if fn is None:
        from finetune.errors import did_you_mean

        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(f"{key}: module '{module_name}' has no function '{attr}'{did_you_mean(attr, names)}")
    if not callable(fn):
        raise UserError(f"{key}: '{spec}' is not callable")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var = any(p.kind == p.VAR_POSITIONAL for p in params.values())
    if params and len(positional) < 2 and not has_var:
        raise UserError(f"{key}: '{spec}' must take (prompts, completions) and return one float per completion")

    def call(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        scores = fn(prompts, completions)
        scores = [float(s) for s in scores]
        if len(scores) != len(completions):
            raise UserError(f"{key}: '{spec}' returned {len(scores)} scores for {len(completions)} completions")
        return scores

    call.__name__ = attr
    return call


def reward_model_fn(path: Path, key: str = "reward", device: str | None = None,
                    batch_size: int = 16) -> RewardFn:
    """Score texts with a sequence-classification model that has exactly one output."""
    model, tokenizer = load_reward_model(path, key)
    import torch

    if device:
        model.to(device)
    model.eval()

    def score(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        texts = [p + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
        out: list[float] = []
        dev = next(model.parameters()).device
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="right")
            with torch.no_grad():
                logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits
            out += logits[:, 0].float().tolist()
        return out

    score.__name__ = f"reward_model_{path.name}"
    return score


def load_reward_model(path: Path, key: str = "reward"):
    """(model, tokenizer) of a reward-model directory: a LoRA run (adapter on its base) or a full model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.adapters import is_adapter_dir

    if not (path / "config.json").exists() and not is_adapter_dir(path):
        raise UserError(f"{key}: '{path}' holds no model (no config.json or adapter_config.json)")
    if is_adapter_dir(path):
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
        model = model.merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path))
    num_labels = model.config.num_labels
    if num_labels != 1:
        raise UserError(f"{key}: the model in '{path}' has {num_labels} outputs; a reward model has exactly one "
                        "(train one with `finetune reward`)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
