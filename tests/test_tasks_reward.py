"""`finetune reward`: a one-output classifier learns a synthetic preference (soft places are always
chosen over hard ones) and is then scored the way PPO/GRPO score with it."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, write_jsonl
from rlhf_helpers import SIMPLE_CHAT_TEMPLATE, chat_rows, preference_rows, write_preferences
from rlhf_helpers import one_thread  # noqa: F401 (an autouse fixture)

FAST = ["--max-steps", "40", "--set", "train.batch_size=16", "--set", "train.learning_rate=3e-3",
        "--set", "train.logging_steps=5", "--set", "data.eval_fraction=0.25"]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    return write_preferences(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", n=128)


def reward(*args):
    code, out, err = invoke("reward", *args)
    assert code == 0, err + out
    return out


def errors(stderr: str) -> list[str]:
    """The `error: ...` lines (stderr also carries progress bars)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def held_out_accuracy(run_dir, rows):
    from finetune.rl.rewards import load_reward

    score = load_reward(str(run_dir))
    prompts = [r["prompt"] for r in rows]
    chosen = score(prompts, [r["chosen"] for r in rows])
    rejected = score(prompts, [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def test_full_reward_model_learns_the_preference(tiny_gpt, prefs, tmp_path):
    out = reward("--method", "full", "--model", tiny_gpt, "--data", prefs, "-o", tmp_path / "rm", *FAST)
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 32
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["margin_start"] == pytest.approx(0, abs=0.1) and metrics["margin_end"] > 1.0
    assert "training margin (chosen - rejected score)" in out
    # Scored as a reward source (right padding, eos appended), on pairs it never saw:
    assert held_out_accuracy(tmp_path / "rm", preference_rows(64, seed=7)) >= 0.9
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1


def test_lora_reward_model_adds_a_distinct_pad_and_reloads(tiny_gpt_nopad, tiny_gpt, prefs, tmp_path):
    """The base tokenizer pads with eos: the run adds a pad token, so the score is read at the eos, and
    the adapter (with the new head and embedding row) reloads to the same accuracy."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    reward("--model", tiny_gpt_nopad, "--data", prefs, "-o", tmp_path / "rm", *FAST, "--max-steps", "60")
    run = tmp_path / "rm"
    tok = AutoTokenizer.from_pretrained(run)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    weights = load_file(run / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in weights)  # the head is saved with the adapter
    assert any("lora_A" in k for k in weights)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["trainable_params"] < metrics["total_params"] / 2
    assert held_out_accuracy(run, preference_rows(64, seed=7)) >= 0.9


def test_reward_model_on_chat_messages(tiny_gpt, tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "chat-gpt"
    import shutil

    shutil.copytree(tiny_gpt, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    tok.save_pretrained(model)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(128))
    reward("--method", "full", "--model", model, "--data", data, "-o", tmp_path / "rm", *FAST)
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 1.0


def test_missing_chosen_column(tiny_gpt, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": " a", "rejected": " b"}] * 8)
    code, out, err = invoke("reward", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "rm")
    assert code == 2
    assert errors(err) == [f"error: data.train: no column 'chosen' in '{data}'; preference data needs the columns "
                           "chosen and rejected (and usually prompt), as plain text or as chat messages (trl's standard "
                           "formats). Its columns are: prompt, answer, rejected"]
    assert not (tmp_path / "rm").exists()


def test_empty_prompt(tiny_gpt, tmp_path):
    rows = preference_rows(10)
    rows[3]["prompt"] = ""
    rows[7]["prompt"] = "   "
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, out, err = invoke("reward", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "rm")
    assert code == 2  # rows of the file, although a shuffled eval split is held out of it
    assert errors(err) == [f"error: data.train: empty prompt in '{data}', rows 3, 7 (2 of 10); every row needs the "
                           "prompt the responses answer: fill them in or remove those rows"]


def test_classifier_with_two_outputs_cannot_become_a_reward_model(tiny_gpt, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = tmp_path / "clf"
    AutoModelForSequenceClassification.from_pretrained(tiny_gpt, num_labels=2).save_pretrained(clf)
    AutoTokenizer.from_pretrained(tiny_gpt).save_pretrained(clf)
    code, out, err = invoke("reward", "--model", clf, "--data", write_jsonl(tmp_path / "p.jsonl", preference_rows(8)),
                            "-o", tmp_path / "rm")
    assert code == 2
    assert errors(err) == [f"error: model.name: '{clf}' is a classifier with 2 outputs; a reward model has one: start "
                           "from its base model, or from a `finetune reward` run"]


def test_pairs_longer_than_the_context_are_reported_not_cut(tiny_gpt, tmp_path):
    rows = preference_rows(40)
    long_prompt = " ".join(["the red cat sat on the mat."] * 30)  # > 128 tokens, the tiny model's context
    for i in (2, 5):
        rows[i]["prompt"] = long_prompt
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = reward("--method", "full", "--model", tiny_gpt, "--data", data, "--set", "data.eval_fraction=0",
                 "--max-steps", "2", "-o", tmp_path / "rm")
    assert ("warning: skipping 2 of 40 examples in data.train: longer than data.max_length=128 tokens "
            "(prompt + response + eos) (the first: 'the red cat sat on the mat. the red cat ...'); shorten them or "
            "raise data.max_length") in out
    # nothing left to train on is an error, not an empty run
    data = write_jsonl(tmp_path / "all-long.jsonl", [dict(r, prompt=long_prompt) for r in rows[:6]])
    code, out, err = invoke("reward", "--model", tiny_gpt, "--data", data, "--set", "data.eval_fraction=0",
                            "-o", tmp_path / "rm2")
    assert code == 2
    assert errors(err) == ["error: data.train: every example longer than data.max_length=128 tokens (prompt + "
                           "response + eos); shorten them or raise data.max_length"]


def test_validate_reports_pairs_and_lengths(tiny_gpt, prefs):
    code, out, err = invoke("validate", "--task", "reward", "--model", tiny_gpt, "--data", prefs)
    assert code == 0, err
    assert "data.train: 122 pairs (plain text)" in out and "data.eval: 6 pairs" in out
    assert "(max_length 128)" in out
