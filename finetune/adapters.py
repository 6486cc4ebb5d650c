"""LoRA through peft: which modules to adapt per architecture, what stays trainable, merging.

The default is every linear layer of the blocks, attention and MLP alike: the QLoRA paper and "LoRA
Without Regret" (Schulman et al., 2025) find that adapting the MLPs matters most and that
attention-only LoRA (peft's own defaults, query/value) learns less at the same rank.
`DEFAULT_TARGETS` names the layers where peft's `all-linear` would pick the wrong set (Conv1D in
GPT-2, ViT and VisionEncoderDecoder, encoders whose pooler or head is a plain Linear); every other
model gets `all-linear`, which leaves out the output head (LM head or classifier).
"""

from __future__ import annotations

from finetune.errors import UserError
from finetune.recipe import LoraSpec

# BERT-style encoders: query, key, value, attention output, MLP in and out. Not the pooler (`pooler.dense`)
# nor RoBERTa's head (`classifier.dense`), which the classification task trains in full when they are new.
BERT_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

# model_type -> LoRA target module names, where `all-linear` is not the right set.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D layers (fan_in_fan_out=True)
    "bert": BERT_LINEAR,
    "roberta": BERT_LINEAR,
    "xlm-roberta": BERT_LINEAR,
    "camembert": BERT_LINEAR,
    "electra": BERT_LINEAR,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "albert": ["query", "key", "value", "attention.dense", "ffn", "ffn_output"],
    "modernbert": ["Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"],
    # ViT in transformers 5 (layers.N.attention.{q,k,v,o}_proj, layers.N.mlp.{fc1,fc2}); the task keeps
    # the classification head trainable and saved (modules_to_save).
    "vit": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"],
    # ViT encoder + GPT-2 decoder: self-attention and MLPs of both. The dotted suffixes leave out the
    # decoder's cross-attention (`crossattention.c_attn` does not end in `.attn.c_attn`), which is new
    # when two checkpoints are joined, so the captioning task trains it in full instead (modules_to_save).
    "vision-encoder-decoder": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                               "mlp.fc1", "mlp.fc2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}


def target_modules(model, spec: LoraSpec) -> list[str] | str:
    if spec.target_modules is not None:
        return spec.target_modules
    return DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


def uses_conv1d(model, targets) -> bool:
    """GPT-2 style Conv1D layers store weights transposed: LoRA needs fan_in_fan_out=True."""
    from transformers.pytorch_utils import Conv1D

    names = set(targets) if isinstance(targets, list) else set()
    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in names for n, m in model.named_modules())


def lora_config(model, spec: LoraSpec, task_type: str | None, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    targets = target_modules(model, spec)
    keep = list(dict.fromkeys([*(modules_to_save or []), *(spec.modules_to_save or [])])) or None
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      modules_to_save=keep, task_type=task_type, fan_in_fan_out=uses_conv1d(model, targets))


def apply_lora(model, spec: LoraSpec, task_type: str | None, modules_to_save: list[str] | None = None):
    """Wrap `model` with a fresh LoRA adapter; the base weights are frozen."""
    from peft import get_peft_model

    config = lora_config(model, spec, task_type, modules_to_save)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"lora.target_modules: {e}; set lora.target_modules to module names of this model "
                        "(or 'all-linear')") from e


def is_adapter_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()


def merge_adapter(peft_model):
    """Fold the LoRA weights into the base and return a plain transformers model."""
    return peft_model.merge_and_unload()
