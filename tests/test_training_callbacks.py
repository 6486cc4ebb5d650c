"""Early stopping and the best checkpoint (finetune/training/callbacks.py): on a toy task whose eval loss rises
from the first evaluation, the run stops after `patience` worse evaluations and saves the best one."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, write_jsonl


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def test_early_stopping_stops_and_keeps_the_best(tiny_gpt_lm, tmp_path):
    """Training only on "... mat." while evaluating on "... roof.": every step makes "roof" less likely."""
    import torch
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "the red cat sat on the mat."}] * 64)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "the red cat sat on the roof."}] * 8)
    run = tmp_path / "run"
    code, out, err = invoke("lora", "--model", tiny_gpt_lm, "--data", train, "--eval-data", evals, "-o", run,
                            "--max-steps", "20", "--set", "train.eval_steps=1", "--set", "train.logging_steps=1",
                            "--set", "train.early_stopping_patience=2", "--set", "train.learning_rate=1e-2",
                            "--set", "train.batch_size=8", "--set", "train.warmup=0")
    assert code == 0, err
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert losses[1] > losses[0] and losses[2] > losses[0]  # the toy task does what it says
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["best_step"] == 1  # best at 1, two worse evaluations, stop
    assert "  best_step          1" in out  # the summary says it
    assert "best: step 1 (eval_loss " in out
    saved = load_file(run / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in best)
    assert metrics["eval_loss"] == pytest.approx(losses[0], rel=1e-4)  # the final evaluation is of the best


def test_best_needs_evaluations(tiny_gpt, toy_text, tmp_path):
    code, out, err = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "run",
                            "--set", "train.early_stopping_patience=2", "--set", "data.eval_fraction=0")
    assert code == 2
    assert errors(err) == [
        "error: train.early_stopping_patience: needs evaluations to compare; set train.eval_steps=N (an evaluation "
        "every N steps)",
        "error: train.early_stopping_patience: needs evaluation data; set data.eval, or data.eval_fraction above 0"]


def test_default_metric_per_task():
    from finetune.recipe.load import build_recipe
    from finetune.training.callbacks import best_metric

    def metric(task, **train):
        return best_metric(build_recipe({"task": task, "model": {"name": "m"}, "data": {"train": "d"},
                                         "train": {"keep_best": True, "eval_steps": 5, **train}}))

    assert metric("clm") == "eval_loss" and metric("classification") == "eval_accuracy"
    assert metric("translation") == "eval_bleu" and metric("reward") == "eval_accuracy"
    assert metric("clm", metric_for_best="perplexity") == "eval_perplexity"
