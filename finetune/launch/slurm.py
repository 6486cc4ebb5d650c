"""A SLURM batch script for a run on N nodes x G GPUs: `finetune launch-config --slurm`.

    finetune launch-config --slurm -n 16 --num-machines 2 --distributed fsdp > train.sbatch
    sbatch train.sbatch lora --model Qwen/Qwen2.5-7B --data train.jsonl --bf16 -o runs/qwen7b

One task per node runs the same `finetune` command with the node's rank and the first node's address;
on each node it starts the node's ranks through `accelerate launch` (finetune/launch/relaunch.py). SLURM's
warning signal (`--signal=TERM@120`: SIGTERM two minutes before the time limit or on pre-emption) reaches
every task through srun, each forwards it to its ranks, and the ranks save a checkpoint and stop (exit 143).
With `--requeue`, the job that SLURM starts again continues from that checkpoint (--resume, added when
SLURM_RESTART_COUNT says it is a restart). The run directory must be on a file system every node shares.
"""

from __future__ import annotations

from finetune.launch.presets import DEFAULT_PORT

WARNING_SECONDS = 120  # SIGTERM this long before the time limit: room to write a checkpoint


def sbatch_script(num_processes: int, num_machines: int, distributed: str | None, precision: str | None,
                  port: int | None = None) -> str:
    """The script, taking the training command (`lora ...`) as its arguments."""
    gpus = max(num_processes // max(num_machines, 1), 1)
    flags = [f"--num-processes {num_processes}", f"--num-machines {num_machines}"]
    flags += [f"--distributed {distributed}"] if distributed else []
    flags += [f"--{precision}"] if precision else []
    return f"""#!/bin/bash
# finetune on SLURM: {num_machines} node(s) x {gpus} GPU(s), {distributed or 'ddp'}. Submit with the training command:
#   sbatch THIS_FILE lora --model MODEL --data DATA -o runs/NAME
# The run directory (-o) must be on a file system every node shares.
#SBATCH --job-name=finetune
#SBATCH --nodes={num_machines}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --signal=TERM@{WARNING_SECONDS}
#SBATCH --requeue
#SBATCH --output=finetune-%j.out
set -euo pipefail
if [ "$#" -eq 0 ]; then
    echo "usage: sbatch $0 lora --model MODEL --data DATA -o runs/NAME" >&2
    exit 2
fi
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE
ARGS=("$@" {' '.join(flags)} --main-process-ip "$MAIN_IP" --main-process-port {port or DEFAULT_PORT})
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then
    ARGS+=(--resume)  # requeued after pre-emption or the time limit: continue from the last checkpoint
fi
# One task per node, each with its node's rank; srun passes SLURM's SIGTERM to each task, which passes it
# to its ranks.
srun --kill-on-bad-exit=1 bash -c 'exec finetune "$@" --machine-rank "$SLURM_NODEID"' finetune "${{ARGS[@]}}"
"""
