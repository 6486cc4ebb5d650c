"""Chat templates: the built-in ones, rendering a conversation (tools, tool calls, reasoning and the template's
own options included), and reading a generated tool call back.

A conversation reaches the template in the shape transformers documents for `apply_chat_template`: messages of
`role` (system, user, assistant, tool) and `content`; an assistant's `tool_calls` as
`[{"type": "function", "function": {"name", "arguments": {...}}}]` with the arguments as an object (templates
write them with `tojson`); a tool result's `name` / `tool_call_id`; the assistant's reasoning under the key the
template reads (`reasoning_content`, as Qwen3 and DeepSeek-R1 distills, or `thinking`, as gpt-oss); the row's
`tools` as the `tools` argument; and `data.chat_template_kwargs` (say `enable_thinking: false`) as keyword
arguments of every rendering, in training, `validate`, `generate` and `chat` alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from finetune.errors import UserError

# Built-in templates for base models without one, with the special tokens each needs.
TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
               ["<|im_start|>", "<|im_end|>"]),
    "llama-3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
                ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
                "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}", []),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
              ["<start_of_turn>", "<end_of_turn>"]),
    "phi": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
            ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}
TEMPLATES["qwen"] = TEMPLATES["chatml"]
TEMPLATES["llama3"] = TEMPLATES["llama-3"]

REASONING_KEYS = ("reasoning_content", "thinking")  # what rows may carry; the template reads one of them


def set_template(tokenizer, name: str | None) -> list[str]:
    """Give the tokenizer the chat template `name` (built-in or Jinja file), or check it has its own.
    Returns the special tokens that had to be added (their embedding rows are new and must train)."""
    if name is None:
        if not tokenizer.chat_template:
            raise UserError("data.chat_template: the model's tokenizer has no chat template; set data.chat_template "
                            f"to one of {', '.join(sorted(TEMPLATES))} or a Jinja file path")
        return []
    if name in TEMPLATES:
        template, needed = TEMPLATES[name]
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template: '{name}' is not a built-in template ({', '.join(sorted(TEMPLATES))}) "
                            "nor a Jinja file")
        template, needed = path.read_text(), []
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    missing = [t for t in needed if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def reasoning_key(tokenizer) -> str | None:
    """The message key under which the tokenizer's template reads an assistant's reasoning, or None when it
    reads none (reasoning given to it would be dropped)."""
    template = tokenizer.chat_template or ""
    template = template if isinstance(template, str) else json.dumps(template)
    return next((k for k in REASONING_KEYS if k in template), None)


def reasoning_of(message: dict) -> str | None:
    return next((message[k] for k in REASONING_KEYS if isinstance(message.get(k), str) and message[k]), None)


def call_arguments(call: dict) -> Any:
    """A tool call's arguments as given: `function.arguments` (OpenAI), or a flat call's `arguments` /
    `parameters` (ShareGPT function_call, Llama 3.1)."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return fn.get("arguments", fn.get("parameters", {}))


def call_name(call: dict) -> Any:
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return fn.get("name")


def tool_name(tool) -> str | None:
    """A tool schema's function name: `function.name` (OpenAI) or a flat `name`."""
    if not isinstance(tool, dict):
        return None
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    return fn.get("name") if isinstance(fn.get("name"), str) else None


def without_nulls(value: Any) -> Any:
    """A JSON value without null object members. Loading rows with `datasets` unifies every row's objects into
    one struct type, so a call's arguments gain every other call's keys as nulls ({"city": "Paris",
    "animal": null}); the template would write them. A null argument given on purpose is lost with them."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def template_message(message: dict, key: str | None) -> dict:
    """One message as the template expects it: content a string (empty beside tool calls), tool calls in the
    OpenAI shape with their arguments parsed from JSON, the reasoning under the template's key; our own
    per-turn fields (`train`, `weight`) left out."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            args = call_arguments(call)
            calls.append({"type": "function", "function": {
                "name": call_name(call), "arguments": json.loads(args) if isinstance(args, str) else without_nulls(args)}})
        out["tool_calls"] = calls
    for k in ("name", "tool_call_id"):
        if message.get(k) is not None:
            out[k] = message[k]
    reasoning = reasoning_of(message)
    if reasoning is not None and key is not None:
        out[key] = reasoning
    return out


def render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list | None = None,
           kwargs: dict | None = None) -> str:
    from jinja2 import TemplateError

    key = reasoning_key(tokenizer)
    shaped = [template_message(m, key) for m in messages]
    try:
        return tokenizer.apply_chat_template(shaped, tools=without_nulls(tools) or None, tokenize=False,
                                             add_generation_prompt=generation_prompt, **(kwargs or {}))
    except TemplateError as e:  # the template's own checks (roles must alternate, no system role, ...)
        raise UserError(f"data.chat_template: the chat template refuses a conversation: {e}; fix the data or "
                        "choose another template (data.chat_template)") from e


def encode(tokenizer, text: str, offsets: bool = False):
    """Rendered chat text to ids (with `offsets`: and each token's character span): the template writes BOS
    itself, so no special tokens are added."""
    if not offsets:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    return ids


# ---------------------------------------------------------------------------------------
# Generated tool calls

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str) -> list[dict] | None:
    """The tool calls in a generated answer as [{"name", "arguments"}], or None when it holds none in a known
    format: Hermes / Qwen2.5 `<tool_call>{json}</tool_call>` blocks, or a Llama-3.1-style answer that is one
    JSON object (after an optional `<|python_tag|>`) with `name` and `parameters` or `arguments`."""
    blocks = _HERMES.findall(text) if "<tool_call>" in text else [text.strip().removeprefix("<|python_tag|>")]
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        calls.append({"name": obj["name"], "arguments": args})
    return calls or None
