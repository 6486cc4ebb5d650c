"""Packed rows are exact under every attention implementation (finetune/data/packing.py).

eager, sdpa and flex_attention get a block-diagonal mask that transformers builds from the restarting
position ids. Flash attention (flash_attention_2/3, Hub kernels) gets no mask: transformers infers the
documents from position ids only for a batch of one row. The rule is tested here with a stand-in: an
attention function registered through transformers' AttentionInterface, with no mask function (as a
flash kernel has none), that computes exact varlen attention from the arguments it is given and fails
when they are missing. The real kernels run on a GPU (BENCHMARKS.md).
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import toy_sentences, write_jsonl

from finetune.data.packing import CausalCollator, boundaries, needs_boundaries
from finetune.errors import UserError

STAND_IN = "finetune-test-varlen"
calls = []


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each segment of `cu_seq_lens_q`, over the batch's rows laid end to end
    (what flash_attn_varlen_func computes); [batch, heads, length, dim] in, [batch, length, heads, dim] out."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or kwargs.get("max_length_q") is None:
        raise AssertionError("packed rows reached a mask-less attention without their boundaries")
    calls.append(cu.tolist())
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q, k, v = (x.transpose(1, 2).reshape(batch * length, -1, dim) for x in (query, key, value))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # [heads, n, dim]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            *seg, is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(batch, length, heads, dim), None


@pytest.fixture(scope="module")
def stand_in():
    from transformers import AttentionInterface

    AttentionInterface.register(STAND_IN, varlen_attention)  # no mask function: like flash and TGI/vLLM
    return STAND_IN


def test_boundaries_of_a_packed_batch_by_hand():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    got = boundaries(position_ids)
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12] and got["cu_seq_lens_q"].dtype == torch.int32
    assert got["cu_seq_lens_k"] is got["cu_seq_lens_q"]
    assert got["max_length_q"] == got["max_length_k"] == 4
    # a row that does not start at position 0 still starts a segment (rows never share a document)
    assert boundaries(torch.tensor([[0, 1, 2], [3, 4, 5]]))["cu_seq_lens_q"].tolist() == [0, 3, 6]


def fake_model(attn: str, backend: bool = True):
    cls = type("TinyForCausalLM", (), {"_supports_attention_backend": backend})
    model = cls()
    model.config = types.SimpleNamespace(_attn_implementation=attn)
    return model


def test_which_attention_needs_the_boundaries(stand_in):
    for attn in ("eager", "sdpa", "flex_attention"):
        assert needs_boundaries(fake_model(attn)) is False, attn
    for attn in ("flash_attention_2", "flash_attention_3", stand_in):
        assert needs_boundaries(fake_model(attn)) is True, attn
    with pytest.raises(UserError) as e:
        needs_boundaries(fake_model("flash_attention_2", backend=False))
    assert e.value.problems == ["data.packing: TinyForCausalLM does not pass document boundaries to its attention "
                                "layers, so under flash_attention_2 packed examples would attend to each other; set "
                                "data.packing: false, or model.attn_implementation: sdpa"]


ATTENTION = [pytest.param("eager"), pytest.param("sdpa"), pytest.param(STAND_IN),
             pytest.param("flex_attention", marks=pytest.mark.slow)]  # flex: ~35 s of compiling on CPU


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_llama"])  # learned positions; RoPE with grouped-query attention
def test_packed_batch_gives_each_document_its_own_logits(name, attn, request, stand_in):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.packing import packed_dataset

    if (name, attn) == ("tiny_gpt", "flex_attention"):
        pytest.skip("transformers has no flex_attention for GPT-2")
    path = request.getfixturevalue(name)
    tok = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in toy_sentences(9, seed=11)]
    rows = list(packed_dataset(datasets.Dataset.from_dict({"input_ids": docs}), max_length=40))
    assert len(rows) >= 2 and any(len(r["input_ids"]) < 40 for r in rows)  # several rows, one padded
    batch = CausalCollator(tok.pad_token_id, with_boundaries=needs_boundaries(model))(rows)
    assert ("cu_seq_lens_q" in batch) == (attn == STAND_IN)
    calls.clear()
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    assert len(calls) == (model.config.num_hidden_layers if attn == STAND_IN else 0)
    seen = 0
    for r, row in enumerate(rows):
        start = 0
        for n in ((torch.tensor(row["position_ids"]) == 0).nonzero().flatten().tolist()[1:] + [len(row["input_ids"])]):
            ids = row["input_ids"][start:n]
            with torch.no_grad():
                alone = reference(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[r, start:n], alone, atol=1e-5, rtol=1e-4)
            start, seen = n, seen + 1
    assert seen == len(docs)
    if attn == STAND_IN:  # without the boundaries it refuses, where flash attention would attend across documents
        with pytest.raises(AssertionError, match="without their boundaries"), torch.no_grad():
            model(**CausalCollator(tok.pad_token_id)(rows), use_cache=False)


def test_training_under_a_mask_less_attention_passes_the_boundaries(tiny_llama, tmp_path, stand_in):
    from test_tasks_clm import losses, train

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in toy_sentences(200, seed=2)])
    calls.clear()
    metrics = train(tiny_llama, data, tmp_path / "run", method="full", steps=12, **{
        "model.attn_implementation": stand_in, "train.batch_size": 4, "train.logging_steps": 2})
    assert metrics["steps"] == 12 and calls  # every forward got the boundaries (or the stand-in raised)
    assert all(len(cu) > 5 for cu in calls[:4])  # 4 rows of several documents each
    run = losses(tmp_path / "run")
    assert run[-1] < run[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_keeps_packed_documents_apart_only_with_the_boundaries(tiny_llama):
    """The real kernel: with the boundaries each document gets its own logits; without them (a batch of two
    rows, position ids alone) documents attend to each other, which is what packing under flash did before."""
    import importlib.util

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.packing import packed_dataset

    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs flash-attn")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    load = dict(dtype=torch.bfloat16, device_map="cuda")
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", **load).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2", **load).eval()
    assert needs_boundaries(model)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in toy_sentences(9, seed=11)]
    rows = list(packed_dataset(datasets.Dataset.from_dict({"input_ids": docs}), max_length=40))

    def worst(batch) -> float:
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits.float()
        out = 0.0
        for r, row in enumerate(rows):
            ends = (torch.tensor(row["position_ids"]) == 0).nonzero().flatten().tolist()[1:] + [len(row["input_ids"])]
            start = 0
            for n in ends:
                with torch.no_grad():
                    alone = reference(input_ids=torch.tensor([row["input_ids"][start:n]], device="cuda")).logits[0]
                out, start = max(out, (logits[r, start:n] - alone.float()).abs().max().item()), n
        return out

    assert worst(CausalCollator(tok.pad_token_id, with_boundaries=True)(rows)) < 0.05
    assert worst(CausalCollator(tok.pad_token_id)(rows)) > 0.1
