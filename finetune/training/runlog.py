"""A run's log.jsonl: one JSON object per logged step (`{"step": 10, "loss": 2.31, ...}`), written by the
main process. Every task reads and trims it here: training's log callback, PPO's own loop, and the
start -> end curves and final values the tasks report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG = "log.jsonl"


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the run's log, oldest first ([] when there is none yet)."""
    path = Path(run_dir) / LOG
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def trim_log(run_dir: Path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run's checkpoint), so the log reads as one
    uninterrupted run; an empty log when starting at step 0."""
    kept = [r for r in read_log(run_dir) if r.get("step", 0) <= step]
    (Path(run_dir) / LOG).write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with (Path(run_dir) / LOG).open("a") as f:
        f.write(json.dumps(record) + "\n")


def logged_values(run_dir: Path, key: str) -> list[Any]:
    return [r[key] for r in read_log(run_dir) if r.get(key) is not None]


def last_logged(run_dir: Path, key: str) -> Any:
    """The last value of `key` in the log, or None."""
    values = logged_values(run_dir, key)
    return values[-1] if values else None


def curve(run_dir: Path, key: str) -> tuple[float | None, float | None]:
    """First and last numeric values of `key` (the "start -> end" of a training curve), rounded."""
    values = [v for v in logged_values(run_dir, key) if isinstance(v, (int, float))]
    return (round(values[0], 6), round(values[-1], 6)) if values else (None, None)


def whole_run(run_dir: Path) -> tuple[float | None, float | None]:
    """(mean training loss, training seconds) of the whole run, across resumes: each logged loss
    weighted by the steps it averages over (`loss_steps`), and the last `time_s`."""
    rows = read_log(run_dir)
    weighted = [(r["loss"], r.get("loss_steps") or 1) for r in rows if r.get("loss") is not None]
    steps = sum(n for _, n in weighted)
    loss = sum(v * n for v, n in weighted) / steps if steps else None
    seconds = max((r.get("time_s") or 0.0 for r in rows), default=None)
    return loss, seconds
