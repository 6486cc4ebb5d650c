"""What a run prints while it trains: one progress bar per phase (training, evaluating) with loss,
learning rate, tokens/s and ETA in it, and evaluation results as one short line. (Library chatter,
datasets' and transformers' own bars included, is turned off by the CLI unless --debug.)

On a terminal the bars redraw in place (tqdm, on stderr). Anywhere else (CI logs, `| tee`, a file)
there are no bars and no carriage returns: one line per logging step on stdout, e.g.

    step 20/200  loss 2.314  lr 1.8e-04  5120 tok/s  eta 0:01:32
    eval step 20: loss 2.401, accuracy 0.6120

`ConsoleCallback` replaces transformers' ProgressCallback/PrinterCallback (which print raw log dicts
next to the bar). `install()` makes it the Trainer's progress callback: transformers chooses that
class from `transformers.trainer.DEFAULT_PROGRESS_CALLBACK`, the same switch it flips for notebooks,
so every Trainer (and trl's trainers, its subclasses) gets it without code in the tasks.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

from transformers import TrainerCallback

SKIP = ("total_flos", "epoch", "step")


def install() -> None:
    import transformers.trainer

    transformers.trainer.DEFAULT_PROGRESS_CALLBACK = ConsoleCallback


def number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"
    return str(v)


def eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class ConsoleCallback(TrainerCallback):
    def __init__(self, out: TextIO | None = None, interactive: bool | None = None):
        self.out = out  # None: sys.stdout at the time of printing (test runners swap it)
        self.interactive = interactive
        self.bar = self.eval_bar = None
        self.started = self.last_time = 0.0
        self.start_step = self.last_step = self.last_tokens = 0

    # -- output --------------------------------------------------------------------------

    def stream(self) -> TextIO:
        return self.out or sys.stdout

    def is_interactive(self) -> bool:
        if self.interactive is not None:
            return self.interactive
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=self.stream(), flush=True)

    # -- training ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        self.started = self.last_time = time.perf_counter()
        self.start_step = self.last_step = state.global_step
        self.last_tokens = state.num_input_tokens_seen
        if self.is_interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        else:
            self.line(f"training: {state.max_steps} steps" + (f", from step {state.global_step}"
                                                                 if state.global_step else ""))

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None and state.is_world_process_zero:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        if any(k.startswith("eval_") for k in logs):
            shown = [f"{k[5:]} {number(v)}" for k, v in logs.items()
                     if k.startswith("eval_") and isinstance(v, (int, float))
                     and not k.endswith(("_runtime", "_per_second"))]
            self.line(f"eval step {state.global_step}: " + ", ".join(shown))
            return
        if "loss" not in logs and "reward" not in logs:  # the end-of-training totals: the summary shows them
            return
        self.line_or_postfix(state, logs)

    def line_or_postfix(self, state, logs: dict) -> None:
        now = time.perf_counter()
        parts = []
        for key, label in (("loss", "loss"), ("reward", "reward"), ("learning_rate", "lr")):
            if isinstance(logs.get(key), (int, float)):
                parts.append(f"{label} {number(logs[key])}")
        tokens = state.num_input_tokens_seen
        if tokens and now > self.last_time:
            parts.append(f"{(tokens - self.last_tokens) / (now - self.last_time):.0f} tok/s")
        self.last_time, self.last_tokens = now, tokens
        if self.bar is not None:  # tqdm shows the ETA itself
            self.bar.set_postfix_str("  ".join(parts), refresh=True)
            return
        done = state.global_step - self.start_step
        if done > 0 and state.max_steps:
            parts.append(f"eta {eta((now - self.started) / done * (state.max_steps - state.global_step))}")
        self.line(f"step {state.global_step}/{state.max_steps}  " + "  ".join(parts))

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- evaluation ----------------------------------------------------------------------

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        if not state.is_world_process_zero or not self.is_interactive():
            return
        if self.eval_bar is None:
            from tqdm import tqdm

            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") \
                else None
            self.eval_bar = tqdm(total=total, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True,
                                 file=sys.stderr)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kw):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    on_predict = on_evaluate
