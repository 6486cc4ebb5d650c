"""Precision: bfloat16 where the device runs it natively (the default), and the precisions a device cannot
run, refused at the start of a run with a clear error rather than a late crash or a slow emulation.

    finetune lora ...                      # train.bf16 unset: bf16 on Ampere+ GPUs and AMX CPUs, else float32
    finetune lora ... --bf16 | --fp16      # asked for: refused where the device cannot do it
    finetune lora ... --set train.bf16=false
"""

from __future__ import annotations

import os

from finetune.errors import UserError
from finetune.recipe.schema import Recipe


def cpu_bf16_supported() -> bool:
    """oneDNN has bf16 kernels on this CPU (AVX512-BF16/AMX on x86, BF16 on ARM); elsewhere bf16
    autocast on CPU is emulated and slower than float32."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AMX bf16 tile units (Sapphire Rapids and later Xeons; Linux reports them as the amx_bf16 flag): oneDNN
    runs bf16 matmuls on them at about 8x the float32 rate (1,147 against 141 GFLOP/s on one core here)."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def native_bf16() -> bool:
    """Whether bfloat16 mixed precision is the faster choice on this machine's device. FINETUNE_BF16=0 or 1
    sets the answer for every run on the machine (the tests use 0: the same numbers on every machine)."""
    import torch

    forced = os.environ.get("FINETUNE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_amx() and cpu_bf16_supported()


def resolve_precision(recipe: Recipe, say: bool = False) -> Recipe:
    """train.bf16 unset: on where the device runs bfloat16 natively, unless fp16 is asked for. The recipe the
    run records says which."""
    t = recipe.train
    if t.bf16 is not None:
        return recipe
    on = not t.fp16 and native_bf16()
    if on and say:
        import torch

        device = "this GPU" if torch.cuda.is_available() else "this CPU has AMX"
        print(f"precision: bf16 mixed precision (train.bf16 unset: {device}); --set train.bf16=false trains in "
              "float32", flush=True)
    return recipe.model_copy(update={"train": t.model_copy(update={"bf16": on})})


def check_precision(recipe: Recipe) -> None:
    """--bf16 / --fp16 where this machine's device cannot run them: a clear error, not a late crash."""
    import torch

    t = recipe.train
    if torch.cuda.is_available():
        if t.bf16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name()
            raise UserError(f"--bf16: {name} has no bfloat16 support (it needs an Ampere or newer GPU); "
                            "use --fp16 instead")
        return
    if t.fp16:
        raise UserError("--fp16: float16 mixed precision needs a CUDA GPU and none is visible; drop --fp16 "
                        "(on CPU use --bf16 where the CPU supports it, or full precision)")
    if t.bf16 and not cpu_bf16_supported():
        raise UserError("--bf16: this CPU has no bfloat16 instructions (AVX512-BF16 / AMX), so bf16 would be "
                        "emulated and slower than float32; drop --bf16")
    if recipe.quant.bits and recipe.quant.compute_dtype == "float16":
        raise UserError("quant.compute_dtype: float16 matmuls need a CUDA GPU and none is visible; "
                        "set quant.compute_dtype=bfloat16 or float32")
