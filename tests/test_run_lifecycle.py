"""The run lifecycle (run/lifecycle.py, training/rundir.py, training/checkpoints.py, training/guards.py):
nothing a user made is lost.

Interruptions and divergence are made deterministic with a callback that sends SIGTERM to this
process, or poisons a weight, at a chosen step; the real CLI is checked once with a real signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, finish, invoke, start, wait_for_first_step, write_jsonl


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def recipe_for(model: str, data: str, out: Path, steps: int = 12, **sets):
    from finetune.recipe.load import load_recipe

    overrides = {"method": "full", "model.name": model, "data.train": data, "train.output_dir": str(out),
                 "train.max_steps": steps, "train.save_steps": 4, "train.logging_steps": 5, "train.batch_size": 4}
    overrides.update(sets)
    return load_recipe(None, overrides)


def at_step(step: int, action):
    """`action(model)` as step `step` begins (the steps done so far: step - 1)."""
    from transformers import TrainerCallback

    class At(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == step - 1:
                action(model)

    return At()


def sigterm(model):
    os.kill(os.getpid(), signal.SIGTERM)


def poison(model):
    import torch

    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), "resumed weights differ from the uninterrupted run's"


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt, toy_text, tmp_path_factory):
    from finetune.run.lifecycle import execute

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    metrics = execute(recipe_for(tiny_gpt, toy_text, out))
    return out, metrics


@pytest.fixture(scope="module")
def interrupted(tiny_gpt, toy_text, tmp_path_factory):
    """A run stopped by SIGTERM at step 10 (checkpoints 8 and 10 on disk)."""
    from finetune.errors import Stopped
    from finetune.run.lifecycle import execute

    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Stopped) as stopped:
        execute(recipe_for(tiny_gpt, toy_text, out), callbacks=[at_step(10, sigterm)])
    return out, stopped.value


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(interrupted):
    out, stopped = interrupted
    assert stopped.code == 143
    assert stopped.lines == [f"interrupted at step 10: saved {out / 'checkpoints' / 'checkpoint-10'}",
                             f"continue with: finetune full --resume -o {out}"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-8"]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_after_sigterm_is_bit_exact(interrupted, uninterrupted, tmp_path, capsys):
    from finetune.run.lifecycle import execute, resolve

    out = copy_run(interrupted[0], tmp_path / "run")
    metrics = execute(resolve(None, None, {"train.output_dir": str(out)}, None, resume=True), resume=True)
    assert "resuming from checkpoint-10 (step 10)" in capsys.readouterr().out
    assert_same_weights(out, uninterrupted[0])
    # metrics.json covers the whole run, not the resumed part
    whole = uninterrupted[1]
    assert metrics["steps"] == whole["steps"] == 12
    assert metrics["tokens_seen"] == whole["tokens_seen"]
    assert metrics["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("damage", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors",
                                    "trainer_state.json", "manifest.json"])
def test_damaged_newest_checkpoint_falls_back(interrupted, uninterrupted, tmp_path, capsys, damage):
    from finetune.run.lifecycle import execute, resolve

    out = copy_run(interrupted[0], tmp_path / "run")
    newest = out / "checkpoints" / "checkpoint-10"
    if damage in ("model.safetensors", "trainer_state.json"):
        path = newest / damage
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: size // 2])  # truncated
        why = f"{damage} has {size // 2} bytes instead of {size}"
    else:
        (newest / damage).unlink()
        why = "is missing" if damage != "manifest.json" else "no manifest.json"
    execute(resolve(None, None, {"train.output_dir": str(out)}, None, resume=True), resume=True)
    printed = capsys.readouterr().out
    assert f"warning: skipping checkpoint-10: " in printed and why in printed
    assert "resuming from checkpoint-8 (step 8)" in printed
    assert_same_weights(out, uninterrupted[0])


def test_resume_of_a_finished_run_changes_nothing(uninterrupted, tmp_path):
    out = copy_run(uninterrupted[0], tmp_path / "run")
    before = snapshot(out)
    code, stdout, _ = invoke("full", "--resume", "-o", str(out))
    assert code == 0
    assert f"'{out}' holds a finished run (step 12); nothing to do" in stdout
    assert snapshot(out) == before


def test_resume_of_a_finished_run_with_more_steps_continues(uninterrupted, tmp_path):
    out = copy_run(uninterrupted[0], tmp_path / "run")
    code, stdout, stderr = invoke("full", "--resume", "-o", str(out), "--max-steps", "14")
    assert code == 0, stderr
    assert "resuming from checkpoint-12 (step 12)" in stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 14


def test_non_finite_gradients_stop_the_run_and_keep_the_last_good_checkpoint(tiny_gpt, toy_text, tmp_path):
    from finetune.errors import Stopped
    from finetune.run.lifecycle import execute

    out = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        execute(recipe_for(tiny_gpt, toy_text, out), callbacks=[at_step(10, poison)])
    assert stopped.value.code == 3
    first, fix = stopped.value.lines
    assert first == (f"error: training diverged at step 10: the gradients are not finite (nan or inf); no model "
                     f"was written as the result, and the last good checkpoint is "
                     f"{out / 'checkpoints' / 'checkpoint-8'} (step 8)")
    assert fix.startswith("fix: lower train.learning_rate (now 5e-05), add warm-up")
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    import torch
    from safetensors.torch import load_file

    kept = load_file(str(out / "checkpoints" / "checkpoint-8" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    for line in (out / "log.jsonl").read_text().splitlines():  # strict JSON
        json.loads(line, parse_constant=lambda c: pytest.fail(f"log.jsonl holds {c}"))


def test_nan_patience_skips_bad_steps(tiny_gpt, toy_text, tmp_path, capsys):
    from finetune.run.lifecycle import execute

    def poison_grads(model):
        import torch

        for p in model.parameters():
            p.register_hook(lambda g: torch.full_like(g, float("nan"))) if p.requires_grad and p.dim() == 2 else None

    # poisoned once: every later step's gradients are NaN too, so patience 2 stops at the third
    from finetune.errors import Stopped

    with pytest.raises(Stopped) as stopped:
        execute(recipe_for(tiny_gpt, toy_text, tmp_path / "run", **{"train.nan_patience": 2}),
                callbacks=[at_step(6, poison_grads)])
    printed = capsys.readouterr().out
    assert "warning: step 6: non-finite gradients; step skipped (1 of train.nan_patience=2 in a row)" in printed
    assert "warning: step 7: non-finite gradients; step skipped (2 of train.nan_patience=2 in a row)" in printed
    assert stopped.value.lines[0].startswith("error: training diverged at step 8:")


def test_diverging_run_exits_3_and_leaves_nothing(tiny_gpt, toy_text, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", toy_text, "-o", str(out), "--max-steps", "20",
                             "--set", "train.learning_rate=1e6")
    assert code == 3
    assert "error: training diverged at step " in stderr
    assert not out.exists()  # nothing that blocks the corrected rerun


def test_overwrite_with_a_typo_in_data_keeps_the_old_run(uninterrupted, tmp_path):
    out = copy_run(uninterrupted[0], tmp_path / "old-run")
    before = snapshot(out)
    code, _, stderr = invoke("full", "--model", uninterrupted[0], "--data", str(tmp_path / "nope.jsonl"),
                             "-o", str(out), "--overwrite")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: no such file '{tmp_path / 'nope.jsonl'}'"]
    assert snapshot(out) == before


def test_overwrite_failing_inside_the_task_puts_the_old_run_back(uninterrupted, tiny_gpt, tmp_path):
    out = copy_run(uninterrupted[0], tmp_path / "old-run")
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"text": "c d}\n')
    code, stdout, stderr = invoke("full", "--model", tiny_gpt, "--data", str(bad), "-o", str(out), "--overwrite")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: '{bad}' line 2 is not valid JSON (Unterminated string "
                              "starting at, column 10); fix or remove it"]
    assert f"the earlier run in {out} is unchanged" in stdout
    assert snapshot(out) == before
    assert not (tmp_path / ".old-run.replaced").exists()


def test_overwrite_replaces_only_finetune_runs(tiny_gpt, toy_text, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    (folder / "thesis.tex").write_text("\\section{results}")
    code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", toy_text, "-o", str(folder), "--overwrite",
                             "--max-steps", "1")
    assert code == 2
    assert errors(stderr) == [f"error: --output: '{folder}' is not empty and is not a finetune run (it holds "
                              "thesis.tex); finetune only ever replaces its own runs: choose another --output"]
    assert (folder / "thesis.tex").read_text() == "\\section{results}"


def test_a_failed_start_leaves_nothing_behind(tiny_gpt, toy_text, tmp_path):
    out = tmp_path / "run"
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": 1}, {"text": 2}])
    code, _, _ = invoke("full", "--model", tiny_gpt, "--data", ints, "-o", str(out), "--max-steps", "1")
    assert code == 2 and not out.exists()
    code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", toy_text, "-o", str(out), "--max-steps", "1")
    assert code == 0, stderr


def test_chain_checks_every_stage_before_the_first_trains(tiny_gpt, toy_text, tmp_path):
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"model: {{name: {tiny_gpt}}}\ndata: {{train: {toy_text}}}\ntrain: {{max_steps: 2}}\n"
                     "stages:\n  - {name: a, command: full}\n"
                     f"  - {{name: b, command: full, set: {{data.train: {tmp_path / 'missing.jsonl'}, "
                     "model.name: '{stages.a.output}'}}\n")
    code, _, stderr = invoke("chain", str(chain), "-o", str(tmp_path / "c"))
    assert code == 2
    assert errors(stderr) == [f"error: stages[1] (b): data.train: no such file '{tmp_path / 'missing.jsonl'}'"]
    assert not (tmp_path / "c" / "a").exists()


@pytest.mark.parametrize("name, content, message", [
    ("blank.txt", "\n\n  \n", "data.train: every text in '{f}' is empty (column 'text'); nothing to train on"),
    ("latin.jsonl", b'{"text": "caf\xe9"}\n', "data.train: '{f}' line 1 is not UTF-8 text (byte 0xe9); re-save the "
                                              "file as UTF-8 (for example: iconv -f latin1 -t utf-8)"),
    ("ints.jsonl", '{"text": 1}\n{"text": 2}\n', "data.train: column 'text' of '{f}' holds int values (row 1: '1'), "
                                                "not text; set data.text_column to a column of strings"),
    ("mixed.jsonl", '{"text": "a b"}\n{"text": ["c", "d"]}\n',
     "data.train: column 'text' of '{f}' holds list values (row 2: \"['c', 'd']\"), not text; set "
     "data.text_column to a column of strings"),
    ("empty.jsonl", "", "data.train: '{f}' is empty; give a file with at least one row"),
    ("broken.jsonl", '{"text": "a"}\n{"text": "b"\n', "data.train: '{f}' line 2 is not valid JSON (Expecting ',' "
                                                      "delimiter, column 13); fix or remove it"),
])
def test_bad_data_is_named_with_its_fix(tiny_gpt, tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", str(f), "-o", str(tmp_path / "r"),
                             "--max-steps", "1")
    assert code == 2
    assert errors(stderr) == ["error: " + message.format(f=f)]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "train.max_steps: 0 trains nothing; give a positive number of steps, or -1 to let "
                           "train.epochs decide, got 0"),
    (["--set", "train.seed=-1"], "train.seed: input should be greater than or equal to 0, got -1"),
    (["--set", "train.learning_rate=inf"], "train.learning_rate: input should be a finite number, got inf"),
    (["--set", "train.trainer_args.hub_token=hf_secret"],
     "train.trainer_args: 'hub_token' holds a secret, which would be written to recipe.yaml and every checkpoint; "
     "drop it and set the HF_TOKEN environment variable instead"),
])
def test_bad_settings_are_refused(tiny_gpt, toy_text, tmp_path, flags, message):
    code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", toy_text, "-o", str(tmp_path / "r"), *flags)
    assert code == 2
    assert errors(stderr) == ["error: " + message]
    assert not (tmp_path / "r").exists()


def test_truncated_model_weights_are_named(tiny_gpt, toy_text, tmp_path):
    import shutil

    model = shutil.copytree(tiny_gpt, tmp_path / "model")
    weights_file = model / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    code, _, stderr = invoke("full", "--model", str(model), "--data", toy_text, "-o", str(tmp_path / "r"))
    assert code == 2
    assert errors(stderr) == [f"error: model.name: '{weights_file}' is truncated; the model directory is damaged: "
                              "copy or download the model again"]


def test_sigterm_to_the_cli_exits_143_with_a_checkpoint(tiny_gpt, toy_text, tmp_path):
    """The real command and a real signal: stop after training has started, resume from what it saved."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "full", "--model", tiny_gpt, "--data", toy_text,
                             "-o", str(out), "--max-steps", "100000", "--set", "train.logging_steps=1"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    import re

    stopped = re.search(r"interrupted at step (\d+): saved (\S+)", stderr)
    assert stopped, stderr
    step = int(stopped.group(1))
    assert stopped.group(2) == str(out / "checkpoints" / f"checkpoint-{step}")
    assert (out / "checkpoints" / f"checkpoint-{step}" / "manifest.json").is_file()
    assert f"continue with: finetune full --resume -o {out}" in stderr


def stop_with_sigterm(command: list[str], out: Path, after_lines: int) -> int:
    """Start `finetune COMMAND -o OUT`, send SIGTERM once its log.jsonl has `after_lines` lines, and
    return the step it says it stopped (and saved) at."""
    import re

    proc = start(*command, "-o", out)
    deadline = time.time() + 300
    while len((out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").is_file() else []) < after_lines:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output[-3000:]
    return int(re.search(r"interrupted at step (\d+)", output).group(1))


@pytest.mark.slow
def test_sigterm_in_a_two_process_run_resumes_bit_exact(tiny_gpt, toy_text, tmp_path):
    """SIGTERM to the launcher: both ranks stop at the same step and save; resuming with two processes
    ends with the weights of an uninterrupted two-process run."""
    common = ["full", "--model", tiny_gpt, "--data", toy_text, "--max-steps", "400", "-n", "2",
              "--set", "train.logging_steps=1", "--set", "train.save_steps=1000", "--set", "data.max_eval_samples=8"]
    whole = tmp_path / "whole"
    finish(start(*common, "-o", whole))
    out = tmp_path / "run"
    step = stop_with_sigterm(common, out, after_lines=3)
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert {"rng_state_0.pth", "rng_state_1.pth", "manifest.json"} <= {p.name for p in checkpoint.iterdir()}
    resumed = finish(start("full", "--resume", "-o", out))
    assert f"resuming from checkpoint-{step} (step {step})" in resumed
    assert_same_weights(out, whole)


def test_generate_with_an_empty_prompt_is_refused(tiny_gpt):
    code, _, stderr = invoke("generate", tiny_gpt, "")
    assert code == 2
    assert errors(stderr) == ['error: prompt: empty; give some text to continue, for example finetune generate RUN '
                              '"Once upon a time"']


def test_a_full_disk_keeps_the_last_checkpoint_and_resume_continues(tiny_gpt, toy_text, tmp_path, monkeypatch):
    """A checkpoint write that fills the disk: the unfinished checkpoint goes, the last complete one stays, the
    message says the disk is full, and --resume continues from it (a real full tmpfs gives the same lines)."""
    import errno

    from transformers import Trainer

    from finetune.errors import Stopped
    from finetune.run.lifecycle import execute
    from finetune.training import checkpoints, rundir

    out = tmp_path / "run"
    save = Trainer._save_optimizer_and_scheduler

    def disk_fills_up(self, output_dir):
        if self.state.global_step >= 8:  # what torch.save raises then: its zip writer's error, the OSError within
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 200320 vs 200208")
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_fills_up)
    with pytest.raises(Stopped) as e:
        execute(recipe_for(tiny_gpt, toy_text, out))
    assert e.value.code == 1
    assert e.value.lines == [
        f"error: the disk is full under {out}: the run stopped; its last complete checkpoint is "
        f"{out / 'checkpoints' / 'checkpoint-4'} (step 4) (the unfinished checkpoint-8 was removed)",
        f"fix: free space, then continue with: finetune full --resume -o {out}"]
    assert [d.name for d in checkpoints.candidates(out)] == ["checkpoint-4"]
    assert rundir.status(out) == "failed" and not rundir.lock_path(out).exists()
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    metrics = execute(recipe_for(tiny_gpt, toy_text, out), resume=True)
    assert metrics["steps"] == 12 and rundir.status(out) == "finished"
