"""QLoRA on CPU: 4-bit and 8-bit bases train (also across an evaluation pass), merge into full precision,
and bad input fails with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import invoke, new_tiny_gpt


def qlora_recipe(tiny_gpt, toy_text, out, bits, steps, eval_steps=None):
    from finetune.recipe.load import build_recipe

    return build_recipe({
        "method": "lora", "model": {"name": tiny_gpt}, "data": {"train": toy_text, "eval_fraction": 0.05},
        "quant": {"bits": bits},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 16, "learning_rate": 3e-3,
                  "logging_steps": 2, "eval_steps": eval_steps, "save_steps": 1000,
                  "trainer_args": {"disable_tqdm": True}},
    })


def capture_model():
    """A callback keeping the trained model and a copy of its quantised weights at the start."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            import bitsandbytes as bnb

            self.model = model
            self.quantized_before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                                     if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
            self.lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    return Capture()


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r and "train_loss" not in r]


@pytest.fixture(scope="module")
def gpt64(tmp_path_factory) -> str:
    """A 2-layer GPT-2 of hidden size 64: enough width for LoRA alone to lower the loss quickly."""
    path = tmp_path_factory.mktemp("gpt64")
    model, tok = new_tiny_gpt(64)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qlora4(gpt64, toy_text, tmp_path_factory):
    from finetune.tasks import clm

    out = tmp_path_factory.mktemp("qlora4") / "run"
    capture = capture_model()
    metrics = clm.run(qlora_recipe(gpt64, toy_text, out, 4, steps=24, eval_steps=8), callbacks=[capture])
    return out, metrics, capture


def test_4bit_qlora_trains_through_evaluation(qlora4):
    import bitsandbytes as bnb
    import torch

    out, metrics, capture = qlora4
    layers = [m for m in capture.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks; the head stays full precision
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert all(m.weight.quant_type == "nf4" for m in layers)

    losses = logged(out, "loss")
    evals = [v for step, v in logged(out, "eval_loss")]
    assert losses[-1][1] < losses[0][1] - 0.4, losses
    # Training goes on learning after each no-grad evaluation pass (steps 8 and 16).
    after_first_eval = [v for step, v in losses if step > 8]
    assert after_first_eval[-1] < dict(losses)[8] - 0.1, losses
    assert evals[-1] < evals[0], evals

    # Quantised base frozen and untouched; every LoRA matrix moved.
    named = dict(capture.model.named_modules())
    for name, before in capture.quantized_before.items():
        assert torch.equal(named[name].weight.detach(), before), name
    params = dict(capture.model.named_parameters())
    moved = [n for n, before in capture.lora_before.items() if not torch.equal(params[n].detach(), before)]
    assert moved and len(moved) == len(capture.lora_before)
    assert all("lora_" in n for n in capture.lora_before)
    assert metrics["trainable_params"] == sum(p.numel() for p in capture.lora_before.values())


def test_8bit_qlora_trains(gpt64, toy_text, tmp_path):
    import bitsandbytes as bnb

    from finetune.tasks import clm

    capture = capture_model()
    clm.run(qlora_recipe(gpt64, toy_text, tmp_path / "run", 8, steps=10, eval_steps=4), callbacks=[capture])
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in capture.model.modules()) == 8
    losses = logged(tmp_path / "run", "loss")
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    assert dict(losses)[10] < dict(losses)[4], losses  # still learning after the evaluations at steps 4 and 8


def test_merge_of_qlora_run_is_full_precision_and_matches(qlora4, gpt64, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = qlora4
    merged_dir = tmp_path / "merged"
    code, stdout, stderr = invoke("merge", out, "-o", merged_dir)
    assert code == 0, stderr

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any("Linear4bit" in type(m).__name__ or "lora" in n for n, m in merged.named_modules())

    tok = AutoTokenizer.from_pretrained(merged_dir)
    batch = tok(["the red cat sat on the mat.", "the blue dog sat on the box."], return_tensors="pt", padding=True)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        adapter_logits = AutoPeftModelForCausalLM.from_pretrained(out).eval()(**batch).logits
        base_logits = AutoModelForCausalLM.from_pretrained(gpt64)(**batch).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter changed the model


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> str:
    """A model type without Linear layers (convolutions only)."""
    from transformers import ResNetConfig, ResNetModel

    path = tmp_path_factory.mktemp("tiny-resnet")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic")).save_pretrained(path)
    return str(path)


def test_quant_of_a_model_without_linear_layers_is_refused(tiny_resnet, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_resnet, "--data", toy_text, "--quant", "4bit", "-o", tmp_path / "r")
    assert code == 2
    assert stderr.strip() == ("error: --quant 4bit: bitsandbytes cannot quantise model type 'resnet': it has no "
                              "Linear layers outside the output head (bitsandbytes replaces only Linear layers); "
                              "drop --quant and use plain LoRA")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["lora", "--quant", "3bit"], "error: --quant: expected 4bit or 8bit, got '3bit'"),
    (["full", "--quant", "4bit"], "error: quant.bits: quantized bases train only with LoRA (QLoRA), not `finetune full`"),
    (["lora", "--quant", "8bit", "-n", "2", "--distributed", "fsdp"],
     "error: quant.bits: 8-bit weights cannot be sharded by train.distributed=fsdp; use quant.bits=4 with "
     "quant.storage=bfloat16, or the ddp / deepspeed-zero2 presets"),
    (["lora", "--quant", "4bit", "-n", "2", "--distributed", "deepspeed-zero3"],
     "error: quant.storage: train.distributed=deepspeed-zero3 shards only floating-point tensors; set "
     "quant.storage=bfloat16 (the compute dtype)"),
])
def test_bad_quant_input(args, message, tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke(*args, "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r")
    assert code == 2
    assert stderr.strip() == message
