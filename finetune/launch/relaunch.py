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
        print("note: fsdp on CPU: FSDP2 shards over gloo as it does over NCCL on GPUs (slower than ddp here; "
              "the same code path as a GPU cluster)", flush=True)


def fsdp_on_cpu() -> None:
    """In a launched rank on CPU with an FSDP config: shard, as on GPUs.

    accelerate (1.16) switches to FSDP only for accelerator backends (AcceleratorState.__init__ keeps
    MULTI_CPU and drops the plugin, accelerate/state.py), so on CPU the fsdp preset ran as plain DDP and FSDP
    never ran before a GPU job. torch's fully_shard runs on CPU with gloo, and with the state switched to
    FSDP after accelerate's own set-up, the Trainer shards, saves a full state dict and resumes exactly as it
    does on GPUs (losses equal to DDP's on the tiny models). Applied only to a rank on CPU whose launcher set
    ACCELERATE_USE_FSDP."""
    import torch

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or torch.cuda.is_available():
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "shards_on_cpu", False):
        return
    init = AcceleratorState.__init__

    def shard(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
              *args, **kwargs):
        init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    shard.shards_on_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = shard


def relaunch(recipe, resume: bool = False) -> int:
    """Run this same command line as the ranks of `launch_config(recipe)` on this machine and wait; returns
    the launcher's exit code. A SIGTERM sent to this process alone is passed on to the ranks, which save a
    checkpoint and stop (a Ctrl-C reaches them directly, from the terminal)."""
    import signal

    import torch
    import yaml

    t = recipe.train
    kind = preset_kind(t.distributed)
    config = launch_config(recipe)
    if kind == "fsdp" and not torch.cuda.is_available():  # both need an accelerator (accelerate refuses them)
        config["fsdp_config"].update(fsdp_cpu_ram_efficient_loading=False, fsdp_sync_module_states=False)
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
