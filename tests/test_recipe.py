"""The recipe schema: strict keys with did-you-mean, overrides, every problem at once."""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.recipe.load import build_recipe, builtin_recipes, load_recipe, parse_override
from finetune.recipe.tasks import REGISTRY as TASKS


def problems_of(data, overrides=None, sets=None) -> list[str]:
    with pytest.raises(UserError) as e:
        build_recipe(data, overrides, sets)
    return e.value.problems


BASE = {"model": {"name": "gpt2"}, "data": {"train": "train.jsonl"}}


def test_unknown_key_suggests_the_right_one():
    assert problems_of({**BASE, "train": {"lerning_rate": 1e-4}}) == [
        "train.lerning_rate: unknown key (did you mean 'learning_rate'?)"]


def test_unknown_section_suggests_the_right_one():
    assert problems_of({**BASE, "trian": {"max_steps": 3}}) == ["trian: unknown key (did you mean 'train'?)"]


def test_typo_in_set_override_fails_like_a_typo_in_yaml():
    assert problems_of(BASE, sets=["train.lerning_rate=1e-4"]) == [
        "train.lerning_rate: unknown key (did you mean 'learning_rate'?)"]


def test_wrong_type_names_key_and_value():
    (msg,) = problems_of(BASE, sets=["train.max_steps=ten"])
    assert msg.startswith("train.max_steps: input should be a valid integer") and msg.endswith("got 'ten'")


def test_all_problems_reported_at_once():
    found = problems_of({**BASE, "train": {"lerning_rate": 1, "batch_size": 0}, "data": {"train": "x", "packng": True}})
    assert len(found) == 3
    assert "data.packng: unknown key (did you mean 'packing'?)" in found


def test_contradictions_are_phrased_as_keys():
    found = problems_of({"data": {}, "train": {"bf16": True, "fp16": True}})
    assert found == ["model.name: required for `finetune lora`; pass --model <Hub id or directory>",
                     "data.train: required; pass --data <file, folder or Hub dataset>",
                     "train.bf16 and train.fp16: choose one precision"]


def test_unknown_task_lists_choices():
    (msg,) = problems_of({**BASE, "task": "clasification"})
    assert msg.startswith("task: unknown task 'clasification' (did you mean 'classification'?)")


def test_precedence_recipe_then_flags_then_set():
    r = build_recipe({**BASE, "train": {"max_steps": 5, "batch_size": 4}},
                     overrides={"train.max_steps": 7, "model.name": None}, sets=["train.max_steps=9"])
    assert r.train.max_steps == 9 and r.train.batch_size == 4 and r.model.name == "gpt2"
    r = build_recipe({**BASE, "train": {"max_steps": 5}}, overrides={"train.max_steps": 7})
    assert r.train.max_steps == 7


def test_set_values_are_yaml_scalars():
    assert parse_override("train.learning_rate=1e-4") == ("train.learning_rate", 1e-4)
    assert parse_override("lora.target_modules=[c_attn, c_proj]") == ("lora.target_modules", ["c_attn", "c_proj"])
    assert parse_override("data.packing=true") == ("data.packing", True)
    with pytest.raises(UserError, match=r"--set train.max_steps: expected key=value"):
        parse_override("train.max_steps")


def test_resolved_recipe_round_trips(tmp_path):
    r = build_recipe(BASE, sets=["train.max_steps=3", "lora.r=4"])
    path = tmp_path / "recipe.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(str(path)) == r


def test_defaults_depend_on_method():
    assert build_recipe(BASE).learning_rate == 2e-4
    assert build_recipe({**BASE, "method": "full"}).learning_rate == 5e-5
    # LoRA on an encoder task: 10x the full fine-tuning rate
    assert build_recipe({**BASE, "task": "classification", "classification": {}}).learning_rate == 5e-4
    assert build_recipe({**BASE, "task": "classification", "classification": {},
                         "method": "full"}).learning_rate == 5e-5
    assert str(build_recipe(BASE).output_dir) == "runs/gpt2-clm-lora"


def test_unknown_builtin_recipe_suggests_one():
    name = next(iter(builtin_recipes()))
    with pytest.raises(UserError) as e:
        load_recipe(name[:-1] + "x")
    assert f"(did you mean '{name}'?)" in e.value.problems[0]


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_shipped_recipe_validates(name):
    path = builtin_recipes()[name]
    text = path.read_text()
    assert text.startswith("# "), "a recipe opens with a one-line description"
    assert "finetune " in text.split("\n\n")[0] + text[:600], "a recipe shows the command that runs it"
    recipe = load_recipe(name)
    assert recipe.task in TASKS
