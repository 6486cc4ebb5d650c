"""The console (finetune/training/console.py): off a terminal, one line per logging step and no carriage
returns; raw log dicts never printed; on a terminal, one bar per phase with the figures in it."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from conftest import invoke, toy_sentences, write_jsonl


def test_non_interactive_output_is_one_line_per_logging_step(tiny_gpt, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in toy_sentences(64)])
    code, out, err = invoke("lora", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "run", "--max-steps", "6",
                            "--set", "train.logging_steps=2", "--set", "train.eval_steps=3",
                            "--set", "train.batch_size=4")
    assert code == 0, err
    assert "\r" not in out and "\r" not in err
    steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/6", "2/6", "4/6", "6/6"]  # logging_first_step, then every 2
    assert all(re.fullmatch(r"step \d/6  loss [\d.]+  lr [\d.e+-]+  \d+ tok/s  eta \d+:\d\d:\d\d", ln) for ln in steps)
    assert sum(ln.startswith("eval step 3: loss ") for ln in out.splitlines()) == 1
    assert "{'loss'" not in out + err and "Loading weights" not in out + err


def test_interactive_bar_carries_the_figures():
    import torch  # noqa: F401 (transformers needs it for the callback module)

    from finetune.training.console import ConsoleCallback

    cb = ConsoleCallback(interactive=True)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=10, num_input_tokens_seen=0)
    stderr = io.StringIO()
    import sys

    real, sys.stderr = sys.stderr, stderr
    try:
        cb.on_train_begin(None, state, None)
        state.global_step, state.num_input_tokens_seen = 5, 5000
        cb.on_step_end(None, state, None)
        cb.on_log(None, state, None, logs={"loss": 1.5, "learning_rate": 2e-4, "epoch": 0.5})
        assert cb.bar.n == 5 and "loss 1.5  lr 2.00e-04" in cb.bar.postfix and "tok/s" in cb.bar.postfix
        cb.on_train_end(None, state, None)
    finally:
        sys.stderr = real
    assert "training" in stderr.getvalue()
