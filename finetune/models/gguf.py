"""GGUF files as models: `--model model.Q4_1.gguf`, or `model.gguf_file` inside a folder or Hub repo.

transformers reads a GGUF (llama.cpp's format) by de-quantising it to float, but a model loaded that
way cannot be saved, and every load pays the de-quantisation again. So a GGUF is converted ONCE into a
plain folder (config.json, model.safetensors, the tokenizer with its chat template) in a cache, and
everything downstream (training, LoRA's `base_model_name_or_path`, generate, chat, merge) uses that
folder like any model written by `save_pretrained`:

    plain_model("SmolLM2-135M-Instruct.Q4_1.gguf", None)  # -> ~/.cache/finetune/gguf/SmolLM2-...-<hash>

The cache is `$FINETUNE_CACHE/gguf` (else `~/.cache/finetune/gguf`); an entry is keyed by the file's
resolved path, size and mtime (a Hub file: repo, filename, revision and snapshot), written into a
temporary sibling and renamed into place, so a half-written entry is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from finetune.errors import UserError, first_line

MAGIC = b"GGUF"
# llama.cpp's architecture names that transformers spells differently (modeling_gguf_pytorch_utils)
RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
SEQ2SEQ = ("t5", "umt5")  # encoder-decoders; every other architecture transformers reads is a causal LM


def is_gguf(name: str | None) -> bool:
    return bool(name) and str(name).lower().endswith(".gguf")


def cache_root() -> Path:
    root = os.environ.get("FINETUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "finetune") / "gguf"


def plain_model(name: str, gguf_file: str | None, key: str = "model.name", revision: str | None = None) -> str:
    """`name` itself, or, when it is a `.gguf` file or `gguf_file` names one inside it (a folder or Hub
    repo), the cached plain folder converted from that file (converted on first use only)."""
    if not gguf_file and (not is_gguf(name) or Path(name).expanduser().is_dir()):
        return name
    if gguf_file and is_gguf(name):
        raise UserError(f"model.gguf_file: model.name '{name}' is a .gguf file already; drop model.gguf_file "
                        "(it names a file inside a folder or Hub repo)")
    path, identity = locate(name, gguf_file, key, revision)
    shown = f"{name}/{gguf_file}" if gguf_file else name
    digest = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:12]
    target = cache_root() / f"{Path(path).stem}-{digest}"
    if (target / "config.json").is_file():
        return str(target)
    arch = read_architecture(path, key, shown)
    convert(path, arch, target, key, shown)
    print(f"model: converted {shown} (GGUF, {arch}) to a plain model in {target} (once; later runs reuse it)",
          flush=True)
    return str(target)


def locate(name: str, gguf_file: str | None, key: str, revision: str | None) -> tuple[str, tuple[str, ...]]:
    """(local path of the .gguf file, what identifies its contents for the cache key)."""
    folder = Path(name).expanduser()
    if gguf_file and not folder.is_dir():
        if name.startswith((".", "/", "~")) or name.count("/") > 1 or folder.exists():  # not a Hub id
            raise UserError(f"{key}: no such directory '{name}' (model.gguf_file names a file inside a folder "
                            "or Hub repo)")
        return download(name, gguf_file, revision)
    path = folder / gguf_file if gguf_file else folder
    if not path.is_file():
        raise UserError(f"model.gguf_file: no such file '{gguf_file}' in folder '{name}'" if gguf_file
                        else f"{key}: no such file '{name}'")
    stat = path.resolve().stat()
    return str(path), (str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns))


def download(repo: str, filename: str, revision: str | None) -> tuple[str, tuple[str, ...]]:
    """A GGUF file of a Hub repo, from the local Hub cache when offline."""
    from huggingface_hub import hf_hub_download

    from finetune.launch.offline import hub_reachable, unreachable_reason

    online = hub_reachable()
    try:
        path = hf_hub_download(repo, filename, revision=revision, local_files_only=not online)
    except Exception as e:  # not found, gated, offline without a cached copy
        why = first_line(e) if online else f"{unreachable_reason()} with no cached copy"
        raise UserError(f"model.gguf_file: could not get '{filename}' from the Hub repo '{repo}': {why}") \
            from e
    # the snapshot path holds the commit, so a repo updated on the Hub gets a new entry
    return path, (repo, filename, revision or "main", str(Path(path).parent))


def read_architecture(path: str, key: str, shown: str) -> str:
    """`general.architecture` from the file's metadata (no weights read); a UserError when the file is
    not GGUF, the gguf package is missing, or transformers cannot read that architecture."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"{key}: '{shown}' is not a GGUF file (it does not start with 'GGUF'); pass a .gguf "
                            "file written by llama.cpp, or a directory written by save_pretrained")
    try:
        import gguf
    except ImportError as e:
        raise UserError(f"{key}: reading '{shown}' needs the gguf package: pip install gguf") from e
    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, IndexError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{key}: '{shown}' is not a readable GGUF file ({type(e).__name__}: {e}); download "
                        "or convert it again") from e
    supported = supported_architectures()
    if arch not in supported and RENAMES.get(arch, arch) not in supported:
        raise UserError(f"{key}: '{shown}' holds a '{arch}' model, which transformers cannot read from GGUF; "
                        f"it reads {', '.join(supported)}")
    return arch


def supported_architectures() -> list[str]:
    """The architectures (llama.cpp's names) transformers reads from GGUF: its legacy reader's list and
    those of its newer reader, where this version has one."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        GGUF_CONFIG_ARCHS = {}
    spelled = {v: k for k, v in RENAMES.items()}
    names = [spelled.get(a, a) for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    return list(dict.fromkeys([*names, *GGUF_CONFIG_ARCHS]))


def convert(path: str, arch: str, target: Path, key: str, shown: str) -> None:
    """De-quantise the GGUF at `path` to float32 and save it as a plain model in `target`: written into a
    temporary sibling, then renamed into place (a concurrent conversion that finished first wins)."""
    import torch
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    folder, filename = str(Path(path).parent), Path(path).name
    auto_cls = getattr(transformers, "AutoModelForSeq2SeqLM" if arch in SEQ2SEQ else "AutoModelForCausalLM")
    # de-quantised on load, with no GGUF quantizer left on the model (transformers >= 5.25; older ones
    # de-quantise anyway and keep a quantizer that refuses to save: see `plain_copy`)
    kwargs = {"quantization_config": transformers.GgufConfig(dequantize=True)} \
        if hasattr(transformers, "GgufConfig") else {}
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            model = auto_cls.from_pretrained(folder, gguf_file=filename, dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"{key}: transformers could not read '{shown}' (GGUF, {arch}): {first_line(e)}") from e
        if getattr(model.config, "quantization_config", None) is not None:
            model = plain_copy(model, auto_cls)
        if hasattr(model.config, "_model_name_or_path"):  # the GGUF's general.name; config.json needs none
            del model.config._model_name_or_path
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.is_dir() and not (target / "config.json").is_file():  # emptied or damaged by hand
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process converted the same file meanwhile: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plain_copy(loaded, auto_cls):
    """The de-quantised model as an ordinary one: transformers refuses to save a model whose config
    still says it was quantised with gguf, so the weights move into a model built from a clean config."""
    config = loaded.config
    del config.quantization_config
    model = auto_cls.from_config(config)
    model.load_state_dict(loaded.state_dict())
    return model
