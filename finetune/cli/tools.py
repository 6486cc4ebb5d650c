"""Commands around runs: env, plan, prepare, launch-config, recipes (list, show, copy), push, plot, runs.

Registered on the app in cli/app.py; each imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.cli.common import (Bf16Opt, DataOpt, DebugOpt, DistOpt, EvalOpt, Fp16Opt, IpOpt, MachinesOpt,
                                 ModelOpt, PortOpt, ProcsOpt, QuantOpt, RankOpt, RecipeArg, SetOpt, TaskOpt,
                                 flag_overrides, guarded, env_defaults, scale_overrides)
from finetune.errors import UserError

recipes_app = typer.Typer(help="List, show and copy the built-in recipes.", no_args_is_help=True, rich_markup_mode=None)


def env(debug: DebugOpt = False) -> None:
    """Versions, devices, and whether the Hugging Face Hub is reachable."""

    def body():
        from finetune.launch.environment import environment_report

        typer.echo(environment_report())

    guarded(debug, body)


def print_plan(recipe, capacity_gib: float | None = None, seq: int | None = None,
               image_tokens: int | None = None) -> None:
    """The memory estimate (`seq`: tokens per row, where the data decides it; `image_tokens`: of them, the
    image tokens of a vision-language example), and a warning when it does not fit one device."""
    from finetune.models.memory import estimate, fit_problems, report
    from finetune.models.quantization import check_quantizable, skeleton
    from finetune.training.precision import resolve_precision

    recipe = resolve_precision(recipe)

    model = skeleton(recipe.model, recipe.task)  # once, for both
    check_quantizable(recipe, model)
    est = estimate(recipe, model, capacity=capacity_gib * 2**30 if capacity_gib else None, seq=seq,
                   image_tokens=image_tokens)
    typer.echo("\n".join(report(recipe, est)))
    for p in fit_problems(recipe, est):
        typer.secho(f"warning: {p}", err=True, fg=typer.colors.YELLOW)


def plan(recipe: RecipeArg = None, model: ModelOpt = None, task: TaskOpt = None,
         method: Annotated[str, typer.Option("--method", help="lora, full or pretrain.")] = "lora",
         set_: SetOpt = None, num_processes: ProcsOpt = None, quant: QuantOpt = None, bf16: Bf16Opt = False,
         fp16: Fp16Opt = False, distributed: DistOpt = None,
         device_memory: Annotated[Optional[float], typer.Option(
             "--device-memory", min=0.1, help="GiB of one device (default: this machine's GPU, else its RAM).",
             show_default=False)] = None,
         debug: DebugOpt = False) -> None:
    """Estimate peak memory per device before a run: weights, gradients, optimizer, activations, logits.

    Reads only the model's config (no weights, no data). Example:
    finetune plan --model Qwen/Qwen2.5-0.5B --quant 4bit --bf16 --set train.batch_size=8 --device-memory 24"""

    def body():
        scale = scale_overrides(quant, bf16, fp16, distributed)
        overrides = flag_overrides(model, task, None, None, None, None, None, num_processes, scale)
        from finetune.recipe.load import find_recipe, load_recipe

        if recipe is not None:
            find_recipe(recipe)
        r = load_recipe(recipe, {"method": method, **overrides}, set_, ignore=("data.train",))
        env_defaults()
        print_plan(r, device_memory)

    guarded(debug, body)


def prepare(recipe: RecipeArg = None, model: ModelOpt = None, data: DataOpt = None, eval_data: EvalOpt = None,
            method: Annotated[str, typer.Option("--method", help="lora, full or pretrain.")] = "lora",
            set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Tokenize, mix and pack a causal-LM recipe's data into the cache, and nothing else: the run then
    starts training at once (a cluster job spends no GPU time on it). Example:
    finetune prepare qwen2.5-0.5b-instruct-lora-chat --set data.num_proc=8"""

    def body():
        import time

        from finetune.recipe.load import find_recipe, load_recipe
        from finetune.recipe.tasks import load_task, task_info

        if recipe is not None:
            find_recipe(recipe)
        r = load_recipe(recipe, {"method": method, **flag_overrides(model, None, data, eval_data, None, None, None,
                                                                     None, {})}, set_)
        if not task_info(r.task).mixtures:
            raise UserError(f"prepare: the {r.task} task prepares its data when it runs; `finetune prepare` is for "
                            "causal-LM (clm) data")
        if r.data.streaming:
            raise UserError("prepare: data.streaming reads the data as training asks for it, so there is nothing to "
                            "prepare ahead; set data.streaming: false to prepare and cache it")
        if not r.data.cache:
            raise UserError("prepare: data.cache is false, so a prepared copy would not be kept; drop it")
        from finetune.data.sources import check_sources

        check_sources(r.data)
        env_defaults()
        start = time.perf_counter()
        _, _, prepared = load_task(r.task).prepare_data(r)
        rows = prepared.train
        tokens = sum(len(ids) for batch in rows.select_columns(["input_ids"]).iter(batch_size=10_000)
                     for ids in batch["input_ids"])
        typer.echo(f"prepared: {len(rows):,} training rows, {tokens:,} tokens"
                   + (f"; {len(prepared.eval):,} evaluation rows" if prepared.eval is not None else "")
                   + f" ({time.perf_counter() - start:.0f} s)")
        typer.echo(f"cache: {prepared.cache}")
        again = recipe or f"--model {r.model.name} --data {data}"
        typer.echo(f"next: finetune {r.method} {again}   # the same recipe and files start from the prepared data")

    guarded(debug, body)


def launch_config_command(
        recipe: RecipeArg = None, set_: SetOpt = None, num_processes: ProcsOpt = None, bf16: Bf16Opt = False,
        fp16: Fp16Opt = False, distributed: DistOpt = None, num_machines: MachinesOpt = None,
        machine_rank: RankOpt = None, main_process_ip: IpOpt = None, main_process_port: PortOpt = None,
        slurm: Annotated[bool, typer.Option("--slurm", help="Print a SLURM batch script for these nodes and "
                                            "GPUs instead (sbatch FILE lora --model ... -o ...).")] = False,
        debug: DebugOpt = False) -> None:
    """Print the accelerate config a run with these flags uses (a preset with the run's values filled in).

    Example: finetune launch-config --distributed fsdp -n 16 --num-machines 2 --main-process-ip 10.0.0.1
    On SLURM: finetune launch-config --slurm --distributed fsdp -n 16 --num-machines 2 > train.sbatch"""

    def body():
        from finetune.launch.presets import launch_config_yaml
        from finetune.recipe.load import find_recipe, load_recipe

        ip = main_process_ip or ("first-node" if slurm else None)  # on SLURM the script finds the first node
        scale = scale_overrides(None, bf16, fp16, distributed, num_machines, machine_rank, ip, main_process_port)
        overrides = flag_overrides(None, None, None, None, None, None, None, num_processes, scale)
        if recipe is not None:
            find_recipe(recipe)
        r = load_recipe(recipe, overrides, set_, ignore=("data.train", "model.name"))
        if slurm:
            from finetune.launch.slurm import sbatch_script

            t = r.train
            typer.echo(sbatch_script(t.num_processes, t.num_machines, t.distributed,
                                     "bf16" if t.bf16 else "fp16" if t.fp16 else None, t.main_process_port), nl=False)
            return
        typer.echo(launch_config_yaml(r), nl=False)

    guarded(debug, body)


@recipes_app.command("list")
def recipes_list() -> None:
    """The built-in recipes with their one-line descriptions."""
    from finetune.recipe.load import builtin_recipes

    for name, path in builtin_recipes().items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        typer.echo(f"{name:<40} {first}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="A built-in recipe name.")]) -> None:
    """Print a built-in recipe."""
    guarded(False, lambda: typer.echo(_builtin(name).read_text(), nl=False))


@recipes_app.command("copy")
def recipes_copy(name: Annotated[str, typer.Argument(help="A built-in recipe name.")],
                 dest: Annotated[str, typer.Argument(help="Where to write it (file or directory).")]) -> None:
    """Copy a built-in recipe to start your own."""

    def body():
        src = _builtin(name)
        target = Path(dest)
        if target.is_dir():
            target = target / src.name
        if target.exists():
            raise UserError(f"{target}: already exists; choose another destination")
        target.write_text(src.read_text())
        typer.echo(f"wrote {target}; run it with: finetune lora {target}")

    guarded(False, body)


def _builtin(name: str) -> Path:
    from finetune.errors import did_you_mean
    from finetune.recipe.load import builtin_recipes

    found = builtin_recipes()
    if name not in found:
        raise UserError(f"recipe '{name}': no such built-in recipe{did_you_mean(name, found)}; "
                        "`finetune recipes list` shows them")
    return found[name]


def push(
    run: Annotated[str, typer.Argument(help="A finished run directory, or an export of one (a .gguf file, an "
                                            "Ollama or vLLM folder from `finetune export`).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id: user/name or org/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created if "
                                                                       "missing; default main).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Upload a run to the Hugging Face Hub: model or adapter, tokenizer, card, recipe, metrics, log; or an
    export of it (a GGUF file, an Ollama folder, a vLLM folder).

    Never checkpoints/ or files holding a token. Needs HF_TOKEN or `hf auth login`.
    Example: finetune push runs/gpt2-lora me/gpt2-lora --private"""

    def body():
        import re

        from finetune.hub.push import files_to_push, push_problems, push_run

        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise UserError(f"REPO_ID: '{repo_id}' is not a Hub repo id; write it as user/name or org/name")
        run_dir = Path(run)
        if not run_dir.exists():
            raise UserError(f"run: no such run, file or folder '{run}'")
        files = files_to_push(run_dir)
        problems = push_problems("push")
        if problems:
            raise UserError(problems)
        url = push_run(run_dir, repo_id, private, revision)
        typer.echo(f"pushed {len(files)} files to {url}" + (f" (branch {revision})" if revision else ""))

    guarded(debug, body)


def plot(
    runs: Annotated[list[str], typer.Argument(help="Run directories (several: drawn on one figure).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="PNG to write (default RUN/curves.png "
                                                                         "for one run, ./curves.png for several).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Draw loss, eval loss, learning rate and tokens/s (reward for RL) from the runs' log.jsonl.

    Example: finetune plot runs/a runs/b -o compare.png"""

    def body():
        from finetune.hub.plot import plot_runs

        typer.echo(f"wrote {plot_runs([Path(r) for r in runs], Path(output) if output else None)}")

    guarded(debug, body)


def runs_command(
    folder: Annotated[str, typer.Argument(help="Folder holding runs (default runs/).")] = "runs",
) -> None:
    """List the runs under a folder: task, method, base, steps, final metrics, status."""
    from finetune.run.listing import runs_table

    for line in runs_table(Path(folder)):
        typer.echo(line)
