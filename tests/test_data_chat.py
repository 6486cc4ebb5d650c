"""Chat masks token by token: ChatML, a Llama-3-style template with BOS, system prompts, several turns,
prompt/completion data plain and conversational; row checks; templates that break the prefix property."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from finetune.data import chat, masks, templates
from finetune.errors import UserError
from finetune.recipe.sections import DataSpec


@pytest.fixture(scope="module")
def chatml_tok(tiny_gpt):
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    assert templates.set_template(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    return tok


def with_bos(tok):
    """Make the tokenizer add BOS in front of every text, as Llama tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="$A $B",
                                                              special_tokens=[("<|begin_of_text|>", bos)])
    assert tok("the cat")["input_ids"][0] == bos
    return tok


@pytest.fixture(scope="module")
def llama_tok(tiny_gpt):
    tok = with_bos(AutoTokenizer.from_pretrained(tiny_gpt))
    templates.set_template(tok, "llama-3")
    return tok


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Hand-written segmentation: (text, trained) pieces tokenized one by one."""
    ids, labels = [], []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [-100] * len(part)
    return ids, labels


U, A, S = ({"role": r, "content": c} for r, c in (("user", "where did the red cat sit?"),
                                                   ("assistant", "on the mat."), ("system", "be brief.")))
U2, A2 = {"role": "user", "content": "and the dog?"}, {"role": "assistant", "content": "on the roof."}


def test_chatml_single_turn(chatml_tok):
    ids, labels = masks.tokenize_chat(chatml_tok, [U, A], "assistant")
    prompt = "<|im_start|>user\nwhere did the red cat sit?<|im_end|>\n<|im_start|>assistant\n"
    want = expected(chatml_tok, [(prompt, False), ("on the mat.<|im_end|>", True), ("\n", False)])
    assert (ids, labels) == want
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t, lab in zip(ids, labels) if lab != -100][-1] == im_end  # the model learns to stop


def test_chatml_system_and_several_turns(chatml_tok):
    msgs = [S, U, A, U2, A2]
    head = "<|im_start|>system\nbe brief.<|im_end|>\n<|im_start|>user\nwhere did the red cat sit?<|im_end|>\n"
    turn2 = "\n<|im_start|>user\nand the dog?<|im_end|>\n<|im_start|>assistant\n"
    pieces = [(head + "<|im_start|>assistant\n", False), ("on the mat.<|im_end|>", True), (turn2, False),
              ("on the roof.<|im_end|>", True), ("\n", False)]
    assert masks.tokenize_chat(chatml_tok, msgs, "assistant") == expected(chatml_tok, pieces)
    # last_assistant and completion train the final answer only; all trains every token
    last = [(head + "<|im_start|>assistant\non the mat.<|im_end|>" + turn2, False),
            ("on the roof.<|im_end|>", True), ("\n", False)]
    assert masks.tokenize_chat(chatml_tok, msgs, "last_assistant") == expected(chatml_tok, last)
    assert masks.tokenize_chat(chatml_tok, msgs, "completion") == expected(chatml_tok, last)
    ids, labels = masks.tokenize_chat(chatml_tok, msgs, "all")
    assert labels == ids


def test_llama3_style_template_with_bos_and_headers(llama_tok):
    ids, labels = masks.tokenize_chat(llama_tok, [S, U, A, U2, A2], "assistant")
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    pieces = [("<|begin_of_text|>" + h.format("system") + "be brief.<|eot_id|>" + h.format("user")
               + "where did the red cat sit?<|eot_id|>" + h.format("assistant"), False),
              ("on the mat.<|eot_id|>", True),
              (h.format("user") + "and the dog?<|eot_id|>" + h.format("assistant"), False),
              ("on the roof.<|eot_id|>", True)]
    assert (ids, labels) == expected(llama_tok, pieces)
    assert ids.count(llama_tok.bos_token_id) == 1 and ids[0] == llama_tok.bos_token_id  # no double BOS
    eot = llama_tok.convert_tokens_to_ids("<|eot_id|>")
    assert masks.end_of_turn_ids(llama_tok) == sorted({llama_tok.eos_token_id, eot})


def test_conversational_prompt_completion_trains_the_completion_only(chatml_tok):
    spec = DataSpec()
    row = {"prompt": [S, U, A, U2], "completion": [A2]}  # a few-shot answer inside the prompt
    assert chat.row_problems(row, "prompt_completion", spec, "row 1") == []
    msgs, n_prompt = chat.to_messages(row, "prompt_completion", spec)
    assert n_prompt == 4
    got = masks.tokenize_chat(chatml_tok, msgs, "assistant", n_prompt)
    assert got == masks.tokenize_chat(chatml_tok, msgs, "last_assistant")
    assert masks.tokenize_chat(chatml_tok, msgs, "completion", n_prompt) == got
    trained = [t for t, lab in zip(*got) if lab != -100]
    assert chatml_tok.decode(trained) == "on the roof.<|im_end|>"


def test_plain_prompt_completion_matches_generation_tokenization(llama_tok):
    ids, labels = masks.tokenize_prompt_completion(llama_tok, "question: where is the cat? answer:", " on the mat.",
                                                  "assistant")
    prompt_ids = llama_tok("question: where is the cat? answer:")["input_ids"]  # what generate feeds the model
    assert prompt_ids[0] == llama_tok.bos_token_id and ids[:len(prompt_ids)] == prompt_ids
    completion = llama_tok(" on the mat.", add_special_tokens=False)["input_ids"] + [llama_tok.eos_token_id]
    assert ids == prompt_ids + completion
    assert labels == [-100] * len(prompt_ids) + completion
    assert masks.tokenize_prompt_completion(llama_tok, "a", " b", "all")[1] == masks.tokenize_prompt_completion(
        llama_tok, "a", " b", "all")[0]


def test_template_that_rewrites_earlier_turns_is_refused(tiny_gpt):
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    # drops the content of earlier assistant turns (as reasoning templates drop past thoughts)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[a]"
                         "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="the prefix property fails"):
        masks.tokenize_chat(tok, [U, A, U2, A2], "assistant")


def test_template_by_name_or_file_and_missing_template(tiny_gpt, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    with pytest.raises(UserError, match="the model's tokenizer has no chat template; set data.chat_template"):
        templates.set_template(tok, None)
    with pytest.raises(UserError, match="'chatmll' is not a built-in template"):
        templates.set_template(tok, "chatmll")
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert templates.set_template(tok, str(path)) == []
    assert templates.render(tok, [U]) == "user: where did the red cat sit?\n"


def test_row_problems_name_row_and_fix():
    spec = DataSpec()
    rows = [
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
    ]
    assert chat.check_rows(rows, "messages", spec, "data.train") == [
        "data.train row 1: messages turn 1 has unknown role 'human'; use one of system, user, assistant, tool",
        "data.train row 2: messages turn 1 has empty content; remove the turn or fill it",
        "data.train row 3: messages turn 1 has content of type int; content must be a string",
        "data.train row 4: the conversation ends with a 'user' turn; end it with the assistant's answer "
        "(the turn that is trained)",
        "data.train row 5: a text row in a messages file (mixed formats); keep one format per file",
    ]


def test_sharegpt_conversations_are_mapped():
    spec = DataSpec()
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert chat.detect_format(["conversations"], spec) == "conversations"
    assert chat.to_messages(row, "conversations", spec) == ([{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}], 0)
    bad = {"conversations": [{"from": "robot", "value": "hi"}]}
    assert chat.row_problems(bad, "conversations", spec, "row 2")[0].startswith(
        "row 2: conversations turn 1 has unknown 'from' 'robot'")


def test_format_detection():
    spec = DataSpec()
    assert chat.detect_format(["messages", "id"], spec) == "messages"
    assert chat.detect_format(["prompt", "completion"], spec) == "prompt_completion"
    assert chat.detect_format(["text"], spec) == "text"
    assert chat.detect_format(["messages", "text"], DataSpec(format="text")) == "text"
    with pytest.raises(UserError, match="data.format: messages data needs the column"):
        chat.detect_format(["text"], DataSpec(format="messages"))
    with pytest.raises(UserError, match="no column for any format; its columns are: body"):
        chat.detect_format(["body"], spec)


def test_show_mask_brackets_the_trained_tokens(chatml_tok):
    ids, labels = masks.tokenize_chat(chatml_tok, [U, A], "assistant")
    shown = masks.show_mask(chatml_tok, ids, labels, colour=False)
    assert shown.endswith("assistant\n[[on the mat.<|im_end|>]]\n")


def test_template_errors_are_user_errors(tiny_gpt):
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="the chat template refuses a conversation: System role not supported"):
        masks.tokenize_chat(tok, [S, U, A], "assistant")


def test_prompt_completion_rows_of_both_kinds_are_refused():
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": [U], "completion": [A]}, {"prompt": "", "completion": "x"}]
    assert chat.check_rows(rows, "prompt_completion", DataSpec(), "data.train") == [
        "data.train row 2: its prompt and completion are lists of messages, earlier rows' are plain strings; "
        "keep one kind per file",
        "data.train row 3: 'prompt' is empty or not a string; give it text",
    ]
