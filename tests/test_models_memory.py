"""Precision checks, the memory estimate against measured peaks, `finetune plan`, and the automatic
batch size that halves on out-of-memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, invoke

sys.path.insert(0, str(Path(REPO) / "benchmarks"))

# The estimate must land within this factor of the measured peak of live tensors (both directions).
# Measured on the tiny models below: 0.79x to 1.11x (BENCHMARKS.md).
FACTOR = 1.5


def recipe_for(model, data, out, method="lora", bits=None, steps=3, batch=8, length=64, checkpointing=False,
               attn=None, **train):
    from finetune.recipe.load import build_recipe

    return build_recipe({
        "method": method, "model": {"name": model, "attn_implementation": attn},
        "data": {"train": data, "max_length": length, "packing": True},
        "quant": {"bits": bits},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch, "logging_steps": 1,
                  "save_steps": 1000, "gradient_checkpointing": checkpointing,
                  "trainer_args": {"disable_tqdm": True}, **train},
    })


@pytest.mark.parametrize("method, bits, checkpointing, batch", [
    ("lora", None, False, 8),
    ("full", None, False, 8),
    ("lora", 4, True, 16),
])
def test_estimate_is_within_factor_of_measured_peak(method, bits, checkpointing, batch, tiny_gpt, toy_text, tmp_path):
    from finetune.models.memory import estimate
    from finetune.tasks import clm
    from peak_memory import peak_memory_callback  # benchmarks/peak_memory.py (measuring is not the package's job)

    recipe = recipe_for(tiny_gpt, toy_text, tmp_path / "run", method, bits, batch=batch, checkpointing=checkpointing)
    predicted = estimate(recipe).tensors  # live tensors; the process itself is not measured here
    peak = peak_memory_callback()
    clm.run(recipe, callbacks=[peak])
    ratio = peak.peak / predicted
    assert 1 / FACTOR <= ratio <= FACTOR, f"measured {peak.peak / 2**20:.2f} MiB, estimated {predicted / 2**20:.2f} MiB"


def test_estimate_scales_with_what_the_run_keeps(tiny_gpt, toy_text, tmp_path):
    from finetune.models.memory import estimate

    def est(**kw):
        return estimate(recipe_for(tiny_gpt, toy_text, tmp_path, **kw))

    lora, full, qlora = est(), est(method="full"), est(bits=4)
    assert full.trainable == full.total_params > 2 * lora.trainable
    assert full.optimizer == 2 * full.gradients  # AdamW: two moments per trained parameter
    assert qlora.quantized_params > 0 and qlora.weights < lora.weights
    assert est(checkpointing=True).activations < lora.activations / 1.5
    assert est(batch=16).activations == pytest.approx(2 * lora.activations, rel=0.01)
    sharded = est(method="full", num_processes=4, distributed="fsdp")
    assert sharded.optimizer == pytest.approx(full.optimizer / 4)


def test_plan_reports_and_warns_when_it_cannot_fit(tiny_gpt):
    code, stdout, stderr = invoke("plan", "--model", tiny_gpt, "--quant", "4bit", "--set", "train.batch_size=4",
                                  "--set", "data.max_length=64")
    assert code == 0, stderr
    assert "memory per device (QLoRA 4-bit, fp32, batch 4 x 64 tokens, single process):" in stdout
    for part in ("weights", "gradients", "optimizer", "activations", "logits/loss", "peak"):
        assert f"  {part}" in stdout
    assert stderr == ""

    code, stdout, stderr = invoke("plan", "--model", tiny_gpt, "--set", "train.batch_size=128", "--device-memory", "0.1")
    assert code == 0
    assert stderr.startswith("warning: memory: the estimated peak of ")
    assert "does not fit in the 102.4 MiB of this device (with 10% to spare); training will lower " \
           "train.batch_size (raising train.grad_accum), then turn on gradient checkpointing, to fit the memory that " \
           "is free when it starts (train.fit_memory)" in stderr
    code, stdout, stderr = invoke("plan", "--model", tiny_gpt, "--set", "train.batch_size=128", "--device-memory", "0.1",
                                  "--set", "train.fit_memory=false")
    assert "per device does not fit in the 102.4 MiB of one device (with 10% to spare); lower train.batch_size" \
        in stderr


def test_validate_ends_with_the_estimate(tiny_gpt, toy_text):
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt, "--data", toy_text, "--set", "data.max_length=32")
    assert code == 0, stderr
    assert "data: ok" in stdout and "memory per device (lora, fp32, batch 8 x 32 tokens" in stdout


def test_auto_batch_size_halves_and_keeps_the_effective_batch(tiny_gpt, toy_text, tmp_path):
    from transformers import TrainerCallback

    from finetune.run.lifecycle import run_with_auto_batch
    from finetune.tasks import clm

    tried = []

    class SmallDevice(TrainerCallback):
        """Out of memory above 4 examples per step, as a small GPU would be."""

        def on_step_begin(self, args, state, control, **kw):
            tried.append(args.per_device_train_batch_size)
            if args.per_device_train_batch_size > 4:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    recipe = recipe_for(tiny_gpt, toy_text, tmp_path / "run", steps=6, batch=16, learning_rate=3e-3,
                        auto_batch_size=True)
    metrics = run_with_auto_batch(recipe, lambda r: clm.run(r, callbacks=[SmallDevice()]))
    assert tried[:2] == [16, 8] and set(tried[2:]) == {4}
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 4)  # 16 x 1 examples per update, as asked
    assert metrics["steps"] == 6
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < losses[0]


def test_out_of_memory_without_auto_batch_size_is_not_retried(tiny_gpt, toy_text, tmp_path):
    from finetune.run.lifecycle import run_with_auto_batch

    calls = []

    def run(recipe):
        calls.append(recipe.train.batch_size)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError):
        run_with_auto_batch(recipe_for(tiny_gpt, toy_text, tmp_path), run)
    assert calls == [8]


def test_fp16_on_cpu_is_refused(tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r", "--fp16")
    assert code == 2
    assert stderr.strip() == ("error: --fp16: float16 mixed precision needs a CUDA GPU and none is visible; drop "
                              "--fp16 (on CPU use --bf16 where the CPU supports it, or full precision)")


def test_bf16_on_a_cpu_without_bf16_is_refused(tiny_gpt, toy_text, tmp_path, monkeypatch):
    from finetune.training import precision

    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r", "--bf16")
    assert code == 2
    assert stderr.strip() == ("error: --bf16: this CPU has no bfloat16 instructions (AVX512-BF16 / AMX), so bf16 "
                              "would be emulated and slower than float32; drop --bf16")


def test_bf16_and_fp16_together_are_refused(tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r", "--bf16", "--fp16")
    assert code == 2 and stderr.strip() == "error: train.bf16 and train.fp16: choose one precision"


def test_bf16_lora_trains_on_a_cpu_with_bf16(tiny_gpt, toy_text, tmp_path):
    from finetune.training.precision import cpu_bf16_supported

    if not cpu_bf16_supported():
        pytest.skip("this CPU has no bf16 support")
    code, stdout, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r", "--bf16",
                                  "--max-steps", "12", "--set", "train.learning_rate=3e-3",
                                  "--set", "train.batch_size=16", "--set", "train.logging_steps=1")
    assert code == 0, stderr
    assert yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())["train"]["bf16"] is True
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(x) and "train_loss" not in json.loads(x)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_estimate_counts_qlora_float32_residual_liger_and_eager_attention(tiny_gpt, toy_text, tmp_path):
    """What a GPU measurement showed the estimate missing (BENCHMARKS.md): under 16-bit QLoRA the
    hidden-width activations are float32 (peft upcasts embeddings and norms); Liger's fused loss keeps
    no logits on the families it patches, and changes nothing on those it does not (GPT-2); eager
    attention asked for in the recipe keeps its score matrices."""
    from transformers import Qwen2Config

    from finetune.models.memory import estimate

    qwen = tmp_path / "qwen"
    Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=2000, max_position_embeddings=256).save_pretrained(qwen)

    def est(model=str(qwen), **kw):
        return estimate(recipe_for(model, toy_text, tmp_path / "run", **kw))

    lora16, qlora16 = est(bf16=True), est(bits=4, bf16=True)
    assert qlora16.activations > 1.25 * lora16.activations  # the hidden-width half of them doubles
    assert est(bits=4).activations == pytest.approx(est().activations)  # float32 compute: no difference
    fused = est(bf16=True, liger_kernel=True)
    assert fused.logits <= 8 * 64 * 64 * 8 < lora16.logits / 10  # at most the hidden states' size, twice, fp32
    assert fused.activations == lora16.activations
    assert any("liger_kernel" in n for n in fused.notes)
    gpt = est(tiny_gpt, liger_kernel=True)
    assert gpt.logits == est(tiny_gpt).logits and not any("liger_kernel" in n for n in gpt.notes)
    eager = est(attn="eager", bf16=True)  # batch 8, 4 heads, 64 x 64 scores and their softmax, 2 layers, 2 bytes
    assert eager.activations - lora16.activations == pytest.approx(2 * 8 * 4 * 64 * 64 * 2 * 2)


# A packed Llama on CPU: the estimate counts SDPA's per-layer copy of the block-diagonal mask and the K/V
# that repeat_kv copies to every query head (measured / estimated: 1.18x and 1.23x without them, 0.98x and
# 1.03x with them).
LLAMA_FACTOR = 1.15


@pytest.mark.parametrize("method", ["lora", "full"])
def test_estimate_of_a_packed_llama_is_close_to_its_measured_peak(method, tiny_llama, toy_text, tmp_path):
    from finetune.models.memory import estimate
    from finetune.tasks import clm
    from peak_memory import peak_memory_callback

    recipe = recipe_for(tiny_llama, toy_text, tmp_path / "run", method, batch=8, length=256)
    predicted = estimate(recipe, seq=256).tensors
    peak = peak_memory_callback()
    clm.run(recipe, callbacks=[peak])
    ratio = peak.peak / predicted
    assert 1 / LLAMA_FACTOR <= ratio <= LLAMA_FACTOR, \
        f"measured {peak.peak / 2**20:.2f} MiB, estimated {predicted / 2**20:.2f} MiB"
