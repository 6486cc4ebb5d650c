"""`finetune plot` (finetune/hub/plot.py: the data handed to matplotlib, not pixels) and `finetune runs`
(finetune/run/listing.py: task, method, base, steps, metrics, status of each run under a folder)."""

from __future__ import annotations

import json

import pytest

from conftest import invoke
from finetune.errors import UserError
from finetune.hub import plot


def write_run(path, log, metrics=None, recipe="task: clm\nmethod: lora\nmodel:\n  name: gpt2\n", marker=None):
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(recipe)
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if marker is not None:
        (path / "run.json").write_text(json.dumps(marker))
    return path


LOG_A = [{"step": 1, "loss": 3.0, "learning_rate": 1e-4, "tokens_per_s": 100.0},
         {"step": 2, "loss": 2.0, "learning_rate": 5e-5, "tokens_per_s": 120.0},
         {"step": 2, "eval_loss": 2.5}]
LOG_B = [{"step": 1, "loss": 4.0, "learning_rate": 2e-4}, {"step": 3, "loss": 1.0, "learning_rate": 1e-4}]


def test_plot_hands_the_logged_curves_to_matplotlib(tmp_path, monkeypatch):
    a, b = write_run(tmp_path / "a", LOG_A), write_run(tmp_path / "b", LOG_B)
    drawn = {}
    monkeypatch.setattr(plot, "draw", lambda series, output: drawn.update(series=series, output=output) or output)
    code, out, err = invoke("plot", str(a), str(b), "-o", str(tmp_path / "cmp.png"))
    assert code == 0, err
    assert drawn["output"] == tmp_path / "cmp.png"
    assert drawn["series"] == {
        "train loss": {"a": ([1, 2], [3.0, 2.0]), "b": ([1, 3], [4.0, 1.0])},
        "eval loss": {"a": ([2], [2.5])},
        "learning rate": {"a": ([1, 2], [1e-4, 5e-5]), "b": ([1, 3], [2e-4, 1e-4])},
        "tokens/s": {"a": ([1, 2], [100.0, 120.0])},
    }


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "a", LOG_A)
    assert plot.plot_runs([a]) == a / "curves.png"
    assert (a / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_a_log(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="has no log.jsonl"):
        plot.curves([tmp_path / "x"])
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(UserError) as e:
        plot.draw({"train loss": {"a": ([1], [1.0])}}, tmp_path / "c.png")
    assert e.value.problems == ['plot: needs matplotlib; pip install "finetune-toolkit[plot]"']


def test_runs_lists_task_method_base_steps_metrics_status(tmp_path):
    write_run(tmp_path / "done", LOG_A, {"steps": 2, "eval_loss": 2.5, "final_train_loss": 2.0})
    write_run(tmp_path / "cut", LOG_B)
    write_run(tmp_path / "chain" / "dpo", LOG_B, recipe="task: dpo\nmethod: full\nmodel:\n  name: runs/sft\n",
              marker={"status": "failed"})
    code, out, err = invoke("runs", str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run", "task", "method", "base", "steps", "metrics", "status"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows[str(tmp_path / "done")][1:] == ["clm", "lora", "gpt2", "2", "loss", "2.5", "final_train_loss", "2",
                                                "finished"]
    assert rows[str(tmp_path / "cut")][1:] == ["clm", "lora", "gpt2", "3", "-", "interrupted"]
    assert rows[str(tmp_path / "chain" / "dpo")][1:] == ["dpo", "full", "runs/sft", "3", "-", "failed"]


def test_runs_shows_an_eval_score_first_with_its_change_from_the_base(tmp_path):
    write_run(tmp_path / "scored", LOG_A, {"steps": 2, "eval_loss": 2.5, "qa/exact_match": 0.75,
                                            "qa/exact_match_stderr": 0.1, "qa/exact_match_base": 0.25})
    (tmp_path / "scored" / "eval").mkdir()
    (tmp_path / "scored" / "eval" / "qa.json").write_text("{}")
    code, out, err = invoke("runs", str(tmp_path))
    assert code == 0
    row = next(ln for ln in out.splitlines() if ln.startswith(str(tmp_path / "scored")))
    assert row.split()[5:] == ["qa/exact_match", "0.75", "(+0.5", "on", "the", "base)", "loss", "2.5", "finished"]
