"""Several processes, several machines: the same command re-run as N ranks through `accelerate launch`.

    finetune lora --model gpt2 --data train.jsonl --num-processes 8                      # one machine, 8 GPUs
    finetune lora --model gpt2 --data train.jsonl -n 8 --distributed fsdp                # sharded (FSDP2)
    finetune lora ... -n 16 --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 # on machine 0
    finetune lora ... -n 16 --num-machines 2 --machine-rank 1 --main-process-ip 10.0.0.1 # on machine 1
    finetune launch-config --distributed fsdp -n 8                                       # what accelerate gets

A run's accelerate config is a preset shipped in `finetune/presets/` (or the user's own accelerate
config file) with the process counts, machine rank, address and mixed precision of the run filled
in; `presets.launch_config` builds it, `finetune launch-config` prints it and `relaunch` hands exactly that
file to `accelerate launch`. `--num-processes` counts the processes on all machines together, as
accelerate does.

On a CPU-only machine `accelerate launch --cpu --num_processes N` starts ONE process, so the presets
use the MULTI_GPU launcher there too (gloo backend); the Trainer then runs with `use_cpu=True` and a
DistributedSampler gives each rank its own batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

from finetune.errors import UserError
from finetune.launch.presets import launch_config, preset_kind


# Flags of the parent that must not reach the children: the parent already checked (or cleared,
# with --overwrite) the run directory.
PARENT_ONLY = {"--overwrite": False}


# ---------------------------------------------------------------------------------------
# The accelerate config of a run


def needs_launch(recipe) -> bool:
    """Whether this run goes through `accelerate launch` (several processes, machines, or a sharded preset)."""
    t = recipe.train
    return t.num_processes > 1 or t.num_machines > 1 or preset_kind(t.distributed) != "ddp"


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


def launch_command(config_file: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "-m", "finetune", *argv]


def check_distributed(recipe) -> None:
    """What the preset needs from this machine, checked before anything starts."""
    import importlib.util

    import torch

    t = recipe.train
    kind = preset_kind(t.distributed)
    if kind.startswith("deepspeed"):
        if not torch.cuda.is_available():
            raise UserError(f"train.distributed: {t.distributed} needs CUDA GPUs and none is visible; use the ddp "
                            "preset on CPU")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"train.distributed: {t.distributed} needs DeepSpeed; pip install \"finetune[deepspeed]\" "
                            "(or use the ddp / fsdp presets)")
    if kind == "fsdp" and not torch.cuda.is_available():
        # accelerate applies FSDP only on accelerators; on CPU the ranks run as plain data parallel.
        print("note: on CPU accelerate runs the fsdp preset as plain data parallel (no sharding); "
              "FSDP shards only on GPUs", flush=True)


def relaunch(recipe, resume: bool = False) -> int:
    """Run this same command line as the ranks of `launch_config(recipe)` on this machine and wait; returns
    the launcher's exit code. A SIGTERM sent to this process alone is passed on to the ranks, which save a
    checkpoint and stop (a Ctrl-C reaches them directly, from the terminal)."""
    import signal

    import yaml

    t = recipe.train
    kind = preset_kind(t.distributed)
    config = launch_config(recipe)
    if t.num_machines == 1 and not config.get("main_process_port"):
        config["main_process_port"] = free_port()
    argv = child_argv(sys.argv[1:])
    env = {**os.environ, "FINETUNE_CHILD": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    local = t.num_processes // t.num_machines
    where = (f" on machine {t.machine_rank} of {t.num_machines} (main {config['main_process_ip']}:"
             f"{config['main_process_port']})" if t.num_machines > 1 else "")
    print(f"launching {local} process{'es' if local > 1 else ''} ({kind}){where}: accelerate launch "
          f"--config_file <launch-config> -m finetune {' '.join(argv)}", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="finetune-accelerate-", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    previous = {}
    try:
        proc = subprocess.Popen(launch_command(f.name, argv), env=env)
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                    signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None)}
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        os.unlink(f.name)
