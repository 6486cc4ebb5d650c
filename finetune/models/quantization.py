"""QLoRA: the base loaded in 4 or 8 bits by bitsandbytes, frozen, with LoRA adapters trained on top.

    finetune lora --model Qwen/Qwen2.5-0.5B --data train.jsonl --quant 4bit -o runs/qwen-qlora
    finetune lora ... --quant 4bit --set quant.compute_dtype=float16 --set quant.double_quant=false
    finetune lora ... --quant 8bit
    finetune merge runs/qwen-qlora -o runs/qwen-qlora-merged   # into a full-precision copy of the base

`models.load_model(spec, AutoClass, recipe.quant)` loads the base with a BitsAndBytesConfig built from
`quant.*` (NF4/FP4, double quantisation, compute dtype); every Linear (and GPT-2 Conv1D) layer except
the output head becomes a bitsandbytes layer. A task then calls `prepare_quantized(model, recipe)`
before `apply_lora`. Merging never touches the quantised weights: the adapter is folded into the base
reloaded in full precision, so the merged model has no quantisation error of its own.
"""

from __future__ import annotations

from finetune.errors import UserError
from finetune.recipe.schema import Recipe

def quantized_layers(model) -> list[str]:
    """Names of the bitsandbytes layers in a loaded model."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def quantizable_layers(model) -> list[str]:
    """Layers bitsandbytes would quantise in a full-precision model (or a meta-device skeleton): the
    Linear and Conv1D layers transformers converts, minus the output head and tied weights it keeps."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = get_keys_to_not_convert(model)
    return [n for n, m in model.named_modules()
            if (type(m) is nn.Linear or isinstance(m, Conv1D)) and should_convert_module(n, keep)]


def skeleton(spec, task: str):
    """The task's model built from its config on the meta device: shapes and layer types, no memory.
    Falls back to AutoModel when the task's Auto class does not know the architecture."""
    import torch
    import transformers

    from finetune.models.pretrained import load_config

    config = load_config(spec)
    from finetune.recipe.tasks import REGISTRY

    info = REGISTRY.get(task)
    for name in (info.auto_class if info else "AutoModel", "AutoModel"):
        try:
            with torch.device("meta"):
                return getattr(transformers, name).from_config(config, trust_remote_code=spec.trust_remote_code)
        except (ValueError, KeyError):
            continue
    raise UserError(f"model.name: transformers has no model class for model_type "
                    f"'{getattr(config, 'model_type', '?')}'")


def check_backend(recipe: Recipe) -> None:
    """bitsandbytes importable, with kernels for this device."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError(f"--quant {recipe.quant.bits}bit: bitsandbytes is not installed (pip install bitsandbytes), "
                        "or drop --quant") from e


def check_quantizable(recipe: Recipe, model=None) -> None:
    """Fail before loading weights when bitsandbytes would find nothing to quantise in this model type."""
    if not recipe.quant.bits:
        return
    check_backend(recipe)
    model = model if model is not None else skeleton(recipe.model, recipe.task)
    if not quantizable_layers(model):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise UserError(f"--quant {recipe.quant.bits}bit: bitsandbytes cannot quantise model type '{model_type}': "
                        "it has no Linear layers outside the output head (bitsandbytes replaces only Linear "
                        "layers); drop --quant and use plain LoRA")


def keep_cpu_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first no-grad forward of a Linear4bit (an evaluation pass) permanently
    repacks its weight into an inference-only layout; a later training step then crashes or computes
    wrong gradients. Returns the number of layers changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def prepare_quantized(model, recipe: Recipe):
    """Make a base loaded by bitsandbytes trainable under LoRA: freeze it, keep layer norms and the
    head in float32, enable input gradients for gradient checkpointing (peft's
    prepare_model_for_kbit_training), and keep 4-bit weights in their training layout on CPU."""
    from peft import prepare_model_for_kbit_training

    if not quantized_layers(model):
        check_quantizable(recipe, model)  # explains why nothing was quantised
        raise UserError(f"--quant {recipe.quant.bits}bit: the model was loaded without quantisation; load it "
                        "with models.load_model(spec, AutoClass, recipe.quant)")
    keep_cpu_training_layout(model)
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input-gradient hook and works with frozen embeddings.
        gradient_checkpointing_kwargs={"use_reentrant": False})
