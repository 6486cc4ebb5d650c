"""How much more memory this process may use: free GPU memory on CUDA; on CPU the available RAM, capped by
the memory limit of the container or job it runs in (a cgroup: Docker, Kubernetes, SLURM), which is what
the out-of-memory killer enforces, not the machine's RAM.

    headroom()           -> Headroom(bytes, where): what a training run may still allocate
    train.max_memory_gib -> a cap the user sets (a shared machine, or to leave room for something else)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

GiB = 2**30


@dataclasses.dataclass
class Headroom:
    free: float  # bytes this process may still allocate
    where: str  # what the number is, for the user: "available RAM", "the container's limit", ...


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_number(path: Path) -> float | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if value >= 2**60 else value  # v1's "no limit" is a number near 2**63


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """limit - usage of the tightest memory cgroup this process is in (v2: memory.max and memory.current along
    the path up to the root; v1: memory.limit_in_bytes and memory.usage_in_bytes); None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[tuple[Path, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2: the unified hierarchy
            here = root / rel
            while True:
                candidates.append((here, "memory.max", "memory.current"))
                if here == root or root not in here.parents:
                    break
                here = here.parent
        elif "memory" in controllers.split(","):  # cgroup v1
            for base in (root / "memory" / rel, root / "memory"):  # inside a container the path is often not mounted
                candidates.append((base, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    best = None
    for folder, limit_file, usage_file in candidates:
        limit = read_number(folder / limit_file)
        if limit is None:
            continue
        usage = read_number(folder / usage_file) or 0.0
        free = max(0.0, limit - usage)
        best = free if best is None else min(best, free)
    return best


def cpu_headroom(cap_gib: float | None = None) -> Headroom:
    available = meminfo_available()
    limited = cgroup_headroom()
    found = Headroom(available if available is not None else float("inf"), "available RAM")
    if limited is not None and limited < found.free:
        found = Headroom(limited, "free memory within the container's (cgroup's) limit")
    return capped(found, cap_gib, resident_bytes(), "free memory")


def capped(found: Headroom, cap_gib: float | None, used: float, what: str) -> Headroom:
    """train.max_memory_gib, where it leaves less than `found`: the cap less what the process holds (`used`)."""
    if cap_gib is None or cap_gib * GiB - used >= found.free:
        return found
    return Headroom(max(0.0, cap_gib * GiB - used), f"{what} within train.max_memory_gib={cap_gib:g}")


def resident_bytes() -> float:
    """This process's resident memory now."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def headroom(cap_gib: float | None = None) -> Headroom:
    """What this process may still allocate on the device training runs on."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return capped(Headroom(float(free), "free GPU memory"), cap_gib, torch.cuda.memory_reserved(),
                      "free GPU memory")
    return cpu_headroom(cap_gib)


def keep_large_blocks_apart() -> bool:
    """glibc malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    blocks of activations and gradients come from the heap and freed ones stay resident: training
    SmolLM2-135M (batch 2 x 1024 tokens, float32) peaked at 6.25 GiB resident against 4.36 GiB of live
    tensors. A fixed threshold of 1 MiB returns them to the system when freed: 4.96 GiB. It costs system
    time (every such block is a fresh mapping): bf16 LoRA steps of batch 8 x 128 took 1.33x as long, so
    runs only turn it on when memory is tight (fit.keep_tight). Linux with glibc only; returns whether
    it is on."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # the user's own setting wins
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
