"""`finetune grpo`: online RL from a reward function (module:function) or a trained reward model;
the share of sampled completions that name a soft place rises."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, write_jsonl
from rlhf_helpers import (good_rate, logged, mean_reward, preference_rows, supervised_gpt, write_preferences,
                          write_prompts)
from rlhf_helpers import one_thread  # noqa: F401 (an autouse fixture)

FAST = ["--max-steps", "30", "--set", "train.batch_size=16", "--set", "train.logging_steps=5",
        "--set", "data.eval_fraction=0.25", "--set", "grpo.num_generations=8",
        "--set", "grpo.max_completion_length=3"]


@pytest.fixture(scope="module")
def sft(tiny_gpt) -> str:
    return supervised_gpt(tiny_gpt)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", n=64)


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def grpo(*args):
    code, out, err = invoke("grpo", *args)
    assert code == 0, err + out
    return out


def test_grpo_with_a_reward_function_raises_the_reward(sft, prompts_file, tmp_path):
    run = tmp_path / "grpo"
    out = grpo("--method", "full", "--model", sft, "--data", prompts_file, "-o", run,
               "--set", "grpo.reward=rlhf_helpers:soft_place", "--set", "train.learning_rate=1e-3", *FAST)
    rewards = logged(run, "reward")
    assert rewards[-1] > rewards[0] + 0.2, rewards
    assert logged(run, "rewards/soft_place/mean")  # logged under the function's name
    before, after = good_rate(sft), good_rate(str(run))
    assert after > before + 0.2, (before, after)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["reward_start"] == rewards[0] and metrics["reward_end"] == rewards[-1]
    assert metrics["eval_reward"] > 0.5
    assert "mean reward of the sampled completions" in out


def test_grpo_with_a_reward_model_and_lora(sft, prompts_file, tiny_gpt, tmp_path):
    """The reward is a `finetune reward` run; the KL reference is the policy with its adapter disabled.

    The check is the reward model's own score of sampled completions: a reward model this small is
    easy to exploit (the policy drifts to text it over-scores), so "soft places" are not checked here."""
    prefs = write_preferences(tmp_path / "prefs.jsonl", n=128)
    code, out, err = invoke("reward", "--method", "full", "--model", tiny_gpt, "--data", prefs, "-o", tmp_path / "rm",
                            "--max-steps", "40", "--set", "train.batch_size=16", "--set", "train.learning_rate=3e-3")
    assert code == 0, err
    run = tmp_path / "grpo"
    grpo("--model", sft, "--data", prompts_file, "-o", run, "--set", f"grpo.reward={tmp_path / 'rm'}",
         "--set", "grpo.beta=0.04", "--set", "train.learning_rate=5e-3", *FAST)
    rewards = logged(run, "reward")
    assert rewards[-1] > rewards[0] + 0.5, rewards
    kl = logged(run, "kl")
    assert kl[0] == pytest.approx(0, abs=1e-6) and max(kl) > 0
    assert mean_reward(str(run), str(tmp_path / "rm")) > mean_reward(sft, str(tmp_path / "rm")) + 0.5
    assert (run / "adapter_model.safetensors").is_file()


def test_reward_function_that_cannot_be_imported(sft, prompts_file, tmp_path):
    code, out, err = invoke("grpo", "--model", sft, "--data", prompts_file, "-o", tmp_path / "x",
                            "--set", "grpo.reward=no_such_rewards:score")
    assert code == 2
    assert errors(err) == ["error: grpo.reward: cannot import module 'no_such_rewards' (ModuleNotFoundError: No module "
                           "named 'no_such_rewards'); check the name and that it is importable from the current "
                           "directory"]
    assert not (tmp_path / "x").exists()


def test_reward_model_with_more_than_one_output(sft, prompts_file, tiny_gpt, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = tmp_path / "clf"
    AutoModelForSequenceClassification.from_pretrained(tiny_gpt, num_labels=3).save_pretrained(clf)
    AutoTokenizer.from_pretrained(tiny_gpt).save_pretrained(clf)
    code, out, err = invoke("grpo", "--model", sft, "--data", prompts_file, "-o", tmp_path / "x",
                            "--set", f"grpo.reward={clf}")
    assert code == 2
    assert errors(err) == [f"error: grpo.reward: the model in '{clf}' has 3 outputs; a reward model has exactly one "
                           "(train one with `finetune reward`)"]


def test_recipe_contradictions(sft, prompts_file, tmp_path):
    code, out, err = invoke("grpo", "--model", sft, "--data", prompts_file, "-o", tmp_path / "x",
                            "--set", "grpo.num_generations=3")
    assert code == 2
    assert errors(err) == [
        "error: grpo.reward: required for `finetune grpo`; set it to a `finetune reward` run (a reward-model "
        "directory) or to module:function",
        "error: train.batch_size (8) x train.grad_accum (1) must be a multiple of grpo.num_generations (3): every "
        "step scores whole groups of completions of a prompt",
        "error: train.eval_batch_size (8) must be a multiple of grpo.num_generations (3)"]


def test_prompts_without_room_for_the_completion_are_reported(sft, tmp_path):
    rows = [{"prompt": p} for p in ["the red cat sat on the"] * 15] + [{"prompt": " ".join(["the red cat"] * 60)}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = grpo("--method", "full", "--model", sft, "--data", data, "-o", tmp_path / "x", "--max-steps", "1",
               "--set", "grpo.reward=rlhf_helpers:soft_place", "--set", "data.eval_fraction=0",
               "--set", "grpo.num_generations=8", "--set", "grpo.max_completion_length=8")
    assert ("warning: skipping 1 of 16 examples in data.train: the prompt leaves no room for "
            "grpo.max_completion_length=8 tokens in the model's context of 128 (the first: 'the red cat the red cat "
            "the red cat the ...'); shorten those prompts or lower grpo.max_completion_length") in out
    code, out, err = invoke("grpo", "--model", sft, "--data", prompts_file_empty_prompt(tmp_path), "-o", tmp_path / "y",
                            "--set", "grpo.reward=rlhf_helpers:soft_place")
    assert code == 2
    assert errors(err)[0].startswith("error: data.train: empty prompt in ")


def prompts_file_empty_prompt(tmp_path) -> str:
    return write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "the red cat"}] * 8 + [{"prompt": ""}])


def test_trl_style_reward_function(sft, tmp_path, monkeypatch):
    """trl's documentation writes `def reward_len(completions, **kwargs)`; it works unchanged, and the
    data's other columns arrive by keyword."""
    (tmp_path / "trl_rewards.py").write_text(
        "def reward_len(completions, **kwargs):\n"
        "    return [float(p in c) - 0.1 * len(c) for c, p in zip(completions, kwargs['place'])]\n")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "place": "mat"}
                                                    for r in preference_rows(32)])
    grpo("--model", sft, "--data", data, "-o", tmp_path / "run", "--set", "grpo.reward=trl_rewards:reward_len",
         *FAST, "--max-steps", "2", "--set", "train.logging_steps=1")
    assert logged(tmp_path / "run", "rewards/reward_len/mean")
