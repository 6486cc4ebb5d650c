"""Accelerate presets: the configs shipped in finetune/presets/ (ddp, fsdp, deepspeed-zero2/3) or a
user's own accelerate config file, and the config of a run with its processes, machines, address and
precision filled in (what `finetune launch-config` prints and `launch.relaunch` hands to accelerate).

A leaf: the recipe checks `train.distributed` with `preset_problem`, the memory estimate asks
`preset_kind`, and neither needs to know how runs are launched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import did_you_mean

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PORT = 29500  # torchrun's; every machine of a multi-node run must use the same one


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
