"""`finetune dpo`: the policy learns to prefer the chosen responses (soft places) over the rejected
ones, measured here independently of trl; the reference is the policy as it was at the start."""

from __future__ import annotations

import json

import pytest

from conftest import invoke
from rlhf_helpers import logged, logp_margin, preference_rows, supervised_gpt, write_preferences
from rlhf_helpers import one_thread  # noqa: F401 (an autouse fixture)

FAST = ["--max-steps", "30", "--set", "train.batch_size=16", "--set", "train.logging_steps=5",
        "--set", "data.eval_fraction=0.25", "--set", "dpo.beta=0.1"]
HELD_OUT = preference_rows(48, seed=11)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    return write_preferences(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", n=128)


@pytest.fixture(scope="module")
def sft(tiny_gpt) -> str:
    return supervised_gpt(tiny_gpt)


def dpo(*args):
    code, out, err = invoke("dpo", *args)
    assert code == 0, err + out
    return out


def test_lora_dpo_raises_the_chosen_over_rejected_margin(sft, prefs, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "dpo"
    out = dpo("--model", sft, "--data", prefs, "-o", run, "--set", "train.learning_rate=5e-3", *FAST)
    before, after = logp_margin(sft, HELD_OUT), logp_margin(str(run), HELD_OUT)
    assert after > before + 2.0, (before, after)
    # the reference is the policy with its adapter disabled: identical to the policy at step 1
    assert logged(run, "rewards/chosen")[0] == pytest.approx(0, abs=1e-6)
    assert logged(run, "rewards/margins")[-1] > 0.5
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 0.5
    assert metrics["margin_start"] == pytest.approx(0, abs=1e-6)
    assert "training reward margin (chosen - rejected)" in out
    weights = load_file(run / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # the adapter moved


def test_full_dpo_reference_is_the_policy_changed_in_memory(sft, prefs, tmp_path):
    """model.name is a LoRA run: it is merged into its base in memory, so config._name_or_path names
    the base, not these weights. The reference must be a copy of the merged policy (trl would reload
    the base): at step 1 the policy and the reference agree exactly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora_run = tmp_path / "sft-lora"
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(sft),
                                LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, r=4,
                                           init_lora_weights=False))  # random B: the merged model differs
    peft_model.save_pretrained(lora_run)
    AutoTokenizer.from_pretrained(sft).save_pretrained(lora_run)

    run = tmp_path / "dpo-full"
    dpo("--method", "full", "--model", lora_run, "--data", prefs, "-o", run, "--set", "train.learning_rate=1e-3",
        *FAST)
    chosen, rejected = logged(run, "rewards/chosen"), logged(run, "rewards/rejected")
    assert chosen[0] == pytest.approx(0, abs=1e-6) and rejected[0] == pytest.approx(0, abs=1e-6)
    assert logp_margin(str(run), HELD_OUT) > logp_margin(str(lora_run), HELD_OUT) + 2.0
    assert (run / "model.safetensors").is_file()
    assert json.loads((run / "metrics.json").read_text())["eval_accuracy"] >= 0.9


def test_unknown_loss_type(sft, prefs, tmp_path):
    code, out, err = invoke("dpo", "--model", sft, "--data", prefs, "--set", "dpo.loss_type=sigmod",
                            "-o", tmp_path / "x")
    assert code == 2
    assert "error: dpo.loss_type: input should be 'sigmoid', 'hinge', 'ipo'" in err
    assert not (tmp_path / "x").exists()
