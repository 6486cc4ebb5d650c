"""Tiny models and tokenizers, built once per test session and loaded by path (no Hub)."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest, and ranks do not compete
# train.bf16 unset means float32 here (on a GPU or an AMX CPU it would mean bf16): the same numbers everywhere;
# tests/test_training_fit.py checks the machine-dependent default itself
os.environ["FINETUNE_BF16"] = "0"
# a datasets cache of this session's own (finetune keeps prepared data there): runs never see a user's entries
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="finetune-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse"]
PLACES = ["mat", "roof", "tree", "box", "bed", "chair"]


def toy_sentences(n: int, seed: int = 0) -> list[str]:
    """A learnable corpus: a fixed template with random slots."""
    rng = random.Random(seed)
    return [f"the {rng.choice(COLORS)} {rng.choice(ANIMALS)} sat on the {rng.choice(PLACES)}."
            for _ in range(n)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def new_tiny_gpt(n_embd: int = 32):
    """(model, tokenizer): a 2-layer GPT-2 with random weights (seed 0, no dropout) and a BPE tokenizer
    trained on `toy_sentences`, with a pad token distinct from eos."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune.models.pretrained import train_bpe_tokenizer

    tok = train_bpe_tokenizer(toy_sentences(500, seed=1), vocab_size=300)
    config = GPT2Config(vocab_size=len(tok), n_embd=n_embd, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), tok


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory) -> str:
    """A 2-layer GPT-2 (hidden 32) with a BPE tokenizer that has a pad token distinct from eos."""
    path = tmp_path_factory.mktemp("tiny-gpt")
    model, tok = new_tiny_gpt(32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_gpt) -> str:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 for keys and values), the tiny GPT's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt_nopad(tmp_path_factory, tiny_gpt) -> str:
    """The same model with a tokenizer whose pad token is eos (as GPT-2's)."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-gpt-nopad")
    shutil.copytree(tiny_gpt, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_jsonl(path, [{"text": t} for t in toy_sentences(400)])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env() -> dict[str, str]:
    """The environment of a `python -m finetune` subprocess: this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args: str, cwd=None, timeout: int = 600):
    """Run `python -m finetune ARGS` in a subprocess (the real entry point) with this checkout first
    on the path; returns the CompletedProcess with stdout/stderr as text."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def start(*args: str):
    """`python -m finetune ARGS` started in a subprocess with one torch thread, stdout and stderr in one pipe."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "finetune", *map(str, args)], text=True,
                            env={**cli_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_first_step(proc, out, timeout: float = 120) -> None:
    """Wait until the run `proc` writes to OUT has logged a step (it must still be running)."""
    import time

    log, deadline = Path(out) / "log.jsonl", time.time() + timeout
    while not log.is_file() or not log.read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)


def finish(proc, timeout: int = 300) -> str:
    """The output of a `start`ed command, which must succeed."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def invoke(*args: str):
    """Run the CLI in this process (fast); returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from finetune.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def toy_questions(n: int, seed: int = 0) -> list[str]:
    """A second learnable corpus, with the words of the first in a new template."""
    rng = random.Random(seed)
    return [f"where did the {rng.choice(COLORS)} {rng.choice(ANIMALS)} sit? on the {rng.choice(PLACES)}."
            for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_gpt_lm(tmp_path_factory, tiny_gpt) -> str:
    """`tiny_gpt` after a short full pre-training on `toy_sentences`: a base that knows the words,
    for fine-tuning tests (LoRA on a random base barely learns)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-gpt-lm")
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    texts = [t + tok.eos_token for t in toy_sentences(2000, seed=2)]
    model.train()
    for step in range(150):
        batch = tok(texts[(step * 16) % 2000:(step * 16) % 2000 + 16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_qa_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    return write_jsonl(path, [{"text": t} for t in toy_questions(400)])
