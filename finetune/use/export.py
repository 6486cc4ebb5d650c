"""Shipping a finished run to where models run, offline: a GGUF file (llama.cpp, LM Studio), an Ollama folder
(the GGUF and a Modelfile) or a folder vLLM serves (the merged model, or the LoRA adapter for its base).

    export(Path("runs/sft"), "gguf", quant="q8_0")   # -> runs/sft.q8_0.gguf
    export(Path("runs/sft"), "ollama")               # -> runs/sft-ollama/{sft.q8_0.gguf,Modelfile}
    export(Path("runs/sft"), "vllm")                 # -> runs/sft-vllm/ (safetensors, tokenizer, generation config)

A LoRA run is merged into its base in float32 first. GGUF is written by `gguf_writer` with the gguf package;
the k-quants (q4_k_m and friends) by llama.cpp's own quantizer through llama-cpp-python, from an F16 GGUF.
Everything is written to a temporary sibling of the output and renamed into place, so a failure leaves nothing
behind and an existing output is replaced only whole (and only with overwrite).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from finetune.errors import UserError, did_you_mean
from finetune.use import gguf_writer
from finetune.use.inference import check_model_dir, run_task

TARGETS = ("gguf", "ollama", "vllm", "hf")
DEFAULT_QUANT = "q8_0"
TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "spiece", "chat_template", "added_tokens")


def export(run: Path, to: str, output: Path | None = None, quant: str | None = None, adapter: bool = False,
           overwrite: bool = False) -> dict:
    """Write the export; returns {path, target, quant, bytes, seconds, commands, notes}."""
    run, to = Path(run), to.lower()
    if to not in TARGETS:
        raise UserError(f"--to: '{to}' is not an export target{did_you_mean(to, TARGETS)}; choose gguf, ollama or "
                        "vllm (hf)")
    to = "vllm" if to == "hf" else to
    if to == "vllm" and quant is not None:
        raise UserError("--quant: applies to gguf and ollama exports; a vllm folder holds the weights in the "
                        "model's own precision")
    if adapter and to != "vllm":
        raise UserError("--adapter: only a vllm export can keep the LoRA adapter apart; gguf and ollama exports "
                        "are of the merged model")
    quant = gguf_writer.check_quant(quant or DEFAULT_QUANT) if to != "vllm" else None
    check_run(run)
    if adapter:
        check_adapter(run)
    elif to != "vllm":
        check_architecture(run)
    out = Path(output) if output else default_output(run, to, quant, adapter)
    check_output(out, run, overwrite, folder=to != "gguf")
    start = time.perf_counter()
    if to == "vllm" and adapter:
        result = write_adapter(run, out)
    else:
        model, tokenizer = load_merged(run)
        result = {"gguf": write_gguf, "ollama": write_ollama, "vllm": write_vllm}[to](run, model, tokenizer, out,
                                                                                    quant)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"path": out, "target": to, "quant": quant, "bytes": size, "seconds": time.perf_counter() - start,
            "commands": [], "notes": [], **result}


# ---------------------------------------------------------------------------------------
# What is refused before any weight is read


def check_run(run: Path) -> None:
    """A run that finished (or a plain model folder); not one still running, interrupted, failed or diverged."""
    check_model_dir(run, "run")
    from finetune.training.rundir import read_marker, status

    if read_marker(run) is None:
        return
    state = status(run)
    if state == "finished":
        return
    why = {"running": "is still running; wait for it to finish",
           "failed": "failed (it diverged or crashed), so its files are not a trained result; fix it and train again",
           "interrupted": f"was interrupted; finish it first: continue it with --resume -o {run}"}
    raise UserError(f"run: the run in '{run}' did not finish ({state}) and " +
                    why.get(state, f"cannot be exported; continue it with --resume -o {run}"))


def run_config(run: Path):
    """The model config of a run (of its base, for a LoRA run), or None where it cannot be read offline."""
    from transformers import AutoConfig

    source = run
    if (run / "adapter_config.json").is_file():
        source = json.loads((run / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        return AutoConfig.from_pretrained(str(source))
    except Exception:  # the base is not reachable here: loading the run says why
        return None


def check_architecture(run: Path) -> None:
    config = run_config(run)
    if config is not None:
        gguf_writer.check_model(config)


def default_output(run: Path, to: str, quant: str | None, adapter: bool) -> Path:
    """Beside the run: runs/sft.q8_0.gguf, runs/sft-ollama, runs/sft-vllm, runs/sft-vllm-adapter."""
    name = run.resolve().name
    if to == "gguf":
        return run.parent / f"{name}.{quant}.gguf"
    return run.parent / f"{name}-{to}{'-adapter' if adapter else ''}"


def check_output(out: Path, run: Path, overwrite: bool, folder: bool) -> None:
    o, r = out.resolve(), run.resolve()
    if o == r or r in o.parents or o in r.parents:
        raise UserError(f"--output: '{out}' overlaps the run directory '{run}'; write the export beside the run "
                        "(the default) or elsewhere")
    if not folder and out.suffix.lower() != ".gguf":
        raise UserError(f"--output: a GGUF file's name ends in .gguf; got '{out.name}'")
    if not out.exists():
        return
    if folder and not out.is_dir():
        raise UserError(f"--output: '{out}' is a file; this export is a directory: choose a directory name")
    if not folder and out.is_dir():
        raise UserError(f"--output: '{out}' is a directory; give a file name such as {out / 'model.gguf'}")
    if folder and not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--output: '{out}' already exists; pass --overwrite to replace it, or choose another path")
    if folder and not any((out / m).exists() for m in ("Modelfile", "config.json", "adapter_config.json")):
        raise UserError(f"--output: '{out}' holds other files, not an export; choose another directory")


# ---------------------------------------------------------------------------------------
# Writing: to a temporary sibling, then renamed into place


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_file(out: Path, write: Callable[[Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's file is private; the export is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(out: Path, fill: Callable[[Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # replaced only once the new export is complete
        aside = out.with_name(f".{out.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
        tmp.rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(out)


def load_merged(run: Path):
    """(the run's causal LM with any LoRA adapter merged, in float32; its tokenizer)."""
    import torch
    from transformers import AutoTokenizer

    from finetune.models.adapters import merge_adapter

    task = run_task(run)
    try:
        model = task.load_trained(run, dtype=torch.float32)
    except TypeError:  # a task whose loader takes no options
        model = task.load_trained(run).float()
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise UserError("run: its base is loaded quantized (bitsandbytes), which cannot be merged exactly; export "
                        "a run trained on a full-precision base")
    if hasattr(model, "merge_and_unload"):
        model = merge_adapter(model)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise UserError(f"run: export writes causal language models; this run holds a {type(model).__name__}")
    return model.eval(), AutoTokenizer.from_pretrained(str(run))


def write_gguf(run: Path, model, tokenizer, out: Path, quant: str) -> dict:
    atomic_file(out, lambda tmp: gguf_writer.gguf_to(model, tokenizer, tmp, quant, run.resolve().name))
    return {"commands": [f"llama-cli -m {out} -cnv", f"llama-server -m {out}"]}


# ---------------------------------------------------------------------------------------
# Ollama


def write_ollama(run: Path, model, tokenizer, out: Path, quant: str) -> dict:
    name = re.sub(r"[^a-z0-9._-]+", "-", run.resolve().name.lower()).strip("-._") or "model"
    file = f"{name}.{quant}.gguf"
    modelfile, notes = ollama_modelfile(tokenizer, model.generation_config, file)

    def fill(tmp: Path) -> None:
        gguf_writer.gguf_to(model, tokenizer, tmp / file, quant, run.resolve().name)
        (tmp / "Modelfile").write_text(modelfile)

    atomic_dir(out, fill)
    return {"commands": [f"ollama create {name} -f {out / 'Modelfile'}", f"ollama run {name}"], "notes": notes}


# Turn layouts of the chat templates Ollama's syntax is written for here: (prefix, suffix) per role. A
# `system` of None folds the system prompt into the first user turn (Gemma).
LAYOUTS = {
    "chatml": {"system": ("<|im_start|>system\n", "<|im_end|>\n"), "user": ("<|im_start|>user\n", "<|im_end|>\n"),
               "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n")},
    "llama-3": {"system": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
                "user": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                "assistant": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")},
    "gemma": {"system": None, "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
              "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")},
}
PROBE = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Colour of the sky?"}]


def go_template(layout: dict) -> str:
    """The layout in Ollama's Go-template syntax: the system prompt, then user and assistant turns, and the
    assistant's prefix after the last user turn."""
    s, (u0, u1), (a0, a1) = layout["system"], layout["user"], layout["assistant"]
    head = "" if s is None else "{{- if .System }}" + s[0] + "{{ .System }}" + s[1] + "{{ end }}\n"
    fold = "{{ if and $.System (le $i 1) }}{{ $.System }}\n\n{{ end }}" if s is None else ""
    return (head + "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            '{{- if eq .Role "user" }}' + u0 + fold + "{{ .Content }}" + u1 + "{{ if $last }}" + a0 + "{{ end }}\n"
            '{{- else if eq .Role "assistant" }}' + a0 + "{{ .Content }}{{ if not $last }}" + a1 + "{{ end }}\n"
            "{{- end }}\n{{- end }}")


def ollama_render(layout: dict, system: str | None, messages: list[dict]) -> str:
    """What Ollama makes of `go_template(layout)` (its system messages gathered into .System, kept in .Messages)."""
    s, (u0, u1), (a0, a1) = layout["system"], layout["user"], layout["assistant"]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or system
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    out = s[0] + system + s[1] if s is not None and system else ""
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "user":
            fold = system + "\n\n" if s is None and system and i <= 1 else ""
            out += u0 + fold + m["content"] + u1 + (a0 if last else "")
        elif m["role"] == "assistant":
            out += a0 + m["content"] + ("" if last else a1)
    return out


def hf_render(tokenizer, messages: list[dict]) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the probe (no system role, ...)
        return None
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text  # llama.cpp adds the BOS token itself


def ollama_template(tokenizer) -> tuple[str, dict, str | None] | None:
    """(layout name, layout, default system prompt) whose Ollama rendering equals the chat template's on a probe
    conversation, or None."""
    template = tokenizer.chat_template or ""
    for name, layout in LAYOUTS.items():
        if layout["user"][0].split("user")[0] not in template:
            continue
        bare = [m for m in PROBE if m["role"] != "system"][:1]
        plain = hf_render(tokenizer, bare)
        default = None
        if plain is not None and layout["system"] and plain.startswith(layout["system"][0]):
            default = plain[len(layout["system"][0]):].split(layout["system"][1])[0]  # the template's own
        if ollama_render(layout, None, PROBE) == hf_render(tokenizer, PROBE) and \
                ollama_render(layout, default, bare) == plain:
            return name, layout, default
    return None


def ollama_modelfile(tokenizer, generation_config, gguf_file: str) -> tuple[str, list[str]]:
    """The Modelfile text and notes for the user."""
    from finetune.data.masks import end_of_turn_ids

    lines, notes = [f"FROM ./{gguf_file}", ""], []
    found = ollama_template(tokenizer) if tokenizer.chat_template else None
    if found:
        name, layout, default = found
        lines += [f"# the chat template ({name} layout) in Ollama's syntax", f'TEMPLATE """{go_template(layout)}"""']
        if default:
            lines.append(f'SYSTEM """{default}"""')
    elif tokenizer.chat_template:
        lines.append("# TEMPLATE: this model's chat template has no automatic Ollama form; write it by hand "
                     "(https://github.com/ollama/ollama/blob/main/docs/template.md)")
        notes.append("the Modelfile has no TEMPLATE: this chat template is not ChatML, Llama 3 or Gemma; write "
                     "TEMPLATE by hand")
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    for tid in end_of_turn_ids(tokenizer):
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(tid)}"')
    defaults = generation_config.to_diff_dict() if generation_config is not None else {}
    for key, param in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                       ("repetition_penalty", "repeat_penalty")):
        if defaults.get(key) is not None:
            lines.append(f"PARAMETER {param} {defaults[key]}")
    return "\n".join(lines) + "\n", notes


# ---------------------------------------------------------------------------------------
# vLLM


def write_vllm(run: Path, model, tokenizer, out: Path, quant: None) -> dict:
    """The merged model in the precision it was trained from, its tokenizer with the chat template, and a
    generation config whose eos ids end a turn (vLLM stops at them)."""
    import torch

    from finetune.data.masks import end_of_turn_ids

    config = run_config(run)
    dtype = getattr(config, "dtype", None) if config is not None else None
    if dtype in ("float16", "bfloat16", torch.float16, torch.bfloat16):
        model = model.to(getattr(torch, str(dtype).removeprefix("torch.")))
    if tokenizer.chat_template:
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    atomic_dir(out, fill)
    return {"commands": [f"vllm serve {out}"]}


def check_adapter(run: Path) -> dict:
    """The adapter's config, where vLLM's LoRA loader can take the adapter as it is."""
    from finetune.models.adapters import is_adapter_dir

    if not is_adapter_dir(run):
        raise UserError(f"--adapter: '{run}' holds no LoRA adapter (adapter_config.json); drop --adapter to export "
                        "the model")
    config = json.loads((run / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise UserError("--adapter: vLLM does not serve DoRA adapters; drop --adapter to export the merged model")
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        raise UserError("--adapter: this adapter trains whole modules or token rows (modules_to_save, trainable "
                        "tokens), which vLLM's LoRA loader does not load; drop --adapter to export the merged model")
    from safetensors import safe_open

    with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
        full = [k for k in f.keys() if "lora_" not in k]
    if full:
        raise UserError(f"--adapter: the adapter carries full weights ({full[0]}: new tokens' embeddings), which "
                        "vLLM's LoRA loader does not load; drop --adapter to export the merged model")
    return config


def write_adapter(run: Path, out: Path) -> dict:
    """adapter_config.json and adapter_model.safetensors (the layout vLLM's --lora-modules loads), and the
    tokenizer with its chat template."""
    config = check_adapter(run)

    def fill(tmp: Path) -> None:
        for f in run.iterdir():
            if f.is_file() and (f.name in ("adapter_config.json", "adapter_model.safetensors") or
                                f.name.startswith(TOKENIZER_FILES)):
                shutil.copy2(f, tmp / f.name)

    atomic_dir(out, fill)
    base, rank = config.get("base_model_name_or_path"), int(config.get("r") or 8)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.resolve().name)
    rank_flag = f" --max-lora-rank {rank}" if rank > 16 else ""  # vLLM's default limit is 16
    return {"commands": [f"vllm serve {base} --enable-lora --lora-modules {name}={out}{rank_flag}"],
            "notes": [f"base model: {base}; requests name the adapter as model \"{name}\""]}
