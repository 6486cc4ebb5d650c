"""The task registry: one table of tasks, a protocol every task module satisfies, and a new task that
needs nothing outside finetune/tasks/."""

from __future__ import annotations

import inspect
import json
import sys
import textwrap

import pytest
from conftest import invoke

from finetune.errors import UserError
from finetune.recipe.load import build_recipe
from finetune.recipe.schema import Recipe
from finetune.recipe.tasks import REGISTRY, TaskInfo, load_task, stage_commands
from finetune.tasks import PROTOCOL, Task

BASE = {"model": {"name": "gpt2"}, "data": {"train": "train.jsonl"}}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_task_module_satisfies_the_protocol(name):
    module = load_task(name)
    assert isinstance(module, Task)
    for fn in PROTOCOL:
        wanted = list(inspect.signature(getattr(Task, fn)).parameters)[1:]  # without self
        got = list(inspect.signature(getattr(module, fn)).parameters)
        assert got[:len(wanted)] == wanted, f"{name}.{fn}{tuple(got)}: expected the parameters {wanted}"
    info = REGISTRY[name]
    if info.inference == "predict":
        assert callable(module.predict)


def test_the_registry_and_the_schema_agree():
    sections = {t.section for t in REGISTRY.values() if t.section}
    schema = {n for n, f in Recipe.model_fields.items() if f.default is None and n != "stages"}
    assert sections == schema  # every task section belongs to a task, and every task's section exists
    assert stage_commands() == ("lora", "full", "pretrain", "reward", "dpo", "ppo", "grpo")


def test_a_section_of_another_task_is_an_error_naming_its_task():
    with pytest.raises(UserError) as e:
        build_recipe({**BASE, "task": "clm", "dpo": {"beta": 0.2}, "ppo": {}})
    assert e.value.problems == [
        "dpo: a section of the dpo task; this recipe's task is clm (set task: dpo, or drop the section)",
        "ppo: a section of the ppo task; this recipe's task is clm (set task: ppo, or drop the section)"]
    assert build_recipe({**BASE, "task": "dpo", "dpo": {"beta": 0.2}}).dpo.beta == 0.2


def test_a_task_section_reads_as_its_defaults_when_unset():
    from finetune.recipe.task_sections import DpoSpec, PpoSpec

    recipe = build_recipe({**BASE, "task": "ppo", "ppo": {"kl_coef": 0.2}})
    assert recipe.section(PpoSpec).kl_coef == 0.2
    assert build_recipe({**BASE, "task": "dpo"}).section(DpoSpec) == DpoSpec()


def test_a_method_the_task_does_not_train_with():
    with pytest.raises(UserError) as e:
        build_recipe({**BASE, "task": "reward", "method": "pretrain", "model": {}})
    assert e.value.problems == ["method: the reward task starts from a trained model; use --method lora or full"]


TOY = '''
"""A toy task: counts the training rows (what a new task module looks like to the registry)."""
import json
from pathlib import Path


def run(recipe, resume=False, callbacks=None):
    rows = Path(recipe.data.train).read_text().splitlines()
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"rows": len(rows)}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def check(recipe):
    return [], [f"data.train: {len(Path(recipe.data.train).read_text().splitlines())} rows"]


def load_trained(run_dir, **kwargs):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def next_steps(run_dir, recipe):
    return []


def usage(run_dir, recipe):
    return "a toy"
'''


def test_a_new_task_is_one_module_and_one_registry_entry(tmp_path, monkeypatch, tiny_gpt, toy_text):
    (tmp_path / "toy_task.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_task", raising=False)
    monkeypatch.setitem(REGISTRY, "toy", TaskInfo("toy", "toy_task", "AutoModelForCausalLM"))

    with pytest.raises(UserError) as e:
        build_recipe({**BASE, "task": "tyo"})
    assert e.value.problems[0].startswith("task: unknown task 'tyo' (did you mean 'toy'?); choose one of: clm, ")
    assert isinstance(load_task("toy"), Task)

    # validated, checked and run through the command line, which knows of it only through the registry
    code, stdout, stderr = invoke("validate", "--task", "toy", "--model", tiny_gpt, "--data", toy_text)
    assert code == 0, stderr
    assert "recipe: ok (toy, lora" in stdout and "data.train: 400 rows" in stdout and "peak" in stdout
    out = tmp_path / "run"
    code, stdout, stderr = invoke("full", "--task", "toy", "--model", tiny_gpt, "--data", toy_text, "-o", str(out))
    assert code == 0, stderr
    assert json.loads((out / "metrics.json").read_text()) == {"rows": 400}
