"""Guards while training: pre-emption (SIGTERM, SIGINT) and non-finite losses or gradients.

SIGTERM (what SLURM and Kubernetes send before pre-empting a job) and Ctrl-C do not kill the
run: the current step finishes, a complete checkpoint is written, and the run stops with
`Interrupted` (exit 143 or 130), saying how to resume. A second Ctrl-C stops at once.

A step whose gradients (or loss) are not finite is never applied: the weights stay as they were,
and after `train.nan_patience` such steps in a row (0: the first one) the run stops with
`Diverged`, keeping its earlier checkpoints and writing no model.

With several processes the ranks agree on the step to stop at (one small all-reduce per step),
so every rank saves its part of the same checkpoint; the same all-reduce carries the ranks' verdict on
the gradients, so a step costs one collective and one wait for the device.
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager
from typing import Any

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Interrupted(Exception):
    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 143)


class Diverged(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


# The signal received, if any: set by the handler, read at the end of every step.
_received: dict[str, Any] = {"signum": None}


def stop_requested() -> int | None:
    return _received["signum"]


def _handler(signum, frame):
    if signum == signal.SIGINT and _received["signum"] is not None:
        raise KeyboardInterrupt  # the second Ctrl-C: stop at once
    if _received["signum"] is None:
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: finishing this step and saving a checkpoint"
              + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""), flush=True)
    _received["signum"] = signum


@contextmanager
def installed():
    """SIGTERM and SIGINT handlers for the duration of a run (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received["signum"] = None
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received["signum"] = None


def agreed(local: int | None, device=None) -> int | None:
    """The largest `local` over the ranks (the signal any rank received, a flag any rank raised), so that all
    ranks decide alike; 0 and None read as nothing."""
    return agreed_all([local], device)[0]


def agreed_all(values: list[int | None], device=None) -> list[int | None]:
    """`agreed` for several values in one all-reduce: one collective and one host sync instead of one each."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    import torch

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = torch.tensor([v or 0 for v in values], dtype=torch.long, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [int(v) or None for v in flags.tolist()]


def locally_finite(tensors) -> bool:
    """Whether every tensor on this rank is finite."""
    import torch

    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    # one fused reduction per device instead of a check per tensor; a norm that overflows to inf
    # means gradients beyond 1e19, a divergence all the same
    norms = torch._foreach_norm(local) if local else []
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()) if norms else True


def all_finite(tensors, device=None) -> bool:
    """Whether every tensor is finite, on every rank."""
    return not agreed(0 if locally_finite(tensors) else 1, device)


def guard_callback(patience: int = 0):
    """A TrainerCallback that applies the guards to a transformers/trl Trainer."""
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        def __init__(self):
            self.bad_steps = 0
            self.signum = None
            self.agreed_step: int | None = None  # the step whose stop signal on_pre_optimizer_step agreed

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            # fp16 mixed precision: the grad scaler skips overflowing steps itself; the logged
            # loss is checked instead.
            if args.fp16 or model is None:
                return
            params = [p for p in model.parameters() if p.requires_grad]
            # The ranks agree on the gradients and on a stop signal in one all-reduce: the step's one
            # collective and one wait for the device (on_step_end reuses the signal agreed here).
            bad, self.signum = agreed_all([0 if locally_finite([p.grad for p in params]) else 1, stop_requested()])
            self.agreed_step = state.global_step
            if not bad:
                self.bad_steps = 0
                return
            self.bad_steps += 1
            if self.bad_steps > patience:
                raise Diverged(state.global_step + 1, "the gradients are not finite (nan or inf)")
            print(f"warning: step {state.global_step + 1}: non-finite gradients; step skipped "
                  f"({self.bad_steps} of train.nan_patience={patience} in a row)", flush=True)
            for p in params:  # the optimizer then leaves these weights as they are
                p.grad = None

        def on_log(self, args, state, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                raise Diverged(state.global_step, f"the training loss is {loss}")

        def on_step_end(self, args, state, control, **kw):
            if self.agreed_step != state.global_step - 1:  # not agreed before this step's optimizer step
                self.signum = agreed(stop_requested())
            self.agreed_step = None
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True
                control.should_log = True
            elif state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True  # the last steps' loss, so the log covers the whole run

        def on_train_end(self, args, state, control, **kw):
            if self.signum is not None:
                from pathlib import Path

                raise Interrupted(self.signum, state.global_step,
                                  str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    return Guard()
