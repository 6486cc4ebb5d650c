"""`finetune launch-config --slurm`: the batch script, run under a stand-in for SLURM (srun, scontrol) that
starts one task per node and forwards SIGTERM the way srun does on pre-emption or near the time limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, invoke, wait_for_first_step

FAKE_SRUN = '''#!{python}
"""srun: run the command once per node (SLURM_NODEID), forwarding SIGTERM to every task."""
import os, signal, subprocess, sys
args = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(n)}})
         for n in range(int(os.environ["SLURM_NNODES"]))]
signal.signal(signal.SIGTERM, lambda s, f: [t.send_signal(s) for t in tasks])
sys.exit(max(t.wait() for t in tasks))
'''
FAKE_SCONTROL = '#!/bin/bash\necho node-a\necho node-b\n'
RECORDING_FINETUNE = '#!/bin/bash\necho "$SLURM_NODEID $*" >> "{log}"\n'


def slurm_bin(tmp_path: Path, finetune: str | None = None) -> dict[str, str]:
    """A PATH with the stand-ins (and, if given, a `finetune` that records its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    files = {"srun": FAKE_SRUN.format(python=sys.executable), "scontrol": FAKE_SCONTROL}
    if finetune:
        files["finetune"] = finetune
    for name, text in files.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**cli_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]"}


def script(tmp_path: Path, *flags: str) -> Path:
    code, stdout, stderr = invoke("launch-config", "--slurm", *flags)
    assert code == 0, stderr
    path = tmp_path / "train.sbatch"
    path.write_text(stdout)
    return path


def test_the_batch_script_runs_one_task_per_node_with_its_rank(tmp_path):
    path = script(tmp_path, "-n", "16", "--num-machines", "2", "--distributed", "fsdp", "--bf16")
    text = path.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=TERM@120", "#SBATCH --requeue"):
        assert line in text.splitlines()
    log = tmp_path / "calls.txt"
    env = {**slurm_bin(tmp_path, RECORDING_FINETUNE.format(log=log)), "SLURM_NNODES": "2"}
    command = ["lora", "--model", "m", "--data", "d.jsonl", "-o", "runs/x"]
    subprocess.run(["bash", str(path), *command], env=env, check=True)
    common = ("lora --model m --data d.jsonl -o runs/x --num-processes 16 --num-machines 2 --distributed fsdp "
              "--bf16 --main-process-ip node-a --main-process-port 29500")
    assert sorted(log.read_text().splitlines()) == [f"0 {common} --machine-rank 0", f"1 {common} --machine-rank 1"]
    log.unlink()
    subprocess.run(["bash", str(path), *command], env={**env, "SLURM_RESTART_COUNT": "1"}, check=True)
    assert sorted(log.read_text().splitlines()) == [f"0 {common} --resume --machine-rank 0",
                                                    f"1 {common} --resume --machine-rank 1"]
    no_command = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert no_command.returncode == 2 and "usage: sbatch" in no_command.stderr


def test_slurms_sigterm_saves_a_checkpoint_and_the_requeued_job_resumes(tiny_gpt, toy_text, tmp_path):
    """SLURM signals the job step; srun forwards SIGTERM to the task, which saves a checkpoint and stops with
    143; the job started again (SLURM_RESTART_COUNT=1) continues from that checkpoint."""
    path = script(tmp_path, "-n", "1")
    env = {**slurm_bin(tmp_path, f"#!/bin/bash\nexec {sys.executable} -m finetune \"$@\"\n"), "SLURM_NNODES": "1"}
    out = tmp_path / "run"
    command = ["full", "--model", tiny_gpt, "--data", toy_text, "-o", str(out), "--max-steps", "100000",
               "--set", "train.logging_steps=1"]
    job = subprocess.Popen(["bash", str(path), *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    wait_for_first_step(job, out)
    srun = subprocess.run(["pgrep", "-f", "-s", str(job.pid), "bin/srun"], capture_output=True, text=True)
    os.kill(int(srun.stdout.split()[0]), signal.SIGTERM)  # what SLURM does: signal the job step
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr
    assert "interrupted at step " in stderr and f"continue with: finetune full --resume -o {out}" in stderr
    done = subprocess.run(["bash", str(path), *command[:-4], "--max-steps", "3", "--set", "train.logging_steps=1"],
                          env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint-" in done.stdout
