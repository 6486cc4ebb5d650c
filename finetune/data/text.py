"""Data: load splits from files, folders or the Hub, check columns, tokenize (packing: data/packing.py).

`load_splits` returns (train, eval) `datasets.Dataset`s; when the recipe names no eval data, a
small validation split is held out of train with the recipe's seed.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from pathlib import Path

from finetune.data.sources import load_source
from finetune.errors import UserError
from finetune.recipe.sections import DataSpec

def text_problems(ds, column: str, key: str, source: str) -> list[str]:
    """A text column must hold strings: numbers or lists (or a mix) are named with their first row. A column
    Arrow typed as strings needs no look at its rows."""
    if getattr(ds.features.get(column), "dtype", None) in ("string", "large_string"):
        return []
    for n, value in enumerate(ds[column], 1):
        if value is not None and not isinstance(value, str):
            kind = type(value).__name__
            return [f"{key}: column '{column}' of '{source}' holds {kind} values (row {n}: {str(value)[:40]!r}), "
                    f"not text; set data.text_column to a column of strings"]
    return []


def load_splits(spec: DataSpec, seed: int = 42, train=None, key: str = "data.train"):
    """(train, eval) datasets; eval is held out of train when `spec.eval` is unset. `train`: the
    train source already loaded; `key`: how messages name it (data.train.1 in a mixture)."""
    if train is None:
        train = load_source(spec.train, key, spec.train_split, spec.config)
    if spec.eval:
        eval_ds = load_source(spec.eval, "data.eval", spec.eval_split or "validation", spec.config)
    elif spec.eval_split:
        eval_ds = load_source(spec.train, key, spec.eval_split, spec.config)
    elif spec.eval_fraction > 0 and len(train) >= 4:
        n_eval = max(1, round(len(train) * spec.eval_fraction))
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
    else:
        eval_ds = None
    if spec.max_samples and len(train) > spec.max_samples:
        train = train.select(range(spec.max_samples))
    if eval_ds is not None and spec.max_eval_samples and len(eval_ds) > spec.max_eval_samples:
        # a random subset: eval files are often sorted (by label, by length)
        eval_ds = eval_ds.shuffle(seed=seed).select(range(spec.max_eval_samples))
    return train, eval_ds


def load_text_splits(spec: DataSpec, seed: int = 42, train=None, key: str = "data.train"):
    """(train, eval) of a text task: the text column checked in both, empty texts dropped (with a
    warning for train: `finetune validate` lists their rows)."""
    train, eval_ds = load_splits(spec, seed, train, key)
    column = spec.text_column
    field = "data.text_column" if key in ("data.train", "data.eval") else f"{key}.text_column"  # a mixture's source
    for ds, k, source in ((train, key, spec.train), (eval_ds, "data.eval", spec.eval)):
        if ds is not None:
            require_columns(ds, {field: column}, f"{k} '{source or spec.train}'")
    problems = text_problems(train, column, key, spec.train)
    if eval_ds is not None:
        problems += text_problems(eval_ds, column, "data.eval", spec.eval or spec.train)
    if problems:
        raise UserError(problems)
    empty = empty_rows(train, column)
    if len(empty) == len(train):
        raise UserError(f"{key}: every text in '{spec.train}' is empty (column '{column}'); nothing to train on")
    if empty:
        print(f"warning: skipping {len(empty)} empty texts in {key} (`finetune validate` lists their rows)",
              flush=True)
        train = drop_empty(train, column)
    if eval_ds is not None:
        eval_ds = drop_empty(eval_ds, column)
    return train, eval_ds


def load_causal_splits(spec: DataSpec, seed: int = 42, key: str = "data.train"):
    """(train, eval, format) of the causal-LM task. Text data as `load_text_splits`; chat and
    prompt/completion data checked row by row first (every bad row at once, numbered as in the file)."""
    from finetune.data import chat

    train = load_source(spec.train, key, spec.train_split, spec.config)
    fmt = chat.detect_format(train.column_names, spec, key=key)
    if fmt == "text":
        return (*load_text_splits(spec, seed, train, key), fmt)
    problems = chat.check_rows(chat.read_rows(train, spec.train), fmt, spec, key)
    train, eval_ds = load_splits(spec, seed, train, key)
    if spec.eval and eval_ds is not None:
        problems += chat.check_rows(chat.read_rows(eval_ds, spec.eval), fmt, spec, "data.eval")
    if problems:
        raise UserError(problems + ["data: `finetune validate` lists these rows too; fix them and run again"])
    if fmt == "conversations":
        print("note: ShareGPT 'conversations' mapped to messages (from human -> role user, gpt -> assistant, "
              "value -> content)", flush=True)
    return train, eval_ds, fmt


def require_columns(ds, columns: dict[str, str], source: str) -> None:
    """`columns` maps recipe key -> column name; one problem per missing column."""
    problems = []
    for key, column in columns.items():
        if column not in ds.column_names:
            problems.append(f"{key}: no column '{column}' in {source}; its columns are: "
                            f"{', '.join(ds.column_names)}. Set {key} to one of them")
    if problems:
        raise UserError(problems)


def empty_rows(ds, column: str) -> list[int]:
    """Row indices of empty texts, read a batch at a time (never the whole column at once)."""
    out, start = [], 0
    for batch in ds.select_columns([column]).iter(batch_size=10_000):
        out += [start + i for i, t in enumerate(batch[column]) if t is None or (isinstance(t, str) and not t.strip())]
        start += len(batch[column])
    return out


def drop_empty(ds, column: str):
    return ds.filter(lambda t: t is not None and bool(str(t).strip()), input_columns=column)


# ---------------------------------------------------------------------------------------
# Causal-LM tokenization and packing


IDS = "int32"  # token ids, positions and labels (-100) as int32: half the cache and memory of Python's int64


def columns_of(ds) -> list[str]:
    """Column names; a stream of JSON rows knows them only from its first row. (Not `ds.take(1)`: on a
    stream split between processes, take counts rows before the split, so most processes get none.)"""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds), {}))


# Where map_batches writes a Dataset's results: the datasets cache beside the source (None), or a
# folder the caller removes once it has kept what it needs (`writing_to`).
_SCRATCH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("scratch", default=None)


@contextlib.contextmanager
def writing_to(folder: Path):
    """Steps of map_batches inside this block write their Arrow files into `folder`, not beside the
    source in the datasets cache, where every intermediate step of a large corpus would stay."""
    token = _SCRATCH.set(folder)
    try:
        yield
    finally:
        _SCRATCH.reset(token)


MAP_BATCH = 1000  # rows per call of a batched map (tokenization)


def map_batches(ds, fn, names: list[str], desc: str, num_proc: int | None = None, batch_size: int | None = None):
    """`ds.map(fn, batched=True)` into int32 columns `names`, for a Dataset (written to the datasets cache
    or the `writing_to` folder, `num_proc` processes) or a stream (lazily, as it is read)."""
    import datasets

    batch_size = batch_size or MAP_BATCH
    features = datasets.Features({n: datasets.List(datasets.Value(IDS)) for n in names})
    kwargs = {"batched": True, "batch_size": batch_size, "remove_columns": columns_of(ds), "features": features}
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(fn, **kwargs)
    scratch = _SCRATCH.get()
    if scratch is not None:
        kwargs["cache_file_name"] = str(scratch / f"{uuid.uuid4().hex}.arrow")
    return ds.map(fn, desc=desc, num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > batch_size else None,
                  **kwargs)


def tokenize_documents(ds, tokenizer, column: str, max_length: int, split_long: bool, num_proc: int | None = None):
    """Token ids per document with eos appended (so the model learns to stop); empty texts are skipped.

    Texts are tokenized as `generate` tokenizes a prompt (the tokenizer's special tokens, so BOS for
    Llama-family models), so that the model trains on what it is prompted with.
    Documents longer than `max_length` are cut to it, or, with `split_long` (packing), split
    into consecutive pieces of at most `max_length` tokens, so no text is lost.
    """
    eos = tokenizer.eos_token_id

    def encode(batch):
        texts = [t for t in batch[column] if isinstance(t, str) and t.strip()]
        out = []
        for doc in tokenizer(texts)["input_ids"] if texts else []:
            doc = doc + [eos] if eos is not None and doc[-1:] != [eos] else doc
            if split_long:
                out.extend(doc[i:i + max_length] for i in range(0, len(doc), max_length))
            else:
                out.append(doc[:max_length])
        return {"input_ids": out}

    return map_batches(ds, encode, ["input_ids"], "Tokenizing", num_proc)


def tokenize_examples(ds, tokenizer, spec: DataSpec, fmt: str, max_length: int, num_proc: int | None = None,
                      key: str = "data.train"):
    """input_ids and labels per prompt/completion row, or per conversation (one example, or one per answer for
    templates that rewrite earlier turns; see `finetune.data.masks`); labels are -100 outside the trained
    tokens. Longer examples are cut to `max_length` (a conversation split in two would train answers without
    their question); examples left with nothing to train on are dropped, with a warning."""
    import datasets

    from finetune.data import chat, masks

    specials = masks.special_ids(tokenizer)
    cut_answers = [0]  # examples whose trained tokens run past max_length (counted in this process)

    def encode(batch):
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            if fmt == "prompt_completion" and not chat.is_chat(fmt, row, spec):
                ids, labels = masks.tokenize_prompt_completion(tokenizer, row[spec.prompt_column],
                                                               row[spec.completion_column], spec.train_on)
                examples = [{"input_ids": ids, "labels": labels}]
            else:
                messages, n_prompt = chat.to_messages(row, fmt, spec)
                try:
                    examples, _ = masks.chat_examples(
                        tokenizer, messages, spec.train_on, n_prompt, specials, chat.row_tools(row, spec)[0],
                        spec.chat_template_kwargs, spec.turn_mode, spec.train_on_reasoning)
                except UserError as e:  # rows are split and shuffled by now: named by their first words
                    raise UserError([f"{key}: the conversation that begins {opening(messages)}: {p}"
                                     for p in e.problems]) from e
            for example in examples:
                if any(t != -100 for t in example["labels"][max_length:]):
                    cut_answers[0] += 1
                if any(t != -100 for t in example["labels"][:max_length]):
                    out["input_ids"].append(example["input_ids"][:max_length])
                    out["labels"].append(example["labels"][:max_length])
        return out

    tokenized = map_batches(ds, encode, ["input_ids", "labels"], "Tokenizing conversations", num_proc)
    if isinstance(ds, datasets.IterableDataset):
        return tokenized
    if cut_answers[0]:
        print(f"warning: {cut_answers[0]} examples are cut inside an answer by data.max_length={max_length} (their "
              "answers, a tool call say, train incomplete); raise data.max_length", flush=True)
    lost = len(ds) - len(tokenized)
    if lost > 0:
        print(f"warning: {lost} examples have no trained token within data.max_length={max_length} and are "
              "skipped; raise data.max_length", flush=True)
    return tokenized


def opening(messages: list[dict]) -> str:
    text = " ".join(str(m.get("content") or "") for m in messages[:2]).strip()
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    return {"count": len(s), "min": s[0], "mean": sum(s) / len(s), "p50": s[len(s) // 2],
            "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1]}

