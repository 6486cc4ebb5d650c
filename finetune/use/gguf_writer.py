"""A transformers causal LM written as GGUF (llama.cpp's file format) with the gguf package alone.

No llama.cpp binary or conversion script is run or downloaded: the tensor names come from gguf's own maps
(`get_tensor_name_map`), the metadata keys from its `GGUFWriter`, and the few transformations llama.cpp
applies to a checkpoint are done here, as its convert_hf_to_gguf.py does them:

- Llama family: the query and key rows of every head are reordered from the "halves" rotary layout of
  transformers to the interleaved one of llama.cpp (`permute`); transformers' GGUF reader undoes it.
- Gemma 3: its RMSNorm multiplies by (1 + w) and stores w; llama.cpp stores 1 + w.
- Tied embeddings: no `output` tensor (llama.cpp then uses `token_embd`).

Tensor types follow llama.cpp: 1-D tensors and norms stay F32; every matrix takes the requested type, except
that with a 4- or 5-bit type the output projection (the embeddings when tied) is written Q8_0 where llama.cpp
would use Q6_K, which has no quantizer in gguf; a matrix whose rows do not split into the type's blocks is
written F16, as convert_hf_to_gguf.py does. The k-quants (q4_k_m and friends) have no numpy quantizer: an F16
file is written and llama.cpp's own `llama_model_quantize` (bound by llama-cpp-python, an optional install that
builds llama.cpp from source) quantizes it, with llama.cpp's per-tensor rules.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from finetune.errors import UserError, did_you_mean

# transformers model_type -> llama.cpp architecture
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
NATIVE = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# llama.cpp's k-quant file types (`llama-quantize` names), written by llama_model_quantize
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")

# The splitting regexes of the byte-level BPE pre-tokenizers llama.cpp knows by name (tokenizer.ggml.pre),
# as tokenizer.json spells them.
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
}


def supported_line() -> str:
    return ", ".join(ARCHS)


def check_model(config) -> str:
    """The llama.cpp architecture of a model config, or a one-line refusal."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UserError(f"run: GGUF export supports the model types {supported_line()}; this model is "
                        f"'{model_type}'")
    if model_type == "gemma3_text":
        head_dim = config.head_dim
        if config.query_pre_attn_scalar != head_dim:  # llama.cpp scales queries by 1/sqrt(head_dim)
            raise UserError(f"run: this Gemma 3 scales attention by query_pre_attn_scalar={config.query_pre_attn_scalar}"
                            f", which llama.cpp does not read (it uses head_dim={head_dim}); it cannot be exported")
    return ARCHS[model_type]


def rope(config) -> dict:
    """The rotary settings of the global-attention layers."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = params.get("full_attention", params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(w, config, arch: str, quant: str, name: str) -> None:
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(file_type(quant))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    params = rope(config)
    w.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(params["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3") or (kind == "llama3" and arch != "llama"):
        raise UserError(f"run: rope scaling '{kind}' has no GGUF export here; supported: linear, yarn, llama3 "
                        "(Llama)")
    dim = head_dim(config)
    if arch == "llama":
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(dim)
    if arch == "gemma3" or dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(dim)
        w.add_value_length(dim)
    if arch == "gemma3":
        layer_types = getattr(config, "layer_types", None) or []
        if config.sliding_window and "sliding_attention" in layer_types:
            w.add_sliding_window(config.sliding_window)
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
            w.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))


def llama3_rope_factors(config):
    """llama.cpp's `rope_freqs` tensor for Llama 3.1+ rotary scaling (convert_hf_to_gguf.py computes the same)."""
    import math

    import numpy as np

    params, dim = rope(config), head_dim(config)
    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = params.get("factor", 8.0), params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute(w, n_head: int):
    """transformers' rotary layout (first half, second half of each head) to llama.cpp's (pairs): the inverse
    of `LlamaTensorProcessor._reverse_permute_weights` in transformers' GGUF reader."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(model, arch: str):
    """(GGUF name, float32 array) for every weight of the model, transformed as llama.cpp expects."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if arch == "llama" and rope(config).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config)
    for hf_name, t in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        base, _, suffix = hf_name.rpartition(".")
        new = names.get_name(base)
        if new is None:
            raise UserError(f"run: the tensor '{hf_name}' has no GGUF name for the {arch} architecture; this model "
                            "is not a plain causal LM of its type and cannot be exported")
        data = t.detach().float().cpu().numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = permute(data, config.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            data = permute(data, config.num_key_value_heads)
        elif arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1.0
        yield f"{new}.{suffix}", data


def tensor_type(name: str, data, quant: str, tied: bool):
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    qtype = Q[quant.upper()]
    if quant in LOW_BIT and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = Q.Q8_0
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return qtype


def file_type(quant: str) -> int:
    import gguf

    return gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]


def write(model, tokenizer, path: Path, quant: str, name: str) -> dict:
    """Write `model` (float32 weights) and its tokenizer to `path` as GGUF; returns the tensor types written."""
    import gguf

    arch = check_model(model.config)
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, model.config, arch, quant, name)
    add_tokenizer(w, tokenizer, model.get_input_embeddings().weight.shape[0])
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for new_name, data in tensors(model, arch):
        qtype = tensor_type(new_name, data, quant, tied)
        w.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def check_quant(quant: str) -> str:
    quant = quant.lower()
    if quant in NATIVE:
        return quant
    if quant in K_QUANTS:
        if not llama_cpp_installed():
            raise UserError(f"--quant: {quant} needs llama.cpp's quantizer, from the llama-cpp-python package: pip "
                            "install 'finetune-toolkit[llama-cpp]' (it builds llama.cpp from source, a few minutes); "
                            f"without it choose one of {', '.join(NATIVE)}")
        return quant
    known = NATIVE + K_QUANTS
    raise UserError(f"--quant: '{quant}' is not a GGUF type{did_you_mean(quant, known)}; choose one of "
                    f"{', '.join(known)}")


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_to(model, tokenizer, path: Path, quant: str, name: str) -> None:
    """A GGUF at `path`; k-quants through an F16 file beside it, quantized by llama.cpp."""
    if quant in NATIVE:
        write(model, tokenizer, path, quant, name)
        return
    f16 = path.with_name(path.name + ".f16")
    try:
        write(model, tokenizer, f16, "f16", name)
        llama_cpp_quantize(f16, path, quant)
    finally:
        f16.unlink(missing_ok=True)


def llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    import ctypes
    import logging

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])
    params.nthread = os.cpu_count() or 1
    log = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log at its level
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if code != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {src} (code {code})")


# ---------------------------------------------------------------------------------------
# The tokenizer


def add_tokenizer(w, tokenizer, n_vocab: int) -> None:
    """Vocabulary, token types, merges (byte-level BPE) or scores (SentencePiece BPE), special ids, the
    add-bos/eos flags and the chat template, under llama.cpp's keys."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("tokenizer: GGUF export needs a fast tokenizer (tokenizer.json); this run has a slow one")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise UserError(f"tokenizer: a {model.get('type')} tokenizer has no GGUF form here; GGUF export takes "
                        "byte-level BPE (GPT-2 style) and SentencePiece-style BPE tokenizers")
    T = gguf.TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(T.CONTROL if added[i].special or looks_special(token) else T.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(T.BYTE if not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) else T.NORMAL)
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer(spec))
        w.add_token_merges(merges(model))
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        # llama.cpp's SentencePiece tokenizer merges the best-scored pair first; a BPE tokenizer.json lists its
        # tokens in merge order, so the position is the score (what transformers' reader assumes for Gemma)
        w.add_token_scores([-float(i) for i in range(n_vocab)])
        w.add_add_space_prefix(adds_space_prefix(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and tid < n_vocab:
            getattr(w, f"add_{kind}_token_id")(tid)
    probe = tokenizer("a b")["input_ids"]
    w.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    if tokenizer.chat_template:
        from finetune.data.masks import end_of_turn_ids

        template = tokenizer.chat_template
        if isinstance(template, dict):  # named templates (tool use, ...): llama.cpp's list form
            template = [{"name": k, "template": v} for k, v in template.items()]
        w.add_chat_template(template)
        ends = [t for t in end_of_turn_ids(tokenizer) if t != tokenizer.eos_token_id and t < n_vocab]
        if ends:  # llama.cpp stops generating at the end of a turn, not only at eos
            w.add_eot_token_id(ends[0])


def looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<start_of_turn>", "<end_of_turn>")


def merges(model: dict) -> list[str]:
    """tokenizer.json's merges as llama.cpp stores them ("a b"; a space inside a part as U+0120 + 256)."""
    out = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            out.append(m)
        else:
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's splitting rule (tokenizer.ggml.pre)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, known in SPLITS.items():
            if regex == known:
                return name
    raise UserError(f"tokenizer: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one llama.cpp "
                    f"names; GGUF export knows gpt-2, smollm, {', '.join(SPLITS)}")


def adds_space_prefix(tokenizer) -> bool:
    """Whether the SentencePiece tokenizer puts a space (U+2581) before the first word (Llama 2, Mistral: yes;
    Gemma: no)."""
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("\u2581")
