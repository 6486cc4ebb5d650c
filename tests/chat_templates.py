"""Chat templates for the tests, written from the published descriptions of three formats:

HERMES   Qwen2.5 / Hermes style: ChatML; the tools listed as JSON inside <tools></tools> in the system turn;
         each call a <tool_call>{"name": ..., "arguments": {...}}</tool_call> block after the answer's text;
         consecutive tool results grouped in one user turn, each in <tool_response></tool_response>.
LLAMA31  Llama 3.1 style: header tokens; the tools given in the first user turn; a call is the whole answer,
         one JSON object {"name": ..., "parameters": {...}}; a result is an `ipython` turn.
QWEN3    Qwen3 style: ChatML with reasoning in <think></think> before the answer, written only for the answers
         after the last user message (earlier answers lose theirs); `enable_thinking=false` gives an empty
         <think> block in the generation prompt.
"""

def jinja(template: str) -> str:
    """transformers renders with trim_blocks (the newline after a block tag is dropped): such newlines are
    written as expressions, which it keeps."""
    return template.replace("%}\n", "%}{{ '\\n' }}")


HERMES = jinja(
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call functions. Their signatures:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nAnswer a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}\n"
    "<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}{% if m.content or not loop.first %}\n{% endif %}"
    "<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HERMES_TOKENS = ["<|im_start|>", "<|im_end|>"]

LLAMA31 = jinja(
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set head = '<|start_header_id|>' + ('ipython' if m.role == 'tool' else m.role) + '<|end_header_id|>\n\n' %}"
    "{% if m.role == 'user' and loop.index0 == (1 if messages[0].role == 'system' else 0) and tools %}"
    "{{ head }}Given the following functions, answer with one JSON call {\"name\": ..., \"parameters\": ...}.\n\n"
    "{% for tool in tools %}{{ tool | tojson }}\n\n{% endfor %}{{ m.content }}<|eot_id|>"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{{ head }}{% for call in m.tool_calls %}"
    "{\"name\": \"{{ call.function.name }}\", \"parameters\": {{ call.function.arguments | tojson }}}"
    "{% endfor %}<|eot_id|>"
    "{% elif m.role == 'tool' %}{{ head }}{{ m.content }}<|eot_id|>"
    "{% else %}{{ head }}{{ m.content }}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA31_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

QWEN3 = jinja(
    "{% set ns = namespace(last_query=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.reasoning_content and loop.index0 > ns.last_query %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n"
    "{% endif %}{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
QWEN3_TOKENS = ["<|im_start|>", "<|im_end|>"]


def with_template(tokenizer, template: str, tokens: list[str]):
    """The tokenizer with this template and its marker tokens (special, as the models' own are)."""
    tokenizer.chat_template = template
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer
