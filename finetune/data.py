"""Data: load splits from files, folders or the Hub, check columns, tokenize, pack.

`load_splits` returns (train, eval) `datasets.Dataset`s; when the recipe names no eval data, a
small validation split is held out of train with the recipe's seed.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe import DataSpec

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def looks_like_file(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_BUILDERS or name.startswith((".", "/", "~"))


def load_source(name: str, key: str, split: str = "train", config: str | None = None):
    """One `datasets.Dataset` from a local file, a folder, or a Hub dataset name."""
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"{key}: cannot read '{name}': use .jsonl, .json, .csv, .parquet or .txt")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
            ds.data.table.validate(full=True)  # Arrow keeps bytes that are not UTF-8 until a row is read
        elif path.is_dir():
            ds = load_folder(path, key)
        elif looks_like_file(name):
            raise UserError(f"{key}: no such file '{name}'")
        else:
            from finetune.hub import hub_reachable

            if not hub_reachable():
                raise UserError(f"{key}: '{name}' is not a local file or folder, and the Hugging Face Hub is "
                                "unreachable (or HF_HUB_OFFLINE=1); pass a local file")
            ds = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        from finetune.models import first_line

        why = file_problem(path, key, name) if path.is_file() else None
        raise UserError(why or f"{key}: could not read '{name}': {first_line(e)}") from e
    if len(ds) == 0:
        raise UserError(f"{key}: '{name}' has no rows")
    return ds


def check_sources(spec: DataSpec) -> None:
    """Pre-flight: each local data source exists and is not empty (reading it is the task's job)."""
    problems = []
    for key, name in (("data.train", spec.train), ("data.eval", spec.eval)):
        if not name:
            continue
        path = Path(name).expanduser()
        if path.is_file() and path.stat().st_size == 0:
            problems.append(f"{key}: '{name}' is empty; give a file with at least one row")
        elif not path.exists() and looks_like_file(name):
            problems.append(f"{key}: no such file '{name}'")
    if problems:
        raise UserError(problems)


def file_problem(path: Path, key: str, name: str) -> str | None:
    """What is wrong with a local data file datasets could not read: empty, not UTF-8, a bad JSON line."""
    import json

    if path.stat().st_size == 0:
        return f"{key}: '{name}' is empty; give a file with at least one row"
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{key}: '{name}' line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save the "
                        "file as UTF-8 (for example: iconv -f latin1 -t utf-8)")
            if suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    return f"{key}: '{name}' line {n} is not valid JSON ({e.msg}, column {e.colno}); fix or remove it"
    return None


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


def load_folder(path: Path, key: str):
    """A folder of images (imagefolder: <class>/<file> or metadata.jsonl) or of data files."""
    import datasets

    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    data_files = [p for p in files if p.suffix.lower() in FILE_BUILDERS]
    suffixes = {FILE_BUILDERS[p.suffix.lower()] for p in data_files}
    if not data_files:
        raise UserError(f"{key}: folder '{path}' holds no data files (.jsonl, .json, .csv, .parquet, .txt) or images")
    if len(suffixes) > 1:
        raise UserError(f"{key}: folder '{path}' mixes file types; keep one kind of file per folder")
    return datasets.load_dataset(suffixes.pop(), data_files=[str(p) for p in data_files], split="train")


def load_splits(spec: DataSpec, seed: int = 42, train=None):
    """(train, eval) datasets; eval is held out of train when `spec.eval` is unset. `train`: the
    train source already loaded."""
    if train is None:
        train = load_source(spec.train, "data.train", spec.train_split, spec.config)
    if spec.eval:
        eval_ds = load_source(spec.eval, "data.eval", spec.eval_split or "validation", spec.config)
    elif spec.eval_split:
        eval_ds = load_source(spec.train, "data.train", spec.eval_split, spec.config)
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


def load_text_splits(spec: DataSpec, seed: int = 42):
    """(train, eval) of a text task: the text column checked in both, empty texts dropped (with a
    warning for train: `finetune validate` lists their rows)."""
    train, eval_ds = load_splits(spec, seed)
    column = spec.text_column
    for ds, key, source in ((train, "data.train", spec.train), (eval_ds, "data.eval", spec.eval)):
        if ds is not None:
            require_columns(ds, {"data.text_column": column}, f"{key} '{source or spec.train}'")
    problems = text_problems(train, column, "data.train", spec.train)
    if eval_ds is not None:
        problems += text_problems(eval_ds, column, "data.eval", spec.eval or spec.train)
    if problems:
        raise UserError(problems)
    empty = empty_rows(train, column)
    if len(empty) == len(train):
        raise UserError(f"data.train: every text in '{spec.train}' is empty (column '{column}'); nothing to train on")
    if empty:
        print(f"warning: skipping {len(empty)} empty texts in data.train (`finetune validate` lists their rows)",
              flush=True)
        train = drop_empty(train, column)
    if eval_ds is not None:
        eval_ds = drop_empty(eval_ds, column)
    return train, eval_ds


def load_causal_splits(spec: DataSpec, seed: int = 42):
    """(train, eval, format) of the causal-LM task. Text data as `load_text_splits`; chat and
    prompt/completion data checked row by row first (every bad row at once, numbered as in the file)."""
    from finetune import chat

    train = load_source(spec.train, "data.train", spec.train_split, spec.config)
    fmt = chat.detect_format(train.column_names, spec)
    if fmt == "text":
        return (*load_text_splits(spec, seed), fmt)
    problems = chat.check_rows(chat.read_rows(train, spec.train), fmt, spec, "data.train")
    train, eval_ds = load_splits(spec, seed, train)
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
    return [i for i, t in enumerate(ds[column]) if t is None or (isinstance(t, str) and not t.strip())]


def drop_empty(ds, column: str):
    return ds.filter(lambda t: t is not None and bool(str(t).strip()), input_columns=column)


# ---------------------------------------------------------------------------------------
# Causal-LM tokenization and packing


def tokenize_documents(ds, tokenizer, column: str, max_length: int, split_long: bool):
    """Token ids per document with eos appended (so the model learns to stop).

    Texts are tokenized as `generate` tokenizes a prompt (the tokenizer's special tokens, so BOS for
    Llama-family models), so that the model trains on what it is prompted with.
    Documents longer than `max_length` are cut to it, or, with `split_long` (packing), split
    into consecutive pieces of at most `max_length` tokens, so no text is lost.
    """
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch[column])["input_ids"]
        out = []
        for doc in ids:
            doc = doc + [eos] if eos is not None and doc[-1:] != [eos] else doc
            if split_long:
                out.extend(doc[i:i + max_length] for i in range(0, len(doc), max_length))
            else:
                out.append(doc[:max_length])
        return {"input_ids": out}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def tokenize_examples(ds, tokenizer, spec: DataSpec, fmt: str, max_length: int):
    """input_ids and labels per prompt/completion or conversation row (labels -100 outside the trained
    tokens, see `finetune.chat`). Longer rows are cut to `max_length` (a conversation split in two would
    train answers without their question); rows left with nothing to train on are dropped, with a warning."""
    from finetune import chat

    specials = chat.special_ids(tokenizer)

    def encode(batch):
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            if fmt == "prompt_completion" and not chat.is_chat(fmt, row, spec):
                ids, labels = chat.tokenize_prompt_completion(tokenizer, row[spec.prompt_column],
                                                              row[spec.completion_column], spec.train_on)
            else:
                messages, n_prompt = chat.to_messages(row, fmt, spec)
                ids, labels = chat.tokenize_chat(tokenizer, messages, spec.train_on, n_prompt, specials)
            if any(t != -100 for t in labels[:max_length]):
                out["input_ids"].append(ids[:max_length])
                out["labels"].append(labels[:max_length])
        return out

    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing conversations")
    lost = len(ds) - len(tokenized)
    if lost:
        print(f"warning: {lost} examples have no trained token within data.max_length={max_length} and are "
              "skipped; raise data.max_length", flush=True)
    return tokenized


def pack_documents(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: groups of document indices whose lengths sum to <= capacity.

    Documents are never split across bins, so each bin trains on whole documents; every length
    must already be <= capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        n = lengths[i]
        # the fullest bin that still fits n (best fit) keeps bins dense
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            room, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def packed_dataset(tokenized, max_length: int):
    """Rows of several whole documents: input_ids, position_ids restarting at 0 per document,
    and labels with each document's first token masked (never predicted from the previous one).
    Documents with their own labels (chat masks) keep them.

    transformers builds a block-diagonal causal mask from position_ids that restart, as long
    as no attention_mask is passed and the model runs without a cache (use_cache=False).
    """
    import datasets

    docs = tokenized["input_ids"]
    masks = tokenized["labels"] if "labels" in tokenized.column_names else docs
    rows: dict[str, list[Any]] = {"input_ids": [], "position_ids": [], "labels": []}
    for group in pack_documents([len(d) for d in docs], max_length):
        ids, pos, labels = [], [], []
        for i in sorted(group):
            doc = docs[i]
            ids += doc
            pos += list(range(len(doc)))
            labels += [-100] + masks[i][1:]
        rows["input_ids"].append(ids)
        rows["position_ids"].append(pos)
        rows["labels"].append(labels)
    return datasets.Dataset.from_dict(rows)


class CausalCollator:
    """Pads a batch on the right. Labels are masked by position (padding only), never by token id,
    so an eos inside the text is always learned; labels given per example (a loss mask) are kept.

    No attention_mask is returned. With right padding no real token attends to a later pad, so
    the logits of every real token are the same with or without one, and padded positions carry
    no loss. Without a mask the model runs plain causal attention (SDPA's `is_causal` kernels on
    GPU) instead of building a 4-D padding mask per layer. Packed rows carry position_ids that
    restart per document (transformers builds the block-diagonal mask from them); their padding
    then continues as a separate segment. Unpacked rows get no position_ids: the default 0..n-1
    is right for right padding.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        packed = "position_ids" in features[0]
        batch: dict[str, list] = {"input_ids": [], "labels": []}
        if packed:
            batch["position_ids"] = []
        for f in features:
            ids = list(f["input_ids"])
            pad = longest - len(ids)
            labels = list(f["labels"]) if "labels" in f else list(ids)
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            batch["labels"].append(labels + [-100] * pad)
            if packed:
                batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    return {"count": len(s), "min": s[0], "mean": sum(s) / len(s), "p50": s[len(s) // 2],
            "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1]}

