"""LoRA through peft: which modules to adapt per architecture, what stays trainable, merging, and
peft's LoRA variants (DoRA, rsLoRA, PiSSA/OLoRA/LoftQ initialisation, chosen layers, trainable token rows).

The default is every linear layer of the blocks, attention and MLP alike: the QLoRA paper and "LoRA
Without Regret" (Schulman et al., 2025) find that adapting the MLPs matters most and that
attention-only LoRA (peft's own defaults, query/value) learns less at the same rank.
`DEFAULT_TARGETS` names the layers where peft's `all-linear` would pick the wrong set (Conv1D in
GPT-2, ViT and VisionEncoderDecoder, encoders whose pooler or head is a plain Linear). A model with a vision
tower and a language model (Gemma 3, Qwen2-VL, LLaVA, ..., whatever the task: text tasks load Gemma 3 as
its image-text class too) gets the language model's linear layers (`vlm_targets`; the tower and projector
with lora.vision / lora.projector, vlm runs only). Every other model gets `all-linear`, which leaves out the
output head (LM head or classifier).

Every variant is checked against the model and the method before weights load (`lora_problems`, from the
model's config) and again against the loaded model (`apply_lora`), so peft's own errors, raised deep
inside get_peft_model, never reach the user.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.schema import Recipe
from finetune.recipe.sections import LoraSpec

# Architectures built from GPT-2 style Conv1D layers (weights stored transposed).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")
# Initialisations that rewrite the base weights (base = residual after taking out the adapter's part).
REWRITES_BASE = ("pissa", "olora")
# Initialisations that need a step after get_peft_model (LoftQ's weights, PiSSA/OLoRA's conversion when
# saving), done by tasks that call apply_lora and save_adapter. dpo builds its adapter inside trl.
INIT_TASKS = {"pissa": ("clm",), "olora": ("clm",),
              "loftq": ("clm", "mlm", "classification", "translation", "reward", "grpo")}
VARIANT_DEFAULTS = {"use_dora": False, "use_rslora": False, "init": "default", "layers_to_transform": None,
                    "trainable_tokens": None}

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
    if hasattr(model.config, "vision_config") and part_names(model, VLM_LANGUAGE):
        return vlm_targets(model, vision=spec.vision, projector=spec.projector)
    return DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


# The parts of a vision-language model by their submodule names, across transformers' families.
VLM_LANGUAGE = ("language_model", "text_model")
VLM_VISION = ("visual", "vision_tower", "vision_model", "vision_encoder")
VLM_PROJECTOR = ("multi_modal_projector", "merger", "connector", "mm_projector")


def part_names(model, parts: tuple[str, ...]) -> list[str]:
    """Qualified names of the outermost submodules whose last name is one of `parts`."""
    names = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in parts]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def trained_towers(model) -> list:
    """The vision towers of a vision-language model with weights that train outside its projector (Qwen2-VL's
    projector, `merger`, sits inside its tower)."""
    projectors = {id(p) for n in part_names(model, VLM_PROJECTOR) for p in model.get_submodule(n).parameters()}
    towers = [model.get_submodule(n) for n in part_names(model, VLM_VISION)]
    return [t for t in towers if any(p.requires_grad and id(p) not in projectors for p in t.parameters())]


def vlm_targets(model, vision: bool = False, projector: bool = False) -> str:
    """A peft target regex for a vision-language model: the linear layers of its language model, and of the
    vision tower (lora.vision) and the projector (lora.projector) on request; never the LM head (tied to the
    embeddings in many VLMs)."""
    import re

    import torch

    roots = part_names(model, VLM_LANGUAGE)
    if not roots:
        raise UserError("lora.target_modules: cannot find the language model in this VLM (no submodule named "
                        f"{' or '.join(VLM_LANGUAGE)}); set lora.target_modules")
    projectors = part_names(model, VLM_PROJECTOR)
    if vision:
        roots += part_names(model, VLM_VISION)
    if projector:
        roots += projectors
    skip = [] if projector else projectors  # Qwen2-VL's merger sits inside its vision tower
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and any(n.startswith(r + ".") for r in roots) and not any(n.startswith(s + ".") for s in skip)]
    if projector and not any(n.startswith(p + ".") for n in linear for p in projectors):
        where = ", ".join(projectors) or "none found"
        raise UserError(f"lora.projector: this {model.config.model_type} model's projector ({where}) has no linear "
                        "layer for an adapter; drop lora.projector, or train it in full with "
                        f"lora.modules_to_save=[{projectors[0].rsplit('.', 1)[-1] if projectors else 'NAME'}]")
    if not linear:
        raise UserError("lora.target_modules: no linear layer in the language model; set lora.target_modules")
    return "^(" + "|".join(re.escape(n) for n in linear) + ")$"


def uses_conv1d(model, targets) -> bool:
    """GPT-2 style Conv1D layers store weights transposed: LoRA needs fan_in_fan_out=True."""
    from transformers.pytorch_utils import Conv1D

    names = set(targets) if isinstance(targets, list) else set()
    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in names for n, m in model.named_modules())


def variant_problems(spec: LoraSpec, method: str, bits: int | None, model_type: str, num_layers: int | None,
                     vocab_size: int | None, cuda: bool, conv1d: bool | None = None) -> list[str]:
    """The LoRA variants this model, method and device cannot run, one sentence each."""
    out = []
    if method != "lora":
        return [f"lora.{k}: applies to LoRA runs; this is a {method} run, drop it"
                for k, default in VARIANT_DEFAULTS.items() if getattr(spec, k) != default]
    conv1d = model_type in CONV1D_MODEL_TYPES if conv1d is None else conv1d
    if spec.init in REWRITES_BASE and bits:
        out.append(f"lora.init: {spec.init} rewrites the base weights, which a {bits}-bit base cannot hold; drop "
                   "quant.bits, or use lora.init=loftq with quant.bits=4")
    if spec.init == "olora" and conv1d:
        out.append(f"lora.init: olora does not support the Conv1D layers of {model_type} models (peft); use pissa "
                   "or gaussian")
    if spec.init == "loftq" and bits != 4:
        out.append("lora.init: loftq fits the adapter to the error of 4-bit quantisation; set quant.bits=4 "
                   "(or use pissa on an unquantised base)")
    elif spec.init == "loftq" and not cuda:
        out.append("lora.init: peft computes loftq on a CUDA GPU and this machine has none; use lora.init=default")
    if spec.layers_to_transform is not None:
        bad = [i for i in spec.layers_to_transform if i < 0 or (num_layers is not None and i >= num_layers)]
        if bad:
            out.append(f"lora.layers_to_transform: no layer {', '.join(map(str, bad))} in this model; its layers are "
                       f"0 to {num_layers - 1}" if num_layers else
                       f"lora.layers_to_transform: layer indices start at 0, got {bad[0]}")
    ids = [t for t in spec.trainable_tokens or [] if isinstance(t, int)]
    bad_ids = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if bad_ids:
        out.append(f"lora.trainable_tokens: token id {bad_ids[0]} is outside the vocabulary (0 to "
                   f"{(vocab_size or 1) - 1})")
    return out


def lora_problems(recipe: Recipe) -> list[str]:
    """Pre-flight: the LoRA variants against the model's config (no weights), the method and the device."""
    spec = recipe.lora
    parts = [f"lora.{k}: adapts a vision-language model's {k} (--task vlm); this is a {recipe.task} run, drop it"
             for k in ("vision", "projector") if getattr(spec, k) and recipe.task != "vlm"]
    if all(getattr(spec, k) == d for k, d in VARIANT_DEFAULTS.items()):
        return parts
    model_type, num_layers, vocab_size = "", None, None
    if recipe.method == "lora" and recipe.model.name:
        from finetune.models.pretrained import load_config

        try:
            config = load_config(recipe.model)
        except UserError as e:
            return e.problems
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(config, "model_type", "")
        num_layers, vocab_size = getattr(text, "num_hidden_layers", None), getattr(text, "vocab_size", None)
    import torch

    out = variant_problems(spec, recipe.method, recipe.quant.bits, model_type, num_layers, vocab_size,
                           torch.cuda.is_available())
    tasks = INIT_TASKS.get(spec.init)
    if recipe.method == "lora" and tasks is not None and recipe.task not in tasks:
        out.append(f"lora.init: {spec.init} is not supported by the {recipe.task} task yet (its adapter would be "
                   f"saved unconverted); the tasks that support it: {', '.join(tasks)}")
    return parts + out


def token_indices(spec: LoraSpec, tokenizer) -> list[int] | None:
    """lora.trainable_tokens as ids: a string must be one token of the tokenizer (e.g. an added special token)."""
    if not spec.trainable_tokens:
        return None
    ids = []
    for t in spec.trainable_tokens:
        if isinstance(t, int):
            ids.append(t)
            continue
        if tokenizer is None:
            raise UserError(f"lora.trainable_tokens: '{t}': this task names trainable tokens by id only; give the "
                            "token ids")
        found = tokenizer.get_vocab().get(t)
        if found is None:
            raise UserError(f"lora.trainable_tokens: '{t}' is not one token of the tokenizer; add it as a special "
                            "token first, or give its id")
        ids.append(found)
    return sorted(set(ids))


def lora_config(model, spec: LoraSpec, task_type: str | None, modules_to_save: list[str] | None = None,
                tokenizer=None, trainable_tokens: list[int] | None = None):
    """`trainable_tokens`: embedding rows that train too (tokens a chat template added), besides
    lora.trainable_tokens."""
    from peft import LoraConfig

    targets = target_modules(model, spec)
    if spec.layers_to_transform is not None and isinstance(targets, str):
        targets = named_targets(model, targets, spec.layers_to_transform)  # peft wants a list of names for it
    keep = list(dict.fromkeys([*(modules_to_save or []), *(spec.modules_to_save or [])])) or None
    # loftq starts as a plain adapter; apply_lora replaces its weights afterwards from the 4-bit base
    # (peft's replace_lora_weights_loftq), which needs no full-precision copy of the model in memory.
    init = True if spec.init in ("default", "loftq") else spec.init
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      modules_to_save=keep, task_type=task_type, fan_in_fan_out=uses_conv1d(model, targets),
                      use_dora=spec.use_dora, use_rslora=spec.use_rslora, init_lora_weights=init,
                      layers_to_transform=spec.layers_to_transform,
                      trainable_token_indices=token_layers(model, sorted({*(token_indices(spec, tokenizer) or []),
                                                                          *(trainable_tokens or [])})))


def named_targets(model, targets: str, layers: list[int]) -> list[str]:
    """A string target (`all-linear`, or a regex such as a VLM's) as the list of module names it picks: the
    linear layers' own names for `all-linear` (never the output layer; peft keeps those of `layers`), the full
    names a regex matches in `layers` (peft takes a full name as it is, whatever its layer)."""
    import re

    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if targets == "all-linear":
        head = model.get_output_embeddings()
        heads = {n for n, m in model.named_modules() if m is head}
        return sorted({n.rsplit(".", 1)[-1] for n in linear if n not in heads})

    def layer(name: str) -> int | None:
        found = re.search(r"\.(\d+)\.", name)  # peft's default layers pattern: the first index in the name
        return int(found.group(1)) if found else None

    return [n for n in linear if re.fullmatch(targets, n) and layer(n) in layers]


def token_layers(model, ids: list[int]):
    """peft's trainable_token_indices for these rows: the input embedding's, and, when the output layer is not
    tied to it, the output layer's too. Given a list, peft trains the input rows only: an untied head's rows
    for tokens a template added (<|im_end|>) would stay at their random initialisation, so the model could not
    learn to stop, and every load would draw them anew."""
    if not ids:
        return None
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or getattr(outputs, "weight", None) is None or outputs.weight is inputs.weight:
        return ids
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    if id(inputs) not in names or id(outputs) not in names:
        return ids
    return {names[id(inputs)]: ids, names[id(outputs)]: ids}


def embedding_rows(model) -> int | None:
    try:
        return model.get_input_embeddings().weight.shape[0]
    except (AttributeError, NotImplementedError):
        return None


def quantized_bits(model) -> int | None:
    if getattr(model, "is_loaded_in_4bit", False):
        return 4
    return 8 if getattr(model, "is_loaded_in_8bit", False) else None


def apply_lora(model, spec: LoraSpec, task_type: str | None, modules_to_save: list[str] | None = None,
               tokenizer=None, trainable_tokens: list[int] | None = None):
    """Wrap `model` with a fresh LoRA adapter; the base weights are frozen. `tokenizer` resolves
    lora.trainable_tokens given as strings; `trainable_tokens`: embedding rows that train too (tokens
    a chat template added), saved with the adapter."""
    import torch
    from peft import get_peft_model

    config = lora_config(model, spec, task_type, modules_to_save, tokenizer, trainable_tokens)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    problems = variant_problems(spec, "lora", quantized_bits(model), getattr(model.config, "model_type", ""),
                                getattr(text, "num_hidden_layers", None), embedding_rows(model),
                                torch.cuda.is_available(), conv1d=config.fan_in_fan_out)
    if problems:
        raise UserError(problems)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"lora.target_modules: {e}; set lora.target_modules to module names of this model "
                        "(or 'all-linear')") from e
    if spec.init == "loftq":
        loftq_init(peft_model)
    if spec.init in REWRITES_BASE:
        keep_initial_adapter(peft_model)
    return peft_model


def loftq_init(peft_model) -> None:
    from peft import replace_lora_weights_loftq

    source = Path(getattr(peft_model.get_base_model().config, "_name_or_path", "") or "")
    single = source / "model.safetensors"
    replace_lora_weights_loftq(peft_model, model_path=str(single) if single.is_file() else None)


def keep_initial_adapter(peft_model) -> None:
    """PiSSA/OLoRA move part of each base weight into the adapter. Saving the starting adapter lets
    `save_adapter` write the trained one as a plain LoRA on the ORIGINAL base (peft's conversion), so
    that it loads on the base model like any other adapter."""
    import tempfile
    import warnings

    # peft warns at every save that the adapter should be converted: save_adapter does exactly that.
    warnings.filterwarnings("ignore", message=r".*changes the base weights of the model", category=UserWarning)
    folder = tempfile.mkdtemp(prefix="finetune-lora-init-")
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    peft_model.save_pretrained(folder)
    config.init_lora_weights = init
    peft_model.finetune_initial_adapter = folder


def save_adapter(model, run_dir: Path | str) -> None:
    """After `trainer.save_model(run_dir)`: an adapter whose initialisation rewrote the base (PiSSA, OLoRA)
    is written again, converted to an ordinary LoRA (rank 2r) on the original base. No-op otherwise."""
    import shutil

    initial = getattr(model, "finetune_initial_adapter", None)
    if not initial:
        return
    model.save_pretrained(str(run_dir), path_initial_model_for_weight_conversion=initial)
    shutil.rmtree(initial, ignore_errors=True)
    model.finetune_initial_adapter = None


def is_adapter_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()


def merge_adapter(peft_model):
    """Fold the LoRA weights into the base and return a plain transformers model."""
    return peft_model.merge_and_unload()
