"""What the preference and online-RL tasks (reward, dpo, grpo, ppo) share.

Preference data is trl's standard format: `prompt` (optional for reward and DPO), `chosen` and
`rejected`, either all plain text or all chat messages (`[{"role": ..., "content": ...}]`).
Prompt-only data (GRPO, PPO) needs a `prompt` column. Bad rows are errors that name the rows;
examples longer than the context are reported and skipped, never silently cut.

    {"prompt": "Say something nice:", "chosen": " You look great.", "rejected": " Go away."}
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], ...}
"""

from __future__ import annotations

from pathlib import Path

from finetune.data import text as D
from finetune.data.sources import load_source
from finetune.errors import UserError, first_line
from finetune.models import pretrained
from finetune.models.adapters import is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.rl.rewards import is_chat

PREFERENCE_FORMAT = ("preference data needs the columns chosen and rejected (and usually prompt), as plain "
                     "text or as chat messages (trl's standard formats)")
PROMPT_FORMAT = "prompt-only data needs a prompt column (text or chat messages)"


def rows_text(rows: list[int], total: int) -> str:
    shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
    return f"rows {shown} ({len(rows)} of {total})"


def is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(is_empty(m.get("content") if isinstance(m, dict) else m) for m in value)
    return False


# ---------------------------------------------------------------------------------------
# Checking preference and prompt data


def check_columns(ds, key: str, source: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> str:
    """Check the columns a task reads; return the data format, "text" or "chat". Raises UserError."""
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        need = PREFERENCE_FORMAT if "chosen" in required else PROMPT_FORMAT
        raise UserError([f"{key}: no column '{c}' in {source}; {need}. Its columns are: {', '.join(ds.column_names)}"
                         for c in missing])
    columns = [c for c in (*required, *optional) if c in ds.column_names]
    problems, kinds = [], set()
    for column in columns:
        values = ds[column]
        chat = [i for i, v in enumerate(values) if is_chat(v)]
        text = [i for i, v in enumerate(values) if isinstance(v, str)]
        other = [i for i, v in enumerate(values) if not is_chat(v) and not isinstance(v, str) and v is not None
                 and v != []]
        if other:
            problems.append(f"{key}: column '{column}' in {source} holds neither text nor chat messages "
                            f"({rows_text(other, len(values))}); give strings or lists of {{role, content}}")
        if chat and text:
            problems.append(f"{key}: column '{column}' in {source} mixes plain text and chat messages; use one format")
        kinds |= {"chat"} if chat else set()
        kinds |= {"text"} if text else set()
        empty = [i for i, v in enumerate(values) if is_empty(v)]
        if empty:
            what = "prompt the responses answer" if column == "prompt" else f"{column} response"
            problems.append(f"{key}: empty {column} in {source}, {rows_text(empty, len(values))}; every row needs "
                            f"the {what}: fill them in or remove those rows")
    if len(kinds) > 1 and not problems:
        problems.append(f"{key}: {source} mixes plain text and chat messages across columns; use one format")
    if problems:
        raise UserError(problems)
    return "chat" if "chat" in kinds else "text"


def load_checked(recipe: Recipe, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """(train, eval, format), checked before any split, so that reported rows are rows of the file."""
    spec = recipe.data
    fmt = check_columns(load_source(spec.train, "data.train", spec.train_split), "data.train", f"'{spec.train}'",
                        required, optional)
    train, eval_ds = D.load_splits(spec, recipe.train.seed)
    if eval_ds is not None and (spec.eval or spec.eval_split):  # not held out of the checked train data
        check_columns(eval_ds, "data.eval", f"'{spec.eval or spec.train}'", required, optional)
    return train, eval_ds, fmt


def load_preferences(recipe: Recipe):
    """(train, eval, format) of prompt/chosen/rejected data, checked."""
    return load_checked(recipe, ("chosen", "rejected"), ("prompt",))


def load_prompts(recipe: Recipe):
    """(train, eval, format) of data with a prompt column (other columns go to reward functions)."""
    return load_checked(recipe, ("prompt",))


def check_chat_template(tokenizer, fmt: str, recipe: Recipe) -> None:
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        source = recipe.model.tokenizer or recipe.model.name
        raise UserError(f"data.train: holds chat messages, but the tokenizer of '{source}' "
                        "has no chat template; use a chat model's tokenizer (model.tokenizer) or give plain text")


# ---------------------------------------------------------------------------------------
# Lengths: reported and skipped, never silently cut


def token_counts(tokenizer, items: list, generation_prompt: bool = False) -> list[int]:
    """Tokens per prompt or prompt+response, as trl tokenizes them (chat template for messages)."""
    if any(is_chat(x) for x in items):
        return [len(tokenizer.apply_chat_template(x or [], tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation_prompt)["input_ids"])
                for x in items]
    return [len(ids) for ids in tokenizer([x or "" for x in items])["input_ids"]]


def joined(prompt, response, eos: str | None):
    """prompt + response as trl joins them: messages concatenated, or text with eos appended."""
    if is_chat(response) or is_chat(prompt):
        return (prompt or []) + (response or [])
    text = (prompt or "") + response
    return text + eos if eos and not text.endswith(eos) else text


def pair_lengths(ds, tokenizer) -> list[tuple[int, int]]:
    """(prompt tokens, longest of prompt+chosen / prompt+rejected tokens, eos included) per pair."""
    prompts = ds["prompt"] if "prompt" in ds.column_names else [None] * len(ds)
    eos = tokenizer.eos_token
    n_prompt = token_counts(tokenizer, prompts, generation_prompt=True) if "prompt" in ds.column_names \
        else [0] * len(ds)
    n_chosen = token_counts(tokenizer, [joined(p, c, eos) for p, c in zip(prompts, ds["chosen"])])
    n_rejected = token_counts(tokenizer, [joined(p, r, eos) for p, r in zip(prompts, ds["rejected"])])
    return [(p, max(c, r)) for p, c, r in zip(n_prompt, n_chosen, n_rejected)]


def excerpt(value, n: int = 40) -> str:
    text = value if isinstance(value, str) else " ".join(str(m.get("content", "")) for m in value or [])
    return repr(text[:n] + ("..." if len(text) > n else ""))


def drop_rows(ds, rows: list[int], key: str, why: str, fix: str):
    """Drop `rows` with a warning (counted, with the first one quoted: rows of a held-out split are
    shuffled, so their numbers would not be lines of the file); an error when nothing would be left."""
    if not rows:
        return ds
    if len(rows) == len(ds):
        raise UserError(f"{key}: every example {why}; {fix}")
    first = ds[rows[0]]
    quote = excerpt(first.get("prompt") or first.get("chosen"))
    print(f"warning: skipping {len(rows)} of {len(ds)} examples in {key}: {why} (the first: {quote}); {fix}",
          flush=True)
    keep = sorted(set(range(len(ds))) - set(rows))
    return ds.select(keep)


def length_fix(max_length: int, context: int | None) -> str:
    room = f" (the model's context is {context})" if context and context > max_length else ""
    return f"shorten them or raise data.max_length{room}"


# ---------------------------------------------------------------------------------------
# The policy: a model directory or Hub id, or a LoRA run merged into its base in memory


def load_policy(recipe: Recipe, auto_cls=None, **kwargs):
    """(model, merged) for `recipe.model.name`. A LoRA run (adapter_config.json) is merged into its
    base in memory, so its trained weights are the starting point; `merged` tells the caller that
    `config._name_or_path` no longer describes these weights."""
    from transformers import AutoModelForCausalLM

    auto_cls = auto_cls or AutoModelForCausalLM
    path = Path(recipe.model.name).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        from peft import AutoPeftModelForCausalLM

        if recipe.quant.bits:
            raise UserError(f"model.name: '{path}' is a LoRA run; merge it first (finetune merge {path} -o "
                            f"{path}-merged) to train a quantized copy of it")
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload()
            model.requires_grad_(True)  # peft loaded the base frozen; merged, it is a plain model again
        except (OSError, ValueError) as e:
            raise UserError(f"model.name: could not load the LoRA run '{path}': {first_line(e)}") from e
        if auto_cls is not AutoModelForCausalLM:
            model = transplant(model, auto_cls, **kwargs)
        return model, True
    return pretrained.load_model(recipe.model, auto_cls, recipe.quant if recipe.quant.bits else None, **kwargs), False


def transplant(causal_lm, auto_cls, **kwargs):
    """The same transformer body under another head (e.g. a sequence classifier with a fresh head)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        causal_lm.save_pretrained(tmp)
        return auto_cls.from_pretrained(tmp, **kwargs)


def frozen_copy(model):
    """A frozen copy of the policy as it is now, in memory (the reference of DPO and PPO in full
    fine-tuning).

    trl reloads the reference from `config._name_or_path` when given none: wrong when the policy was
    changed in memory (a merged LoRA run, an added pad token), a crash when it was never saved. (trl's
    `create_reference_model` does the same as this, but moved to trl.experimental, which warns on import.)"""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def policy_config(recipe: Recipe):
    """The model config of `model.name` (for a LoRA run: of its base)."""
    path = Path(recipe.model.name).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        import json

        from finetune.recipe.sections import ModelSpec

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return pretrained.load_config(ModelSpec(name=base))
    return pretrained.load_config(recipe.model)


# ---------------------------------------------------------------------------------------
# `finetune validate`


def check_preference_recipe(recipe: Recipe, task: str) -> tuple[list[str], list[str]]:
    """(problems, notes) for preference data: columns, empty rows, chat template, lengths."""
    notes: list[str] = []
    try:
        train, eval_ds, fmt = load_preferences(recipe)
        tokenizer = pretrained.load_tokenizer(recipe.model)
        check_chat_template(tokenizer, fmt, recipe)
        config = policy_config(recipe)
        max_length = pretrained.max_length(recipe.data.max_length, config)
    except UserError as e:
        return e.problems, notes
    problems: list[str] = []
    for ds, key in ((train, "data.train"), (eval_ds, "data.eval")):
        if ds is None:
            continue
        lengths = pair_lengths(ds, tokenizer)
        stats = D.length_stats([n for _, n in lengths])
        notes.append(f"{key}: {len(ds)} pairs ({'chat messages' if fmt == 'chat' else 'plain text'}); tokens per "
                     f"prompt + response: mean {stats['mean']:.0f}, max {stats['max']} (max_length {max_length})")
        if task == "reward":
            skipped = [i for i, (_, n) in enumerate(lengths) if n > max_length]
            what = "are longer than max_length"
        else:
            skipped = [i for i, (p, _) in enumerate(lengths) if p >= max_length]
            what = "have prompts that fill max_length"
            cut = [i for i, (p, n) in enumerate(lengths) if n > max_length and p < max_length]
            if cut:
                notes.append(f"{key}: {len(cut)} of {len(ds)} pairs are longer than max_length; their responses "
                             "will be cut to fit")
        if len(skipped) == len(ds):
            problems.append(f"{key}: all {len(ds)} pairs {what} ({max_length} tokens); raise data.max_length "
                            "or shorten them")
        elif skipped:
            notes.append(f"{key}: {len(skipped)} of {len(ds)} pairs {what} and will be skipped")
    return problems, notes


# ---------------------------------------------------------------------------------------
# Reporting


def print_curve(name: str, start: float | None, end: float | None) -> None:
    if start is not None and end is not None:
        print(f"{name}: {start:.4g} -> {end:.4g} (first -> last logged step)", flush=True)
