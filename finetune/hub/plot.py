"""`finetune plot RUN [RUN...] -o curves.png`: training and evaluation loss, learning rate and tokens/s
(reward for the RL tasks) from each run's log.jsonl, several runs on one figure to compare.

`curves()` turns the logs into the series drawn (tested); `draw()` only hands them to matplotlib
(an optional extra: `pip install "finetune-toolkit[plot]"`).
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError
from finetune.hub.card import DISTRIBUTION

# panel title -> the log.jsonl key it draws
PANELS = {"train loss": "loss", "eval loss": "eval_loss", "learning rate": "learning_rate",
          "tokens/s": "tokens_per_s", "reward": "reward"}

Series = dict[str, dict[str, tuple[list[int], list[float]]]]  # panel -> run label -> (steps, values)


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise UserError(f"run: '{run_dir}' has no log.jsonl; give run directories written by finetune")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its path where two names are the same."""
    names = [Path(r).name for r in run_dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, run_dirs)]


def curves(run_dirs: list[Path]) -> Series:
    """The series of every panel that at least one run logged."""
    out: Series = {}
    for label, run in zip(labels(run_dirs), run_dirs):
        for record in read_log(run):
            for panel, key in PANELS.items():
                if isinstance(record.get(key), (int, float)):
                    steps, values = out.setdefault(panel, {}).setdefault(label, ([], []))
                    steps.append(record["step"])
                    values.append(record[key])
    if not out:
        raise UserError("plot: the logs hold no loss, learning rate, tokens/s or reward to draw")
    return {p: out[p] for p in PANELS if p in out}


def draw(series: Series, output: Path) -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise UserError(f'plot: needs matplotlib; pip install "{DISTRIBUTION}[plot]"') from e
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    cols = 2 if len(series) > 1 else 1
    rows = (len(series) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    for ax, (panel, runs) in zip(axes.flat, series.items()):
        for label, (steps, values) in runs.items():
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def plot_runs(run_dirs: list[Path], output: Path | None = None) -> Path:
    if output is None:
        output = Path(run_dirs[0]) / "curves.png" if len(run_dirs) == 1 else Path("curves.png")
    return draw(curves(run_dirs), Path(output))
