"""Chat and instruction data for causal LMs: formats, conversations as the chat template takes them, and the
checks of every row.

Formats (trl's names), detected from the columns or set with `data.format`:
  text               a `text` column: every token is trained (language modelling)
  prompt_completion  `prompt` and `completion` columns, plain strings or lists of messages
  messages           a `messages` column of {"role", "content"} turns
  conversations      ShareGPT: a `conversations` column of {"from", "value"} turns, mapped to messages

Conversations as in 2026: roles system, user, assistant and tool; an assistant turn may carry `tool_calls`
(with or without content) and its reasoning (`reasoning_content`, or `thinking`); a tool turn carries a result
(`name`, `tool_call_id`); a row may carry `tools` (function schemas, or a JSON string of them; data.tools_column).
ShareGPT's `function_call` turns become assistant tool calls and `observation` turns tool results. The loss mask
is finetune/data/masks.py's; templates and rendering are finetune/data/templates.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from finetune.data.templates import REASONING_KEYS, call_arguments, call_name, tool_name
from finetune.errors import UserError, did_you_mean

FORMATS = ("text", "prompt_completion", "messages", "conversations")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
CALL_SHAPE = '[{"type": "function", "function": {"name": ..., "arguments": {...}}}]'

# ---------------------------------------------------------------------------------------
# Formats


def detect_format(columns: list[str], spec, source: str | None = None, key: str = "data.train") -> str:
    """The data format of a dataset with these columns, from `data.format` or the column names. `key`:
    how messages name the source (a source of a mixture, data.train.1, has fields of its own)."""
    fields = "data" if key in ("data.train", "data.eval") else key
    if spec.format != "auto":
        missing = [c for c in format_columns(spec.format, spec) if c not in columns]
        if missing:
            raise UserError(f"{fields}.format: {spec.format} data needs the column(s) {', '.join(missing)}; the data "
                            f"has: {', '.join(columns)}. Rename them or set the {fields}.*_column names")
        return spec.format
    if spec.messages_column in columns:
        return "messages"
    if "conversations" in columns:
        return "conversations"
    if spec.prompt_column in columns and spec.completion_column in columns:
        return "prompt_completion"
    if spec.text_column in columns:
        return "text"
    raise UserError(f"{key} '{source or spec.train}': no column for any format; its columns are: "
                    f"{', '.join(columns)}. Provide '{spec.text_column}' (plain text), '{spec.prompt_column}' and "
                    f"'{spec.completion_column}', or '{spec.messages_column}' (role/content turns); or set "
                    f"{fields}.text_column, {fields}.prompt_column, {fields}.completion_column or "
                    f"{fields}.messages_column to yours")


def format_columns(fmt: str, spec) -> list[str]:
    return {"text": [spec.text_column], "prompt_completion": [spec.prompt_column, spec.completion_column],
            "messages": [spec.messages_column], "conversations": ["conversations"]}[fmt]


def is_chat(fmt: str, row: dict | None = None, spec=None) -> bool:
    """Whether rows of this format are rendered with a chat template (plain prompt/completion is not)."""
    if fmt in ("messages", "conversations"):
        return True
    if fmt == "prompt_completion" and row is not None:
        return isinstance(row.get(spec.prompt_column), list)
    return False


def row_problems(row: dict, fmt: str, spec, where: str) -> list[str]:
    """Everything wrong with one row of data in format `fmt`, one line per problem."""
    if has_images(row):
        from finetune.data.vision_rows import TAKES_IMAGES

        return [f"{where}: an image row (images, or image items in the messages), and this task trains on text "
                f"only; train images with --task vlm on a vision-language model ({TAKES_IMAGES})"]
    cols = format_columns(fmt, spec)
    if all(row.get(c) is None for c in cols):
        others = [f for f in FORMATS if f != fmt and all(row.get(c) is not None for c in format_columns(f, spec))]
        if others:
            return [f"{where}: a {others[0]} row in a {fmt} file (mixed formats); keep one format per file"]
        return [f"{where}: no '{cols[0]}'; every row needs {' and '.join(repr(c) for c in cols)}"]
    if fmt == "text":
        t = row.get(spec.text_column)
        return [] if isinstance(t, str) and t.strip() else [f"{where}: empty text; remove the row"]
    if fmt == "prompt_completion":
        p, c = row.get(spec.prompt_column), row.get(spec.completion_column)
        if isinstance(p, list) != isinstance(c, list):
            return [f"{where}: '{spec.prompt_column}' and '{spec.completion_column}' must both be strings or both "
                    "lists of messages"]
        if isinstance(p, list):
            tools, problems = row_tools(row, spec, where)
            problems += (turn_problems(p, where, spec.prompt_column, tools, spec.strict_tools)
                         + turn_problems(c, where, spec.completion_column, tools, spec.strict_tools))
            if not errors(problems) and any(m["role"] != "assistant" for m in c):
                problems.append(f"{where}: '{spec.completion_column}' may hold assistant turns only")
            return problems
        return [f"{where}: '{k}' is empty or not a string; give it text" for k, v in
                ((spec.prompt_column, p), (spec.completion_column, c)) if not (isinstance(v, str) and v.strip())]
    turns = row.get(cols[0])
    if fmt == "conversations":
        turns, problems = sharegpt_to_messages(turns, where)
        if problems:
            return problems
    tools, problems = row_tools(row, spec, where)
    problems += turn_problems(turns, where, cols[0], tools, spec.strict_tools)
    if not errors(problems) and turns[-1]["role"] != "assistant":
        problems.append(f"{where}: the conversation ends with a '{turns[-1]['role']}' turn; end it with the "
                        "assistant's answer (the turn that is trained)")
    return problems


def has_images(row: dict) -> bool:
    """Whether a row carries images: an `images`/`image` field, or image items in its turns' content."""
    if row.get("images") or row.get("image"):
        return True
    turns = row.get("messages") or row.get("conversations")
    return isinstance(turns, list) and any(
        isinstance(t, dict) and isinstance(t.get("content"), list)
        and any(isinstance(i, dict) and i.get("type") == "image" for i in t["content"]) for t in turns)


def errors(problems: list[str]) -> list[str]:
    return [p for p in problems if not p.startswith("warning: ")]


def turn_problems(turns: Any, where: str, column: str, tools: list | None = None, strict_tools: bool = False
                  ) -> list[str]:
    """Problems of a conversation's turns; with the row's `tools`, a call to a function not among them is a
    warning (a line starting "warning:"), or a problem with `strict_tools`."""
    if not isinstance(turns, list) or not turns:
        return [f"{where}: '{column}' must be a non-empty list of {{\"role\", \"content\"}} turns"]
    problems, calls_open = [], 0
    names = {n for n in (tool_name(t) for t in tools or []) if n}
    for j, m in enumerate(turns, 1):
        at = f"{where}: {column} turn {j}"
        if not isinstance(m, dict):
            problems.append(f"{at} is not a {{\"role\", \"content\"}} object")
            continue
        role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
        if role not in ROLES:
            problems.append(f"{at} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if role == "assistant" and calls:
            problems += call_problems(calls, at, names, strict_tools)
            calls_open = len(calls) if isinstance(calls, list) else 0
        elif role == "tool":
            if calls_open <= 0:
                problems.append(f"{at} is a tool result with no tool call before it; put the assistant turn that "
                                "calls the tool (its tool_calls) first")
            calls_open -= 1
        elif role in ROLES:
            calls_open = 0
        if calls and role != "assistant":
            problems.append(f"{at}: only assistant turns make tool calls; remove its tool_calls")
        if content is None and role == "assistant" and calls:
            pass  # a tool call without text
        elif not isinstance(content, str):
            problems.append(f"{at} has content of type {type(content).__name__}; content must be a string")
        elif not content.strip() and not (role == "assistant" and calls):
            problems.append(f"{at} has empty content; remove the turn or fill it")
        for key in REASONING_KEYS:
            if m.get(key) is not None and (role != "assistant" or not isinstance(m[key], str)):
                problems.append(f"{at}: '{key}' must be a string on an assistant turn")
        if "train" in m and not isinstance(m["train"], bool):
            problems.append(f"{at}: 'train' must be true or false")
        if "weight" in m and (isinstance(m["weight"], bool) or m["weight"] not in (0, 1)):
            problems.append(f"{at}: 'weight' must be 0 (context only) or 1 (trained)")
    return problems


def call_problems(calls: Any, at: str, names: set[str], strict: bool) -> list[str]:
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return [f"{at}: tool_calls must be a list of calls, {CALL_SHAPE}"]
    problems = []
    for k, call in enumerate(calls, 1):
        name, args = call_name(call), call_arguments(call)
        if not isinstance(name, str) or not name:
            problems.append(f"{at} tool call {k} has no function name; write it as {CALL_SHAPE}")
            continue
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                problems.append(f"{at} tool call {k} ('{name}'): arguments are not valid JSON ({e.msg} at "
                                f"character {e.pos}); give an object or a JSON string of one")
                continue
        if not isinstance(args, dict):
            problems.append(f"{at} tool call {k} ('{name}'): arguments must be an object, not "
                            f"{type(args).__name__}")
        if names and name not in names:
            line = (f"{at} tool call {k} calls '{name}', which is not among the row's tools "
                    f"({', '.join(sorted(names))}){did_you_mean(name, names)}")
            problems.append(line + "; fix the call or the tools" if strict else
                            "warning: " + line + " (data.strict_tools: true makes this an error)")
    return problems


def row_tools(row: dict, spec, where: str = "") -> tuple[list | None, list[str]]:
    """(the row's tools, problems): a list of function schemas, or a JSON string of one; each needs a name."""
    tools = row.get(spec.tools_column)
    if tools is None or tools == "" or tools == []:
        return None, []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            return None, [f"{where}: '{spec.tools_column}' is not valid JSON ({e.msg}); give a list of tools"]
    shape = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
    if not isinstance(tools, list):
        return None, [f"{where}: '{spec.tools_column}' must be a list of tools, each {shape}"]
    problems = [f"{where}: {spec.tools_column} item {k} has no 'name'; write each tool as {shape}"
                for k, t in enumerate(tools, 1) if tool_name(t) is None]
    return (None if problems else tools), problems


def sharegpt_to_messages(turns: Any, where: str = "") -> tuple[list[dict], list[str]]:
    """ShareGPT {"from", "value"} turns as {"role", "content"} messages (human -> user, gpt -> assistant,
    function_call -> an assistant tool call, observation -> a tool result). Ours rather than trl's
    `maybe_convert_to_chatml`, which renames the keys but leaves 'human'/'gpt' as roles and reports nothing:
    here an unknown speaker is a problem named with its row and turn."""
    if not isinstance(turns, list):
        return [], [f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} turns"]
    out, problems = [], []
    for j, m in enumerate(turns, 1):
        source = m.get("from") if isinstance(m, dict) else None
        role = SHAREGPT_ROLES.get(source)
        value = m.get("value") if isinstance(m, dict) else None
        if role is None:
            problems.append(f"{where}: conversations turn {j} has unknown 'from' {source!r}; use one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if source == "function_call":  # the value is the call: {"name", "arguments"}, as JSON
            try:
                call = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError as e:
                problems.append(f"{where}: conversations turn {j} (function_call) is not valid JSON ({e.msg}); "
                                'write it as {"name": ..., "arguments": {...}}')
                call = None
            calls = call if isinstance(call, list) else [call] if isinstance(call, dict) else []
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
            continue
        out.append({"role": role, "content": value})
    return out, problems


MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", *REASONING_KEYS, "train", "weight")


def to_messages(row: dict, fmt: str, spec) -> tuple[list[dict], int]:
    """(messages, number of prompt messages) of one chat row; the prompt is never trained but with `all`."""
    def kept(turns):  # datasets gives every turn every key another turn has (None where absent)
        return [{k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None or k == "content"} for m in turns]

    if fmt == "prompt_completion":
        prompt = kept(row[spec.prompt_column])
        return prompt + kept(row[spec.completion_column]), len(prompt)
    if fmt == "conversations":
        return kept(sharegpt_to_messages(row["conversations"])[0]), 0
    return kept(row[spec.messages_column]), 0


def read_rows(ds, source: str | None) -> Iterator[dict]:
    """The rows of a data source as Python objects, one at a time (a large file is never held whole);
    local JSON Lines files are read line by line, so that rows with mixed types (which `datasets`
    cannot load) are still checked one by one."""
    path = Path(source).expanduser() if source else None
    if path is not None and path.is_file() and path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield {}
        return
    if ds is not None:
        yield from ds


def check_rows(rows: Iterable[dict], fmt: str, spec, key: str, limit: int = 20) -> list[str]:
    """Problems of every row (row numbers count from 1, as lines of the file), at most `limit` listed; warnings
    (calls to functions a row's tools lack) are printed, the first `limit` of them."""
    problems, warnings, first_kind = [], [], None
    for i, row in enumerate(rows, 1):
        found = row_problems(row, fmt, spec, f"{key} row {i}")
        warnings += [w for w in found if w.startswith("warning: ")]
        found = errors(found)
        if not found and fmt == "prompt_completion":  # one kind per file: the template is set once
            kind = "lists of messages" if is_chat(fmt, row, spec) else "plain strings"
            first_kind = first_kind or kind
            if kind != first_kind:
                found = [f"{key} row {i}: its prompt and completion are {kind}, earlier rows' are {first_kind}; "
                         "keep one kind per file"]
        problems += found
    for w in warnings[:limit]:
        print(w, flush=True)
    if len(warnings) > limit:
        print(f"warning: {key}: ... and {len(warnings) - limit} more calls to functions not in their row's tools",
              flush=True)
    if len(problems) > limit:
        problems = problems[:limit] + [f"{key}: ... and {len(problems) - limit} more problems"]
    return problems
