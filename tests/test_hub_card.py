"""The model card (finetune/hub/card.py): valid Hub metadata that round-trips through huggingface_hub's
ModelCard.load, the metrics table, the recipe, the curves picture and the distribution's own link."""

from __future__ import annotations

from finetune.hub.card import is_hub_id, write_card
from finetune.recipe.load import build_recipe

METRICS = {"train_loss": 1.234567, "eval_loss": 0.9, "steps": 10, "tokens_per_s": None}


def load(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_card_of_a_hub_base_with_hub_data(tmp_path):
    recipe = build_recipe({"model": {"name": "openai-community/gpt2"}, "data": {"train": "stanfordnlp/imdb"},
                           "train": {"output_dir": str(tmp_path)}})
    card = load(write_card(recipe, tmp_path, METRICS, "```python\nprint('use')\n```"))
    assert card.data.base_model == "openai-community/gpt2"
    assert card.data.datasets == ["stanfordnlp/imdb"]
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["finetune", "clm", "lora", "peft"]
    assert card.data.license is None
    assert "| train_loss | 1.23457 |" in card.text and "tokens_per_s" not in card.text
    assert "https://pypi.org/project/finetune-toolkit/" in card.text and "pypi.org/project/finetune/" not in card.text
    assert "```yaml\ntask: clm\nmethod: lora\n" in card.text and "print('use')" in card.text
    assert "curves.png" not in card.text


def test_card_of_a_local_base_takes_base_and_license_from_its_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nbase_model: gpt2\nlicense: mit\n---\n# a merged model\n")
    data = tmp_path / "train.jsonl"
    data.write_text('{"label": 1, "text": "x"}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "curves.png").write_bytes(b"\x89PNG")
    recipe = build_recipe({"task": "classification", "method": "full", "model": {"name": str(base)},
                           "data": {"train": str(data)}, "train": {"output_dir": str(run)}})
    card = load(write_card(recipe, run, METRICS, "use it"))
    assert card.data.base_model == "gpt2" and card.data.license == "mit"
    assert card.data.datasets is None  # a local file is not a Hub dataset
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert "![loss, learning rate and tokens/s](curves.png)" in card.text


def test_pretraining_card_has_no_base_model(tmp_path):
    recipe = build_recipe({"method": "pretrain", "model": {"config": "tiny"}, "data": {"train": "corpus.txt"},
                           "train": {"output_dir": str(tmp_path)}})
    path = write_card(recipe, tmp_path, METRICS, "use it")
    assert "base_model" not in path.read_text()
    assert load(path).data.base_model is None and load(path).data.tags == ["finetune", "clm", "pretrain"]


def test_hub_ids():
    assert is_hub_id("gpt2") and is_hub_id("Qwen/Qwen2.5-0.5B")
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("./model") and not is_hub_id("train.jsonl")
    assert not is_hub_id(None) and not is_hub_id("/abs/path")
