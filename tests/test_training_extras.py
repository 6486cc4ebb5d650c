"""Trackers, kernels and attention as typed recipe keys (finetune/training/extras.py): TensorBoard event files in
the run directory; every impossible choice refused before anything loads, by its text."""

from __future__ import annotations

import pytest

from conftest import invoke, write_jsonl, toy_sentences
from finetune.recipe.load import build_recipe
from finetune.training import extras
from finetune.training.extras import kernel_problems


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", [{"text": t} for t in toy_sentences(64)])


def test_tensorboard_event_files_in_the_run_directory(tiny_gpt, small_text, tmp_path):
    pytest.importorskip("tensorboardX")
    for name in ("a", "b"):  # each run of the process logs into its own directory
        code, out, err = invoke("lora", "--model", tiny_gpt, "--data", small_text, "-o", tmp_path / name,
                                "--max-steps", "2", "--set", "train.logging_steps=1",
                                "--set", "train.report_to=tensorboard")
        assert code == 0, err
        events = list((tmp_path / name / "tensorboard").glob("events.out.tfevents.*"))
        assert events and sum(e.stat().st_size for e in events) > 0
    assert not (tmp_path / "a" / "checkpoints" / "runs").exists()  # not transformers' default place


def test_missing_tracker_is_named_with_its_install(tiny_gpt, small_text, tmp_path, monkeypatch):
    monkeypatch.setattr(extras, "installed", lambda module: False)
    code, out, err = invoke("lora", "--model", tiny_gpt, "--data", small_text, "-o", tmp_path / "run",
                            "--set", "train.report_to=[wandb, mlflow]")
    assert code == 2
    assert errors(err) == ['error: train.report_to: wandb is not installed; pip install "finetune-toolkit[wandb]"',
                           'error: train.report_to: mlflow is not installed; pip install "finetune-toolkit[mlflow]"']
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_is_a_recipe_error(tiny_gpt, small_text, tmp_path):
    code, out, err = invoke("lora", "--model", tiny_gpt, "--data", small_text, "--set", "train.report_to=tensorbord")
    assert code == 2
    assert errors(err) == ["error: train.report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); "
                           "choose from none, tensorboard, wandb, mlflow, trackio, got 'tensorbord'"]


def recipe(**sections):
    base = {"model": {"name": "gpt2"}, "data": {"train": "x.jsonl"}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    return build_recipe(base)


def test_kernel_and_attention_refusals():
    assert kernel_problems(recipe(model={"attn_implementation": "flash_attention_2"}), cuda=False) == [
        "model.attn_implementation: flash_attention_2 needs a CUDA GPU and this machine has none; use sdpa"]
    assert kernel_problems(recipe(model={"attn_implementation": "sdpa"}), cuda=False) == []
    assert kernel_problems(recipe(model={"attn_implementation": "flash"}), cuda=False) == [
        "model.attn_implementation: unknown 'flash'; choose eager, sdpa, flash_attention_2, flash_attention_3, "
        "flex_attention, or a Hub kernel as org/repo"]
    assert kernel_problems(recipe(train={"liger_kernel": True}), cuda=False) == [
        "train.liger_kernel: Liger's kernels run on CUDA GPUs (Triton) and this machine has none; drop it"]
    assert kernel_problems(recipe(task="ppo", train={"torch_compile": True, "neftune_noise_alpha": 5}), cuda=True) == [
        "train.torch_compile: `finetune ppo` has its own training loop; drop it",
        "train.neftune_noise_alpha: `finetune ppo` has its own training loop; drop it"]


def test_kernel_keys_reach_the_training_arguments(tmp_path):
    from finetune.training.session import training_arguments

    r = recipe(model={"attn_implementation": "eager"},
               train={"neftune_noise_alpha": 5.0, "torch_compile": False, "report_to": "none"})
    args = training_arguments(r, tmp_path)
    assert args.neftune_noise_alpha == 5.0 and args.use_liger_kernel is False and args.report_to == []


def test_attention_implementation_is_used_when_loading(tiny_gpt):
    from transformers import AutoModelForCausalLM

    from finetune.models.pretrained import load_model

    model = load_model(recipe(model={"name": tiny_gpt, "attn_implementation": "eager"}).model, AutoModelForCausalLM)
    assert model.config._attn_implementation == "eager"
