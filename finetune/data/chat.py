"""Chat and instruction data for causal LMs: formats, chat templates, and the loss mask.

Formats (trl's names), detected from the columns or set with `data.format`:
  text               a `text` column: every token is trained (language modelling)
  prompt_completion  `prompt` and `completion` columns, plain strings or lists of messages
  messages           a `messages` column of {"role", "content"} turns
  conversations      ShareGPT: a `conversations` column of {"from", "value"} turns, mapped to messages

The mask. A conversation is rendered with the tokenizer's chat template once per turn boundary
(`apply_chat_template` on messages[:i], with the generation prompt before each assistant turn).
Every rendering's tokens must be a prefix of the whole conversation's tokens (the prefix property);
an assistant turn is then exactly the tokens between "prompt up to the generation prompt" and "prompt
plus that turn", less any whitespace after its end-of-turn token. Templates that rewrite earlier turns
(drop past reasoning, move the system prompt into the last user turn) break the property and are
refused. transformers' `return_assistant_tokens_mask` needs `{% generation %}` blocks, which almost no
shipped template has, so the incremental rendering is the general method; it works on any template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from finetune.errors import UserError

FORMATS = ("text", "prompt_completion", "messages", "conversations")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}

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
            problems = turn_problems(p, where, spec.prompt_column) + turn_problems(c, where, spec.completion_column)
            if not problems and any(m["role"] != "assistant" for m in c):
                problems.append(f"{where}: '{spec.completion_column}' may hold assistant turns only")
            return problems
        return [f"{where}: '{k}' is empty or not a string; give it text" for k, v in
                ((spec.prompt_column, p), (spec.completion_column, c)) if not (isinstance(v, str) and v.strip())]
    turns = row.get(cols[0])
    if fmt == "conversations":
        turns, problems = sharegpt_to_messages(turns, where)
        if problems:
            return problems
    problems = turn_problems(turns, where, cols[0])
    if not problems and turns[-1]["role"] != "assistant":
        problems.append(f"{where}: the conversation ends with a '{turns[-1]['role']}' turn; end it with the "
                        "assistant's answer (the turn that is trained)")
    return problems


def turn_problems(turns: Any, where: str, column: str) -> list[str]:
    if not isinstance(turns, list) or not turns:
        return [f"{where}: '{column}' must be a non-empty list of {{\"role\", \"content\"}} turns"]
    problems = []
    for j, m in enumerate(turns, 1):
        if not isinstance(m, dict):
            problems.append(f"{where}: {column} turn {j} is not a {{\"role\", \"content\"}} object")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"{where}: {column} turn {j} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"{where}: {column} turn {j} has content of type {type(content).__name__}; "
                            "content must be a string")
        elif not content.strip():
            problems.append(f"{where}: {column} turn {j} has empty content; remove the turn or fill it")
    return problems


def sharegpt_to_messages(turns: Any, where: str = "") -> tuple[list[dict], list[str]]:
    """ShareGPT {"from", "value"} turns as {"role", "content"} messages (human -> user, gpt -> assistant).
    Ours rather than trl's `maybe_convert_to_chatml`, which renames the keys but leaves 'human'/'gpt' as
    roles and reports nothing: here an unknown speaker is a problem named with its row and turn."""
    if not isinstance(turns, list):
        return [], [f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} turns"]
    out, problems = [], []
    for j, m in enumerate(turns, 1):
        source = m.get("from") if isinstance(m, dict) else None
        role = SHAREGPT_ROLES.get(source)
        if role is None:
            problems.append(f"{where}: conversations turn {j} has unknown 'from' {source!r}; use one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": m.get("value") if isinstance(m, dict) else None})
    return out, problems


def to_messages(row: dict, fmt: str, spec) -> tuple[list[dict], int]:
    """(messages, number of prompt messages) of one chat row; the prompt is never trained but with `all`."""
    if fmt == "prompt_completion":
        prompt = [dict(role=m["role"], content=m["content"]) for m in row[spec.prompt_column]]
        return prompt + [dict(role=m["role"], content=m["content"]) for m in row[spec.completion_column]], len(prompt)
    if fmt == "conversations":
        return sharegpt_to_messages(row["conversations"])[0], 0
    return [dict(role=m["role"], content=m["content"]) for m in row[spec.messages_column]], 0


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
    """Problems of every row (row numbers count from 1, as lines of the file), at most `limit` listed."""
    problems, first_kind = [], None
    for i, row in enumerate(rows, 1):
        found = row_problems(row, fmt, spec, f"{key} row {i}")
        if not found and fmt == "prompt_completion":  # one kind per file: the template is set once
            kind = "lists of messages" if is_chat(fmt, row, spec) else "plain strings"
            first_kind = first_kind or kind
            if kind != first_kind:
                found = [f"{key} row {i}: its prompt and completion are {kind}, earlier rows' are {first_kind}; "
                         "keep one kind per file"]
        problems += found
    if len(problems) > limit:
        problems = problems[:limit] + [f"{key}: ... and {len(problems) - limit} more problems"]
    return problems


# ---------------------------------------------------------------------------------------
# Templates


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


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # the template's own checks (roles must alternate, no system role, ...)
        raise UserError(f"data.chat_template: the chat template refuses a conversation: {e}; fix the data or "
                        "choose another template (data.chat_template)") from e


def encode(tokenizer, text: str) -> list[int]:
    """Rendered chat text to ids: the template writes BOS itself, so no special tokens are added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    return ids


def trim_after_end_of_turn(ids: list[int], start: int, end: int, specials: set[int], tokenizer) -> int:
    """The end of an assistant span without the whitespace a template writes after its end-of-turn token
    (ChatML's newline after <|im_end|>): the model never generates it, since generation stops there."""
    last = max((j for j in range(start, end) if ids[j] in specials), default=None)
    if last is not None and last + 1 < end and not tokenizer.decode(ids[last + 1:end]).strip():
        return last + 1
    return end


def tokenize_chat(tokenizer, messages: list[dict], train_on: str, n_prompt: int = 0,
                  specials: set[int] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside the trained spans."""
    specials = special_ids(tokenizer) if specials is None else specials
    full = encode(tokenizer, render(tokenizer, messages))

    def boundary(k: int, generation_prompt: bool) -> int:
        ids = encode(tokenizer, render(tokenizer, messages[:k], generation_prompt)) if k else []
        if full[:len(ids)] != ids:
            raise UserError(
                f"data.chat_template: the template renders the first {k} turns differently once the conversation "
                "goes on (the prefix property fails), so the tokens of each answer cannot be found exactly; "
                "use a template that leaves earlier turns unchanged (data.chat_template: chatml, or a Jinja file)")
        return len(ids)

    if train_on == "all":
        return full, list(full)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= n_prompt]
    if train_on == "last_assistant":
        assistants = assistants[-1:]
    labels = [-100] * len(full)
    if train_on == "completion":
        start = boundary(n_prompt or assistants[-1], True)
        spans = [(start, trim_after_end_of_turn(full, start, len(full), specials, tokenizer))]
    else:
        spans = []
        for i in assistants:
            start, end = boundary(i, True), boundary(i + 1, False)
            spans.append((start, trim_after_end_of_turn(full, start, end, specials, tokenizer)))
    for start, end in spans:
        labels[start:end] = full[start:end]
    return full, labels


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, train_on: str) -> tuple[list[int], list[int]]:
    """Plain prompt/completion: the prompt tokenized as `generate` tokenizes a prompt (BOS included), then
    the completion and eos; trained on the completion (and eos) unless `train_on` is `all`."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = p + c
    return ids, (list(ids) if train_on == "all" else [-100] * len(p) + c)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under the tokenizer's template (eos included), for generation."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if tokenizer.chat_template:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            full, labels = tokenize_chat(tokenizer, probe, "assistant")
            trained = [t for t, lab in zip(full, labels) if lab != -100]
            ids.update(t for t in trained[-1:] if t in special_ids(tokenizer))
        except Exception:  # a template that cannot render the probe: eos alone
            pass
    return sorted(ids)


def show_mask(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """The text of one example with the trained tokens marked: green on a terminal, [[...]] otherwise."""
    out, inside = [], False
    for t, lab in zip(ids, labels):
        trained = lab != -100
        if trained != inside:
            out.append(("\033[32m" if trained else "\033[0m") if colour else ("[[" if trained else "]]"))
            inside = trained
        out.append(tokenizer.decode([t]))
    if inside:
        out.append("\033[0m" if colour else "]]")
    return "".join(out)
