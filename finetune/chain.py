"""`finetune chain`: run a chained recipe's stages in order (SFT -> reward -> PPO, or -> DPO, GRPO),
each stage's output feeding the next, each one resumable.

    finetune chain tiny-gpt-chain-sft-reward-dpo -o runs/tiny-chain
    finetune chain tiny-gpt-chain-sft-reward-dpo -o runs/tiny-chain --resume     # after an interruption
    finetune chain my-chain.yaml --set train.max_steps=20 --set stages.dpo.dpo.beta=0.2

A chained recipe is a recipe with `stages:`. Its other fields are the defaults every stage starts
from; each stage names the command it runs and what it changes (recipe.py, StageSpec):

    model: {name: gpt2}
    stages:
      - {name: sft, command: lora, set: {data.train: sft.jsonl}}
      - {name: reward, command: reward, set: {model.name: "{stages.sft.output}", data.train: prefs.jsonl}}
      - {name: dpo, command: dpo, set: {model.name: "{stages.sft.output}", data.train: prefs.jsonl}}

The chain directory holds chain.yaml (the chain as run), chain.json (per-stage metrics and wall
time) and one ordinary run per stage, <dir>/<stage>/. After a LoRA stage the adapter is merged into
its base in <dir>/<stage>/merged/: that is what `{stages.<stage>.output}` names, a plain model
directory any later stage (or `finetune ppo`) loads like a Hub checkpoint.

Resuming skips the stages that finished with the same recipe, continues an interrupted stage from its
last checkpoint, and reruns every stage after one that ran again (its input changed).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from finetune.errors import UserError, did_you_mean
from finetune.recipe import (Recipe, build_recipe, chain_dir, find_recipe, parse_override, read_recipe_file,
                             stage_output, stage_recipes)
from finetune.tasks import load_task
from finetune.training import complete_checkpoints

SHOWN = ("final_train_loss", "eval_loss", "eval_accuracy", "eval_margin", "margin_start", "margin_end",
         "reward_start", "reward_end", "eval_reward")


def load_chain(name_or_path: str, output: str | None = None, sets: list[str] | None = None) -> Recipe:
    """The chain recipe, with `--set stages.NAME.KEY=VALUE` applied to that stage and the other
    `--set` items to the shared fields."""
    data = read_recipe_file(find_recipe(name_or_path))
    if not data.get("stages"):
        raise UserError(f"recipe: '{name_or_path}' has no stages; run a single recipe with "
                        "finetune lora|full|reward|dpo|grpo|ppo, or list its stages under `stages:`")
    shared_sets = []
    for item in sets or []:
        key, value = parse_override(item)
        if not key.startswith("stages."):
            shared_sets.append(item)
            continue
        name, _, rest = key[len("stages."):].partition(".")
        stages = {s.get("name"): s for s in data["stages"] if isinstance(s, dict)}
        if name not in stages or not rest:
            raise UserError(f"--set {item}: expected stages.<stage name>.<key>=<value>; stage names: "
                            f"{', '.join(map(str, stages))}{did_you_mean(name, map(str, stages))}")
        if rest in ("command", "recipe"):
            stages[name][rest] = value
        else:
            stages[name].setdefault("set", {})[rest] = value
    return build_recipe(data, {"train.output_dir": output}, shared_sets)


def describe(chain: Recipe) -> str:
    """The plan: one line per stage with its command, model and run directory."""
    lines = [f"chain: {len(chain.stages or [])} stages in {chain_dir(chain)}/"]
    for i, (stage, recipe) in enumerate(stage_recipes(chain), 1):
        model = recipe.model.name or recipe.model.config
        lines.append(f"  {i}. {stage.name:<10} finetune {stage.command:<8} ({recipe.task}, {recipe.method})  "
                     f"model {model}  data {recipe.data.train}  -> {recipe.output_dir}")
    return "\n".join(lines)


def prepare_dir(root: Path, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise UserError("--overwrite and --resume: choose one (--resume continues the chain, --overwrite replaces it)")
    holds_chain = (root / "chain.yaml").is_file()
    not_empty = root.is_dir() and any(root.iterdir())
    if root.exists() and not root.is_dir():
        raise UserError(f"--output: '{root}' is a file; choose a directory")
    if resume:
        if not holds_chain:
            raise UserError(f"--resume: no chain in '{root}' (no chain.yaml); run without --resume to start it")
        return
    if not not_empty:
        return
    if not holds_chain:
        raise UserError(f"--output: '{root}' is not empty and holds no chain; choose another directory")
    if not overwrite:
        raise UserError(f"--output: '{root}' already holds a chain; pass --resume to continue it (finished stages "
                        "are skipped), --overwrite to start afresh, or choose another --output")
    shutil.rmtree(root)


def finished(recipe: Recipe) -> bool:
    return (recipe.output_dir / "metrics.json").is_file()


def merge_stage(recipe: Recipe) -> None:
    """A LoRA stage's adapter merged into its base: the plain model directory later stages load."""
    from finetune.inference import merge_run

    out = stage_output(recipe)
    if out.exists():
        shutil.rmtree(out)  # a merge interrupted half-way
    merge_run(recipe.output_dir, out)


def check_unchanged(stage_name: str, recipe: Recipe) -> None:
    saved = recipe.output_dir / "recipe.yaml"
    if saved.is_file() and saved.read_text() != recipe.to_yaml():
        raise UserError(f"stage '{stage_name}': its recipe changed since it ran ({saved}); pass --overwrite to run the "
                        f"whole chain afresh, or delete {recipe.output_dir} to run this stage and the ones after it again")


def run_chain(chain: Recipe, resume: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    stages = stage_recipes(chain)
    root = chain_dir(chain)
    prepare_dir(root, overwrite, resume)
    root.mkdir(parents=True, exist_ok=True)
    (root / "chain.yaml").write_text(chain.to_yaml())
    print(describe(chain), flush=True)

    summary: list[dict[str, Any]] = []
    upstream_ran = False  # once a stage runs again, every later stage has a new input
    for i, (stage, recipe) in enumerate(stages, 1):
        run_dir = recipe.output_dir
        header = f"stage {i}/{len(stages)} {stage.name} (finetune {stage.command})"
        if finished(recipe) and not upstream_ran:
            check_unchanged(stage.name, recipe)
            if recipe.method == "lora" and not (stage_output(recipe) / "config.json").is_file():
                merge_stage(recipe)  # interrupted while merging
            print(f"\n== {header}: finished earlier, skipped ({run_dir})", flush=True)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            summary.append(stage_summary(stage.name, stage.command, recipe, metrics, None))
            continue
        continue_run = resume and not upstream_ran and bool(complete_checkpoints(run_dir))
        if continue_run:
            check_unchanged(stage.name, recipe)
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted stage without a checkpoint, or one whose input changed
        print(f"\n== {header}{', continued from its last checkpoint' if continue_run else ''} -> {run_dir}",
              flush=True)
        start = time.perf_counter()
        metrics = load_task(recipe.task).run(recipe, resume=continue_run)
        if recipe.method == "lora":
            merge_stage(recipe)
        upstream_ran = True
        summary.append(stage_summary(stage.name, stage.command, recipe, metrics, time.perf_counter() - start))

    (root / "chain.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(root, summary)
    return summary


def stage_summary(name: str, command: str, recipe: Recipe, metrics: dict, wall: float | None) -> dict[str, Any]:
    return {"stage": name, "command": command, "run": str(recipe.output_dir), "output": str(stage_output(recipe)),
            "wall_s": round(wall, 1) if wall is not None else None,
            "metrics": {k: metrics[k] for k in SHOWN if metrics.get(k) is not None}}


def print_summary(root: Path, summary: list[dict[str, Any]]) -> None:
    lines = [f"\nfinetune chain finished: {root}/ (chain.json has every stage's numbers)"]
    for s in summary:
        wall = f"{s['wall_s']:.0f} s" if s["wall_s"] is not None else "skipped"
        shown = ", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items() if isinstance(v, (int, float)))
        lines.append(f"  {s['stage']:<10} {s['command']:<8} {wall:>8}  {shown}")
        lines.append(f"  {'':<10} model: {s['output']}")
    print("\n".join(lines), flush=True)
