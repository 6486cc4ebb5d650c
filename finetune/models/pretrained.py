"""Loading models and tokenizers: a Hub id, a local directory or a GGUF file, with clear errors.

Every task picks its Auto class and calls `load_model(recipe.model, AutoModelFor...)`;
pre-training builds a model from a size preset or a config file with `model_from_config`.
`model_source` is the one place model.name becomes something transformers loads: a GGUF file
(model.name itself, or model.gguf_file inside it) becomes its cached plain folder (finetune.models.gguf).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from finetune.errors import UserError, first_line
from finetune.launch.offline import hub_reachable, unreachable_reason
from finetune.models.gguf import is_gguf, plain_model
from finetune.recipe.sections import ModelSpec, QuantSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")

# Decoder size presets for `finetune pretrain` (GPT-2 architecture).
GPT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256),  # ~1M params + embeddings: CPU demos
    "small": dict(n_embd=384, n_layer=6, n_head=6, n_positions=512),  # ~10M + embeddings
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),  # GPT-2 small, 124M
}


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an invalid repo id
        return False


def check_source(name: str, key: str, filename: str = "config.json") -> str:
    """Resolve `name` to a local directory or a Hub id, failing fast instead of retrying offline. A `.gguf`
    file resolves to its converted plain folder (converted on first use)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if is_gguf(name):
        return plain_model(name, None, key)
    if path.exists():
        raise UserError(f"{key}: '{name}' is a file; expected a directory written by save_pretrained or a Hub id")
    if looks_like_path(name):
        raise UserError(f"{key}: no such directory '{name}'")
    if not hub_reachable() and not in_hub_cache(name, filename):
        raise UserError(f"{key}: '{name}' is not a local directory, and {unreachable_reason()} with no cached copy; "
                        "pass a directory written by save_pretrained, or go online")
    return name


def model_source(spec: ModelSpec, key: str = "model.name") -> str:
    """model.name as transformers loads it: unchanged, or the cached plain folder of a GGUF file (model.name
    itself, or model.gguf_file in the folder or Hub repo model.name)."""
    return plain_model(spec.name, spec.gguf_file, key, spec.revision)


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (truncated, not safetensors), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "truncated"
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return "not a safetensors file"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and "data_offsets" in t]
    if 8 + n + max(ends, default=0) > size:
        return "truncated"
    return None


def check_model_files(name: str, key: str, gguf_file: str | None = None, revision: str | None = None) -> None:
    """Pre-flight: the model exists (or is a reachable Hub id) and its local weight files are whole."""
    name = plain_model(name, gguf_file, key, revision)
    check_source(name, key)
    path = Path(name).expanduser()
    if path.is_dir():
        for weights in sorted(path.glob("*.safetensors")):
            if why := safetensors_problem(weights):
                raise UserError(f"{key}: '{weights}' is {why}; the model directory is damaged: copy or "
                                "download the model again")


def has_tokenizer(directory: str) -> bool:
    return any((Path(directory) / f).exists() for f in TOKENIZER_FILES)


def tokenizer_source(spec: ModelSpec) -> str:
    if spec.tokenizer:
        return check_source(spec.tokenizer, "model.tokenizer", "tokenizer_config.json")
    if not spec.name:
        raise UserError("model.tokenizer: no tokenizer given; pass --set model.tokenizer=<directory or Hub id>")
    source = check_source(model_source(spec), "model.name")
    if Path(source).is_dir() and not has_tokenizer(source):
        raise UserError(f"model.name: directory '{source}' has no tokenizer; pass "
                        "--set model.tokenizer=<directory or Hub id> (or save one into it)")
    return source


def load_tokenizer(spec: ModelSpec, **kwargs: Any):
    from transformers import AutoTokenizer

    source = tokenizer_source(spec)
    try:
        return AutoTokenizer.from_pretrained(source, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.tokenizer: could not load a tokenizer from '{source}': {first_line(e)}") from e


def ensure_pad_token(tokenizer, model=None) -> bool:
    """Give the tokenizer a pad token distinct from eos, adding `<|pad|>` if needed.

    With pad == eos the usual collators mask every eos out of the labels, and the model never
    learns to stop. Returns True when a token was added (the embeddings then grow by one row).
    """
    added = False
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        added = tokenizer.add_special_tokens({"pad_token": "<|pad|>"}) > 0
    # Also when the token was added by an earlier call without the model (tokenizer first, model later).
    if model is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    return added


def pad_with_eos(tokenizer) -> None:
    """Causal-LM training: eos doubles as pad when the tokenizer has none. Labels are masked by position
    (finetune's collator), so eos stays trained, and no embedding row is added (a new row would make a LoRA
    adapter carry the whole embedding matrix and the merged model differ from the base vocabulary)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def torch_dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(quant: QuantSpec, keep: list[str] | None = None):
    """bitsandbytes settings for QLoRA, or None when the base loads in full precision. `keep`: modules left
    unquantised (a VLM's vision tower and projector), as transformers matches them: a prefix of the module's
    name, a regex from its start, or a suffix."""
    if not quant.bits:
        return None
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": keep} if keep else {}
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
                              bnb_4bit_quant_storage=torch_dtype(quant.storage) if quant.storage != "uint8" else None,
                              **skip)


def load_model(spec: ModelSpec, auto_cls, quant: QuantSpec | None = None, keep: list[str] | None = None,
               **kwargs: Any):
    """`auto_cls.from_pretrained` on a Hub id or local directory, with the recipe's dtype and trust; under
    `quant`, the modules `keep` matches stay unquantised."""
    name = model_source(spec)
    source = str(Path(check_source(name, "model.name")).resolve()) if Path(name).expanduser().is_dir() \
        else check_source(name, "model.name")
    qconfig = quantization_config(quant, keep) if quant else None
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if spec.attn_implementation:  # checked before loading (extras.kernel_problems)
        kwargs.setdefault("attn_implementation", spec.attn_implementation)
    try:
        return auto_cls.from_pretrained(source, dtype=torch_dtype(spec.dtype), revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: could not load '{source}' as {auto_cls.__name__}: {first_line(e)}") from e


def context_length(config) -> int | None:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


def max_length(requested: int | None, config, default_cap: int = 1024) -> int:
    """The recipe's data.max_length, or the model's context (at most `default_cap`) when unset."""
    context = context_length(config)
    if requested is None:
        return min(context or default_cap, default_cap)
    if context and requested > context:
        raise UserError(f"data.max_length: {requested} exceeds the model's context of {context} tokens; "
                        f"set data.max_length <= {context}")
    return requested


def load_config(spec: ModelSpec):
    from transformers import AutoConfig

    source = check_source(model_source(spec), "model.name")
    try:
        return AutoConfig.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: could not read the config of '{source}': {first_line(e)}") from e


def preset_config(spec: ModelSpec, presets: dict[str, dict], config_cls, which: str = "presets"):
    """model.config (default "tiny") as a config: a preset of `presets` built with `config_cls`, or a config
    file or directory; anything else is an error naming the presets (`which` introduces them)."""
    from transformers import AutoConfig

    name = spec.config or "tiny"
    if name in presets:
        return config_cls(**presets[name])
    if Path(name).exists():
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(f"model.config: could not read a model config from '{name}': {first_line(e)}") from e
    from finetune.errors import did_you_mean

    raise UserError(f"model.config: '{name}' is neither a preset nor a file{did_you_mean(name, presets)}; "
                    f"{which}: {', '.join(presets)}")


def gpt_config(spec: ModelSpec, vocab_size: int, max_length: int | None, tokenizer):
    """A GPT-2 config from a preset name or a config file/directory, sized to the tokenizer."""
    from transformers import GPT2Config

    config = preset_config(spec, GPT_PRESETS, GPT2Config)
    config.vocab_size = vocab_size
    for attr in ("n_positions", "max_position_embeddings"):
        if max_length and hasattr(config, attr) and getattr(config, attr) < max_length:
            setattr(config, attr, max_length)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`, with eos and a distinct pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
