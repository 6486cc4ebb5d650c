"""Using a finished run: load it, generate text, merge a LoRA adapter into its base."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.load import read_recipe_file
from finetune.recipe.schema import Recipe
from finetune.recipe.tasks import load_task


def run_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run directory was made with, or None for a plain model directory."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    return Recipe.model_validate(read_recipe_file(path))


def run_task(run_dir: Path, default: str = "clm"):
    recipe = run_recipe(run_dir)
    return load_task(recipe.task if recipe else default)


def check_model_dir(path: Path, key: str) -> None:
    if not path.is_dir():
        raise UserError(f"{key}: no such directory '{path}'")
    markers = ("config.json", "adapter_config.json")
    if not any((path / m).exists() for m in markers):
        if (path / "recipe.yaml").exists():
            from finetune.training.rundir import killed_reason, status

            if status(path) == "killed":
                raise UserError(f"{key}: {killed_reason(path)}; it holds no trained model: continue it with "
                                f"--resume -o {path} (from its last checkpoint, if it saved one)")
            raise UserError(f"{key}: run '{path}' holds no trained model yet (interrupted?); "
                            f"continue it with --resume -o {path}")
        raise UserError(f"{key}: '{path}' holds no model (no config.json or adapter_config.json)")


def load_for_generation(source: str):
    """(model in eval mode, tokenizer, chat): a run directory, a model directory, a GGUF file or a Hub id.
    `chat`: prompts are rendered with the chat template: the run was trained on conversations or
    conversational prompt/completion data (its `chat.json`), or a model that is not a finetune run (an
    instruct model, a merged run) has a chat template."""
    from transformers import AutoTokenizer

    from finetune.models.gguf import is_gguf, plain_model
    from finetune.models.pretrained import check_source

    if is_gguf(source):  # a GGUF file: its converted plain folder
        source = plain_model(source, None, "model")
    path = Path(source)
    if path.exists() or source.startswith((".", "/", "~")):
        check_model_dir(path, "model")
        model = for_inference(run_task(path).load_trained(path))
        tok_source = str(path)
    else:
        tok_source = check_source(source, "model")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tok_source)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    chat = (path / "chat.json").is_file() or (not (path / "recipe.yaml").is_file() and bool(tokenizer.chat_template))
    return model.eval(), tokenizer, chat


def for_inference(model):
    """A LoRA run's adapter folded into its base, in memory: the same outputs as the adapter on its base, at the
    base's speed. Unmerged, every adapted layer runs three more small matmuls per token, which in batched
    decoding (one token per step) tripled the time of SmolLM2-135M's answers (BENCHMARKS.md). A quantized base
    stays unmerged (merging into 4-bit weights rounds them)."""
    from finetune.models.adapters import merge_adapter

    if not hasattr(model, "merge_and_unload") or getattr(model, "is_loaded_in_4bit", False) or \
            getattr(model, "is_loaded_in_8bit", False) or getattr(model.config, "quantization_config", None):
        return model
    return merge_adapter(model)


def prompt_ids(tokenizer, prompt: str | list[dict], templated: bool, tools: list | None = None,
               kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt, exactly as training tokenized it: rendered with the chat template (a string
    becomes one user message), the tools and the template options, and the generation prompt; or plain text
    with the tokenizer's special tokens."""
    from finetune.data import templates

    if isinstance(prompt, list) or templated or tools:
        if not tokenizer.chat_template:
            raise UserError("prompt: messages need a chat template, and this model's tokenizer has none")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return templates.encode(tokenizer, templates.render(tokenizer, messages, True, tools, kwargs))
    return tokenizer(prompt)["input_ids"]


def template_kwargs(source: str) -> dict | None:
    """The run's data.chat_template_kwargs (its chat.json), rendered with every prompt as in training."""
    import json

    path = Path(source) / "chat.json"
    return json.loads(path.read_text()).get("chat_template_kwargs") if path.is_file() else None


def read_tools(path: Path | None) -> list | None:
    """--tools FILE: a JSON list of function schemas (as a row's `tools`)."""
    import json

    from finetune.data.templates import tool_name

    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--tools: cannot read '{path}' as JSON ({e}); give a JSON list of tools") from None
    if not isinstance(tools, list) or not tools or any(tool_name(t) is None for t in tools):
        raise UserError(f"--tools: '{path}' must be a JSON list of tools, each "
                        '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
    return tools


def shown_answer(text: str, tools: list | None) -> str:
    """An answer as printed: a tool call as parsed JSON ({"name", "arguments"}, one per line) when the text is
    one in a known format (and tools were offered), otherwise the text."""
    import json

    from finetune.data.templates import parse_tool_calls

    calls = parse_tool_calls(text) if tools else None
    return "\n".join(json.dumps({"tool_call": c}) for c in calls) if calls else text


def generate_ids(model, tokenizer, batch: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 streamer=None) -> list[list[int]]:
    """New tokens for each prompt (left-padded together), cut at the first end-of-turn token."""
    import torch

    from finetune.data.masks import end_of_turn_ids

    stops = end_of_turn_ids(tokenizer)
    longest = max(map(len, batch))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in batch], device=model.device)
    attention = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, pad_token_id=pad, eos_token_id=stops, streamer=streamer)
    new = []
    for row in out[:, longest:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        new.append(row[:cut])
    return new


def generate_text(source: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int, raw: bool = False, tools: list | None = None) -> str:
    """The prompt continued (plain runs, or `raw`), or the assistant's answer (runs trained on chat data, or
    given `tools`), a tool call shown as parsed JSON."""
    from transformers import set_seed

    model, tokenizer, templated = load_for_generation(source)
    templated = (templated or bool(tools)) and not raw
    set_seed(seed)
    ids = prompt_ids(tokenizer, prompt, templated, tools, template_kwargs(source))
    if not ids:  # no BOS to start from, and no text
        raise UserError("prompt: empty; give some text to continue, for example finetune generate RUN \"Once upon a time\"")
    new = generate_ids(model, tokenizer, [ids], max_new_tokens, temperature, top_p)[0]
    if templated:
        return shown_answer(answer_text(tokenizer, new, tools), tools)
    return tokenizer.decode(ids + new, skip_special_tokens=True)


def answer_text(tokenizer, new: list[int], tools: list | None) -> str:
    """A generated answer as text; with tools, added tokens such as <tool_call> stay, so that a call is read."""
    if not tools:
        return tokenizer.decode(new, skip_special_tokens=True)
    specials = set(tokenizer.all_special_ids)
    return tokenizer.decode([t for t in new if t not in specials], skip_special_tokens=False)


def generate_file(source: str, data: Path, output: Path, batch_size: int, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int, raw: bool = False, tools: list | None = None) -> dict:
    """One JSON line per row of `data` (`prompt` strings or `messages` conversations, each with its own `tools`
    or `tools` for all) with the generated text (and `tool_calls`, parsed, where it is one), in batches of
    prompts of similar length. Returns rows, new tokens and seconds."""
    from finetune.data.templates import parse_tool_calls

    import json
    import time

    from transformers import set_seed

    rows = read_prompts(data)
    model, tokenizer, templated = load_for_generation(source)
    kwargs = template_kwargs(source)
    offered = [r.get("tools") or tools for r in rows]
    templated = templated and not raw
    set_seed(seed)
    encoded = [prompt_ids(tokenizer, r.get("messages") or r.get("prompt"), templated, t, kwargs)
               for r, t in zip(rows, offered)]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))  # less padding per batch
    answers: dict[int, list[int]] = {}
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        for i, new in zip(chunk, generate_ids(model, tokenizer, [encoded[i] for i in chunk], max_new_tokens,
                                              temperature, top_p)):
            answers[i] = new
    seconds = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as f:
        for i, row in enumerate(rows):
            text = answer_text(tokenizer, answers[i], offered[i])
            calls = parse_tool_calls(text) if offered[i] else None
            f.write(json.dumps({**row, "generated": text} | ({"tool_calls": calls} if calls else {})) + "\n")
    return {"rows": len(rows), "new_tokens": sum(map(len, answers.values())), "seconds": seconds}


def read_prompts(data: Path) -> list[dict]:
    import json

    if not data.is_file():
        raise UserError(f"--data: no such file '{data}'")
    rows, problems = [], []
    for n, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"--data '{data}' line {n}: not JSON ({e.msg})")
            continue
        prompt = row.get("messages") or row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            problems.append(f"--data '{data}' line {n}: needs a 'prompt' string or a 'messages' list")
            continue
        rows.append(row)
    if problems:
        raise UserError(problems)
    if not rows:
        raise UserError(f"--data: '{data}' has no rows")
    return rows


def chat_loop(read, write, greeting: str, system: str | None, respond, reset, command=None) -> None:
    """The terminal chat every kind of run shares: lines are read until `/quit` or EOF; `/reset` calls `reset`
    (the caller's history), `/system TEXT` sets the system prompt; `command(line)` takes lines of its own (True
    when it did); any other line goes to `respond(line, system)`, which answers it and keeps the history."""
    write(greeting)
    while True:
        try:
            line = read("you: ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            reset()
            write("(history cleared)")
        elif line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            write("(system prompt set)" if system else "(system prompt removed)")
        elif command is None or not command(line):
            respond(line, system)


def chat_session(source: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 system: str | None = None, read=input, write=print, tools: list | None = None) -> None:
    """An interactive chat: the template applied to the whole history, answers streamed as they are
    generated, `/reset` clears the history, `/system TEXT` sets the system prompt, `/quit` or EOF ends."""
    from transformers import TextStreamer, set_seed

    from finetune.models.pretrained import context_length

    model, tokenizer, _ = load_for_generation(source)
    if not tokenizer.chat_template:
        raise UserError(f"model: '{source}' has no chat template; train it on conversations (data.format: messages) "
                        "or use `finetune generate` for plain text")
    set_seed(seed)
    kwargs = template_kwargs(source)
    limit = (context_length(model.config) or 2048) - max_new_tokens
    history: list[dict] = []

    def respond(line: str, system: str | None) -> None:
        if not line:
            return
        history.append({"role": "user", "content": line})
        head = [{"role": "system", "content": system}] if system else []
        ids = prompt_ids(tokenizer, head + history, True, tools, kwargs)
        while len(ids) > limit and len(history) > 2:  # forget the oldest exchange when the context is full
            del history[:2]
            ids = prompt_ids(tokenizer, head + history, True, tools, kwargs)
        write("assistant: ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        new = generate_ids(model, tokenizer, [ids], max_new_tokens, temperature, top_p, streamer=streamer)[0]
        text = answer_text(tokenizer, new, tools).strip()
        if tools and shown_answer(text, tools) != text:  # a tool call: shown again, parsed
            write(shown_answer(text, tools))
        history.append({"role": "assistant", "content": text})

    chat_loop(read, write, "chat: /system TEXT sets the system prompt, /reset clears the history, /quit ends",
              system, respond, history.clear)


def merge_run(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Merge the run's LoRA adapter into its base (in full precision) and save a plain model."""
    from finetune.models.adapters import is_adapter_dir, merge_adapter

    check_model_dir(run_dir, "run")
    if not is_adapter_dir(run_dir):
        raise UserError(f"run: '{run_dir}' holds no LoRA adapter (adapter_config.json); it is already a plain model")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"--output: '{out_dir}' is not empty; pass --overwrite or choose another directory")
        if not (out_dir / "config.json").exists():
            raise UserError(f"--output: '{out_dir}' is not empty and holds no model; choose another directory")
        shutil.rmtree(out_dir)
    model = run_task(run_dir).load_trained(run_dir)
    merged = merge_adapter(model)
    if (run_dir / "chat.json").is_file():  # plain transformers `generate` then stops at the end of a turn
        from transformers import AutoTokenizer

        from finetune.data.masks import end_of_turn_ids

        merged.generation_config.eos_token_id = end_of_turn_ids(AutoTokenizer.from_pretrained(str(run_dir)),
                                                                template_kwargs(str(run_dir)))
    merged.save_pretrained(str(out_dir))
    for f in run_dir.iterdir():  # tokenizer / processor files travel with the model
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "preprocessor", "processor", "spiece",
                              "chat", "added_tokens")):
            shutil.copy2(f, out_dir / f.name)
    return out_dir
