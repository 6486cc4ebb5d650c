"""Reward sources for online RL (PPO, GRPO): a trained reward-model directory or a Python function.

    reward: runs/reward            # a run of `finetune reward` (adapter or full) or a model directory
    reward: my_rewards:length      # module:function, called the way trl calls reward functions

A function is called by keyword, `fn(prompts=..., completions=..., **columns)` with the dataset's
other columns, as trl's GRPOTrainer does, so every trl example (`def reward_len(completions, **kwargs)`)
works unchanged; a function of two positional parameters (prompts, completions) is accepted too.
Both sources give a `RewardFn(prompts, completions, **columns) -> list[float]`.

Scoring follows the convention the reward model was trained with (trl's RewardTrainer, which
`finetune reward` uses): plain text is prompt + completion + eos; chat messages are rendered with the
tokenizer's chat template (no eos added). Each text is tokenized on its own and the batch is padded
on the RIGHT: left padding shifts GPT-2's absolute positions and can flip scores.
"""

from __future__ import annotations

import importlib
import inspect
import json
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


# ---------------------------------------------------------------------------------------
# module:function


MOVED = {"finetune.rewards": "finetune.rl.rewards"}  # recipes written before the package had wings


def import_reward_fn(spec: str, key: str = "reward") -> RewardFn:
    module_name, _, attr = spec.partition(":")
    module_name = MOVED.get(module_name, module_name)
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
    call_with = reward_caller(fn, spec, key)

    def call(prompts: list, completions: list, **kwargs) -> list[float]:
        scores = list(call_with(prompts, completions, kwargs))
        if len(scores) != len(completions):
            raise UserError(f"{key}: '{spec}' returned {len(scores)} scores for {len(completions)} completions")
        try:  # None means "no opinion" to trl (a NaN it averages around)
            return [float("nan") if s is None else float(s) for s in scores]
        except (TypeError, ValueError) as e:
            raise UserError(f"{key}: '{spec}' returned a score that is not a number ({e})") from e

    call.__name__ = attr
    return call


SIGNATURE = ("def fn(prompts, completions, **kwargs) -> list[float], or def fn(completions, **kwargs) as in "
             "trl's documentation; the dataset's other columns arrive as keyword arguments")


def reward_caller(fn, spec: str, key: str):
    """How to call `fn` with (prompts, completions, columns): the way trl does, by keyword
    (`prompts=`, `completions=`, every other dataset column), when it names those parameters or takes
    **kwargs; positionally as fn(prompts, completions) otherwise, with the columns it names by keyword."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the historical positional call
        return lambda prompts, completions, columns: fn(prompts, completions)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "completions" in names:  # trl's convention: everything by keyword, what it does not take is left out
        def by_keyword(prompts, completions, columns):
            given = {"prompts": prompts, "completions": completions, **columns}
            missing = [n for n in required if n not in given]
            if missing:
                raise UserError(f"{key}: '{spec}' takes {', '.join(missing)}, which the data has no column for; "
                                f"add the column, or give the parameter a default")
            return fn(**{k: v for k, v in given.items() if var_kw or k in names})

        return by_keyword
    if len(positional) >= 2 or var_pos:  # fn(prompts, completions) under other names
        first_two = {p.name for p in positional[:2]}

        def by_position(prompts, completions, columns):
            extra = {k: v for k, v in columns.items() if k not in first_two and (var_kw or k in names)}
            return fn(prompts, completions, **extra)

        return by_position
    raise UserError(f"{key}: '{spec}' cannot be called as a reward function; expected {SIGNATURE}")


def matches_answer(prompts: list, completions: list, answer: list | None = None, **kwargs) -> list[float]:
    """A ready-made reward function, `finetune.rl.rewards:matches_answer`: 1.0 when a completion starts
    with its example's `answer` column (case and surrounding spaces ignored), else 0.0."""
    if answer is None:
        raise UserError("reward: finetune.rl.rewards:matches_answer needs an `answer` column in the data "
                        "(the expected answer of each prompt)")
    texts = [c[-1]["content"] if is_chat(c) else c for c in completions]
    return [float(bool(a.strip()) and t.strip().lower().startswith(a.strip().lower())) for t, a in zip(texts, answer)]


# ---------------------------------------------------------------------------------------
# Reward-model directory


def reward_model_fn(path: Path, key: str = "reward", device: str | None = None,
                    batch_size: int = 16) -> RewardFn:
    """Score texts with a sequence-classification model that has exactly one output."""
    model, tokenizer = load_reward_model(path, key)
    if device:
        model.to(device)
    model.eval()

    def score(prompts: list, completions: list, **kwargs) -> list[float]:
        return score_pairs(model, tokenizer, prompts, completions, batch_size)

    score.__name__ = f"reward_model_{path.name}"
    return score


def is_chat(value) -> bool:
    """A list of {"role", "content"} messages (trl's conversational format)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def reward_input_ids(tokenizer, prompt, completion) -> list[int]:
    """Token ids of one prompt+completion exactly as trl's RewardTrainer builds them for training."""
    if is_chat(prompt) or is_chat(completion):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("reward: chat messages need a tokenizer with a chat template; this one has none")
        messages = (prompt if is_chat(prompt) else []) + (completion if is_chat(completion) else [])
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    text = (prompt or "") + completion
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def score_pairs(model, tokenizer, prompts: list, completions: list, batch_size: int = 16) -> list[float]:
    """One score per prompt+completion, right-padded batches (the reward model's training convention)."""
    import torch

    device = next(model.parameters()).device
    ids = [reward_input_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
    out: list[float] = []
    for i in range(0, len(ids), batch_size):
        batch = tokenizer.pad({"input_ids": ids[i:i + batch_size]}, padding=True, padding_side="right",
                              return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        out += logits[:, 0].float().tolist()
    return out


def reward_head_outputs(path: Path) -> int | None:
    """Outputs of the classification head an adapter run saved with it (None: no head saved)."""
    from safetensors import safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            head = name.rsplit(".", 2)
            if name.endswith(".weight") and len(head) == 3 and head[-2] in ("score", "classifier", "out_proj"):
                shape = f.get_slice(name).get_shape()
                if len(shape) == 2:
                    return shape[0]
    return None


def check_reward_dir(path: Path, key: str = "reward") -> None:
    """Fail before loading weights when `path` is not a one-output reward model."""
    from finetune.models.adapters import is_adapter_dir

    hint = f"train one with `finetune reward --model {path}`"
    if is_adapter_dir(path):
        config = json.loads((path / "adapter_config.json").read_text())
        if config.get("task_type") not in (None, "SEQ_CLS"):
            raise UserError(f"{key}: '{path}' holds a {config['task_type']} adapter, not a reward model; {hint}")
        outputs = reward_head_outputs(path)
        if outputs is None:
            raise UserError(f"{key}: the adapter in '{path}' holds no reward head (score weights); "
                            "train it with `finetune reward`, which saves the head with the adapter")
    elif (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise UserError(f"{key}: '{path}' is a {archs[0]}, not a reward model (no score head); {hint}")
        outputs = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    else:
        if (path / "recipe.yaml").is_file():
            raise UserError(f"{key}: run '{path}' holds no trained model yet (interrupted?); "
                            f"continue it with --resume -o {path}")
        raise UserError(f"{key}: '{path}' holds no model (no config.json or adapter_config.json)")
    if outputs != 1:
        raise UserError(f"{key}: the model in '{path}' has {outputs} outputs; a reward model has exactly one "
                        "(train one with `finetune reward`)")


def load_reward_model(path: Path, key: str = "reward"):
    """(model, tokenizer) of a reward-model directory: a LoRA run (adapter on its base) or a full model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.models.adapters import is_adapter_dir

    check_reward_dir(path, key)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base's "score.weight newly initialized" report: the adapter brings it
    try:
        if is_adapter_dir(path):
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
            model = model.merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as RewardTrainer did when this model was trained
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
