"""The prepared-data cache: tokenized, packed datasets kept under a key of everything that decides them.

A key is the hash of the tokenizer (its vocabulary, rules, special tokens and chat template), the
data section of the recipe (sources, formats, columns, what carries the loss), each local file's
path, size and modification time, the block length, packing, the seed and PIPELINE below. Any
change to one of them is a new key, so a stale entry is never read; entries are written to a
temporary folder and renamed, so a half-written one is never read either.

Entries live in the `datasets` cache folder (HF_DATASETS_CACHE, else ~/.cache/huggingface/datasets),
under finetune/<key>; `datasets.load_from_disk` maps them into memory without reading them whole.
A Hub dataset is keyed by its name, config and split: `data.cache: false` rebuilds after the dataset
changed on the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

PIPELINE = 2  # raise when tokenization or packing starts producing different rows for the same inputs


def cache_root() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "finetune"


def file_identity(name: str) -> Any:
    """A local file (or every file of a folder) as path, size and modification time; a Hub name as itself."""
    path = Path(name).expanduser()
    if path.is_file():
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return [file_identity(str(p)) for p in sorted(path.rglob("*")) if p.is_file()]
    return name


def tokenizer_identity(tokenizer) -> str:
    """What decides a tokenizer's output: its backend's full description (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a tokenizer without a Rust backend
        from datasets.fingerprint import Hasher

        body = Hasher.hash(tokenizer)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.chat_template,
                        getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
                       sort_keys=True, default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def scratch():
    """A folder for the intermediate steps of one build, removed with everything in it when the block
    ends (the entry keeps only the result)."""
    import tempfile

    cache_root().mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".build-", dir=cache_root())


def make_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"pipeline": PIPELINE, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load(key: str) -> tuple[Any, Any, dict] | None:
    """(train, eval or None, meta) of a finished entry, or None."""
    folder = cache_root() / key
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    import datasets

    meta = json.loads(meta_file.read_text())
    train = datasets.load_from_disk(str(folder / "train"))
    eval_ds = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return train, eval_ds, meta


def store(key: str, train, eval_ds, meta: dict, num_proc: int | None = None) -> Path:
    """Write an entry: the datasets, then meta.json (its presence marks the entry finished), then one rename."""
    folder = cache_root() / key
    tmp = folder.with_name(f".{key}.{os.getpid()}.{time.time_ns()}")
    try:
        train.save_to_disk(str(tmp / "train"), num_proc=num_proc)
        if eval_ds is not None:
            eval_ds.save_to_disk(str(tmp / "eval"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
