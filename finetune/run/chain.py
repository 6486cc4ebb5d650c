"""`finetune chain`: run a chained recipe's stages in order (SFT -> reward -> PPO, or -> DPO, GRPO),
each stage's output feeding the next, each one resumable.

    finetune chain tiny-gpt-chain-sft-reward-dpo -o runs/tiny-chain
    finetune chain tiny-gpt-chain-sft-reward-dpo -o runs/tiny-chain --resume     # after an interruption
    finetune chain my-chain.yaml --set train.max_steps=20 --set stages.dpo.dpo.beta=0.2

A chained recipe is a recipe with `stages:`. Its other fields are the defaults every stage starts
from; each stage names the command it runs and what it changes (recipe/schema.py, StageSpec):

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

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.data import sources
from finetune.errors import Stopped, UserError, did_you_mean
from finetune.recipe.load import build_recipe, find_recipe, parse_override, read_recipe_file, set_dotted
from finetune.recipe.schema import Recipe
from finetune.recipe.tasks import METHODS
from finetune.run.lifecycle import execute
from finetune.training import rundir
from finetune.training.checkpoints import latest

SHOWN = ("final_train_loss", "eval_loss", "eval_accuracy", "eval_margin", "margin_start", "margin_end",
         "reward_start", "reward_end", "eval_reward")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the verb it runs: finetune <command>
    recipe: Recipe  # validated, placeholders replaced

    @property
    def run_dir(self) -> Path:
        return self.recipe.output_dir

    @property
    def output(self) -> Path:
        return stage_output(self.recipe)


@dataclasses.dataclass(frozen=True)
class Chain:
    """A chained recipe resolved once: the recipe as written (shared fields and `stages`), its directory,
    and each stage with its own validated recipe."""

    recipe: Recipe
    root: Path
    stages: list[Stage]


# ---------------------------------------------------------------------------------------
# Expanding a chained recipe into its stages' recipes

PLACEHOLDER = re.compile(r"\{stages\.([^{}]*?)\.([^.{}]*)\}")


def chain_dir(chain: Recipe) -> Path:
    return Path(chain.train.output_dir) if chain.train.output_dir else Path("runs") / "chain"


def stage_output(recipe: Recipe) -> Path:
    """What `{stages.NAME.output}` names: the stage's trained model as a plain model directory
    (a LoRA run is merged into its base there by the chain)."""
    return recipe.output_dir / "merged" if recipe.method == "lora" else recipe.output_dir


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"train": x}} -> {"data.train": x}, so that a stage's `set` merges into sections."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.endswith("trainer_args"):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _substitute(value: Any, outputs: dict[str, dict[str, Path]], where: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, where, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, where, problems) for v in value]
    if not isinstance(value, str):
        return value

    def replace(m: re.Match) -> str:
        name, attr = m.group(1), m.group(2)
        if name not in outputs:
            earlier = f"; earlier stages: {', '.join(outputs)}" if outputs else "; it is the first stage"
            problems.append(f"{where}: '{m.group(0)}' names no earlier stage{did_you_mean(name, outputs)}{earlier}")
            return m.group(0)
        if attr not in ("output", "run"):
            problems.append(f"{where}: '{m.group(0)}': use {{stages.{name}.output}} (its trained model) or "
                            f"{{stages.{name}.run}} (its run directory)")
            return m.group(0)
        return str(outputs[name][attr])

    return PLACEHOLDER.sub(replace, value)


def stage_recipes(chain: Recipe) -> list[Stage]:
    """Each stage's validated recipe: the chain's fields, then the stage's `recipe` file on top, then its
    `set`; `{stages.NAME.output|run}` replaced by earlier stages' directories. Every problem of every
    stage is reported at once."""
    shared = chain.model_dump(mode="json", exclude_unset=True, exclude={"stages"})
    shared.get("train", {}).pop("output_dir", None)
    root = chain_dir(chain)
    outputs: dict[str, dict[str, Path]] = {}
    resolved, problems = [], []
    for i, stage in enumerate(chain.stages or []):
        where = f"stages[{i}] ({stage.name})"
        stage_problems: list[str] = []
        data = shared
        if stage.recipe:
            try:
                own = read_recipe_file(find_recipe(stage.recipe))
            except UserError as e:
                problems += [f"{where}.recipe: {p}" for p in e.problems]
                continue
            if "stages" in own:
                stage_problems.append(f"{where}.recipe: '{stage.recipe}' is itself a chain; a stage runs one recipe")
            data = deep_merge(shared, own)
        data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain values
        sets = flatten(stage.set)
        fixed = "method" if stage.command in METHODS else "task"
        if fixed in sets:
            stage_problems.append(f"{where}.set.{fixed}: the stage's command `{stage.command}` sets the {fixed}; "
                                  "drop it")
        if "stages" in sets or any(k.startswith("stages.") for k in sets):
            stage_problems.append(f"{where}.set.stages: a stage runs one recipe and cannot hold stages")
        data[fixed] = stage.command
        set_dotted(data, "train.output_dir", str(root / stage.name))
        data.pop("stages", None)
        try:
            for key, value in sets.items():
                set_dotted(data, key, value)
        except UserError as e:
            stage_problems += [f"{where}.set: {p}" for p in e.problems]
        data = _substitute(data, outputs, where, stage_problems)
        if not stage_problems:
            try:
                recipe = build_recipe(data)
            except UserError as e:
                stage_problems += [f"{where}: {p}" for p in e.problems]
            else:
                if recipe.train.num_processes > 1:
                    stage_problems.append(f"{where}: train.num_processes > 1 is not supported inside a chain; run "
                                          f"that stage on its own: finetune {stage.command} ... --num-processes N")
                resolved.append(Stage(stage.name, stage.command, recipe))
                outputs[stage.name] = {"output": stage_output(recipe), "run": recipe.output_dir}
        if stage_problems:  # still resolvable by later stages, so that one mistake is reported once
            outputs[stage.name] = {"output": root / stage.name, "run": root / stage.name}
        problems += stage_problems
    if problems:
        raise UserError(problems)
    return resolved


def chain_problems(chain: Recipe) -> list[str]:
    """What stops the chain before any stage is expanded: no stages, or two with one name."""
    stages = chain.stages or []
    if not stages:
        return ["stages: empty; list the stages to run (or drop `stages` to run a single recipe)"]
    names = [s.name for s in stages]
    return [f"stages: the name '{n}' is used twice; each stage needs its own name (its run directory)"
            for n in sorted({n for n in names if names.count(n) > 1})]


def resolve_chain(chain: Recipe) -> Chain:
    """The chain with every stage's recipe built and validated, once; every problem at once."""
    problems = chain_problems(chain)
    if problems:
        raise UserError(problems)
    return Chain(chain, chain_dir(chain), stage_recipes(chain))


def build_chain(data: dict[str, Any], overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> Chain:
    """A chained recipe's dict (with `stages`) -> its resolved Chain."""
    return resolve_chain(build_recipe(data, overrides, sets))


# ---------------------------------------------------------------------------------------
# Loading, describing and running a chain


def load_chain(name_or_path: str, output: str | None = None, sets: list[str] | None = None) -> Chain:
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
    return build_chain(data, {"train.output_dir": output}, shared_sets)


def describe(chain: Chain) -> str:
    """The plan: one line per stage with its command, model and run directory."""
    lines = [f"chain: {len(chain.stages)} stages in {chain.root}/"]
    for i, stage in enumerate(chain.stages, 1):
        recipe = stage.recipe
        model = recipe.model.name or recipe.model.config
        lines.append(f"  {i}. {stage.name:<10} finetune {stage.command:<8} ({recipe.task}, {recipe.method})  "
                     f"model {model}  data {sources.describe(recipe.data)}  -> {recipe.output_dir}")
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
    # --overwrite deletes nothing here: each stage replaces its own earlier run only when it finishes


def check_inputs(stages, root: Path) -> None:
    """Every stage's data files, and the models that exist already, before the first stage trains (each
    stage's full pre-flight runs again when it starts, through run.execute)."""
    from finetune.models.pretrained import check_model_files

    problems = []
    for i, stage in enumerate(stages):
        recipe, where = stage.recipe, f"stages[{i}] ({stage.name})"
        try:
            sources.check_sources(recipe.data)
            name = recipe.model.name
            if name and not Path(name).resolve().is_relative_to(root.resolve()):  # not an earlier stage's output
                check_model_files(name, "model.name", recipe.model.gguf_file, recipe.model.revision)
        except UserError as e:
            problems += [f"{where}: {p}" for p in e.problems]
    if problems:
        raise UserError(problems)


def finished(recipe: Recipe) -> bool:
    return (recipe.output_dir / "metrics.json").is_file()


def merge_stage(recipe: Recipe) -> None:
    """A LoRA stage's adapter merged into its base: the plain model directory later stages load."""
    from finetune.use.inference import merge_run

    out = stage_output(recipe)
    if out.exists():
        shutil.rmtree(out)  # a merge interrupted half-way
    merge_run(recipe.output_dir, out)


def check_unchanged(stage_name: str, recipe: Recipe) -> None:
    """The stage's recipe is the one its run was asked to run (run.json's fingerprint; recipe.yaml holds what the
    run resolved from it, such as the precision and a batch fitted to the memory)."""
    saved = recipe.output_dir / "recipe.yaml"
    asked = (rundir.read_marker(recipe.output_dir) or {}).get("requested")
    changed = asked != rundir.fingerprint(recipe.to_yaml()) if asked else \
        saved.is_file() and saved.read_text() != recipe.to_yaml()
    if changed:
        raise UserError(f"stage '{stage_name}': its recipe changed since it ran ({saved}); pass --overwrite to run the "
                        f"whole chain afresh, or delete {recipe.output_dir} to run this stage and the ones after it again")


def run_chain(chain: Chain, resume: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    stages, root = chain.stages, chain.root
    check_inputs(stages, root)
    prepare_dir(root, overwrite, resume)
    root.mkdir(parents=True, exist_ok=True)
    (root / "chain.yaml").write_text(chain.recipe.to_yaml())
    print(describe(chain), flush=True)

    summary: list[dict[str, Any]] = []
    upstream_ran = overwrite  # once a stage runs again, every later stage has a new input
    for i, stage in enumerate(stages, 1):
        recipe = stage.recipe
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
        continue_run = resume and not upstream_ran and latest(run_dir) is not None
        if continue_run:
            check_unchanged(stage.name, recipe)
        # an interrupted stage without a checkpoint, or one whose input changed, is replaced, through
        # the same lifecycle as any run: the old one goes only when the new one finishes
        replace = not continue_run and run_dir.exists() and any(run_dir.iterdir())
        print(f"\n== {header}{', continued from its last checkpoint' if continue_run else ''} -> {run_dir}",
              flush=True)
        start = time.perf_counter()
        try:
            metrics = execute(recipe, resume=continue_run, overwrite=replace)
        except Stopped as e:  # interrupted or diverged: the chain resumes as a whole
            lines = [ln for ln in e.lines if not ln.startswith("continue with:")]
            if e.code in (130, 143):
                lines.append(f"continue the chain with: finetune chain {root / 'chain.yaml'} --resume -o {root}")
            raise Stopped(lines, e.code) from e
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
