"""Packing: whole documents laid into rows of a fixed length (first-fit-decreasing within a window), the row
length that follows the data, and the collator that pads a batch and keeps its documents apart."""

from __future__ import annotations

import bisect
from typing import Any

from finetune.data.text import map_batches
from finetune.errors import UserError


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


# Documents packed together: first-fit-decreasing within a window of this many packs nearly as densely as
# packing the whole corpus at once (BENCHMARKS.md: data at scale), and keeps the packer's memory bounded by
# the window, not the corpus; a stream packs the same way as it is read.
PACK_WINDOW = 2000


def pack_rows(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Rows of several whole documents of `batch`: input_ids, position_ids restarting at 0 per document,
    and labels with each document's first token masked (never predicted from the previous one).
    Documents with their own labels (chat masks) keep them."""
    docs = batch["input_ids"]
    masks = batch["labels"] if "labels" in batch else docs
    rows: dict[str, list[Any]] = {"input_ids": [], "position_ids": [], "labels": []}
    for group in pack_documents([len(d) for d in docs], max_length):
        ids, pos, labels = [], [], []
        for i in sorted(group):
            doc = docs[i]
            ids += doc
            pos += range(len(doc))
            labels += [-100, *masks[i][1:]]
        rows["input_ids"].append(ids)
        rows["position_ids"].append(pos)
        rows["labels"].append(labels)
    return rows


MIN_BLOCK = 64  # the shortest row a data-sized block gets


def fitted_block(parts: list, cap: int, round_up: bool = True) -> int:
    """The packed row length that follows the data (data.max_length unset): the smallest power of two that
    holds the longest tokenized example, at most `cap`. Short conversations then pack into short rows and
    a few hundred of them make tens of optimizer steps, not five rows of 1,024 tokens; attention, which
    grows with the row length, costs less per token too."""
    import pyarrow.compute as pc

    longest = 0
    for ds in parts:
        if ds is None or len(ds) == 0:
            continue
        lengths = pc.list_value_length(ds.data.column("input_ids"))
        longest = max(longest, int(pc.max(lengths).as_py() or 0))
    if not round_up:  # unpacked rows: padded to the longest of their batch, at most this
        return min(max(longest, 1), cap)
    block = MIN_BLOCK
    while block < longest:
        block *= 2
    return min(block, cap)


def packed_dataset(tokenized, max_length: int, num_proc: int | None = None):
    """Blocks of at most `max_length` tokens packed from whole documents (`pack_rows`), a window of
    PACK_WINDOW documents at a time; a Dataset or a stream.

    Under eager, sdpa and flex_attention, transformers builds a block-diagonal causal mask from
    position_ids that restart, as long as no attention_mask is passed and the model runs without a
    cache (use_cache=False); under flash attention the collator passes the boundaries (`needs_boundaries`).
    """
    return map_batches(tokenized, lambda batch: pack_rows(batch, max_length), ["input_ids", "position_ids", "labels"],
                       "Packing", num_proc, batch_size=PACK_WINDOW)


def needs_boundaries(model) -> bool:
    """Whether packed rows must carry their documents' boundaries as varlen arguments (`cu_seq_lens_q/k`,
    `max_length_q/k`) for the model's attention to keep the documents apart.

    eager, sdpa and flex_attention get a mask that transformers builds from the restarting position_ids
    (block-diagonal): no. flash_attention_2/3, Hub kernels registered as flash attention, and any attention
    function registered without a mask get none: transformers' flash path infers the boundaries from
    position_ids only for a batch of one row, so a batch of several rows would run dense causal attention
    across documents, silently. With the boundaries it runs varlen attention over the batch as one row.
    A model class that does not pass these arguments down to its attention layers cannot pack exactly
    under such an attention: refused."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if ALL_MASK_ATTENTION_FUNCTIONS.get(attn, None) not in (None, flash_attention_mask):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_supports_attention_backend", False):
        raise UserError(f"data.packing: {type(base).__name__} does not pass document boundaries to its attention "
                        f"layers, so under {attn} packed examples would attend to each other; set data.packing: "
                        "false, or model.attn_implementation: sdpa")
    return True


def boundaries(position_ids) -> dict[str, Any]:
    """The varlen arguments of a packed batch, over its rows laid end to end: a document (or a row's padding)
    starts wherever a position id is 0, and at the start of every row. Computed on the host, once per batch,
    so the attention layers need no device sync to find them."""
    import torch

    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[::position_ids.shape[-1]] = True
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class CausalCollator:
    """Pads a batch on the right. Labels are masked by position (padding only), never by token id,
    so an eos inside the text is always learned; labels given per example (a loss mask) are kept.

    No attention_mask is returned. With right padding no real token attends to a later pad, so
    the logits of every real token are the same with or without one, and padded positions carry
    no loss. Without a mask the model runs plain causal attention (SDPA's `is_causal` kernels on
    GPU) instead of building a 4-D padding mask per layer. Packed rows carry position_ids that
    restart per document (transformers builds the block-diagonal mask from them); their padding
    then continues as a separate segment; with `with_boundaries` (an attention that builds no mask,
    `needs_boundaries`) they carry the varlen arguments too. Unpacked rows get no position_ids: the
    default 0..n-1 is right for right padding.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, with_boundaries: bool = False):
        self.pad_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.with_boundaries = with_boundaries

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
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if packed and self.with_boundaries:
            out.update(boundaries(out["position_ids"]))
        return out
