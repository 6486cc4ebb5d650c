"""One run per run directory (finetune/training/rundir.py): the lock beside it, its heartbeat, and a second
run into the same directory stopped in pre-flight with one line naming the holder."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import cli_env, invoke, wait_for_first_step

from finetune.errors import UserError
from finetune.training import rundir


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_second_run_into_a_live_runs_directory_is_stopped(tiny_gpt, toy_text, tmp_path):
    """A job submitted twice: the second one stops at once, naming the first; --overwrite cannot move it."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "finetune", "full", "--model", tiny_gpt, "--data", toy_text,
                              "-o", str(out), "--max-steps", "100000", "--set", "train.logging_steps=1"],
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_step(first, out)
    lock = json.loads(rundir.lock_path(out).read_text())
    assert (lock["pid"], lock["host"]) == (first.pid, socket.gethostname())
    for flags in ([], ["--resume"], ["--overwrite"]):
        code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", toy_text, "-o", str(out), *flags)
        assert code == 2, stderr
        [line] = errors(stderr)
        assert line.startswith(f"error: --output: '{out}' is in use by another run (host {socket.gethostname()}, "
                               f"pid {first.pid}, started {lock['started']}, heartbeat ")
        assert line.endswith(" s ago); wait for it to finish, or choose another --output")
    assert rundir.status(out) == "running" and not rundir.aside_path(out).exists()
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr
    assert not rundir.lock_path(out).exists()  # released with the run
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # every step logged once


def write_lock(run_dir, **fields):
    rundir.lock_path(run_dir).write_text(json.dumps(fields))


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(run_dir, host=socket.gethostname(), pid=dead.pid, pid_start="1", started="2026-01-01T00:00:00",
               beat=time.time())
    rundir.check_lock(run_dir)  # no error: its process is gone
    lock = rundir.Lock(run_dir)
    assert json.loads(rundir.lock_path(run_dir).read_text())["pid"] != dead.pid
    lock.release()
    assert not rundir.lock_path(run_dir).exists()


def test_another_machines_lock_holds_while_its_heartbeat_is_recent(tmp_path):
    run_dir = tmp_path / "run"
    write_lock(run_dir, host="node-7", pid=4242, started="2026-12-05T10:00:00", beat=time.time() - 40)
    with pytest.raises(UserError) as e:
        rundir.Lock(run_dir)
    assert e.value.problems == [
        f"--output: '{run_dir}' is in use by another run (host node-7, pid 4242, started 2026-12-05T10:00:00, "
        f"heartbeat 40 s ago); wait for it to finish, or choose another --output; if that run is gone, its lock "
        f"{rundir.lock_path(run_dir)} lapses 300 s after its last heartbeat"]
    write_lock(run_dir, host="node-7", pid=4242, started="2026-12-05T10:00:00", beat=time.time() - 301)
    rundir.Lock(run_dir).release()


def test_the_heartbeat_tells_a_live_run_on_another_machine_from_a_killed_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_marker(run_dir, status="running", host="node-7", pid=4242)
    assert rundir.status(run_dir) == "killed"  # no lock: nothing keeps it alive
    write_lock(run_dir, host="node-7", pid=4242, beat=time.time() - 10)
    assert rundir.status(run_dir) == "running"
    write_lock(run_dir, host="node-7", pid=4242, beat=time.time() - 400)
    assert rundir.status(run_dir) == "killed"
    monkeypatch.setattr(rundir, "HEARTBEAT", 0.05)
    lock = rundir.Lock(tmp_path / "other")
    first = json.loads(rundir.lock_path(tmp_path / "other").read_text())["beat"]
    time.sleep(0.3)
    assert json.loads(rundir.lock_path(tmp_path / "other").read_text())["beat"] > first
    lock.release()
