"""Tool calling end to end on a tiny Llama: it learns to call the right function with the right argument for
prompts it never saw, `validate` shows the mask and the loss by kind, and `generate --tools` prints the call
parsed."""

from __future__ import annotations

import json
import random
import re

import pytest
from chat_templates import jinja
from conftest import ANIMALS, COLORS, PLACES, invoke, write_jsonl
from test_tasks_clm import train

# ChatML with the tools' names in the system turn and Hermes-style <tool_call> blocks, short enough for a model
# with 128 positions.
TEMPLATE = jinja(
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "find", "parameters": {"type": "object", "properties": {
    "animal": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "paint", "parameters": {"type": "object", "properties": {
             "color": {"type": "string"}}}}}]


def request(kind: str, a: str, b: str) -> tuple[str, dict]:
    """(prompt, the call it asks for): find the animal, or paint with the colour."""
    if kind == "find":
        return f"find the {a} on the {b}", {"name": "find", "arguments": {"animal": a}}
    return f"paint the {b} {a}", {"name": "paint", "arguments": {"color": a}}


def combos() -> tuple[list, list]:
    """Every (kind, word, place), split so that held-out prompts pair words and places never seen together."""
    rng = random.Random(0)
    every = [("find", a, p) for a in ANIMALS for p in PLACES] + [("paint", c, p) for c in COLORS for p in PLACES]
    rng.shuffle(every)
    return every[12:], every[:12]


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    seen, _ = combos()
    out = []
    for _ in range(n):
        prompt, want = request(*rng.choice(seen))
        out.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": want}]}]})
    return out


MARKERS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def with_markers(model_dir: str, out) -> str:
    """A copy of the model whose tokenizer has the template's markers as single tokens, as chat models do."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(MARKERS, special_tokens=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tool_run(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    tiny_llama = with_markers(tiny_llama, tmp / "model")
    (tmp / "tools.jinja").write_text(TEMPLATE)
    data = write_jsonl(tmp / "calls.jsonl", rows(400, seed=0))
    out = tmp / "run"
    train(tiny_llama, data, out, method="full", steps=500, **{"data.chat_template": str(tmp / "tools.jinja"),
                                                             "data.max_length": 128,
                                                             "data.chat_template_kwargs.enable_thinking": "false"})
    (tmp / "tools.json").write_text(json.dumps(TOOLS))
    return out, tmp


def test_learns_to_call_the_right_function_with_the_right_argument_on_held_out_prompts(tool_run):
    from finetune.data.templates import parse_tool_calls
    from finetune.use.inference import answer_text, generate_ids, load_for_generation, prompt_ids

    out, _ = tool_run
    model, tokenizer, templated = load_for_generation(str(out))
    assert templated
    _, held_out = combos()
    right = 0
    for kind, a, b in held_out:
        prompt, want = request(kind, a, b)
        ids = prompt_ids(tokenizer, prompt, True, TOOLS)
        new = generate_ids(model, tokenizer, [ids], 60, 0.0, 1.0)[0]
        right += parse_tool_calls(answer_text(tokenizer, new, TOOLS)) == [want]
    assert right >= 0.75 * len(held_out), f"{right} of {len(held_out)} held-out calls right"


def test_generate_with_tools_prints_the_call_parsed(tool_run, monkeypatch):
    from finetune.data import templates

    out, tmp = tool_run
    assert json.loads((out / "chat.json").read_text())["chat_template_kwargs"] == {"enable_thinking": False}
    seen = []  # the run's template options reach every rendering of generate
    real = templates.render
    monkeypatch.setattr(templates, "render", lambda *a, **k: (seen.append(a[4] if len(a) > 4 else k.get("kwargs")),
                                                              real(*a, **k))[1])
    code, stdout, stderr = invoke("generate", out, "find the cat on the box", "--tools", tmp / "tools.json",
                                  "--temperature", "0", "--max-new-tokens", "60")
    assert code == 0, stderr
    assert json.loads(stdout) == {"tool_call": {"name": "find", "arguments": {"animal": "cat"}}}
    assert seen and all(k == {"enable_thinking": False} for k in seen)


def test_validate_shows_the_turn_mode_the_loss_by_kind_and_a_tool_example(tiny_gpt, tmp_path):
    (tmp_path / "tools.jinja").write_text(TEMPLATE)
    data = rows(20, seed=1)
    data[0]["messages"] += [{"role": "tool", "content": "on the box"},
                            {"role": "assistant", "content": "it is on the box."}]
    path = write_jsonl(tmp_path / "calls.jsonl", data)
    model = with_markers(tiny_gpt, tmp_path / "model")
    code, stdout, stderr = invoke("validate", "--model", model, "--data", path, "--set",
                                  f"data.chat_template={tmp_path / 'tools.jinja'}", "--set", "data.max_length=128")
    assert code == 0, stdout + stderr
    assert "turn mode (auto): all 20 conversations trained whole (one example each)" in stdout
    shares = next(line.strip() for line in stdout.splitlines() if line.strip().startswith("loss tokens: "))
    assert re.fullmatch(r"loss tokens: content \d+%, tool calls \d+%, markup \d+%", shares), shares
    assert "an example with tools, tool calls or reasoning, trained tokens in [[brackets]]:" in stdout
    assert ("<|im_start|>assistant\n    [[<tool_call>{\"name\": \"find\"" in stdout
            or "<|im_start|>assistant\n    [[<tool_call>{\"name\": \"paint\"" in stdout), stdout
    assert "</tool_call><|im_end|>]]\n    <|im_start|>tool\n    on the box<|im_end|>\n    <|im_start|>assistant\n" \
        "    [[it is on the box.<|im_end|>]]" in stdout, stdout
