"""Checkpoints you can trust: a manifest written last, checked before resuming.

Every checkpoint-N gets `manifest.json` once all its files are written: each file's size, and a
SHA-256 for files up to 512 MiB (hashing a multi-GB optimizer state at every save costs more than
it protects; a size and, for safetensors, a header that matches the file catch truncation). A
checkpoint counts as complete only when its manifest is there and every file matches it. Resume
takes the newest complete checkpoint and says which one, and why it skipped any newer ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from finetune.models.pretrained import safetensors_problem

MANIFEST = "manifest.json"
HASH_LIMIT = 512 * 2**20
# Files a Trainer checkpoint cannot resume without, besides the model weights.
TRAINER_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a finished checkpoint (written last, atomically)."""
    files: dict[str, Any] = {}
    for p in sorted(checkpoint.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            entry: dict[str, Any] = {"size": p.stat().st_size}
            if entry["size"] <= HASH_LIMIT:
                entry["sha256"] = sha256(p)
            files[str(p.relative_to(checkpoint))] = entry
    tmp = checkpoint / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    tmp.replace(checkpoint / MANIFEST)


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete. The answer is remembered for
    as long as no file of the checkpoint changes (size or modification time), so that pre-flight, the task's
    resume and the end of a run do not hash the same files again."""
    try:
        state = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in checkpoint.rglob("*") if p.is_file()))
    except OSError:  # a file went away while looking
        return verify(checkpoint)
    return remembered(checkpoint, state)


@functools.lru_cache(maxsize=64)
def remembered(checkpoint: Path, state: tuple) -> str | None:
    return verify(checkpoint)


def verify(checkpoint: Path) -> str | None:
    """Every file of the manifest present, of its size and checksum, safetensors readable."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (it was still being written)"
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "manifest.json is damaged"
    for name, entry in listed.items():
        p = checkpoint / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != entry["size"]:
            return f"{name} has {p.stat().st_size} bytes instead of {entry['size']}"
        if "sha256" in entry and sha256(p) != entry["sha256"]:
            return f"{name} does not match its checksum"
        if p.suffix == ".safetensors" and (why := safetensors_problem(p)):
            return f"{name} is {why}"
    return None


def checkpoint_step(checkpoint: str | Path | None) -> int | None:
    """The step (or iteration) in a checkpoint's name (checkpoint-500 -> 500); None for None or another name."""
    step = Path(checkpoint).name.rsplit("-", 1)[-1] if checkpoint else ""
    return int(step) if step.isdigit() else None


def candidates(run_dir: Path) -> list[Path]:
    """checkpoint-N directories of a run, oldest first."""
    found = [d for d in (run_dir / "checkpoints").glob("checkpoint-*") if d.is_dir() and checkpoint_step(d) is not None]
    return sorted(found, key=checkpoint_step)


def latest(run_dir: Path, report: bool = False) -> Path | None:
    """The newest complete checkpoint. With `report`, say which one and why newer ones were skipped."""
    for d in reversed(candidates(run_dir)):
        why = problem(d)
        if why is None:
            if report:
                print(f"resuming from {d.name} (step {checkpoint_step(d)})", flush=True)
            return d
        if report:
            print(f"warning: skipping {d.name}: {why}; falling back to an earlier checkpoint", flush=True)
    return None


def drop_unfinished(run_dir: Path) -> list[Path]:
    """Remove the checkpoints newer than the newest complete one that never got their manifest (a save that
    failed part-way, as on a full disk): resume skips them anyway, and on a full disk their space is what
    lets the run record how it stopped. Returns what was removed."""
    import shutil

    last = latest(run_dir)
    after = checkpoint_step(last) if last is not None else -1
    gone = [d for d in candidates(run_dir) if checkpoint_step(d) > after and not (d / MANIFEST).is_file()]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def manifest_callback():
    """A TrainerCallback that writes each checkpoint's manifest once every process has saved."""
    from transformers import TrainerCallback

    class Manifest(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's files (its RNG state, its shard) are on disk
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    write_manifest(checkpoint)

    return Manifest()
