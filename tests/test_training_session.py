"""TrainingArguments from the recipe: what the defaults turn on."""

from __future__ import annotations

import pytest

from finetune.recipe.load import build_recipe
from finetune.training import session


def arguments(tmp_path, task: str, **sets):
    data = {"task": task, "method": "full", "model": {"name": "m"}, "data": {"train": "d.jsonl"},
            "train": {"output_dir": str(tmp_path)}}
    if task == "classification":
        data["classification"] = {}
    recipe = build_recipe(data, sets=[f"{k}={v}" for k, v in sets.items()])
    return session.training_arguments(recipe, tmp_path)


@pytest.mark.parametrize("task", ["mlm", "translation"])
def test_text_tasks_batch_by_length_by_default(tmp_path, task):
    assert arguments(tmp_path, task).train_sampling_strategy == "group_by_length"
    assert arguments(tmp_path, task, **{"train.group_by_length": "false"}).train_sampling_strategy == "random"


def test_classification_groups_by_length_only_when_asked(tmp_path):
    assert arguments(tmp_path, "classification").train_sampling_strategy == "random"
    assert arguments(tmp_path, "classification", **{"train.group_by_length": "true"}).train_sampling_strategy == \
        "group_by_length"


def test_clm_packs_by_default_and_groups_by_length_only_unpacked(tmp_path):
    from finetune.tasks.clm import packs

    recipe = build_recipe({"task": "clm", "method": "full", "model": {"name": "m"}, "data": {"train": "d.jsonl"}})
    assert packs(recipe)
    assert arguments(tmp_path, "clm").train_sampling_strategy == "random"  # packed rows are full already
    assert arguments(tmp_path, "clm", **{"data.packing": "false"}).train_sampling_strategy == "group_by_length"


def test_packed_mlm_blocks_are_not_grouped(tmp_path):
    assert arguments(tmp_path, "mlm", **{"data.packing": "true"}).train_sampling_strategy == "random"


def test_longest_first_keeps_every_row_and_ties_in_order():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2], [4, 5, 6], [7]], "labels": [0, 1, 2, 3, 4]})
    out = session.longest_first(ds)
    assert out["labels"] == [1, 3, 2, 0, 4]
    assert sorted(map(tuple, out["input_ids"])) == sorted(map(tuple, ds["input_ids"]))
