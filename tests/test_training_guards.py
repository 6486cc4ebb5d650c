"""training/guards.py across ranks: the ranks agree on a stop signal and on non-finite gradients in one
all-reduce per optimizer step, so every rank skips the same step and stops at the same one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WORKER = r'''
import json, os, signal, sys
import torch, torch.distributed as dist
from transformers import TrainerControl, TrainerState, TrainingArguments
from finetune.training import guards

rank = int(sys.argv[1]); out = sys.argv[2]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
calls = []
real = dist.all_reduce
dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
model = torch.nn.Linear(2, 2)
args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[])
state, control, guard = TrainerState(), TrainerControl(), guards.guard_callback(patience=5)
seen = []
for step in range(3):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if step == 1 and rank == 1:
        model.weight.grad[0, 0] = float("nan")  # only rank 1's gradients are bad
    if step == 2 and rank == 0:
        guards._received["signum"] = signal.SIGTERM  # only rank 0 is told to stop
    guard.on_pre_optimizer_step(args, state, control, model=model)
    skipped = model.weight.grad is None
    state.global_step += 1
    guard.on_step_end(args, state, control)
    seen.append({"skipped": skipped, "stop": bool(control.should_training_stop), "reduces": len(calls)})
json.dump(seen, open(os.path.join(out, f"rank{rank}.json"), "w"))
dist.destroy_process_group()
'''


def test_ranks_agree_on_bad_gradients_and_a_signal_in_one_all_reduce_per_step(tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "FINETUNE_BF16": "0"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    seen = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1], "the ranks decided differently"
    assert [s["skipped"] for s in seen[0]] == [False, True, False]  # rank 1's nan skips the step on both
    assert [s["stop"] for s in seen[0]] == [False, False, True]  # rank 0's SIGTERM stops both at step 3
    assert [s["reduces"] for s in seen[0]] == [1, 2, 3]  # one all-reduce per optimizer step, not two
    assert "warning: step 2: non-finite gradients; step skipped" in outs[0]


def test_without_a_gradient_check_the_signal_is_still_agreed_at_the_end_of_the_step(monkeypatch, tmp_path):
    """fp16 leaves the gradient check to the grad scaler: on_step_end then agrees on the signal itself."""
    import signal

    from transformers import TrainerControl, TrainerState

    from finetune.training import guards

    asked = []
    monkeypatch.setattr(guards, "agreed", lambda local, device=None: (asked.append(local), local)[1])
    args = type("Args", (), {"fp16": True, "output_dir": str(tmp_path)})()
    state, control, guard = TrainerState(), TrainerControl(), guards.guard_callback()
    guard.on_pre_optimizer_step(args, state, control, model=object())
    guards._received["signum"] = signal.SIGTERM
    try:
        state.global_step = 1
        guard.on_step_end(args, state, control)
    finally:
        guards._received["signum"] = None
    assert asked == [signal.SIGTERM] and control.should_training_stop
