"""`finetune env`: versions, devices and whether the Hugging Face Hub can be used, for bug reports."""

from __future__ import annotations

import os
import sys


def environment_report() -> str:
    import importlib.metadata as md

    from finetune.launch.offline import hub_status

    from finetune import __version__

    lines = [f"{'finetune':<14} {__version__}"]  # the distribution is finetune-toolkit; `finetune` on PyPI is another
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "evaluate", "bitsandbytes",
                "tokenizers", "gguf", "typer", "pydantic"):
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
        from finetune.launch.headroom import cpu_headroom

        room = cpu_headroom()
        lines.append(f"{'devices':<14} CPU only ({os.cpu_count()} cores), {room.free / 2**30:.1f} GiB free "
                     f"({room.where})")
    lines.append(f"{'hub':<14} {hub_status()}")
    lines.append(f"{'HF_HOME':<14} {os.environ.get('HF_HOME', '~/.cache/huggingface')}")
    lines.append(f"{'HF_TOKEN':<14} {'set' if os.environ.get('HF_TOKEN') else 'not set'}")
    return "\n".join(lines)
