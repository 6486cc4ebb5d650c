"""Data sources: read a file, a folder or a Hub dataset as a `datasets.Dataset` (or a stream), check
local sources before a run starts, and mix several sources into one (data.train as a list).

A mixture is a list of sources, each its own path, split, format and columns (`SourceSpec`); a source
is handed to the task as a one-source `DataSpec` (`one_source`), so every reader and check written for
one source serves each source of a mixture. `mix` joins the prepared parts: all rows of every
source in order (no weights), or sampled with the weights as probabilities
(`datasets.interleave_datasets`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from finetune.errors import UserError, first_line
from finetune.recipe.sections import DataSpec, SourceSpec

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
            from finetune.launch.offline import hub_reachable

            if not hub_reachable():
                raise UserError(f"{key}: '{name}' is not a local file or folder, and the Hugging Face Hub is "
                                "unreachable (or HF_HUB_OFFLINE=1); pass a local file")
            ds = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files

        why = file_problem(path, key, name) if path.is_file() else None
        raise UserError(why or f"{key}: could not read '{name}': {first_line(e)}") from e
    if len(ds) == 0:
        raise UserError(f"{key}: '{name}' has no rows")
    return ds


def check_sources(spec: DataSpec) -> None:
    """Pre-flight: each local data source exists and is not empty (reading it is the task's job)."""
    problems = []
    for source in listed(spec, "train") + listed(spec, "eval"):
        name = source.spec.train
        path = Path(name).expanduser()
        if path.is_file() and path.stat().st_size == 0:
            problems.append(f"{source.key}: '{name}' is empty; give a file with at least one row")
        elif not path.exists() and looks_like_file(name):
            problems.append(f"{source.key}: no such file '{name}'")
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


def load_folder(path: Path, key: str, streaming: bool = False):
    """A folder of images (imagefolder: <class>/<file> or metadata.jsonl) or of data files."""
    import datasets

    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train", streaming=streaming)
    data_files = [p for p in files if p.suffix.lower() in FILE_BUILDERS]
    suffixes = {FILE_BUILDERS[p.suffix.lower()] for p in data_files}
    if not data_files:
        raise UserError(f"{key}: folder '{path}' holds no data files (.jsonl, .json, .csv, .parquet, .txt) or images")
    if len(suffixes) > 1:
        raise UserError(f"{key}: folder '{path}' mixes file types; keep one kind of file per folder")
    return datasets.load_dataset(suffixes.pop(), data_files=[str(p) for p in data_files], split="train",
                                 streaming=streaming)


def load_stream(name: str, key: str, split: str = "train", config: str | None = None):
    """A `datasets.IterableDataset` over a local file, a folder of files or a Hub dataset: rows are read
    as they are asked for, nothing is converted or kept."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{key}: cannot read '{name}': use .jsonl, .json, .csv, .parquet or .txt")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    if path.is_dir():
        return load_folder(path, key, streaming=True)
    if looks_like_file(name):
        raise UserError(f"{key}: no such file '{name}'")
    from finetune.launch.offline import hub_reachable

    if not hub_reachable():
        raise UserError(f"{key}: '{name}' is not a local file or folder, and the Hugging Face Hub is unreachable "
                        "(or HF_HUB_OFFLINE=1); pass a local file")
    return datasets.load_dataset(name, config, split=split, streaming=True)


# ---------------------------------------------------------------------------------------
# Mixtures


@dataclasses.dataclass(frozen=True)
class Source:
    key: str  # how messages name it: data.train, or data.train.1 in a list
    spec: DataSpec  # a one-source DataSpec: `train` is this source, with its own split, config, format, columns
    weight: float | None = None
    fraction: float | None = None


SOURCE_FIELDS = ("format", "text_column", "prompt_column", "completion_column", "messages_column", "train_on")


def listed(spec: DataSpec, which: str = "train") -> list[Source]:
    """The sources of data.train (or data.eval), each as a one-source DataSpec that every reader and check
    written for one source takes. A plain data.train is `spec` itself (its eval fields included)."""
    value = getattr(spec, which)
    if value is None:
        return []
    if isinstance(value, str) and which == "train" and not isinstance(spec.eval, list):
        return [Source("data.train", spec)]
    entries = [SourceSpec(path=value)] if isinstance(value, str) else value
    out = []
    for i, entry in enumerate(entries):
        default_split = spec.train_split if which == "train" else spec.eval_split or "validation"
        update = {"train": entry.path, "train_split": entry.split or default_split, "config": entry.config or spec.config,
                  "eval": None, "max_samples": entry.max_samples}
        if which == "eval" or spec.eval is not None:  # nothing held out: the rows are all train, or all eval
            update.update(eval_split=None, eval_fraction=0.0)
        if which == "eval":
            update["max_eval_samples"] = None
        update.update({f: getattr(entry, f) for f in SOURCE_FIELDS if getattr(entry, f) is not None})
        key = f"data.{which}" if isinstance(value, str) else f"data.{which}.{i}"
        out.append(Source(key, spec.model_copy(update=update), entry.weight, entry.fraction))
    return out


def describe(spec: DataSpec, which: str = "train") -> str:
    """data.train (or data.eval) in a few words: its path, or its sources with their weights."""
    value = getattr(spec, which)
    if not isinstance(value, list):
        return str(value)
    return " + ".join(s.path + (f" (weight {s.weight:g})" if s.weight is not None else "") for s in value)


def paths(spec: DataSpec) -> list[str]:
    """Every source of data.train and data.eval."""
    return [s.spec.train for s in listed(spec, "train") + listed(spec, "eval")]


def subsample(ds, source: Source, seed: int):
    """A random `fraction` of a source's rows (the same rows for the same seed)."""
    if source.fraction is None or source.fraction >= 1:
        return ds
    n = max(1, round(len(ds) * source.fraction))
    return ds.shuffle(seed=seed).select(range(n))


def mix(parts: list, weights: list[float | None], seed: int, stopping_strategy: str = "first_exhausted"):
    """One dataset (or stream) of several: every row of each part in turn, or, with weights, rows drawn
    from the parts with the weights (normalised) as probabilities, the same draws for the same seed."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    if any(w is None for w in weights):
        return datasets.concatenate_datasets(parts)
    total = sum(weights)  # type: ignore[arg-type]
    return datasets.interleave_datasets(parts, probabilities=[w / total for w in weights],  # type: ignore[operator]
                                        seed=seed, stopping_strategy=stopping_strategy)


class EmptyBufferNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


def shuffled(stream, seed: int, chunk: int):
    """A stream's files (shards) in a seeded order, and its rows permuted within consecutive chunks of
    `chunk` rows, each chunk by its own seeded permutation.

    Not `IterableDataset.shuffle(buffer_size=chunk)`: the rows its buffer holds are not part of the
    stream's state, so a run resumed from that state would skip them. A chunk is: resumed, the stream
    re-reads the current chunk from its start and skips the rows already yielded, so it continues at
    exactly the next row of the uninterrupted order.

    Applied last (to tokenized or packed rows): every batched map after it would turn the chunk's
    indices, which each of its rows carries as its key, into text, row by row (10,000 indices a row
    halved the throughput of a stream shuffled before tokenizing)."""
    import numpy as np

    def permute(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        order = np.random.default_rng([seed, indices[0] // chunk]).permutation(len(indices))
        return {k: [v[i] for i in order] for k, v in batch.items()}

    # buffer_size=1: the shard order alone is shuffled, and no row is ever held back (so datasets'
    # warning that a resumed buffer starts empty does not apply)
    stream_log = logging.getLogger("datasets.iterable_dataset")
    if not any(isinstance(f, EmptyBufferNote) for f in stream_log.filters):
        stream_log.addFilter(EmptyBufferNote())
    return stream.shuffle(seed=seed, buffer_size=1).map(permute, batched=True, batch_size=chunk, with_indices=True,
                                                         features=stream.features)


def rank_part(stream, rank: int, world: int):
    """This process's part of a stream: whole files when there are as many as processes (a multiple),
    else every world-th row. The parts are disjoint and together the whole stream.

    Rows are kept by a filter rather than `split_dataset_by_node`, which for a stream that cannot be
    split by files keeps every world-th example at the end of the whole pipeline: each process would
    tokenize and pack every row of the stream and keep its share of the blocks. Filtered here, each
    process reads every row but tokenizes and packs only its own."""
    if world == 1:
        return stream
    if stream.num_shards % world == 0:
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(stream, rank=rank, world_size=world)
    return stream.filter(lambda _, i: i % world == rank, with_indices=True)
