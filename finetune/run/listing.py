"""`finetune runs [DIR]`: the runs under a folder, one line each: task, method, base, steps, final
metrics and status.

Status: the `status` field of the run's `run.json` marker where the run lifecycle wrote one
(finished, interrupted, failed, running, or killed when it says running and its process is gone);
otherwise `finished` when metrics.json exists, else `interrupted` (a run that stopped before writing its
metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from finetune.training.rundir import status as rundir_status

# The final metrics shown, first found first (one task logs a few of them).
SHOWN = ("eval_loss", "eval_accuracy", "eval_bleu", "eval_reward", "reward_end", "eval_rewards/accuracies",
         "final_train_loss")


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Directories holding a recipe.yaml under `root` (a chain's stages included), sorted."""
    found = []
    if (root / "recipe.yaml").is_file():
        found.append(root)
    if depth > 0 and root.is_dir():
        for child in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "checkpoints"):
            found += find_runs(child, depth - 1)
    return found


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def last_step(run: Path) -> int | None:
    path = run / "log.jsonl"
    if not path.is_file():
        return None
    steps = [json.loads(ln).get("step") for ln in path.read_text().splitlines() if ln.strip()]
    return max((s for s in steps if isinstance(s, int)), default=None)


def describe_run(run: Path) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    metrics = read_json(run / "metrics.json")
    marker = read_json(run / "run.json")
    status = marker.get("status") or ("finished" if metrics else "interrupted")
    if status == "running":
        status = rundir_status(run)  # killed, when its process is gone
    model = recipe.get("model") or {}
    shown = {k: metrics[k] for k in SHOWN if isinstance(metrics.get(k), (int, float))}
    scored = [k for k, v in metrics.items() if "/" in k and isinstance(v, (int, float)) and not k.endswith(
        ("_stderr", "_base")) and (run / "eval" / f"{k.split('/')[0]}.json").is_file()]
    if scored:  # `finetune eval`'s first score goes first, with its change from the base where measured
        shown = {scored[0]: metrics[scored[0]], **shown}
    return {"run": str(run), "task": recipe.get("task", "clm"), "method": recipe.get("method", "lora"),
            "base": model.get("name") or model.get("config") or "-",
            "steps": metrics.get("steps", metrics.get("iterations")) or last_step(run),
            "metrics": dict(list(shown.items())[:2]), "base_scores": {k: metrics[f"{k}_base"] for k in shown
                                                                       if isinstance(metrics.get(f"{k}_base"),
                                                                                     (int, float))},
            "status": status}


def runs_table(root: Path) -> list[str]:
    rows = [describe_run(r) for r in find_runs(root)]
    if not rows:
        return [f"no runs under {root} (a run is a directory with a recipe.yaml)"]
    cells = [["run", "task", "method", "base", "steps", "metrics", "status"]]
    for r in rows:
        shown = "  ".join(f"{k.removeprefix('eval_')} {v:.4g}" + (f" ({v - r['base_scores'][k]:+.4g} on the base)"
                                                                   if k in r["base_scores"] else "")
                          for k, v in r["metrics"].items()) or "-"
        cells.append([r["run"], r["task"], r["method"], r["base"], str(r["steps"] or "-"), shown, r["status"]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
