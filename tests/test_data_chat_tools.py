"""Conversations of 2026, masks token by token: tool calls (one and a parallel pair), tool results, reasoning
trained and masked, templates that drop past reasoning (expanded, one example per answer), `train: false`;
row checks for tools; ShareGPT function calls; generated tool calls read back."""

from __future__ import annotations

import json

import pytest
from chat_templates import HERMES, HERMES_TOKENS, LLAMA31, LLAMA31_TOKENS, QWEN3, QWEN3_TOKENS, with_template
from test_data_chat import expected
from transformers import AutoTokenizer

from finetune.data import chat, masks, templates
from finetune.errors import UserError
from finetune.recipe.sections import DataSpec


@pytest.fixture(scope="module")
def hermes(tiny_gpt):
    return with_template(AutoTokenizer.from_pretrained(tiny_gpt), HERMES, HERMES_TOKENS)


@pytest.fixture(scope="module")
def llama31(tiny_gpt):
    return with_template(AutoTokenizer.from_pretrained(tiny_gpt), LLAMA31, LLAMA31_TOKENS)


@pytest.fixture(scope="module")
def qwen3(tiny_gpt):
    return with_template(AutoTokenizer.from_pretrained(tiny_gpt), QWEN3, QWEN3_TOKENS)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOLS = [WEATHER]
TOOLS_JSON = json.dumps(WEATHER)


def call(city, as_string=False):
    args = {"city": city}
    return {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args) if as_string else args}}


U = {"role": "user", "content": "weather in paris and rome?"}
PAIR = {"role": "assistant", "content": None, "tool_calls": [call("paris", as_string=True), call("rome")]}
R1, R2 = {"role": "tool", "name": "get_weather", "content": "sunny"}, {"role": "tool", "content": "rain"}
FINAL = {"role": "assistant", "content": "paris is sunny, rome rainy."}
HERMES_SYSTEM = ("<|im_start|>system\n# Tools\n\nYou may call functions. Their signatures:\n<tools>\n" + TOOLS_JSON
                 + "\n</tools>\nAnswer a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n")


def hermes_call(city):
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "' + city + '"}}\n</tool_call>'


def test_hermes_parallel_calls_and_results(hermes):
    ids, labels = masks.tokenize_chat(hermes, [U, PAIR, R1, R2, FINAL], "assistant", tools=TOOLS)
    pieces = [(HERMES_SYSTEM + "<|im_start|>user\nweather in paris and rome?<|im_end|>\n<|im_start|>assistant\n", False),
              (hermes_call("paris") + "\n" + hermes_call("rome") + "<|im_end|>", True),
              ("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n"
               "</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
              ("paris is sunny, rome rainy.<|im_end|>", True), ("\n", False)]
    assert (ids, labels) == expected(hermes, pieces)


def test_hermes_one_call_with_text_and_the_loss_shares(hermes):
    one = {"role": "assistant", "content": "let me look.", "tool_calls": [call("paris")]}
    (example,), mode = masks.chat_examples(hermes, [U, one, R1, FINAL], "assistant", tools=TOOLS, kinds=True)
    assert mode == "whole"
    pieces = [(HERMES_SYSTEM + "<|im_start|>user\nweather in paris and rome?<|im_end|>\n<|im_start|>assistant\n", False),
              ("let me look.\n" + hermes_call("paris") + "<|im_end|>", True),
              ("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
              ("paris is sunny, rome rainy.<|im_end|>", True), ("\n", False)]
    assert (example["input_ids"], example["labels"]) == expected(hermes, pieces)
    kinds = [k for k in example["kinds"] if k]
    assert kinds.count("content") == len(hermes("let me look.")["input_ids"]) + len(
        hermes("paris is sunny, rome rainy.")["input_ids"])
    assert kinds.count("markup") == 2  # the two <|im_end|>
    assert kinds.count("tool calls") == len(kinds) - kinds.count("content") - 2 > 0


def test_llama31_call_as_the_answer_and_ipython_results(llama31):
    one = {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "paris"}'}]}
    ids, labels = masks.tokenize_chat(llama31, [U, one, R1, FINAL], "assistant", tools=TOOLS)
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    pieces = [("<|endoftext|>" + h.format("user") + 'Given the following functions, answer with one JSON call '
               '{"name": ..., "parameters": ...}.\n\n' + TOOLS_JSON + "\n\nweather in paris and rome?<|eot_id|>"
               + h.format("assistant"), False),
              ('{"name": "get_weather", "parameters": {"city": "paris"}}<|eot_id|>', True),
              (h.format("ipython") + "sunny<|eot_id|>" + h.format("assistant"), False),
              ("paris is sunny, rome rainy.<|eot_id|>", True)]
    assert (ids, labels) == expected(llama31, pieces)


Q = [{"role": "user", "content": "the red cat?"}, {"role": "assistant", "reasoning_content": "a cat.", "content": "mat"},
     {"role": "user", "content": "the dog?"}, {"role": "assistant", "reasoning_content": "a dog.", "content": "roof"},
     {"role": "user", "content": "the bird?"}, {"role": "assistant", "reasoning_content": "a bird.", "content": "tree"}]


def test_qwen3_three_turns_expand_into_three_examples(qwen3):
    examples, mode = masks.chat_examples(qwen3, Q, "assistant")
    assert mode == "expanded" and len(examples) == 3
    history = ""
    for k, (q, r, a) in enumerate([("the red cat?", "a cat.", "mat"), ("the dog?", "a dog.", "roof"),
                                   ("the bird?", "a bird.", "tree")]):
        prompt = history + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        want = expected(qwen3, [(prompt, False), (f"<think>\n{r}\n</think>\n\n{a}<|im_end|>", True), ("\n", False)])
        assert (examples[k]["input_ids"], examples[k]["labels"]) == want, k
        history = prompt + f"{a}<|im_end|>\n"  # earlier answers lose their reasoning, as the template renders them
    with pytest.raises(UserError, match="prefix property fails.*data.turn_mode: expand"):
        masks.chat_examples(qwen3, Q, "assistant", mode="whole")
    single, mode = masks.chat_examples(qwen3, Q[:2], "assistant")
    assert mode == "whole" and single[0]["labels"] == examples[0]["labels"]  # one answer: nothing to expand


def test_qwen3_reasoning_masked_while_the_answer_trains(qwen3):
    (example,), _ = masks.chat_examples(qwen3, Q[:2], "assistant", train_on_reasoning=False, kinds=True)
    want = expected(qwen3, [("<|im_start|>user\nthe red cat?<|im_end|>\n<|im_start|>assistant\n", False),
                            ("<think>\n", True), ("a cat.", False), ("\n</think>\n\nmat<|im_end|>", True), ("\n", False)])
    assert (example["input_ids"], example["labels"]) == want
    assert "reasoning" not in example["kinds"]
    (trained,), _ = masks.chat_examples(qwen3, Q[:2], "assistant", kinds=True)
    assert trained["kinds"].count("reasoning") == len(qwen3("a cat.", add_special_tokens=False)["input_ids"])


def test_turns_marked_train_false_are_context(qwen3, hermes):
    context = dict(Q[1], train=False)
    examples, _ = masks.chat_examples(qwen3, [Q[0], context, *Q[2:4]], "assistant")
    assert len(examples) == 1  # only the second answer trains
    assert qwen3.decode([t for t, lab in zip(examples[0]["input_ids"], examples[0]["labels"]) if lab != -100]) == \
        "<think>\na dog.\n</think>\n\nroof<|im_end|>"
    ids, labels = masks.tokenize_chat(hermes, [U, dict(PAIR, weight=0), R1, R2, FINAL], "assistant", tools=TOOLS)
    assert hermes.decode([t for t, lab in zip(ids, labels) if lab != -100]) == "paris is sunny, rome rainy.<|im_end|>"


def test_chat_template_kwargs_reach_every_rendering(qwen3):
    off = {"enable_thinking": False}
    prompt = templates.render(qwen3, Q[:1], True, kwargs=off)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not templates.render(qwen3, Q[:1], True).endswith("</think>\n\n")


def test_templates_that_would_drop_reasoning_or_calls_are_refused(tiny_gpt):
    chatml = AutoTokenizer.from_pretrained(tiny_gpt)
    templates.set_template(chatml, "chatml")
    with pytest.raises(UserError, match="does not render the assistant's reasoning, so it would be dropped"):
        masks.chat_examples(chatml, Q[:2], "assistant")
    with pytest.raises(UserError, match="does not render tool_calls, so the call to 'get_weather' would be dropped"):
        masks.chat_examples(chatml, [U, dict(PAIR, content="checking."), R1, FINAL], "assistant")
    with pytest.raises(UserError, match="does not render the row's tools"):
        masks.chat_examples(chatml, [U, FINAL], "assistant", tools=TOOLS)


def test_bad_tool_rows_are_named_with_row_and_turn(capsys):
    spec = DataSpec()
    bad_json = {"messages": [U, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": paris}'}}]}, R1, FINAL]}
    orphan = {"messages": [U, R1, FINAL]}
    unknown = {"tools": TOOLS, "messages": [U, {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_wether", "arguments": {}}}]}, R1, FINAL]}
    nameless = {"tools": json.dumps([{"type": "function", "function": {"description": "x"}}]), "messages": [U, FINAL]}
    assert chat.check_rows([bad_json, orphan, unknown, nameless], "messages", spec, "data.train") == [
        "data.train row 1: messages turn 2 tool call 1 ('get_weather'): arguments are not valid JSON (Expecting "
        "value at character 9); give an object or a JSON string of one",
        "data.train row 2: messages turn 2 is a tool result with no tool call before it; put the assistant turn "
        "that calls the tool (its tool_calls) first",
        "data.train row 4: tools item 1 has no 'name'; write each tool as {\"type\": \"function\", \"function\": "
        "{\"name\": ..., \"description\": ..., \"parameters\": {...}}}",
    ]
    assert capsys.readouterr().out == (
        "warning: data.train row 3: messages turn 2 tool call 1 calls 'get_wether', which is not among the row's "
        "tools (get_weather) (did you mean 'get_weather'?) (data.strict_tools: true makes this an error)\n")
    strict = chat.check_rows([unknown], "messages", DataSpec(strict_tools=True), "data.train")
    assert strict == ["data.train row 1: messages turn 2 tool call 1 calls 'get_wether', which is not among the "
                      "row's tools (get_weather) (did you mean 'get_weather'?); fix the call or the tools"]
    good = {"tools": TOOLS_JSON.join("[]"), "messages": [U, PAIR, R1, R2, FINAL]}
    assert chat.check_rows([good], "messages", spec, "data.train") == []


def test_sharegpt_function_call_and_observation():
    row = {"tools": TOOLS_JSON.join("[]"), "conversations": [
        {"from": "human", "value": "weather in paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "paris"}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "sunny."}]}
    spec = DataSpec()
    assert chat.row_problems(row, "conversations", spec, "row 1") == []
    messages, _ = chat.to_messages(row, "conversations", spec)
    assert messages == [{"role": "user", "content": "weather in paris?"},
                        {"role": "assistant", "content": None,
                         "tool_calls": [{"name": "get_weather", "arguments": {"city": "paris"}}]},
                        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny."}]
    assert chat.row_tools(row, spec)[0] == TOOLS


def test_rows_loaded_by_datasets_lose_the_nulls_it_adds(hermes):
    """datasets unifies the calls' arguments of all rows into one struct: {"city": "paris", "animal": None}."""
    unified = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris", "animal": None}}}]}
    text = templates.render(hermes, [U, unified], tools=[dict(WEATHER, extra=None)])
    assert '"animal"' not in text and '"extra"' not in text and '{"city": "paris"}' in text


def test_generated_tool_calls_are_read_back():
    assert templates.parse_tool_calls(hermes_call("paris") + "\n" + hermes_call("rome")) == [
        {"name": "get_weather", "arguments": {"city": "paris"}}, {"name": "get_weather", "arguments": {"city": "rome"}}]
    assert templates.parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "rome"}}') == [
        {"name": "get_weather", "arguments": {"city": "rome"}}]
    assert templates.parse_tool_calls("it is sunny.") is None
    assert templates.parse_tool_calls("<tool_call>\n{\"name\": broken}\n</tool_call>") is None


def test_mask_report_says_which_conversations_expand_and_what_it_costs(qwen3):
    spec = DataSpec()
    convs = [(Q, 0, None), (Q[:2], 0, None)]
    lines = masks.mask_report(qwen3, convs, spec, colour=False)
    examples, _ = masks.chat_examples(qwen3, Q, "assistant")
    tokens = sum(len(e["input_ids"]) for e in examples)
    once = len(templates.encode(qwen3, templates.render(qwen3, Q)))
    assert lines[0] == (f"turn mode (auto): 1 conversations trained whole, 1 expanded into 3 examples (one per answer: "
                        f"their template rewrites earlier turns), which hold {tokens:,} tokens against {once:,} "
                        f"rendered once (x{tokens / once:.2f})")
    assert lines[1].startswith("loss tokens: content ") and "reasoning" in lines[1]
    masked = masks.mask_report(qwen3, convs, DataSpec(train_on_reasoning=False), colour=False)
    assert " reasoning " not in masked[1] and masked[1].endswith("(data.train_on_reasoning: false)")
