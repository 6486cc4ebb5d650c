"""Several processes through accelerate: `--num-processes N` re-runs the same command as N
data-parallel ranks with `accelerate launch`.

On a CPU-only machine `accelerate launch --cpu --num_processes N` starts ONE process, so the
CPU case also goes through `--multi_gpu` (gloo backend); the Trainer then runs with
`use_cpu=True` and a DistributedSampler gives each rank its own batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from finetune.errors import UserError

# Flags of the parent that must not reach the children: the parent already chose the process
# count and checked (or cleared, with --overwrite) the run directory.
PARENT_ONLY = {"--num-processes": True, "-n": True, "--overwrite": False}


def child_argv(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in PARENT_ONLY:
            skip = PARENT_ONLY[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(free_port()),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", *argv]


def relaunch(num_processes: int, resume: bool) -> None:
    """Run this same command line as `num_processes` ranks and wait for them."""
    cmd = launch_command(num_processes, child_argv(sys.argv[1:]))
    env = {**os.environ, "FINETUNE_CHILD": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"launching {num_processes} processes: accelerate launch --multi_gpu --num_processes {num_processes} "
          f"-m finetune {' '.join(child_argv(sys.argv[1:]))}", flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise UserError(f"--num-processes: the {num_processes} processes failed (exit code {code}); "
                        "the lines above say why")


def environment_report() -> str:
    import importlib.metadata as md

    from finetune.models import hub_reachable

    lines = []
    for pkg in ("finetune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "evaluate",
                "bitsandbytes", "tokenizers", "typer", "pydantic"):
        try:
            lines.append(f"{pkg:<14} {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg:<14} not installed")
    lines.append(f"{'python':<14} {sys.version.split()[0]}")
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"{'cuda:' + str(i):<14} {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                         f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append(f"{'devices':<14} CPU only ({os.cpu_count()} cores)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    lines.append(f"{'hub':<14} " + ("offline mode (HF_HUB_OFFLINE=1)" if offline
                                    else "reachable" if hub_reachable() else "unreachable (finetune runs offline)"))
    lines.append(f"{'HF_HOME':<14} {os.environ.get('HF_HOME', '~/.cache/huggingface')}")
    lines.append(f"{'HF_TOKEN':<14} {'set' if os.environ.get('HF_TOKEN') else 'not set'}")
    return "\n".join(lines)
