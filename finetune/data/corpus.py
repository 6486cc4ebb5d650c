"""The causal-LM data pipeline: sources -> checked rows -> token ids -> packed blocks, cached or streamed.

    finetune prepare RECIPE          # this step alone, so a cluster job starts training at once

1. Sources: data.train is one source or a list (a mixture); each is read and checked in its own
   format (text, prompt/completion, conversations) and columns (`sources.listed`).
2. Template: when a source holds conversations, the tokenizer gets the chat template, once.
3. Tokens: each source is tokenized (data.num_proc processes), text with eos after each document,
   other formats with labels -100 outside the trained tokens.
4. Mixture: the sources are joined: every row once, or drawn by their weights (`sources.mix`).
5. Blocks: whole documents packed into rows of data.max_length tokens (`packing.packed_dataset`); unset, the
   smallest power of two that holds the longest example, at most 1,024 (`packing.fitted_block`).

Not streaming, the result is cached (data/cache.py): with several processes the first one on each
machine prepares it while the others wait, then they load it; a second run on the same data loads
it in seconds. Streaming (data.streaming), nothing is materialised: the same steps run lazily as
training reads, and each process reads its own part of the stream (`sources.rank_part`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from finetune.data import cache
from finetune.data import chat
from finetune.data import sources
from finetune.data import templates
from finetune.data import text as D
from finetune.data.packing import fitted_block, packed_dataset
from finetune.errors import UserError
from finetune.recipe.schema import Recipe
from finetune.recipe.sections import DataSpec

CHECK_ROWS = 1000  # a stream's rows checked before training (the whole file is checked when not streaming)


@dataclasses.dataclass
class Prepared:
    train: Any  # a Dataset, or an IterableDataset when streaming
    eval: Any
    fmt: str  # the format of the conversations, if any source has them (else text or prompt_completion)
    templated: bool  # rendered with the chat template
    new_tokens: list[str]  # tokens the template added to the tokenizer
    cache: Path | None = None  # where the prepared data is kept
    block: int | None = None  # tokens per row at most: the packed row length, or the longest example


def prepare(recipe: Recipe, tokenizer, max_length: int, packing: bool) -> Prepared:
    """The training and evaluation data of a causal-LM run, tokenized (and packed); from the cache
    when the same data was prepared before with the same tokenizer and settings."""
    d = recipe.data
    if d.streaming:
        return stream(recipe, tokenizer, max_length, packing)
    key = cache.make_key(key_parts(recipe, tokenizer, max_length, packing)) if d.cache else None
    with first_process():
        hit = cache.load(key) if key else None
        if hit is not None:
            train, eval_ds, meta = hit
            new_tokens = templates.set_template(tokenizer, d.chat_template) if meta["templated"] else []
            folder = cache.cache_root() / key  # type: ignore[operator]
            print(f"data: {len(train):,} prepared rows from the cache ({folder})", flush=True)
            return Prepared(train, eval_ds, meta["format"], meta["templated"], new_tokens, folder, meta.get("block"))
        start = time.perf_counter()
        if key is None:
            return build(recipe, tokenizer, max_length, packing)
        # Tokenized and packed steps are written to a scratch folder, which goes once the entry is
        # stored: beside the source they would stay, about twice the entry's size again on disk.
        with cache.scratch() as scratch, D.writing_to(Path(scratch)):
            prepared = build(recipe, tokenizer, max_length, packing)
            took = time.perf_counter() - start
            meta = {"format": prepared.fmt, "templated": prepared.templated, "rows": len(prepared.train),
                    "seconds": round(took, 1), "block": prepared.block}
            folder = cache.store(key, prepared.train, prepared.eval, meta, d.num_proc)
        train, eval_ds, _ = cache.load(key)  # type: ignore[misc]  # the stored copy: mapped, not in memory
        print(f"data: prepared {len(train):,} rows in {took:.0f} s; cached for the next run ({folder})", flush=True)
        return dataclasses.replace(prepared, train=train, eval=eval_ds, cache=folder)


@contextlib.contextmanager
def first_process():
    """With several processes: the first on each machine runs the body first, the others after it
    (and find its result in the cache)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


def key_parts(recipe: Recipe, tokenizer, max_length: int, packing: bool) -> dict[str, Any]:
    """Everything that decides the prepared rows (see data/cache.py)."""
    d = recipe.data
    template = Path(d.chat_template).expanduser() if d.chat_template else None
    return {"task": recipe.task, "data": d.model_dump(exclude={"streaming", "num_proc", "cache", "shuffle_buffer"}),
            "files": [cache.file_identity(s.spec.train) for s in sources.listed(d, "train") + sources.listed(d, "eval")],
            "template_file": hashlib.sha256(template.read_bytes()).hexdigest() if template and template.is_file() else None,
            "tokenizer": cache.tokenizer_identity(tokenizer), "max_length": max_length, "packing": packing,
            "seed": recipe.train.seed}


def tokenize(ds, tokenizer, spec: DataSpec, fmt: str, max_length: int, packing: bool, key: str = "data.train"):
    if fmt == "text":
        return D.tokenize_documents(ds, tokenizer, spec.text_column, max_length, split_long=packing,
                                    num_proc=spec.num_proc)
    return D.tokenize_examples(ds, tokenizer, spec, fmt, max_length, num_proc=spec.num_proc, key=key)


def with_labels(parts: list) -> list:
    """Parts of one mixture need the same columns: text gets labels (its ids) when a chat part has them."""
    if not any("labels" in D.columns_of(p) for p in parts):
        return parts
    return [p if "labels" in D.columns_of(p) else D.map_batches(
        p, lambda b: {"input_ids": b["input_ids"], "labels": b["input_ids"]}, ["input_ids", "labels"], "Labels")
        for p in parts]


def template_rules(tokenizer, d: DataSpec, checked: list[tuple[Any, str, DataSpec]]) -> tuple[str, bool, list[str]]:
    """(format, templated, new tokens): the template is set once, when any source holds conversations.
    `checked`: (first row, format, spec) per source."""
    chats = [fmt for row, fmt, spec in checked if chat.is_chat(fmt, row, spec)]
    new_tokens = templates.set_template(tokenizer, d.chat_template) if chats else []
    return (chats[0] if chats else checked[0][1]), bool(chats), new_tokens


def build(recipe: Recipe, tokenizer, max_length: int, packing: bool) -> Prepared:
    d, seed = recipe.data, recipe.train.seed
    train_sources = sources.listed(d, "train")
    whole = train_sources[0].spec is d  # one source: its eval fields are read with it
    loaded, problems = [], []
    for src in train_sources + ([] if whole else sources.listed(d, "eval")):
        try:
            rows, held_out, fmt = D.load_causal_splits(src.spec, seed, src.key)
        except UserError as e:
            problems += e.problems
            continue
        loaded.append((src, sources.subsample(rows, src, seed), held_out, fmt))
    if problems:
        raise UserError(problems)
    fmt, templated, new_tokens = template_rules(tokenizer, d, [(ds[0], f, s.spec) for s, ds, _, f in loaded])

    train_parts, weights, eval_parts = [], [], []
    for src, rows, held_out, source_fmt in loaded:
        part = tokenize(rows, tokenizer, src.spec, source_fmt, max_length, packing, src.key)
        if src.key.startswith("data.eval"):
            eval_parts.append(part)
            continue
        train_parts.append(part)
        weights.append(src.weight)
        if held_out is not None:
            eval_parts.append(tokenize(held_out, tokenizer, src.spec, source_fmt, max_length, packing, src.key))
    if len(loaded) > 1:
        report_mixture(loaded, weights)
    train = sources.mix(with_labels(train_parts), weights, seed, d.stopping_strategy)
    if not whole and d.max_samples and len(train) > d.max_samples:
        train = train.select(range(d.max_samples))
    eval_ds = sources.mix(with_labels(eval_parts), [None] * len(eval_parts), seed) if eval_parts else None
    if eval_ds is not None and not whole and d.max_eval_samples and len(eval_ds) > d.max_eval_samples:
        eval_ds = eval_ds.shuffle(seed=seed).select(range(d.max_eval_samples))
    block = max_length if d.max_length else fitted_block([train, eval_ds], max_length, packing)  # rows' longest
    if packing:
        train = packed_dataset(train, block, d.num_proc)
        eval_ds = packed_dataset(eval_ds, block, d.num_proc) if eval_ds is not None else None
    return Prepared(train, eval_ds, fmt, templated, new_tokens, block=block)


def report_mixture(loaded: list, weights: list[float | None]) -> None:
    train = [(src, rows, fmt) for src, rows, _, fmt in loaded if src.key.startswith("data.train")]
    total_rows = sum(len(rows) for _, rows, _ in train)
    total_weight = sum(w for w in weights if w is not None)
    print(f"data: a mixture of {len(train)} sources", flush=True)
    for (src, rows, fmt), weight in zip(train, weights):
        share = weight / total_weight if weight is not None else len(rows) / max(1, total_rows)
        print(f"  {src.key} '{src.spec.train}': {len(rows):,} rows ({fmt.replace('_', '/')}), {share:.0%} of the "
              "mixture" + (" by weight" if weight is not None else " by rows"), flush=True)


# ---------------------------------------------------------------------------------------
# Streaming


def stream(recipe: Recipe, tokenizer, max_length: int, packing: bool) -> Prepared:
    """The training data as a stream read, tokenized and packed as training asks for it. Each source's
    first CHECK_ROWS rows are checked before training; without data.eval, the first rows of each
    source are held out for evaluation (data.max_eval_samples in all, default 500)."""
    from datasets import Dataset

    d, seed = recipe.data, recipe.train.seed
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    train_sources = sources.listed(d, "train")
    hold_out = d.eval is None and not d.eval_split and d.eval_fraction > 0
    per_source = -(-(d.max_eval_samples or 500) // len(train_sources))
    opened, problems = [], []
    for src in train_sources:
        s = src.spec
        try:
            raw = sources.load_stream(s.train, src.key, s.train_split, s.config)
            head = list(raw.take(CHECK_ROWS))
            if not head:
                raise UserError(f"{src.key}: '{s.train}' has no rows")
            fmt = chat.detect_format(list(head[0]), s, s.train, src.key)
        except UserError as e:
            problems += e.problems
            continue
        problems += head_problems(head, fmt, s, src.key)
        n_eval = min(per_source, len(head) // 2) if hold_out else 0
        held_out = Dataset.from_list(head[:n_eval]) if n_eval else None
        if d.eval_split:
            held_out = Dataset.from_list(list(sources.load_stream(s.train, src.key, d.eval_split, s.config)
                                              .take(per_source)))
        part = sources.rank_part(raw.skip(n_eval) if n_eval else raw, rank, world)
        if s.max_samples:
            part = part.take(s.max_samples)
        opened.append((src, head[0], fmt, part, held_out))
    evals = []
    if d.eval is not None:  # evaluation files are read whole (and cut to data.max_eval_samples)
        for src in sources.listed(d, "eval"):
            try:
                evals.append((src, *D.load_causal_splits(src.spec, seed, src.key)))
            except UserError as e:
                problems += e.problems
    if problems:
        raise UserError(problems)
    fmt, templated, new_tokens = template_rules(
        tokenizer, d, [(row, f, src.spec) for src, row, f, _, _ in opened] + [(r[0], f, s.spec) for s, r, _, f in evals])

    parts = [tokenize(part, tokenizer, src.spec, f, max_length, packing, src.key) for src, _, f, part, _ in opened]
    train = sources.mix(with_labels(parts), [src.weight for src, *_ in opened], seed, d.stopping_strategy)
    eval_parts = [tokenize(h, tokenizer, src.spec, f, max_length, packing) for src, _, f, _, h in opened if h is not None]
    eval_parts += [tokenize(rows, tokenizer, src.spec, f, max_length, packing) for src, rows, _, f in evals]
    eval_ds = sources.mix(with_labels(eval_parts), [None] * len(eval_parts), seed) if eval_parts else None
    if eval_ds is not None and d.max_eval_samples and len(eval_ds) > d.max_eval_samples:
        eval_ds = eval_ds.shuffle(seed=seed).select(range(d.max_eval_samples))
    if packing:
        train = packed_dataset(train, max_length)
        eval_ds = packed_dataset(eval_ds, max_length) if eval_ds is not None else None
    if d.shuffle_buffer:  # the training rows (blocks, when packed), as the last step: see sources.shuffled
        train = sources.shuffled(train, seed, d.shuffle_buffer)
    order = f"{'blocks' if packing else 'rows'} shuffled in chunks of {d.shuffle_buffer:,}" if d.shuffle_buffer \
        else "in file order"
    print(f"data: streaming {len(opened)} source{'s' if len(opened) > 1 else ''}"
          + (f", process {rank} of {world} reads its own part" if world > 1 else "") + f"; {order}", flush=True)
    return Prepared(train, eval_ds, fmt, templated, new_tokens, block=max_length)


def head_problems(head: list[dict], fmt: str, spec: DataSpec, key: str) -> list[str]:
    """The first rows of a stream, checked as a whole file is (row numbers count from 1)."""
    if fmt != "text":
        return chat.check_rows(head, fmt, spec, key)
    column = spec.text_column
    for n, row in enumerate(head, 1):
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            return [f"{key}: column '{column}' of '{spec.train}' holds {type(value).__name__} values (row {n}: "
                    f"{str(value)[:40]!r}), not text; set data.text_column to a column of strings"]
    return []


STREAM_STATE = "stream-state-{rank}.json"  # in each checkpoint: where each process's stream was


def own_dataloader(trainer, checkpoint: str | None) -> None:
    """A stream is already split between the processes (`sources.rank_part`); the Trainer's accelerate
    would split it again and drop part of each process's rows, so training reads it with a plain
    DataLoader, in this process (its position is the stream's state, which workers would not share).

    Each checkpoint keeps every process's stream state; resumed, the stream continues from it: the
    Trainer does not replay the batches already trained, and the stream re-reads at most its current
    chunk (a tokenization batch, a packing window, a shuffle chunk) to find the next row. A checkpoint
    without the state (written before it was kept) resumes by replaying the stream from its start."""
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback

    # A stream that runs out before train.max_steps starts again, in the same order. The Trainer sees one
    # endless pass, so the stream's saved state says which repetition it was in (the Trainer's own epochs
    # would restart the stream from the saved state instead of from its beginning).
    stream, rank = trainer.train_dataset.repeat(None), int(os.environ.get("RANK", "0"))

    def get_train_dataloader():
        return DataLoader(stream, batch_size=trainer._train_batch_size, collate_fn=trainer.data_collator,
                          num_workers=0, pin_memory=trainer.args.dataloader_pin_memory)

    class KeepStreamState(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():  # before the manifest is written (this callback comes first)
                (folder / STREAM_STATE.format(rank=rank)).write_text(json.dumps(stream.state_dict()))

    trainer.get_train_dataloader = get_train_dataloader
    trainer.callback_handler.callbacks.insert(0, KeepStreamState())
    saved = Path(checkpoint) / STREAM_STATE.format(rank=rank) if checkpoint else None
    if saved is not None and saved.is_file():
        stream.load_state_dict(json.loads(saved.read_text()))
        trainer.args.ignore_data_skip = True
        if rank == 0:
            print(f"data: the stream continues where {Path(checkpoint).name} left it", flush=True)
