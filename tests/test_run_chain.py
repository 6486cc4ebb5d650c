"""`finetune chain`: SFT -> reward -> DPO as stages of one recipe, each stage's output feeding the
next, finished stages skipped and an interrupted one continued on --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, invoke
from finetune.errors import UserError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import Recipe
from finetune.run.chain import build_chain, resolve_chain
from rlhf_helpers import write_preferences
from rlhf_helpers import one_thread  # noqa: F401 (an autouse fixture)

CHAIN = "tiny-gpt-chain-sft-reward-dpo"
RLHF_RECIPES = sorted(p.name for p in (Path(REPO) / "recipes").glob("*.yaml")
                      if any(k in p.name for k in ("reward", "dpo", "grpo", "ppo", "chain")))


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.fixture(scope="module")
def chain_args(tmp_path_factory, tiny_gpt, toy_text) -> list[str]:
    """The shipped tiny chain, pointed at the test's tiny GPT and data, with few steps."""
    prefs = write_preferences(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", n=128)
    return [CHAIN, "--set", f"model.name={tiny_gpt}", "--set", f"data.train={prefs}",
            "--set", "data.eval_fraction=0.25", "--set", "train.save_steps=10",
            "--set", f"stages.sft.data.train={toy_text}", "--set", "stages.sft.train.max_steps=20",
            "--set", "stages.reward.train.max_steps=30", "--set", "stages.reward.train.learning_rate=3e-3",
            "--set", "stages.dpo.train.max_steps=20", "--set", "stages.dpo.train.learning_rate=5e-3"]


def test_chain_runs_end_to_end_and_resumes(chain_args, tiny_gpt, tmp_path):
    root = tmp_path / "chain"
    code, out, err = invoke("chain", *chain_args, "-o", root)
    assert code == 0, err + out
    # each stage is an ordinary run; a LoRA stage is merged for the next ones
    for stage in ("sft", "reward", "dpo"):
        assert (root / stage / "metrics.json").is_file() and (root / stage / "recipe.yaml").is_file()
    assert (root / "sft" / "merged" / "config.json").is_file()
    reward_recipe = load_recipe(str(root / "reward" / "recipe.yaml"))
    dpo_recipe = load_recipe(str(root / "dpo" / "recipe.yaml"))
    assert reward_recipe.model.name == dpo_recipe.model.name == str(root / "sft" / "merged")
    assert (reward_recipe.task, reward_recipe.method, dpo_recipe.task) == ("reward", "full", "dpo")
    assert dpo_recipe.dpo.sft_weight == 1.0 and dpo_recipe.train.max_steps == 20  # the recipe's stage value; --set's
    summary = json.loads((root / "chain.json").read_text())
    assert [s["stage"] for s in summary] == ["sft", "reward", "dpo"]
    assert summary[1]["metrics"]["eval_accuracy"] >= 0.9
    assert summary[2]["metrics"]["eval_margin"] > 0 and summary[2]["metrics"]["margin_start"] == 0
    assert all(s["wall_s"] > 0 for s in summary)
    assert "finetune chain finished" in out

    # again without --resume or --overwrite: refused
    code, out, err = invoke("chain", *chain_args, "-o", root)
    assert code == 2
    assert errors(err) == [f"error: --output: '{root}' already holds a chain; pass --resume to continue it (finished "
                           "stages are skipped), --overwrite to start afresh, or choose another --output"]

    # the dpo stage interrupted between its checkpoints: --resume skips sft and reward, continues dpo
    import shutil

    (root / "dpo" / "metrics.json").unlink()
    shutil.rmtree(root / "dpo" / "checkpoints" / "checkpoint-20")
    reward_mtime = (root / "reward" / "metrics.json").stat().st_mtime
    code, out, err = invoke("chain", *chain_args, "-o", root, "--resume")
    assert code == 0, err + out
    assert "stage 1/3 sft (finetune lora): finished earlier, skipped" in out
    assert "stage 2/3 reward (finetune reward): finished earlier, skipped" in out
    assert "stage 3/3 dpo (finetune dpo), continued from its last checkpoint" in out
    assert (root / "reward" / "metrics.json").stat().st_mtime == reward_mtime
    assert json.loads((root / "dpo" / "metrics.json").read_text())["steps"] == 20
    steps = [json.loads(ln)["step"] for ln in (root / "dpo" / "log.jsonl").read_text().splitlines()]
    assert steps[:3] == [1, 10, 20] and steps.count(1) == 1  # one log, as if never interrupted

    # a changed stage recipe is not silently skipped
    code, out, err = invoke("chain", *chain_args, "--set", "stages.reward.reward.center_rewards=0.01", "-o", root,
                            "--resume")
    assert code == 2
    assert errors(err)[0].startswith("error: stage 'reward': its recipe changed since it ran")


def chain_recipe(stages: list[dict], **shared) -> dict:
    return {"model": {"name": "base"}, "data": {"train": "prefs.jsonl"}, **shared, "stages": stages}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(UserError) as e:
        build_chain(data)
    return e.value.problems


def test_placeholders_must_name_an_earlier_stage():
    data = chain_recipe([{"name": "sft", "command": "lora"},
                         {"name": "dpo", "command": "dpo", "set": {"model.name": "{stages.sfy.output}"}},
                         {"name": "rm", "command": "reward", "set": {"model.name": "{stages.dpo.outptu}"}}])
    assert problems_of(data) == [
        "stages[1] (dpo): '{stages.sfy.output}' names no earlier stage (did you mean 'sft'?); earlier stages: sft",
        "stages[2] (rm): '{stages.dpo.outptu}': use {stages.dpo.output} (its trained model) or {stages.dpo.run} "
        "(its run directory)"]


def test_stage_recipes_are_validated_like_any_recipe():
    data = chain_recipe([{"name": "sft", "command": "lora", "set": {"train.lerning_rate": 1e-3}},
                         {"name": "sft", "command": "dpo"}])
    assert problems_of(data) == ["stages: the name 'sft' is used twice; each stage needs its own name (its run directory)"]
    data = chain_recipe([{"name": "sft", "command": "lora", "set": {"train": {"lerning_rate": 1e-3}}},
                         {"name": "dpo", "command": "dpo", "set": {"task": "clm", "dpo.beta": -1}}])
    assert problems_of(data) == [
        "stages[0] (sft): train.lerning_rate: unknown key (did you mean 'learning_rate'?)",
        "stages[1] (dpo).set.task: the stage's command `dpo` sets the task; drop it"]
    assert problems_of(chain_recipe([])) == ["stages: empty; list the stages to run (or drop `stages` to run a single "
                                             "recipe)"]


def test_stage_outputs_are_plain_model_directories():
    chain = build_chain(chain_recipe(
        [{"name": "sft", "command": "lora"}, {"name": "rm", "command": "reward", "set": {"method": "full"}},
         {"name": "dpo", "command": "dpo", "set": {"model.name": "{stages.sft.output}", "data.eval": "{stages.rm.run}"}}],
        train={"output_dir": "runs/c"}))
    recipes = {s.name: s.recipe for s in chain.stages}
    assert recipes["dpo"].model.name == str(Path("runs/c/sft/merged"))  # a LoRA stage: merged into its base
    assert recipes["dpo"].data.eval == str(Path("runs/c/rm"))
    assert recipes["rm"].model.name == "base" and recipes["rm"].output_dir == Path("runs/c/rm")


def test_a_chain_is_not_run_by_a_training_verb(chain_args):
    code, out, err = invoke("lora", CHAIN)
    assert code == 2
    assert errors(err) == [f"error: recipe: '{CHAIN}' is a chain (it has stages); run it with `finetune chain {CHAIN}`"]
    code, out, err = invoke("chain", CHAIN, "--set", "stages.dpa.dpo.beta=0.2")
    assert code == 2
    assert errors(err) == ["error: --set stages.dpa.dpo.beta=0.2: expected stages.<stage name>.<key>=<value>; stage "
                           "names: sft, reward, dpo (did you mean 'dpo'?)"]


def test_validate_shows_the_plan():
    code, out, err = invoke("validate", CHAIN)
    assert code == 0, err
    assert "chain: 3 stages in runs/tiny-chain/" in out
    assert "3. dpo        finetune dpo      (dpo, lora)  model runs/tiny-chain/sft/merged" in out


@pytest.mark.parametrize("name", RLHF_RECIPES)
def test_shipped_rlhf_recipes_validate(name):
    if "ppo" in name and "ppo" not in Recipe.model_fields:
        pytest.skip("the ppo section is added with the ppo task")
    recipe = load_recipe(str(Path(REPO) / "recipes" / name))
    if recipe.stages:
        resolve_chain(recipe)  # every stage's recipe is valid
    text = (Path(REPO) / "recipes" / name).read_text().splitlines()
    assert text[0].startswith("# ") and any(ln.lstrip("# ").startswith("finetune ") for ln in text[1:6])
    assert recipe.task in ("reward", "dpo", "grpo", "ppo") or recipe.stages
