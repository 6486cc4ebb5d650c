"""The loss mask of a conversation: exactly the assistant's tokens, found by rendering, never by guessing.

A conversation is rendered with the chat template once per turn boundary (`apply_chat_template` on
messages[:i], with the generation prompt before each assistant turn). When every such rendering's tokens are a
prefix of the whole conversation's tokens (the prefix property), an assistant turn is exactly the tokens between
"the prompt up to the generation prompt" and "the prompt plus that turn", less any whitespace after its
end-of-turn token; the conversation is one example that trains every assistant turn ("whole").

Templates that rewrite earlier turns (Qwen3 and DeepSeek-R1 distills drop past reasoning, others move the
system prompt) break the property. Such a conversation of k trained assistant turns becomes k examples
("expanded"): example i is the conversation up to assistant turn i, rendered as the template renders it when
that turn is the last, and trains that turn only. Its mask is exact by construction: the prompt's rendering is
checked to be a prefix of the example's, per example. `data.turn_mode: auto` (the default) expands exactly the
conversations that break the property; `whole` refuses them instead, `expand` expands every conversation.

Within a trained turn, the reasoning (`reasoning_content` / `thinking`) trains unless
`data.train_on_reasoning: false`; its tokens are the ones whose characters overlap the reasoning text in the
rendering. Tool results, system and user turns never train; an assistant turn with `"train": false` (or
`"weight": 0`) is context only. transformers' `return_assistant_tokens_mask` needs `{% generation %}` blocks,
which almost no shipped template has, so the rendering method is the general one: it works on any template.
"""

from __future__ import annotations

from finetune.data.templates import call_name, encode, reasoning_of, render, special_ids, tool_name
from finetune.errors import UserError

TURN_MODES = ("auto", "whole", "expand")
KINDS = ("content", "reasoning", "tool calls", "markup")  # what the trained tokens are, for `validate`


class NotPrefix(Exception):
    """The rendering of the first `turns` messages is not a prefix of the whole conversation's."""

    def __init__(self, turns: int):
        super().__init__(turns)
        self.turns = turns


def trains(message: dict) -> bool:
    """Whether an assistant turn carries loss: not with `"train": false` or `"weight": 0`."""
    return message.get("train", True) is not False and message.get("weight", 1) != 0


def trim_after_end_of_turn(ids: list[int], start: int, end: int, specials: set[int], tokenizer) -> int:
    """The end of an assistant span without the whitespace a template writes after its end-of-turn token
    (ChatML's newline after <|im_end|>): the model never generates it, since generation stops there."""
    last = max((j for j in range(start, end) if ids[j] in specials), default=None)
    if last is not None and last + 1 < end and not tokenizer.decode(ids[last + 1:end]).strip():
        return last + 1
    return end


def chat_examples(tokenizer, messages: list[dict], train_on: str, n_prompt: int = 0, specials: set[int] | None = None,
                  tools: list | None = None, kwargs: dict | None = None, mode: str = "auto",
                  train_on_reasoning: bool = True, kinds: bool = False) -> tuple[list[dict], str]:
    """(examples, "whole" or "expanded") of one conversation; each example has `input_ids` and `labels` (-100
    outside the trained tokens) and, with `kinds`, the kind of each trained token (KINDS; None elsewhere)."""
    specials = special_ids(tokenizer) if specials is None else specials

    def rendered(msgs: list[dict], generation_prompt: bool = False) -> str:
        return render(tokenizer, msgs, generation_prompt, tools, kwargs) if msgs else ""

    if train_on == "all":
        ids = encode(tokenizer, rendered(messages))
        return [{"input_ids": ids, "labels": list(ids)}], "whole"
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= n_prompt and trains(m)]
    if train_on == "last_assistant":
        turns = turns[-1:]
    detail = kinds or bool(tools) or any(reasoning_of(m) or m.get("tool_calls") for m in messages)
    if mode != "expand":
        text = rendered(messages)
        ids, offsets = encode(tokenizer, text, offsets=True) if detail else (encode(tokenizer, text), None)

        def boundary(k: int, generation_prompt: bool) -> int:
            prefix = encode(tokenizer, rendered(messages[:k], generation_prompt))
            if ids[:len(prefix)] != prefix:
                raise NotPrefix(k)
            return len(prefix)

        try:
            if train_on == "completion":  # conversational prompt/completion: everything after the prompt
                start = boundary(n_prompt or turns[-1], True)
                spans = [(start, len(ids), len(messages) - 1)]
            else:
                spans = [(boundary(i, True), boundary(i + 1, False), i) for i in turns]
        except NotPrefix as e:
            if mode == "whole":
                raise UserError(
                    f"data.chat_template: the template renders the first {e.turns} turns differently once the "
                    "conversation goes on (the prefix property fails), so the tokens of each answer cannot be found "
                    "in one rendering; set data.turn_mode: expand (one example per answer) or auto") from None
        else:
            example = labelled(tokenizer, messages, text, ids, offsets, spans, specials, tools, train_on_reasoning,
                               kinds)
            return [example], "whole"
    examples = []
    for i in turns:  # expanded: each answer in the rendering where it is the last turn
        text = rendered(messages[:i + 1])
        ids, offsets = encode(tokenizer, text, offsets=True) if detail else (encode(tokenizer, text), None)
        prompt = encode(tokenizer, rendered(messages[:i], True))
        if ids[:len(prompt)] != prompt:
            raise UserError(
                f"turn {i + 1}: the chat template renders the prompt differently once the answer follows it, even "
                "as the last turn, so the answer's tokens cannot be found exactly; use another template "
                "(data.chat_template)")
        examples.append(labelled(tokenizer, messages, text, ids, offsets, [(len(prompt), len(ids), i)], specials,
                                 tools if not examples else None, train_on_reasoning, kinds))
    return examples, "expanded"


def labelled(tokenizer, messages, text, ids, offsets, spans, specials, tools, train_on_reasoning, kinds) -> dict:
    """One example's labels from its trained spans: the reasoning masked out on request, each span checked to
    hold the reasoning and tool calls its message gave (a template that drops them is refused)."""
    labels = [-100] * len(ids)
    kind: list[str | None] | None = [None] * len(ids) if kinds else None
    if tools and offsets is not None:
        names = [n for n in (tool_name(t) for t in tools) if n]
        first = offsets[spans[0][0]][0] if spans and spans[0][0] < len(offsets) else len(text)
        if names and not any(n in text[:first] for n in names):
            raise UserError("the chat template does not render the row's tools (none of their names is in the "
                            "prompt), so the model would be trained to call tools it was never shown; use a "
                            "template that renders tools (data.chat_template)")
    for start, end, i in spans:
        end = trim_after_end_of_turn(ids, start, end, specials, tokenizer)
        labels[start:end] = ids[start:end]
        if offsets is None or start >= end:
            continue
        message = messages[i]
        lo, hi = offsets[start][0], offsets[end - 1][1]
        turn_text = text[lo:hi]
        reasoning = reasoning_of(message)
        r_lo = r_hi = -1
        if reasoning:
            at = turn_text.find(reasoning.strip())
            if at < 0:
                raise UserError(f"turn {i + 1}: the chat template does not render the assistant's reasoning, so it "
                                "would be dropped from training; use a template that renders `reasoning_content` "
                                "(data.chat_template), or leave the reasoning out of the data")
            r_lo, r_hi = lo + at, lo + at + len(reasoning.strip())
        for call in message.get("tool_calls") or []:
            if str(call_name(call)) not in turn_text:
                raise UserError(f"turn {i + 1}: the chat template does not render tool_calls, so the call to "
                                f"'{call_name(call)}' would be dropped from training; use a template that renders "
                                "tools (data.chat_template)")
        content = (message.get("content") or "").strip()
        c_at = turn_text.find(content, max(r_hi - lo, 0)) if content else -1
        c_lo, c_hi = (lo + c_at, lo + c_at + len(content)) if c_at >= 0 else (-1, -1)
        for j in range(start, end):
            a, b = offsets[j]
            in_reasoning = a < r_hi and b > r_lo
            if in_reasoning and not train_on_reasoning:
                labels[j] = -100
            if kind is not None and labels[j] != -100:
                kind[j] = ("reasoning" if in_reasoning else "content" if a < c_hi and b > c_lo
                           else "tool calls" if message.get("tool_calls") and ids[j] not in specials else "markup")
    example = {"input_ids": ids, "labels": labels}
    if kind is not None:
        example["kinds"] = kind
    return example


def tokenize_chat(tokenizer, messages: list[dict], train_on: str, n_prompt: int = 0, specials: set[int] | None = None,
                  tools: list | None = None, kwargs: dict | None = None, train_on_reasoning: bool = True
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation as one example (the prefix property must hold)."""
    (example,), _ = chat_examples(tokenizer, messages, train_on, n_prompt, specials, tools, kwargs, "whole",
                                  train_on_reasoning)
    return example["input_ids"], example["labels"]


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, train_on: str) -> tuple[list[int], list[int]]:
    """Plain prompt/completion: the prompt tokenized as `generate` tokenizes a prompt (BOS included), then
    the completion and eos; trained on the completion (and eos) unless `train_on` is `all`."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = p + c
    return ids, (list(ids) if train_on == "all" else [-100] * len(p) + c)


def end_of_turn_ids(tokenizer, kwargs: dict | None = None) -> list[int]:
    """Token ids that end an assistant turn under the tokenizer's template (eos included), for generation."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if tokenizer.chat_template:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            full, labels = tokenize_chat(tokenizer, probe, "assistant", kwargs=kwargs)
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


def mask_report(tokenizer, conversations: list[tuple[list[dict], int, list | None]], spec, colour: bool
                ) -> list[str]:
    """`validate`'s lines on conversations (messages, prompt turns, tools): which turn mode they get and what
    expanding costs in tokens, the share of loss tokens by kind, and one example with its trained tokens
    marked (one with tool calls, tool results or reasoning, when there is one)."""
    whole = expanded = examples = expanded_tokens = whole_tokens = 0
    by_kind = dict.fromkeys(KINDS, 0)
    shown, shown_rich = None, False
    for messages, n_prompt, tools in conversations:
        found, mode = chat_examples(tokenizer, messages, spec.train_on, n_prompt, None, tools,
                                    spec.chat_template_kwargs, spec.turn_mode, spec.train_on_reasoning, kinds=True)
        if mode == "whole":
            whole += 1
        else:
            expanded += 1
            examples += len(found)
            expanded_tokens += sum(len(e["input_ids"]) for e in found)
            whole_tokens += len(encode(tokenizer, render(tokenizer, messages, False, tools, spec.chat_template_kwargs)))
        for e in found:
            for k in e.get("kinds") or []:
                if k is not None:
                    by_kind[k] += 1
        rich = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" or reasoning_of(m) for m in messages)
        if found and (shown is None or (rich and not shown_rich)):
            shown, shown_rich = found[-1], rich
    lines = []
    if expanded:
        lines.append(f"turn mode ({spec.turn_mode}): {whole} conversations trained whole, {expanded} expanded into "
                     f"{examples} examples (one per answer: their template rewrites earlier turns), which hold "
                     f"{expanded_tokens:,} tokens against {whole_tokens:,} rendered once "
                     f"(x{expanded_tokens / max(1, whole_tokens):.2f})")
    else:
        lines.append(f"turn mode ({spec.turn_mode}): all {whole} conversations trained whole (one example each)")
    total = sum(by_kind.values())
    if total:
        lines.append("loss tokens: " + ", ".join(f"{k} {v / total:.0%}" for k, v in by_kind.items() if v)
                     + ("" if spec.train_on_reasoning else " (data.train_on_reasoning: false)"))
    if shown is not None:
        lines.append(("an example with tools, tool calls or reasoning" if shown_rich else "the first example")
                     + ", trained tokens " + ("in green:" if colour else "in [[brackets]]:"))
        lines.append("  " + show_mask(tokenizer, shown["input_ids"], shown["labels"], colour).rstrip("\n")
                     .replace("\n", "\n    "))
    return lines
