"""The run directory: the marker that says a directory is a finetune run, and claiming one.

A run directory holds `run.json`, written when the run claims it:

    {"finetune": "0.1.0", "task": "clm", "method": "lora", "status": "running", "step": 0, ...}

`status` is running, finished, interrupted or failed; a run whose process was killed without a word
(SIGKILL: most often the out-of-memory killer, exit code 137) still says running, and `status()`
reads it as killed when the process named by `pid` and `host` is gone. Only a directory with this
marker (or, for runs made before it existed, one holding only the files a run writes) is ever replaced by
`--overwrite`, and only after pre-flight has passed. Replacing moves the old run aside to a hidden
sibling and deletes it only when the new run finishes: a new run that fails before its first
checkpoint is removed and the old one put back, byte for byte.

One run at a time per directory: the run that claims it holds `.NAME.lock` beside it (created with
O_EXCL, which shared cluster file systems honour where flock may not), with its host, pid and a heartbeat
rewritten every HEARTBEAT seconds. A second run into the same directory (a job submitted twice, a SLURM
array sharing one --output) stops in pre-flight with one line naming the holder. A holder on this machine
is alive while its process is; one on another machine while its heartbeat is younger than STALE. A lock
whose holder is gone is taken over, and tells a killed run on another machine from a live one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from finetune.errors import UserError

MARKER = "run.json"
# What a run writes. A directory made before run.json existed counts as a run only when it holds
# recipe.yaml and nothing outside this list, so that --overwrite never takes someone's other files.
RUN_FILES = {
    MARKER, "recipe.yaml", "metrics.json", "log.jsonl", "README.md", "checkpoints", "merged", "labels.json",
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "training_args.bin", "critic", "value_head.safetensors", "eval",
}


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "finetune" in data else None


def write_marker(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Update run.json with `fields` (written whole to a temporary file, then renamed)."""
    from finetune import __version__

    data = read_marker(run_dir) or {"finetune": __version__}
    data.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = run_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(run_dir / MARKER)
    return data


def is_run_dir(path: Path) -> bool:
    if read_marker(path) is not None:
        return True
    if not (path / "recipe.yaml").is_file():
        return False
    return all(p.name in RUN_FILES or p.name.startswith("checkpoint") for p in path.iterdir())


def is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def fingerprint(recipe_yaml: str) -> str:
    """The recipe a run was asked to run (before it resolved precision, fitted its batch to the memory and
    planned its epochs, which recipe.yaml records): `requested` in run.json."""
    import hashlib

    return hashlib.sha256(recipe_yaml.encode()).hexdigest()[:16]


def process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": process_start(os.getpid())}


def is_alive(marker: dict[str, Any]) -> bool:
    """Whether the process on this machine that wrote a marker (run.json or a lock) is still there. A marker
    without a pid (older runs) counts as alive: nothing here can tell."""
    pid = marker.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid
        pass
    started = marker.get("pid_start")
    return started is None or process_start(pid) in (None, started)


def status(run_dir: Path) -> str:
    """finished, interrupted, failed, running, killed (running, but its process is gone), or unknown (older
    runs)."""
    marker = read_marker(run_dir)
    if marker is not None:
        state = str(marker.get("status", "unknown"))
        return "killed" if state == "running" and not still_running(run_dir, marker) else state
    return "finished" if (run_dir / "metrics.json").is_file() else "unknown"


def still_running(run_dir: Path, marker: dict[str, Any]) -> bool:
    """Whether a run whose run.json says running still is: on this machine, while its process is; from another
    machine (a shared file system), while that process holds the run's lock with a recent heartbeat."""
    if marker.get("host") in (None, socket.gethostname()):
        return is_alive(marker)
    lock = read_lock(run_dir)
    return same_holder(lock, marker) and lock_alive(lock, lock_path(run_dir))


# ---------------------------------------------------------------------------------------
# The lock: one run per directory

HEARTBEAT = 30.0  # seconds between rewrites of the lock by its holder
STALE = 300.0  # a lock from another machine not rewritten for this long is a dead run's


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def read_lock(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def same_holder(lock: dict[str, Any] | None, process: dict[str, Any]) -> bool:
    """Whether a lock was written by `process` (its host and pid)."""
    return lock is not None and (lock.get("host"), lock.get("pid")) == (process.get("host"), process.get("pid"))


def lock_alive(lock: dict[str, Any] | None, path: Path) -> bool:
    """Whether a lock's holder is still running: on this machine its process (this very process holds no
    lock between runs: one it finds is a leftover), elsewhere a recent heartbeat. A lock being written
    (no content yet) is alive while its file is recent."""
    if lock is None:
        try:
            return time.time() - path.stat().st_mtime < STALE
        except OSError:
            return False
    if lock.get("host") == socket.gethostname():
        mine = (lock.get("pid"), lock.get("pid_start")) == (os.getpid(), process_start(os.getpid()))
        return not mine and is_alive(lock)
    return time.time() - float(lock.get("beat", 0)) < STALE


def holder_line(run_dir: Path, lock: dict[str, Any] | None) -> str:
    if lock is None:
        return f"--output: '{run_dir}' is being claimed by another run right now; choose another --output"
    ago = max(0, round(time.time() - float(lock.get("beat", 0))))
    elsewhere = "" if lock.get("host") == socket.gethostname() else (
        f"; if that run is gone, its lock {lock_path(run_dir)} lapses {STALE:.0f} s after its last heartbeat")
    return (f"--output: '{run_dir}' is in use by another run (host {lock.get('host')}, pid {lock.get('pid')}, "
            f"started {lock.get('started')}, heartbeat {ago} s ago); wait for it to finish, or choose another "
            f"--output{elsewhere}")


def check_lock(run_dir: Path) -> None:
    """Pre-flight: refuse a directory another live run holds."""
    path = lock_path(run_dir)
    if path.exists() and lock_alive(lock := read_lock(run_dir), path):
        raise UserError(holder_line(run_dir, lock))


class Lock:
    """This process's hold on a run directory, with a heartbeat thread, until `release()`."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, lock_path(run_dir)
        self.fields = {**this_process(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                lock = read_lock(run_dir)
                if lock_alive(lock, self.path):
                    raise UserError(holder_line(run_dir, lock)) from None
                self.path.unlink(missing_ok=True)  # a dead run's lock
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self.fields, "beat": time.time()}) + "\n")
            break
        else:
            raise UserError(holder_line(run_dir, read_lock(run_dir)))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="finetune-lock", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        while not self.stop.wait(HEARTBEAT):
            if not same_holder(read_lock(self.run_dir), self.fields):
                return  # no longer ours
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self.fields, "beat": time.time()}) + "\n")
            tmp.replace(self.path)

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if same_holder(read_lock(self.run_dir), self.fields):
            self.path.unlink(missing_ok=True)


def killed_reason(run_dir: Path) -> str:
    marker = read_marker(run_dir) or {}
    step = marker.get("step")
    at = f" at step {step}" if step else ""
    return (f"the run in '{run_dir}' was killed{at} without a word (its process {marker.get('pid')} is gone and "
            "run.json still says running): most often the out-of-memory killer (exit code 137); `finetune plan` "
            "estimates its memory")


def aside_path(run_dir: Path) -> Path:
    """Where the run that --overwrite replaces waits until the new run finishes."""
    return run_dir.parent / f".{run_dir.name}.replaced"


def check(run_dir: Path, overwrite: bool, resume: bool, has_checkpoint: bool) -> None:
    """Refuse what would lose work; changes nothing. `has_checkpoint`: a complete checkpoint exists."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume: choose one (--resume continues the run, --overwrite replaces it)")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output: '{run_dir}' is a file; choose a directory")
    check_lock(run_dir)
    if resume:
        if is_empty(run_dir) or not is_run_dir(run_dir):
            raise UserError(f"--resume: '{run_dir}' holds no finetune run; start one there without --resume")
        if not has_checkpoint and status(run_dir) == "killed":
            raise UserError(f"--resume: {killed_reason(run_dir)}; it stopped before its first complete checkpoint, "
                            "so there is nothing to continue from: pass --overwrite instead of --resume to start it "
                            "again")
        if not has_checkpoint:
            raise UserError(f"--resume: the run in '{run_dir}' stopped before its first complete checkpoint, so "
                            "there is nothing to continue from; pass --overwrite instead of --resume to start it again")
        return
    if is_empty(run_dir):
        return
    if not is_run_dir(run_dir):
        others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)[:3]
        raise UserError(f"--output: '{run_dir}' is not empty and is not a finetune run (it holds "
                        f"{', '.join(others) or 'other files'}); finetune only ever replaces its own runs: "
                        "choose another --output")
    if overwrite:
        return
    state = status(run_dir)
    if state == "finished":
        raise UserError(f"--output: '{run_dir}' already holds a finished run; pass --overwrite to replace it, "
                        "--resume with a larger --max-steps or --epochs to train it further, or choose another "
                        "--output")
    if state == "killed":
        raise UserError(f"--output: {killed_reason(run_dir)}; " + (
            "pass --resume to continue it from its last checkpoint, --overwrite to start it again, or choose another "
            "--output" if has_checkpoint else "it stopped before its first checkpoint: pass --overwrite to start it "
            "again, or choose another --output"))
    if has_checkpoint:
        raise UserError(f"--output: '{run_dir}' already holds a run that did not finish ({state}); pass --resume "
                        "to continue it from its last checkpoint, --overwrite to start it again, or choose "
                        "another --output")
    if state == "unknown":
        raise UserError(f"--output: '{run_dir}' already holds a run; pass --overwrite to replace it, or choose "
                        "another --output")
    raise UserError(f"--output: '{run_dir}' already holds a run that stopped before its first checkpoint "
                    f"({state}); pass --overwrite to start it again, or choose another --output")


class Claim:
    """A run directory taken by a run that passed pre-flight; `close(outcome)` settles it.

    With --overwrite the old run is moved aside first. `close("finished")` deletes it.
    `close("failed")` or `close("interrupted")` before the new run wrote a complete checkpoint
    removes the new directory and puts the old run (or the empty directory) back; after one, the
    new run stays (resumable), and so does the old one, aside, until the new run finishes.
    """

    def __init__(self, run_dir: Path, overwrite: bool, resume: bool, identity: dict[str, Any]):
        self.lock = Lock(run_dir)  # raises, changing nothing, when another run holds the directory
        self.run_dir = run_dir
        self.aside = aside_path(run_dir)
        self.existed = run_dir.exists()
        if overwrite and not is_empty(run_dir):
            if self.aside.exists():  # an earlier replacement that never finished: the aside is the real run
                shutil.rmtree(run_dir)
            else:
                run_dir.rename(self.aside)
            self.existed = False
        run_dir.mkdir(parents=True, exist_ok=True)
        fields = {**identity, **this_process()}
        if not resume:
            fields["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_marker(run_dir, status="running", **fields)

    def close(self, outcome: str, has_checkpoint: bool, step: int | None = None) -> str | None:
        """Settle the claim; returns a line for the user when the old run was kept or put back."""
        try:
            return self.settle(outcome, has_checkpoint, step)
        finally:
            self.lock.release()

    def settle(self, outcome: str, has_checkpoint: bool, step: int | None) -> str | None:
        if outcome == "finished":
            write_marker(self.run_dir, status="finished", **({"step": step} if step is not None else {}))
            if self.aside.exists():
                shutil.rmtree(self.aside)
            return None
        if not has_checkpoint:
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            if self.aside.exists():
                self.aside.rename(self.run_dir)
                return f"the earlier run in {self.run_dir} is unchanged"
            if self.existed:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            return None
        write_marker(self.run_dir, status=outcome, **({"step": step} if step is not None else {}))
        if self.aside.exists():
            return f"the run this one replaces is kept in {self.aside} until this one finishes"
        return None
