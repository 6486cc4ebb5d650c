"""Causal-LM training end to end on a tiny GPT-2: LoRA, full, pre-training, resume, merge, packing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke, toy_sentences, write_jsonl

from finetune.recipe.load import build_recipe
from finetune.tasks import clm


def train(model, data, out, method="lora", steps=40, **sets):
    """Run the clm task in-process with a fast recipe; returns its metrics."""
    items = {"train.max_steps": steps, "train.batch_size": 8, "train.logging_steps": 5,
             "train.learning_rate": 3e-3, "train.save_steps": 1000, "data.max_length": 32, "lora.dropout": 0.0}
    items.update(sets)
    recipe = build_recipe({"method": method, "model": {"name": model} if model else {},
                           "data": {"train": data}, "train": {"output_dir": str(out)}},
                          sets=[f"{k}={v}" for k, v in items.items()])
    return clm.run(recipe)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def lora_run(tiny_gpt_lm, toy_qa_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    metrics = train(tiny_gpt_lm, toy_qa_text, out, steps=60)
    return out, metrics


def test_lora_loss_falls_and_run_dir_explains_itself(lora_run):
    out, metrics = lora_run
    curve = losses(out)
    assert curve[-1] < 0.6 * curve[0], curve
    assert metrics["eval_loss"] < 0.6 * curve[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml",
                 "metrics.json", "log.jsonl", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["trainable_params"] < saved["total_params"] / 2
    assert saved["tokens_seen"] > 0 and saved["perplexity"] == pytest.approx(torch.tensor(saved["eval_loss"]).exp().item(), rel=1e-3)
    card = (out / "README.md").read_text()
    assert "finetune lora recipe.yaml" in card and "eval_loss" in card


def test_lora_moves_adapter_weights_and_freezes_base(lora_run, tiny_gpt_lm):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt_lm).state_dict()
    tuned = AutoPeftModelForCausalLM.from_pretrained(str(out))
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # lora_B starts at zero
    for name, p in tuned.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), f"frozen weight changed: {name}"


def test_merged_model_matches_adapter_logits(lora_run, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora_run
    code, stdout, stderr = invoke("merge", str(out), "-o", str(tmp_path / "merged"))
    assert code == 0, stderr
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))(toy_sentences(4, seed=9), return_tensors="pt",
                                                                   padding=True)
    with torch.no_grad():
        a, b = adapter(**ids).logits, merged(**ids).logits
    assert (a - b).abs().max() < 1e-4
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_generation_folds_the_adapter_into_its_base_with_the_same_logits(lora_run):
    """`generate` and `chat` run a LoRA run merged in memory (three fewer matmuls per adapted layer and token)."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoTokenizer

    from finetune.use.inference import load_for_generation

    out, _ = lora_run
    model, tok, _ = load_for_generation(str(out))
    assert not isinstance(model, PeftModel) and not any("lora" in n for n, _ in model.named_parameters())
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ids = AutoTokenizer.from_pretrained(str(out))(toy_sentences(4, seed=9), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (adapter(**ids).logits - model(**ids).logits).abs().max() < 1e-4


def test_generate_from_run_directory(lora_run, tiny_gpt_lm):
    out, _ = lora_run
    prompt = ("where did the red cat", "--temperature", "0", "--max-new-tokens", "8")
    code, tuned, _ = invoke("generate", str(out), *prompt)
    assert code == 0 and tuned.startswith("where did the red cat sit")  # the fine-tuning template
    code, base, _ = invoke("generate", tiny_gpt_lm, *prompt)
    assert code == 0 and base.startswith("where did the red cat sat")  # the base's template


def test_full_finetune_changes_all_weights(tiny_gpt, toy_text, tmp_path):
    from transformers import AutoModelForCausalLM

    metrics = train(tiny_gpt, toy_text, tmp_path / "full", method="full", steps=20)
    assert metrics["trainable_params"] == metrics["total_params"]
    before = AutoModelForCausalLM.from_pretrained(tiny_gpt).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).state_dict()
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])


def test_pretrain_trains_tokenizer_and_model_from_preset(toy_text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pre"
    train(None, toy_text, out, method="pretrain", steps=40, **{"model.config": "tiny", "model.vocab_size": 300,
                                                               "data.packing": True})
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok) <= 300 + 2
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.n_layer == 4 and model.config.n_embd == 128
    curve = losses(out)
    assert curve[-1] < 0.5 * curve[0]


def test_pad_equal_to_eos_adds_no_token(tiny_gpt_nopad, toy_text, tmp_path):
    """Labels are masked by position, so eos can pad: no embedding row is added, and eos is still learned."""
    from transformers import AutoTokenizer

    out = tmp_path / "nopad"
    train(tiny_gpt_nopad, toy_text, out, steps=10)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == len(AutoTokenizer.from_pretrained(tiny_gpt_nopad))
    code, _, stderr = invoke("merge", str(out), "-o", str(tmp_path / "merged"))
    assert code == 0, stderr
    code, stdout, _ = invoke("generate", str(tmp_path / "merged"), "the", "--max-new-tokens", "3")
    assert code == 0 and stdout.startswith("the")


def test_resume_after_interruption_matches_uninterrupted_run(tiny_gpt, toy_text, tmp_path):
    from safetensors.torch import load_file

    sets = {"train.save_steps": 6, "train.save_total_limit": 5, "data.max_samples": 200}
    straight = tmp_path / "straight"
    train(tiny_gpt, toy_text, straight, steps=12, **sets)

    # The same run, "killed" while writing checkpoint-12: only checkpoint-6 is complete.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "README.md"):
        (resumed / f).unlink()
    (resumed / "checkpoints" / "checkpoint-12" / "trainer_state.json").unlink()  # half-written
    recipe_file = resumed / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(straight), str(resumed)))

    code, stdout, stderr = invoke("lora", "--resume", "-o", str(resumed))
    assert code == 0, stderr
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the log reads as one run


def test_packing_keeps_documents_apart(tiny_gpt):
    """A packed row gives each document the same logits as running it alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.packing import CausalCollator, packed_dataset

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt).eval()
    model.config.use_cache = False
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in toy_sentences(3, seed=5)]
    import datasets

    packed = packed_dataset(datasets.Dataset.from_dict({"input_ids": docs}), max_length=64)
    assert len(packed) == 1
    batch = CausalCollator(tok.pad_token_id)([packed[0]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            assert torch.allclose(together[start:start + len(doc)], alone, atol=1e-5)
            start += len(doc)
    # each document's first token is never a target
    labels = batch["labels"][0].tolist()
    assert [labels[0], labels[len(docs[0])], labels[len(docs[0]) + len(docs[1])]] == [-100, -100, -100]


def test_pack_documents_is_a_valid_packing():
    from finetune.data.packing import pack_documents

    lengths = [5, 9, 3, 7, 10, 1, 2, 8, 6, 4] * 20
    bins = pack_documents(lengths, capacity=16)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 16) + 2  # close to the lower bound


def test_collator_keeps_eos_in_labels_when_pad_equals_eos():
    from finetune.data.packing import CausalCollator

    batch = CausalCollator(pad_token_id=0)([{"input_ids": [5, 6, 0]}, {"input_ids": [7]}])
    assert batch["labels"].tolist() == [[5, 6, 0], [7, -100, -100]]
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0]]
    assert set(batch) == {"input_ids", "labels"}  # right padding needs no attention mask


def test_collator_keeps_labels_given_per_example():
    from finetune.data.packing import CausalCollator

    batch = CausalCollator(pad_token_id=9)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}])
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_right_padded_batch_without_mask_gives_the_same_logits_and_loss(tiny_gpt):
    """Dropping the attention mask of a right-padded causal batch changes nothing a real token sees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.packing import CausalCollator

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt).eval()
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in toy_sentences(4, seed=3)]
    docs[1] = docs[1][:3]  # a short one: most of its row is padding
    batch = CausalCollator(tok.pad_token_id)([{"input_ids": d} for d in docs])
    mask = (torch.arange(batch["input_ids"].shape[1])[None, :] < torch.tensor([len(d) for d in docs])[:, None]).long()
    with torch.no_grad():
        without = model(**batch)
        masked = model(**batch, attention_mask=mask)
    assert not torch.equal(batch["input_ids"] * mask, batch["input_ids"])  # there is padding
    for row, doc in enumerate(docs):
        assert torch.allclose(without.logits[row, :len(doc)], masked.logits[row, :len(doc)], atol=1e-5)
    assert torch.allclose(without.loss, masked.loss, atol=1e-6)


def test_written_jsonl_with_other_columns(tiny_gpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": t, "id": i} for i, t in enumerate(toy_sentences(60))])
    metrics = train(tiny_gpt, data, tmp_path / "run", steps=3, **{"data.text_column": "body"})
    assert metrics["steps"] == 3


def test_an_instruct_model_answers_through_its_chat_template(tiny_gpt, lora_run, tmp_path):
    """A model directory that is not a finetune run and has a chat template (an instruct model, a GGUF's plain
    folder) gets prompts as user messages; a run trained on plain text continues them as text."""
    import shutil

    from transformers import AutoTokenizer

    from finetune.data.templates import set_template
    from finetune.use.inference import load_for_generation

    instruct = tmp_path / "instruct"
    shutil.copytree(tiny_gpt, instruct)
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    set_template(tok, "chatml")
    tok.save_pretrained(instruct)
    assert load_for_generation(str(instruct))[2] is True
    assert load_for_generation(tiny_gpt)[2] is False  # no template
    assert load_for_generation(str(lora_run[0]))[2] is False  # a run on plain text
