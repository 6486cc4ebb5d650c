"""What every command shares: the error contract (`guarded`), offline defaults, the option types of the
training verbs, and flags -> recipe overrides. Imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from finetune.errors import Stopped, UserError, first_line
from finetune.recipe.tasks import method_tasks


def fail(problems: list[str], code: int = 2) -> None:
    for p in problems:
        typer.secho(f"error: {p}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def guarded(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run `fn`; bad input ends in one line per problem and exit code 2, without a traceback."""
    if not debug:
        import warnings

        import logging

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # three bars per split otherwise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "Loading weights" bar
        # Already imported (the CLI called in-process): too late for the environment variables.
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.getLogger("kernels").setLevel(logging.ERROR)  # bitsandbytes' kernel lookup, offline: nothing to act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # peft, saving a checkpoint of a LoRA run whose chat template added tokens: checkpoints keep the
        # whole embedding matrix (for resuming), the finished run only the new rows; nothing to act on
        warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`", category=UserWarning)
    try:
        return fn()
    except UserError as e:
        if debug:
            raise
        fail(e.problems)
    except Stopped as e:  # interrupted (143/130) or diverged (3): the lines say what was kept
        for line in e.lines:
            typer.secho(line, err=True, fg=typer.colors.RED if line.startswith("error") else None)
        raise typer.Exit(e.code)
    except KeyboardInterrupt:
        typer.secho("interrupted; continue from the last checkpoint with --resume", err=True)
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug or an environment failure, not bad input
        if debug:
            raise

        fail([f"{type(e).__name__}: {first_line(e)}", "run again with --debug for the full traceback"], code=1)


def env_defaults() -> None:
    """Offline-safe defaults before any Hugging Face import."""
    from finetune.launch.offline import use_offline_defaults

    use_offline_defaults()


RecipeArg = Annotated[Optional[str], typer.Argument(help="Recipe: a YAML file or a built-in name "
                                                          "(`finetune recipes list`).", show_default=False)]


ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, local model directory or .gguf file.")]


TASK_HELP = f"Task (default clm): {', '.join(method_tasks())}."


TaskOpt = Annotated[Optional[str], typer.Option("--task", "-t", help=TASK_HELP)]


MethodOpt = Annotated[Optional[str], typer.Option("--method", help="lora (default) or full.")]


DataOpt = Annotated[Optional[str], typer.Option("--data", "-d", help="Training data: .jsonl/.json/.csv/.parquet/.txt, a folder, or a Hub dataset.")]


EvalOpt = Annotated[Optional[str], typer.Option("--eval-data", help="Evaluation data (default: hold out a small split).")]


OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Run directory (default runs/<model>-<task>-<method>).")]


StepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps (overrides --epochs).")]


EpochsOpt = Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training data.")]


SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any recipe field: --set train.learning_rate=1e-4 (repeatable).")]


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in the output directory.")]


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its last checkpoint.")]


ProcsOpt = Annotated[Optional[int], typer.Option("--num-processes", "-n", help="Data-parallel processes (accelerate), on all machines together.")]


QuantOpt = Annotated[Optional[str], typer.Option("--quant", help="QLoRA: load the base in 4bit (NF4) or 8bit with bitsandbytes.", show_default=False)]


Bf16Opt = Annotated[bool, typer.Option("--bf16", help="bfloat16 mixed precision (Ampere+ GPUs; CPUs with AVX512-BF16/AMX).")]


Fp16Opt = Annotated[bool, typer.Option("--fp16", help="float16 mixed precision (CUDA GPUs).")]


DistOpt = Annotated[Optional[str], typer.Option("--distributed", help="Preset: ddp, fsdp, deepspeed-zero2, deepspeed-zero3, or an accelerate config file.", show_default=False)]


MachinesOpt = Annotated[Optional[int], typer.Option("--num-machines", help="Multi-node: machines taking part.", show_default=False)]


RankOpt = Annotated[Optional[int], typer.Option("--machine-rank", help="Multi-node: this machine's index (0 = main).", show_default=False)]


IpOpt = Annotated[Optional[str], typer.Option("--main-process-ip", help="Multi-node: address of machine 0.", show_default=False)]


PortOpt = Annotated[Optional[int], typer.Option("--main-process-port", help="Multi-node: port on machine 0 (default 29500).", show_default=False)]


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library warnings.")]


def flag_overrides(model, task, data, eval_data, output, max_steps, epochs, num_processes,
                   scale: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model.name": model, "task": task, "data.train": data, "data.eval": eval_data,
            "train.output_dir": output, "train.max_steps": max_steps, "train.epochs": epochs,
            "train.num_processes": num_processes, **(scale or {})}


def scale_overrides(quant=None, bf16=False, fp16=False, distributed=None, num_machines=None, machine_rank=None,
                    main_process_ip=None, main_process_port=None) -> dict[str, Any]:
    """The scale-out flags as recipe keys; a flag not given leaves the recipe's value."""
    bits = None
    if quant is not None:
        bits = {"4bit": 4, "4": 4, "nf4": 4, "8bit": 8, "8": 8, "int8": 8}.get(quant.lower())
        if bits is None:
            raise UserError(f"--quant: expected 4bit or 8bit, got '{quant}'")
    return {"quant.bits": bits, "train.bf16": True if bf16 else None, "train.fp16": True if fp16 else None,
            "train.distributed": distributed, "train.num_machines": num_machines,
            "train.machine_rank": machine_rank, "train.main_process_ip": main_process_ip,
            "train.main_process_port": main_process_port}


def resolve_recipe(method: str | None, recipe: str | None, overrides: dict[str, Any], sets: list[str] | None,
                   resume: bool, allow_chain: bool = False):
    from finetune.run.lifecycle import resolve

    return resolve(method, recipe, overrides, sets, resume, allow_chain)
