"""Memory: what a run will need, and what to do when it does not fit (precision is finetune/training/precision.py).

    finetune plan --model Qwen/Qwen2.5-0.5B --quant 4bit --bf16 --set train.batch_size=8 --set data.max_length=1024
    finetune lora ... --set train.max_memory_gib=12    # fit the batch to 12 GiB (unset: what is free)

`estimate(recipe)` predicts the peak memory of one device from the model's config alone (built on the meta
device: exact parameter counts, no weights read): weights, gradients and AdamW state of what trains,
activations of one micro-batch, the logits and loss, the share a distributed preset keeps per device, and
on CPU the process itself. Checked against measured peaks (live tensors, resident memory, and on CUDA
`torch.cuda.max_memory_allocated`; BENCHMARKS.md). finetune/training/fit.py fits a run to the memory that is free.
"""

from __future__ import annotations

import dataclasses
import os

from finetune.launch.headroom import resident_bytes
from finetune.recipe.schema import Recipe
from finetune.recipe.tasks import task_info

GiB = 2**30


# ---------------------------------------------------------------------------------------
# The estimate


@dataclasses.dataclass
class Estimate:
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float
    logits: float
    trainable: int  # parameter counts
    total_params: int
    quantized_params: int
    devices: int  # processes sharing the model state (sharded presets divide by it)
    seq: int  # tokens per example
    capacity: float | None  # bytes of one device, when known
    notes: list[str]
    process: float = 0.0  # on CPU: the process itself (Python, torch, libraries, data), resident before the model
    vision: float = 0.0  # vision-language models: the pixels, and the vision tower's activations when it trains

    @property
    def tensors(self) -> float:
        """The tensors of the run: weights, gradients, optimizer state, activations and logits."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.vision

    @property
    def peak(self) -> float:
        return self.tensors + self.process


def model_dims(config) -> dict[str, int]:
    """hidden, layers, heads, ffn and vocab sizes under their usual config names."""
    def first(*names, default=None):
        for n in names:
            v = getattr(config, n, None)
            if isinstance(v, int):
                return v
        return default

    text = getattr(config, "text_config", None) or getattr(config, "decoder", None)
    if first("hidden_size", "n_embd", "d_model") is None and text is not None:
        return model_dims(text)
    hidden = first("hidden_size", "n_embd", "d_model", default=768)
    return dict(hidden=hidden, layers=first("num_hidden_layers", "n_layer", "num_layers", default=12),
                heads=first("num_attention_heads", "n_head", "num_heads", default=12),
                kv_heads=first("num_key_value_heads", "num_attention_heads", "n_head", "num_heads", default=12),
                ffn=first("intermediate_size", "n_inner", "d_ff", "ffn_dim", default=4 * hidden) or 4 * hidden,
                vocab=first("vocab_size", default=0), context=first("n_positions", "max_position_embeddings",
                                                                  default=1024))


def ffn_saved_tensors(model, config) -> int:
    """Tensors of the MLP width autograd keeps per layer: 2 for a fused activation (gelu, relu),
    3 for CLIP's quick_gelu (x * sigmoid(1.702x)), 4 for a gated MLP (SwiGLU), 5 for GPT-2's unfused tanh-GELU."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if names & {"gate_proj", "gate_up_proj", "w1", "wi_0"}:
        return 4
    act = getattr(config, "activation_function", None) or getattr(config, "hidden_act", "")
    return {"gelu_new": 5, "quick_gelu": 3}.get(act, 2)


def language_part(model):
    """A vision-language model's language model (its layers are what `model_dims` describes); else the model."""
    from finetune.models.adapters import VLM_LANGUAGE, part_names

    names = part_names(model, VLM_LANGUAGE) if hasattr(model.config, "vision_config") else []
    return model.get_submodule(names[0]) if names else model


def vision_dims(config) -> dict[str, int] | None:
    """A vision-language model's vision tower: width, depth, heads, MLP width, patch, and how many tower
    positions each image token of the language model stands for (Qwen2-VL merges 2x2 patches into one token,
    Idefics3 shuffles scale_factor^2 of them, Gemma 3 pools to mm_tokens_per_image; LLaVA keeps one each)."""
    v = getattr(config, "vision_config", None)
    if v is None:
        return None

    def first(*names, default=None):
        for n in names:
            x = getattr(v, n, None)
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                return x
        return default

    hidden = int(first("embed_dim", "hidden_size", default=768))
    patch = int(first("patch_size", default=14))
    image = first("image_size")
    side = int(image) // patch if image else None
    merge = first("spatial_merge_size") or getattr(config, "spatial_merge_size", None)  # Mistral 3: the top config
    if isinstance(merge, int) and merge > 1:
        per_token = int(merge) ** 2
    elif isinstance(getattr(config, "scale_factor", None), int):
        per_token = config.scale_factor ** 2
    elif isinstance(getattr(config, "mm_tokens_per_image", None), int) and side:
        per_token = max(1, side * side // config.mm_tokens_per_image)
    else:
        per_token = 1
    return dict(hidden=hidden, layers=int(first("depth", "num_hidden_layers", default=12)),
                heads=int(first("num_heads", "num_attention_heads", default=12)),
                ffn=int(first("intermediate_size", default=0) or first("mlp_ratio", default=4) * hidden),
                pixels_per_position=3 * patch * patch * int(first("temporal_patch_size", default=1)),
                per_token=per_token, side=side or 448 // patch)


def vision_cost(model, config, recipe: Recipe, b: int, image_tokens: int | None, act_bytes: int,
                lm_hidden: int) -> tuple[float, str]:
    """(bytes, a note) of a vision-language model's image side for one micro-batch: the pixels, and the tower's
    activations when its weights train (lora.vision, full fine-tuning), or the projector's when only it
    trains. A frozen tower runs without a graph (finetune/tasks/vlm.py keeps checkpointing's input hook off
    it), so it keeps nothing for backward. `image_tokens`: image tokens per example, from the data; unset,
    one image at the tower's own size."""
    from finetune.models.adapters import VLM_PROJECTOR, part_names, trained_towers

    v = vision_dims(config)
    if v is None or recipe.task != "vlm":
        return 0.0, ""
    assumed = image_tokens is None
    if assumed:
        image_tokens = max(1, v["side"] ** 2 // v["per_token"])
    positions = b * image_tokens * v["per_token"]
    pixels = positions * v["pixels_per_position"] * 4  # float32 pixel values
    projectors = [model.get_submodule(n) for n in part_names(model, VLM_PROJECTOR)]
    projector = positions * (v["hidden"] + 2 * lm_hidden) * act_bytes  # its input, hidden and output
    towers = trained_towers(model)
    if towers:
        hv, saved = v["hidden"], ffn_saved_tensors(towers[0], config.vision_config)
        per_layer = positions * ((7 + 2) * hv + saved * v["ffn"]) * act_bytes
        if getattr(config.vision_config, "_attn_implementation", None) == "eager":
            per_layer += 2 * positions * v["heads"] * v["side"] ** 2 * act_bytes
        layers = max(v["layers"], 1)
        if recipe.train.gradient_checkpointing:
            activations = layers * positions * hv * act_bytes + per_layer
        else:
            activations = layers * per_layer
        activations += projector
        what = "the pixels and the tower's activations (it trains)"
    elif any(p.requires_grad for m in projectors for p in m.parameters()):
        activations, what = projector, "the pixels and the projector's activations (the tower is frozen)"
    else:
        activations, what = 0.0, "the pixels only (the tower is frozen: it keeps nothing for backward)"
    per_image = v["side"] ** 2
    source = (f"one {per_image}-position image per example assumed (the run counts its data's)" if assumed
              else f"{image_tokens} image tokens per example")
    return float(pixels + activations), f"vision: {source}, {positions // b:,} tower positions; {what}"


# The decoder families whose causal-LM forward Liger (0.8) replaces with its fused linear cross-entropy
# (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN, decoder entries); read here
# rather than imported, since importing Liger needs Triton and `finetune plan` runs anywhere.
LIGER_FUSED_LOSS = frozenset({
    "deepseek_v2", "deepseek_v3", "exaone4", "falcon_h1", "gemma", "gemma2", "gemma3", "gemma3_text", "glm4",
    "gpt_oss", "granite", "hunyuan_v1_dense", "hunyuan_v1_moe", "llama", "ministral", "mistral", "mixtral",
    "nemotron", "olmo2", "olmo3", "phi3", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "smollm3"})


def fused_loss(recipe: Recipe, config) -> bool:
    """Whether the run's loss never materialises the logits (Liger on a family it patches)."""
    return recipe.train.liger_kernel and getattr(config, "model_type", None) in LIGER_FUSED_LOSS


def sequence_length(recipe: Recipe, dims: dict[str, int], config) -> int:
    """Tokens per example: data.max_length (or the model's context, at most 1024); patches for images."""
    vision = getattr(config, "vision_config", None) or config
    image, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and recipe.task == "image-classification":
        return (image // patch) ** 2 + 1
    return min(recipe.data.max_length or min(dims["context"], 1024), dims["context"] or 10**9)


def packs_rows(recipe: Recipe) -> bool:
    """Whether the run trains on packed rows (several examples per row): causal LM packs unless told not to."""
    packing = recipe.data.packing
    return bool(packing) or (packing is None and recipe.task == "clm")


def dtype_bytes(recipe: Recipe, config) -> int:
    name = recipe.model.dtype
    if name == "auto":
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if "16" in name else 4


def device_capacity() -> float | None:
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate(recipe: Recipe, model=None, capacity: float | None = None, seq: int | None = None,
             image_tokens: int | None = None) -> Estimate:
    """Peak memory of one device for this recipe (model: a meta-device skeleton, built when not given; seq:
    tokens per row when the data decides it, as packing does; image_tokens: a vision-language run's image
    tokens per example, within seq)."""
    from finetune.launch.presets import preset_kind
    from finetune.models.adapters import lora_config
    from finetune.models.quantization import quantizable_layers, skeleton

    model = model if model is not None else skeleton(recipe.model, recipe.task)
    config = model.config
    dims = model_dims(config)
    t, q, notes = recipe.train, recipe.quant, []
    weight_bytes = dtype_bytes(recipe, config)

    # Weights: quantised layers at 4 bits (+ block scales) or 8 bits; the rest in the load dtype, or in
    # float32 under QLoRA (prepare_model_for_kbit_training upcasts norms, embeddings and head).
    quantized = {f"{n}.weight" for n in quantizable_layers(model)} if q.bits else set()
    per_q = {4: 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64), 8: 1.0}.get(q.bits or 0, 0)
    weights = 0.0
    qparams = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name in quantized:
            qparams += p.numel()
            weights += p.numel() * per_q
        else:
            weights += p.numel() * (4 if q.bits else weight_bytes)

    # What trains: LoRA adapters (float32, peft keeps them so) or every parameter.
    lora_inputs = 0  # summed input width of the adapted layers (LoRA dropout copies their inputs)
    if recipe.method == "lora":
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        # the adapter's shapes only: its initialisation and named token rows do not change what it holds
        shapes = recipe.lora.model_copy(update={"init": "default", "trainable_tokens": None})
        peft_model = get_peft_model(model, lora_config(model, shapes, None))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        lora_inputs = sum(m.in_features for m in peft_model.modules() if isinstance(m, LoraLayer))
        weights += trainable * 4
        train_bytes = trainable * 4
    else:
        trainable = total
        train_bytes = trainable * weight_bytes
    optim = str(t.trainer_args.get("optim", "adamw_torch"))
    state_per_byte = 0.5 if "8bit" in optim else 0.0 if optim == "sgd" else 2.0  # AdamW: two moments
    gradients, optimizer = float(train_bytes), train_bytes * state_per_byte

    # Activations of one micro-batch, in bytes: per layer, the tensors autograd keeps of the hidden width (norm
    # inputs and outputs, q, k, v, attention output) and of the MLP width (ffn_saved_tensors), plus
    # LoRA dropout's copies of the adapted layers' inputs. Gradient checkpointing keeps only each
    # layer's input and recomputes one layer at a time in backward.
    b, s, h, f = t.batch_size, seq or sequence_length(recipe, dims, config), dims["hidden"], dims["ffn"]
    L = max(dims["layers"], 1)
    act_bytes = 2 if (t.bf16 or t.fp16) else 4
    # Under QLoRA prepare_model_for_kbit_training upcasts the embeddings and norms to float32: the
    # residual stream, the norms' tensors and what adds to them stay float32 under 16-bit autocast, so
    # the hidden-width tensors count 4 bytes (a 0.5B Qwen2 on an H200, batch 8 x 1024: 31.3 GiB
    # measured against 26.8 estimated without this, 1.16x).
    hidden_bytes = 4 if q.bits else act_bytes
    kv_share = dims["kv_heads"] / dims["heads"] if dims["heads"] else 1.0
    attn = recipe.model.attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    # Packed rows attend through a block-diagonal mask, except on flash attention's varlen path: SDPA then
    # keeps each layer's own copy of the mask for backward, and with a mask transformers' repeat_kv copies
    # K and V to every query head (SmolLM2-135M, 1 x 1024 tokens: 4 MiB of mask and 6 MiB of K/V per layer).
    masked = recipe.task == "clm" and packs_rows(recipe) and "flash" not in str(attn)
    if masked:
        kv_share = 1.0
    language = language_part(model)
    per_layer = b * s * ((7 + 2 * kv_share) * h * hidden_bytes
                         + ffn_saved_tensors(language, getattr(language, "config", config)) * f * act_bytes)
    if masked:
        per_layer += b * s * s * act_bytes
    if recipe.lora.dropout > 0:
        per_layer += b * s * lora_inputs / L * act_bytes
    if attn == "eager":
        per_layer += 2 * b * dims["heads"] * s * s * act_bytes
    if t.gradient_checkpointing:
        activations = L * b * s * h * hidden_bytes + per_layer
    else:
        activations = L * per_layer
    activations += 3 * b * s * h * hidden_bytes  # embeddings and final norm
    # Logits and loss: the head's output, its float32 log-softmax and the two gradients in backward.
    vocab = dims["vocab"] if task_info(recipe.task).lm_head else 0  # a head over the whole vocabulary
    logits = float(b * s * vocab * (12 + (act_bytes if act_bytes == 2 else 0)))
    if vocab and fused_loss(recipe, config):
        # Liger's fused linear cross-entropy computes the loss and its gradient chunk by chunk and
        # never holds the logits; what stays is about a chunk of them and the hidden states' gradient.
        logits = float(2 * b * s * h * 4)
        notes.append("train.liger_kernel: the loss is fused with the LM head; no logits are kept")

    trained = peft_model if recipe.method == "lora" else model
    vision, vision_note = vision_cost(trained, config, recipe, b, image_tokens, act_bytes, h)
    if vision_note:
        notes.append(vision_note)

    # Distributed presets: what each device keeps.
    kind = preset_kind(t.distributed) if t.distributed else "ddp"
    devices = t.num_processes
    if devices > 1 and kind == "ddp":
        gradients *= 2  # DDP's gradient buckets hold a second copy
    elif kind == "deepspeed-zero2":
        gradients, optimizer = gradients / devices, optimizer / devices
    elif kind in ("fsdp", "deepspeed-zero3"):
        biggest_layer = weights / max(L, 1)
        weights = weights / devices + 2 * biggest_layer  # one gathered layer, one prefetched
        gradients, optimizer = gradients / devices, optimizer / devices

    if (t.bf16 or t.fp16) and (weight_bytes == 4 or q.bits):
        # autocast keeps a 16-bit copy of each float32 weight a matmul uses (under QLoRA: the head,
        # which prepare_model_for_kbit_training upcast)
        weights += (total - qparams) * 2
    if t.bf16 or t.fp16:
        notes.append("activations in 16 bits (mixed precision); weights and optimizer state as loaded")
    if recipe.method == "lora":
        notes.append(f"trains {trainable:,} LoRA parameters of {total:,}")
    capacity = capacity if capacity is not None else device_capacity()
    process = 0.0 if is_cuda() else resident_bytes()  # this process now: imports done, no weights loaded yet
    return Estimate(process=process, weights=weights, gradients=gradients, optimizer=optimizer,
                    activations=float(activations),
                    logits=logits, trainable=trainable, total_params=total, quantized_params=qparams,
                    devices=devices, seq=s, capacity=capacity, notes=notes, vision=vision)


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def report(recipe: Recipe, est: Estimate) -> list[str]:
    t = recipe.train
    method = f"QLoRA {recipe.quant.bits}-bit" if recipe.quant.bits else recipe.method
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    kind = t.distributed or ("ddp" if t.num_processes > 1 else "single process")
    lines = [f"memory per device ({method}, {precision}, batch {t.batch_size} x {est.seq} tokens, "
             f"{kind}{f', {t.num_processes} processes' if t.num_processes > 1 else ''}"
             f"{', gradient checkpointing' if t.gradient_checkpointing else ''}):"]
    parts = (("process", est.process),) if est.process else ()
    for label, value in (*parts, ("weights", est.weights), ("gradients", est.gradients), ("optimizer", est.optimizer),
                         ("activations", est.activations), ("logits/loss", est.logits),
                         *((("vision", est.vision),) if est.vision else ())):
        lines.append(f"  {label:<12} {fmt(value):>11}")
    lines.append(f"  {'peak':<12} {fmt(est.peak):>11}  (estimate; allow ~10% for allocator fragmentation"
                 f"{' and ~0.5 GiB for the CUDA context' if est.capacity and is_cuda() else ''})")
    lines += [f"  {n}" for n in est.notes]
    return lines


def is_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def fit_problems(recipe: Recipe, est: Estimate) -> list[str]:
    """A warning-sized problem when the estimate does not fit the device."""
    if not est.capacity or est.peak <= 0.9 * est.capacity:
        return []
    if recipe.train.fit_memory and recipe.train.num_processes == 1:
        return [f"memory: the estimated peak of {fmt(est.peak)} does not fit in the {fmt(est.capacity)} of this "
                "device (with 10% to spare); training will lower train.batch_size (raising train.grad_accum), then "
                "turn on gradient checkpointing, to fit the memory that is free when it starts (train.fit_memory)"]
    return [f"memory: the estimated peak of {fmt(est.peak)} per device does not fit in the {fmt(est.capacity)} "
            "of one device (with 10% to spare); lower train.batch_size (and raise train.grad_accum), set "
            "train.gradient_checkpointing=true, use --bf16, --quant 4bit, or shard with --distributed fsdp"]
