"""Runs that fit the machine: the memory a process may use (cgroup limits included), the batch fitted to it
before training, packed rows that follow the data, the optimizer steps small data gets, and a run killed
without a word (the out-of-memory killer) recognised by the next command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import cli_env, invoke, write_jsonl
from test_tasks_clm_chat import conversations

GiB = 2**30


# ---------------------------------------------------------------------------------------
# What the process may use


def test_cgroup_v2_limit_is_the_tightest_along_the_path(tmp_path):
    from finetune.launch.headroom import cgroup_headroom

    root = tmp_path / "cgroup"
    job = root / "slurm" / "job_7"
    job.mkdir(parents=True)
    (root / "slurm" / "memory.max").write_text(f"{16 * GiB}\n")
    (root / "slurm" / "memory.current").write_text(f"{10 * GiB}\n")
    (job / "memory.max").write_text(f"{8 * GiB}\n")
    (job / "memory.current").write_text(f"{1 * GiB}\n")
    proc = tmp_path / "cgroup-self"
    proc.write_text("0::/slurm/job_7\n")
    assert cgroup_headroom(root, proc) == 6 * GiB  # the parent has 6 GiB left, the job itself 7

    (job / "memory.max").write_text("max\n")
    (root / "slurm" / "memory.max").write_text("max\n")
    assert cgroup_headroom(root, proc) is None


def test_cgroup_v1_limit_of_a_container(tmp_path):
    from finetune.launch.headroom import cgroup_headroom

    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    proc = tmp_path / "cgroup-self"
    proc.write_text("12:memory:/docker/abc\n3:cpu:/docker/abc\n")  # the container's own path is not mounted
    assert cgroup_headroom(root, proc) == 3 * GiB
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_headroom(root, proc) is None


# ---------------------------------------------------------------------------------------
# The batch fitted before training


def llama_recipe(model, data, out, **train):
    from finetune.recipe.load import build_recipe

    return build_recipe({"method": "lora", "model": {"name": model}, "data": {"train": data, "max_length": 128},
                         "train": {"output_dir": str(out), "batch_size": 8, "grad_accum": 1, **train}})


@pytest.fixture(autouse=True)
def allocator_left_alone(monkeypatch):
    """A tight fit would fix glibc's mmap threshold for the rest of the test session: record it instead."""
    from finetune.launch import headroom

    monkeypatch.setattr(headroom, "keep_large_blocks_apart", lambda: False)


def with_free_memory(monkeypatch, free: float) -> None:
    from finetune.launch import headroom

    monkeypatch.setattr(headroom, "headroom", lambda cap=None: headroom.Headroom(free, "available RAM"))


def test_fit_keeps_a_recipe_that_fits(tiny_llama, toy_text, tmp_path, monkeypatch, capsys):
    from finetune.training.fit import fit_to_memory

    recipe = llama_recipe(tiny_llama, toy_text, tmp_path)
    with_free_memory(monkeypatch, 64 * GiB)
    assert fit_to_memory(recipe) is recipe
    assert capsys.readouterr().out == ""


def test_fit_halves_the_batch_and_keeps_the_effective_batch(tiny_llama, toy_text, tmp_path, monkeypatch, capsys):
    from finetune.models.memory import estimate, fmt
    from finetune.training.fit import fit_to_memory

    recipe = llama_recipe(tiny_llama, toy_text, tmp_path)
    full = estimate(recipe).tensors
    two = estimate(recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": 2})})).tensors
    free = (two + 1) / 0.9  # room for 2 rows of 128 tokens, not for 4
    with_free_memory(monkeypatch, free)
    fitted = fit_to_memory(recipe)
    assert (fitted.train.batch_size, fitted.train.grad_accum) == (2, 4)
    assert not fitted.train.gradient_checkpointing
    assert capsys.readouterr().out == (
        f"memory: batch 8 x 128 tokens needs about {fmt(full)} and {fmt(free)} is free (available RAM); training with "
        f"train.batch_size=2, train.grad_accum=4 (the same 8 rows per optimizer step, about {fmt(two)}). "
        "train.fit_memory=false turns this off\n")


def test_a_tight_fit_returns_freed_blocks_to_the_system(tiny_llama, toy_text, tmp_path, monkeypatch, capsys):
    """Room for the tensors but not for glibc's slack: freed blocks go back at once (slower steps); with room
    to spare the allocator is left alone (fast)."""
    from finetune.launch import headroom
    from finetune.models.memory import estimate
    from finetune.training import fit

    turned_on = []
    monkeypatch.setattr(headroom, "keep_large_blocks_apart", lambda: turned_on.append(1) or True)
    recipe = llama_recipe(tiny_llama, toy_text, tmp_path)
    need = estimate(recipe).tensors
    with_free_memory(monkeypatch, need * 10)
    assert fit.fit_to_memory(recipe) is recipe and not turned_on
    with_free_memory(monkeypatch, need * 1.2 / 0.9)
    assert fit.fit_to_memory(recipe) is recipe and turned_on
    assert capsys.readouterr().out == ("memory: tight, so freed blocks go back to the system at once (glibc's mmap "
                                       "threshold at 1 MiB): resident memory stays near the estimate, steps take up "
                                       "to a third longer\n")


def test_fit_turns_on_gradient_checkpointing_when_one_row_does_not_fit(tiny_llama, toy_text, tmp_path, monkeypatch):
    from finetune.models.memory import estimate
    from finetune.training.fit import fit_to_memory

    recipe = llama_recipe(tiny_llama, toy_text, tmp_path)
    one = recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": 1})})
    checkpointed = one.model_copy(update={"train": one.train.model_copy(update={"gradient_checkpointing": True})})
    with_free_memory(monkeypatch, (estimate(one).tensors + estimate(checkpointed).tensors) / 2 / 0.9)
    fitted = fit_to_memory(recipe)
    assert fitted.train.gradient_checkpointing
    assert fitted.train.batch_size * fitted.train.grad_accum == 8


def test_nothing_fits_is_one_line_with_the_numbers(tiny_llama, toy_text, tmp_path, monkeypatch):
    from finetune.errors import UserError
    from finetune.models.memory import estimate, fmt
    from finetune.training.fit import fit_to_memory

    recipe = llama_recipe(tiny_llama, toy_text, tmp_path)
    smallest = recipe.model_copy(update={"train": recipe.train.model_copy(update={
        "batch_size": 1, "gradient_checkpointing": True})})
    with_free_memory(monkeypatch, 1024.0)
    with pytest.raises(UserError) as e:
        fit_to_memory(recipe)
    assert e.value.problems == [
        f"memory: even batch 1 x 128 tokens with gradient checkpointing needs about {fmt(estimate(smallest).tensors)} "
        f"and {fmt(1024.0)} is free (available RAM); use a shorter data.max_length, --quant 4bit, --bf16 where the "
        "device has it, LoRA instead of full fine-tuning, a smaller model, or more memory (train.max_memory_gib if "
        "the number above is wrong)"]


def test_a_run_with_little_memory_trains_with_a_smaller_batch(tiny_llama, tmp_path, monkeypatch):
    """The command under a memory cap (train.max_memory_gib; the process itself counted as empty here, so that
    the cap is what the run's tensors may take): the batch shrinks, the effective batch stays, the run
    finishes and recipe.yaml holds what it trained with; a cap nothing fits ends before anything is created."""
    from finetune.launch import headroom
    from finetune.models.memory import estimate
    from finetune.recipe.load import build_recipe

    monkeypatch.setattr(headroom, "resident_bytes", lambda: 0.0)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(200, seed=0))
    out = tmp_path / "run"
    args = ["lora", "--model", tiny_llama, "--data", data, "-o", str(out), "--max-steps", "2",
            "--set", "data.chat_template=chatml", "--set", "data.max_length=128", "--set", "train.batch_size=16"]

    def need(batch):
        return estimate(build_recipe({"method": "lora", "model": {"name": tiny_llama},
                                      "data": {"train": data, "max_length": 128},
                                      "train": {"batch_size": batch}})).tensors

    cap = (need(4) + need(8)) / 2 / 0.9 / GiB  # 4 rows fit, 8 do not
    code, stdout, stderr = invoke(*args, "--set", f"train.max_memory_gib={cap:.6f}")
    assert code == 0, stderr
    assert "memory: batch 16 x 128 tokens needs about " in stdout
    assert "training with train.batch_size=4, train.grad_accum=4 (the same 16 rows per optimizer step" in stdout
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 4)

    refused = tmp_path / "refused"
    code, stdout, stderr = invoke(*args[:6], str(refused), *args[7:], "--set", "train.max_memory_gib=0.0001")
    assert code == 2
    assert stderr.startswith("error: memory: even batch 1 x 128 tokens with gradient checkpointing needs about ")
    assert "is free (free memory within train.max_memory_gib=0.0001)" in stderr
    assert not refused.exists()


# ---------------------------------------------------------------------------------------
# Small data: rows that follow it, and enough optimizer steps


def test_short_conversations_pack_into_short_rows_and_train_for_enough_steps(tiny_gpt, tmp_path):
    """300 short conversations: rows of the longest example's power of two (not 1,024 tokens), and since
    train.epochs is unset, as many passes (up to 3) as reach about 100 optimizer steps."""
    from finetune.data.packing import MIN_BLOCK
    from finetune.training.session import MIN_STEPS

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(300, seed=0))
    out = tmp_path / "run"
    code, stdout, stderr = invoke("lora", "--model", tiny_gpt, "--data", data, "-o", str(out),
                                  "--set", "data.chat_template=chatml", "--set", "train.save_steps=1000")
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] >= MIN_STEPS * 0.9, metrics  # 5 rows of 1,024 tokens made 1 step before
    assert metrics["epochs"] <= 3
    first = next(line for line in stdout.splitlines() if line.startswith("training: "))
    assert first.startswith(f"training: {metrics['steps']} optimizer steps (")
    assert f" rows of up to {MIN_BLOCK} tokens, 8 per batch = 8 rows per step" in first  # examples of ~30 tokens
    assert "train.epochs: " in stdout
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["train"]["epochs"] == pytest.approx(metrics["epochs"], abs=0.01)  # what it trained with


def test_an_explicit_epoch_count_is_kept_and_few_steps_are_warned(tiny_gpt, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40, seed=0))
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt, "--data", data, "--epochs", "1",
                                  "--set", "data.chat_template=chatml")
    assert code == 0, stderr
    planned = [line.strip() for line in stdout.splitlines() if "optimizer steps" in line]
    assert planned[0].startswith("training: about ") and "(1 epoch of " in planned[0]
    assert planned[1].startswith("warning: only ") and planned[1].endswith(
        "optimizer steps: too few for the learning-rate warm-up and schedule to do their work; lower "
        "train.batch_size, raise --epochs or give more data")
    assert "train.epochs:" not in stdout


def test_validate_of_a_stream_names_its_rows_and_no_epochs(tiny_gpt, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40, seed=0))
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt, "--data", data, "--max-steps", "5",
                                  "--set", "data.chat_template=chatml", "--set", "data.streaming=true")
    assert code == 0, stderr
    assert "packing: whole examples packed into rows of 64 tokens" in stdout and "optimizer steps" not in stdout


def test_fitted_block_is_the_longest_example_rounded_up():
    from datasets import Dataset

    from finetune.data.packing import fitted_block

    ds = Dataset.from_dict({"input_ids": [[1] * 70, [1] * 83, [1] * 20]})
    assert fitted_block([ds, None], 1024) == 128
    assert fitted_block([ds], 100) == 100
    assert fitted_block([ds], 1024, round_up=False) == 83
    assert fitted_block([Dataset.from_dict({"input_ids": [[1] * 5]})], 1024) == 64


# ---------------------------------------------------------------------------------------
# Killed without a word


def test_a_killed_run_is_recognised_by_the_next_command(tiny_gpt, toy_text, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "full", "--model", tiny_gpt, "--data", toy_text,
                             "-o", str(out), "--max-steps", "100000", "--set", "train.logging_steps=1",
                             "--set", "train.save_steps=5"], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("checkpoint-*/manifest.json")) if (out / "checkpoints").is_dir() \
            else True:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # what the out-of-memory killer sends: no handler runs
    proc.wait(timeout=60)
    marker = json.loads((out / "run.json").read_text())
    assert marker["status"] == "running" and marker["pid"] == proc.pid

    from finetune.training.rundir import status

    assert status(out) == "killed"
    code, _, stderr = invoke("full", "--model", tiny_gpt, "--data", toy_text, "-o", str(out), "--max-steps", "3")
    assert code == 2
    assert stderr.startswith(f"error: --output: the run in '{out}' was killed")
    assert "most often the out-of-memory killer (exit code 137)" in stderr
    assert "pass --resume to continue it from its last checkpoint" in stderr
    code, stdout, _ = invoke("runs", str(tmp_path))
    assert code == 0 and stdout.splitlines()[1].rstrip().endswith("killed")
    code, _, stderr = invoke("full", "--resume", "-o", str(out), "--max-steps", "12")
    assert code == 0, stderr
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_live_run_is_not_called_killed(tmp_path):
    from finetune.training.rundir import status, this_process, write_marker

    tmp_path.mkdir(exist_ok=True)
    write_marker(tmp_path, status="running", **this_process())
    assert status(tmp_path) == "running"
    write_marker(tmp_path, pid=2**22 + 12345)  # no such process
    assert status(tmp_path) == "killed"
    write_marker(tmp_path, host="another-machine")  # a shared file system: alive only with a recent heartbeat
    assert status(tmp_path) == "killed"  # (tests/test_training_rundir.py: the lock's heartbeat keeps it running)
    if os.path.exists(f"/proc/{os.getpid()}/stat"):
        write_marker(tmp_path, host=this_process()["host"], pid=os.getpid(), pid_start="1")  # a reused pid
        assert status(tmp_path) == "killed"


# ---------------------------------------------------------------------------------------
# Precision: bf16 where the device runs it natively


def test_bf16_is_the_default_where_the_device_runs_it_natively(tiny_gpt, toy_text, tmp_path, monkeypatch, capsys):
    from finetune.recipe.load import build_recipe
    from finetune.training import precision

    recipe = build_recipe({"model": {"name": tiny_gpt}, "data": {"train": toy_text}})
    assert recipe.train.bf16 is None
    monkeypatch.delenv("FINETUNE_BF16")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert precision.cpu_has_amx(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not precision.cpu_has_amx(str(cpuinfo))

    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    resolved = precision.resolve_precision(recipe, say=True)
    assert resolved.train.bf16 is True
    assert capsys.readouterr().out.startswith("precision: bf16 mixed precision (train.bf16 unset: ")
    assert precision.resolve_precision(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"fp16": True})})).train.bf16 is False  # fp16 asked for
    assert precision.resolve_precision(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"bf16": False})})).train.bf16 is False  # float32 asked for
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.resolve_precision(recipe).train.bf16 is False


def test_a_run_that_fits_trains_exactly_as_without_the_fit(tiny_gpt, toy_text, tmp_path):
    """Fitting builds the model's skeleton (and an adapter on it): the run's random stream must not move."""
    from test_tasks_clm import losses, train

    train(tiny_gpt, toy_text, tmp_path / "fit", steps=6, **{"train.logging_steps": 1})
    train(tiny_gpt, toy_text, tmp_path / "as-set", steps=6, **{"train.logging_steps": 1, "train.fit_memory": "false"})
    assert losses(tmp_path / "fit") == losses(tmp_path / "as-set")
