"""Several processes, several machines: the same command re-run as N ranks through `accelerate launch`.

    finetune lora --model gpt2 --data train.jsonl --num-processes 8                      # one machine, 8 GPUs
    finetune lora --model gpt2 --data train.jsonl -n 8 --distributed fsdp                # sharded (FSDP2)
    finetune lora ... -n 16 --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 # on machine 0
    finetune lora ... -n 16 --num-machines 2 --machine-rank 1 --main-process-ip 10.0.0.1 # on machine 1
    finetune launch-config --distributed fsdp -n 8                                       # what accelerate gets

A run's accelerate config is a preset shipped in `finetune/presets/` (or the user's own accelerate
config file) with the process counts, machine rank, address and mixed precision of the run filled
in; `launch_config` builds it, `finetune launch-config` prints it and `relaunch` hands exactly that
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
from pathlib import Path
from typing import Any

from finetune.errors import UserError, did_you_mean

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PORT = 29500  # torchrun's; every machine of a multi-node run must use the same one

# Flags of the parent that must not reach the children: the parent already checked (or cleared,
# with --overwrite) the run directory.
PARENT_ONLY = {"--overwrite": False}


# ---------------------------------------------------------------------------------------
# Presets


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(value: str) -> Path:
    return PRESETS_DIR / f"{value}.yaml" if value in preset_names() else Path(value).expanduser()


def read_preset(value: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(preset_path(value).read_text())
    return data if isinstance(data, dict) else {}


def preset_problem(value: str) -> str | None:
    """Why `train.distributed: VALUE` cannot be used, or None."""
    if value in preset_names():
        return None
    path = Path(value).expanduser()
    if path.suffix not in (".yaml", ".yml", ".json") and not path.exists():
        return (f"train.distributed: unknown preset '{value}'{did_you_mean(value, preset_names())}; choose one of "
                f"{', '.join(preset_names())}, or give the path of an accelerate config file")
    if not path.is_file():
        return f"train.distributed: no such accelerate config file '{value}'"
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        return f"train.distributed: '{value}' is not valid YAML: {getattr(e, 'problem', e)}"
    if not isinstance(data, dict) or "distributed_type" not in data:
        return (f"train.distributed: '{value}' has no distributed_type; write it with `accelerate config` "
                "or start from `finetune launch-config --distributed ddp`")
    return None


def preset_kind(value: str | None) -> str:
    """ddp, fsdp, deepspeed-zero<stage>, or the accelerate distributed_type for anything else."""
    if not value:
        return "ddp"
    data = read_preset(value)
    kind = str(data.get("distributed_type", "")).upper()
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return f"deepspeed-zero{(data.get('deepspeed_config') or {}).get('zero_stage', 2)}"
    if kind.startswith("MULTI_") or kind == "NO":
        return "ddp"
    return kind.lower()


# ---------------------------------------------------------------------------------------
# The accelerate config of a run


def needs_launch(recipe) -> bool:
    """Whether this run goes through `accelerate launch` (several processes, machines, or a sharded preset)."""
    t = recipe.train
    return t.num_processes > 1 or t.num_machines > 1 or preset_kind(t.distributed) != "ddp"


def launch_config(recipe) -> dict[str, Any]:
    """The preset (default ddp) with this run's processes, machines, address and precision filled in."""
    t = recipe.train
    config = read_preset(t.distributed or "ddp")
    config.update(num_processes=t.num_processes, num_machines=t.num_machines, machine_rank=t.machine_rank,
                  mixed_precision="bf16" if t.bf16 else "fp16" if t.fp16 else "no")
    if t.num_machines > 1:
        config.update(main_process_ip=t.main_process_ip, main_process_port=t.main_process_port or DEFAULT_PORT)
    else:
        config.pop("main_process_ip", None)
        config["main_process_port"] = t.main_process_port or 0  # 0: accelerate picks a free port
    return config


def launch_config_yaml(recipe) -> str:
    import yaml

    t = recipe.train
    source = f"preset '{t.distributed or 'ddp'}'" if (t.distributed or "ddp") in preset_names() else t.distributed
    head = (f"# accelerate config for this run ({source}; num_processes counts all machines).\n"
            "# Use it as: accelerate launch --config_file <this file> -m finetune <command> ...\n")
    return head + yaml.safe_dump(launch_config(recipe), sort_keys=False)


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


# ---------------------------------------------------------------------------------------
# Replicas in sync


def weights_fingerprint(tensors) -> str:
    """A short digest of tensors' values: per tensor the float64 sum, sum of squares and a position-weighted
    sum, computed where the tensors live (no copy to the CPU of a large model)."""
    import hashlib

    import torch

    stats = []
    for t in tensors:
        x = t.detach().reshape(-1).double()
        ramp = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) / x.numel()
        stats.append(torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()]).cpu())
    blob = torch.cat(stats).numpy().tobytes() if stats else b""
    return hashlib.sha256(blob).hexdigest()[:16]


def replica_fingerprints(model) -> list[str] | None:
    """Every rank's fingerprint of its trainable weights, gathered (a collective: every rank calls it).

    Data-parallel replicas must end bit-identical; a difference means ranks trained apart (a sampler
    or gradient-sync bug). None in a single process, or when weights are sharded (FSDP, ZeRO-3) and
    each rank holds only a slice."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in params)
    mine = None if sharded else weights_fingerprint(params)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return None if any(g is None for g in gathered) else gathered


# ---------------------------------------------------------------------------------------
# finetune env


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
