"""The `finetune` command line: one short function per verb.

Nothing heavy is imported at module level (no torch, no transformers), so `finetune --help`
answers at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from finetune import __version__
from finetune.errors import UserError

app = typer.Typer(
    name="finetune",
    help="Fine-tune transformer models (GPT, BERT, T5, ViT) with LoRA, full training or QLoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and copy the built-in recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


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
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return fn()
    except UserError as e:
        if debug:
            raise
        fail(e.problems)
    except KeyboardInterrupt:
        typer.secho("interrupted; continue from the last checkpoint with --resume", err=True)
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug or an environment failure, not bad input
        if debug:
            raise
        from finetune.models import first_line

        fail([f"{type(e).__name__}: {first_line(e)}", "run again with --debug for the full traceback"], code=1)


def task_module(task: str):
    from finetune.recipe import TASKS

    return importlib.import_module(TASKS[task])


def env_defaults() -> None:
    """Offline-safe defaults before any Hugging Face import."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from finetune.models import hub_reachable

    if not hub_reachable():
        # Without these, a Hub id retries for ~46 s and evaluate fetches metric scripts.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")


# ---------------------------------------------------------------------------------------
# Training commands: lora, full, pretrain share one signature.

RecipeArg = Annotated[Optional[str], typer.Argument(help="Recipe: a YAML file or a built-in name "
                                                          "(`finetune recipes list`).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local model directory.")]
TASK_HELP = "Task (default clm): clm, mlm, classification, translation, image-classification, captioning."
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
ProcsOpt = Annotated[Optional[int], typer.Option("--num-processes", "-n", help="Data-parallel processes (accelerate).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library warnings.")]


def flag_overrides(model, task, data, eval_data, output, max_steps, epochs, num_processes) -> dict[str, Any]:
    return {"model.name": model, "task": task, "data.train": data, "data.eval": eval_data,
            "train.output_dir": output, "train.max_steps": max_steps, "train.epochs": epochs,
            "train.num_processes": num_processes}


def resolve_recipe(method: str | None, recipe: str | None, overrides: dict[str, Any], sets: list[str] | None,
                   resume: bool):
    from finetune.recipe import build_recipe, find_recipe, load_recipe, read_recipe_file

    overrides = {"method": method, **overrides}  # None: the recipe's own method (default lora)
    # `--resume -o DIR` alone continues DIR with the recipe it was started with.
    if recipe is None and resume and overrides.get("train.output_dir"):
        saved = Path(overrides["train.output_dir"]) / "recipe.yaml"
        if saved.is_file():
            return build_recipe(read_recipe_file(saved), overrides, sets)
    if recipe is not None:
        find_recipe(recipe)
    return load_recipe(recipe, overrides, sets)


def run_training(method: str, recipe_name, overrides, sets, overwrite, resume) -> None:
    from finetune import training
    from finetune.launch import relaunch

    recipe = resolve_recipe(method, recipe_name, overrides, sets, resume)
    if recipe.stages:
        raise UserError(f"recipe: '{recipe_name}' is a chain (it has stages); run it with "
                        f"`finetune chain {recipe_name}`")
    if not training.launched_child() and training.is_main_process():
        training.check_run_dir(recipe.output_dir, overwrite, resume)
    if recipe.train.num_processes > 1 and training.world_size() == 1:
        relaunch(recipe.train.num_processes, resume)
        return
    env_defaults()
    task_module(recipe.task).run(recipe, resume=resume)




def make_train_command(name: str, summary: str, task: str | None = None) -> None:
    """Register `finetune NAME`. For lora/full/pretrain NAME is the method and --task picks the
    task; for a task verb (reward, dpo, ...) NAME is the task and --method picks the method."""
    is_method = task is None

    def command(
        recipe: RecipeArg = None, model: ModelOpt = None,
        task_: TaskOpt = None, method_: MethodOpt = None,
        data: DataOpt = None, eval_data: EvalOpt = None, output: OutputOpt = None, max_steps: StepsOpt = None,
        epochs: EpochsOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False,
        resume: ResumeOpt = False, num_processes: ProcsOpt = None, debug: DebugOpt = False,
    ) -> None:
        def body():
            if is_method and method_:
                raise UserError(f"--method: `finetune {name}` always uses {name}; drop --method")
            if not is_method and task_:
                raise UserError(f"--task: `finetune {name}` always runs the {name} task; drop --task")
            overrides = flag_overrides(model, task_ or task, data, eval_data, output, max_steps, epochs,
                                       num_processes)
            run_training(name if is_method else method_, recipe, overrides, set_, overwrite, resume)

        guarded(debug, body)

    # --task only where NAME is a method, --method only where NAME is a task.
    command.__annotations__.update(
        task_=Annotated[Optional[str], typer.Option("--task", "-t", hidden=not is_method, help=TASK_HELP)],
        method_=Annotated[Optional[str], typer.Option("--method", hidden=is_method, help="lora (default) or full.")])
    command.__doc__ = summary
    app.command(name, help=summary)(command)


make_train_command("lora", "Fine-tune with LoRA adapters (peft): the base stays frozen.\n\n"
                           "Example: finetune lora --model gpt2 --data train.jsonl -o runs/gpt2-lora")
make_train_command("full", "Fine-tune all parameters.\n\n"
                           "Example: finetune full --model gpt2 --data train.jsonl -o runs/gpt2-full")
make_train_command("pretrain", "Train a model from scratch: the architecture from a size preset or config "
                               "(model.config), a tokenizer trained on the corpus when none is given.\n\n"
                               "Example: finetune pretrain --data corpus.txt --set model.config=small -o runs/gpt-small")

# --- RLHF task verbs (reward, dpo, ppo, grpo) are registered here with make_train_command(..., task=...) ---

make_train_command("reward", "Train a reward model on preference pairs (prompt/chosen/rejected): a classifier "
                             "with one output; reports pairwise accuracy and margin on held-out pairs.\n\n"
                             "Example: finetune reward --model gpt2 --data prefs.jsonl -o runs/gpt2-reward",
                   task="reward")
make_train_command("dpo", "Direct preference optimization (trl DPOTrainer) on prompt/chosen/rejected pairs, "
                          "against a frozen reference: the base without the adapter (LoRA) or a copy (full).\n\n"
                          "Example: finetune dpo --model runs/sft/merged --data prefs.jsonl -o runs/dpo",
                   task="dpo")
make_train_command("grpo", "Online RL without a critic (trl GRPOTrainer): sample several completions per prompt "
                           "and reward them with a reward model or a module:function.\n\n"
                           "Example: finetune grpo --model gpt2 --data prompts.jsonl --set grpo.reward=runs/rm -o runs/grpo",
                   task="grpo")


@app.command()
def chain(
    recipe: Annotated[str, typer.Argument(help="A chained recipe (one with `stages:`): a YAML file or a built-in name.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Chain directory (default runs/chain); "
                                                  "each stage runs in <dir>/<stage name>.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="Override a shared field (--set train.max_steps=50) or one stage's "
                            "(--set stages.dpo.dpo.beta=0.2); repeatable.")] = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip finished stages; continue the interrupted one.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a chained recipe: stages such as SFT -> reward -> DPO (or PPO, GRPO), each stage's output
    feeding the next, each one resumable.

    Example: finetune chain tiny-gpt-chain-sft-reward-dpo -o runs/tiny-chain"""

    def body():
        from finetune.chain import load_chain, run_chain

        plan = load_chain(recipe, output, set_)
        env_defaults()
        run_chain(plan, resume=resume, overwrite=overwrite)

    guarded(debug, body)


# ---------------------------------------------------------------------------------------
# Checking, using and exporting runs


@app.command()
def validate(recipe: RecipeArg = None, model: ModelOpt = None, task: TaskOpt = None, data: DataOpt = None,
             eval_data: EvalOpt = None, output: OutputOpt = None, max_steps: StepsOpt = None,
             epochs: EpochsOpt = None, set_: SetOpt = None,
             method: Annotated[str, typer.Option("--method", help="lora, full or pretrain.")] = "lora",
             debug: DebugOpt = False) -> None:
    """Check a recipe AND its data before training; report every problem at once."""

    def body():
        from finetune.recipe import Recipe

        overrides = flag_overrides(model, task, data, eval_data, output, max_steps, epochs, None)
        try:
            r: Recipe = resolve_recipe(method, recipe, overrides, set_, False)
        except UserError as e:
            typer.echo(f"recipe: {len(e.problems)} problem(s)")
            raise
        if r.stages:  # a chain: every stage's recipe is valid; later stages' inputs do not exist yet
            from finetune.chain import describe

            typer.echo(f"recipe: ok\n{describe(r)}")
            return
        typer.echo(f"recipe: ok ({r.task}, {r.method}, model {r.model.name or r.model.config or 'tiny'})")
        env_defaults()
        mod = task_module(r.task)
        problems, notes = mod.check(r) if hasattr(mod, "check") else ([], [])
        for n in notes:
            typer.echo(f"  {n}")
        if problems:
            raise UserError(problems)
        typer.echo("data: ok")

    guarded(debug, body)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run directory (adapter or full model) or a model directory / Hub id.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: DebugOpt = False,
) -> None:
    """Continue a prompt with a trained run or any causal LM."""

    def body():
        env_defaults()
        from finetune.inference import generate_text

        typer.echo(generate_text(model, prompt, max_new_tokens, temperature, top_p, seed))

    guarded(debug, body)


@app.command()
def merge(
    run: Annotated[str, typer.Argument(help="A LoRA run directory.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the merged model.")],
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge a LoRA adapter into its base: a plain transformers model."""

    def body():
        env_defaults()
        from finetune.inference import merge_run

        out = merge_run(Path(run), Path(output), overwrite)
        typer.echo(f"merged model: {out}/\nload it with: AutoModel*.from_pretrained(\"{out}\")")

    guarded(debug, body)


@app.command()
def env(debug: DebugOpt = False) -> None:
    """Versions, devices, and whether the Hugging Face Hub is reachable."""

    def body():
        from finetune.launch import environment_report

        typer.echo(environment_report())

    guarded(debug, body)


@app.command()
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Where the demo runs go.")] = "runs/demo",
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole workflow offline in a few minutes: pre-train a small GPT on a built-in corpus,
    LoRA-fine-tune it on a small task, generate from it."""

    def body():
        env_defaults()
        from finetune.demo import run_demo

        run_demo(Path(output), overwrite)

    guarded(debug, body)


# --- task commands that use a trained run (fill-mask, predict, translate, caption) go here ---


# --- scale-out commands (launch-config, plan) go here ---


# ---------------------------------------------------------------------------------------
# Recipes


@recipes_app.command("list")
def recipes_list() -> None:
    """The built-in recipes with their one-line descriptions."""
    from finetune.recipe import builtin_recipes

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
    from finetune.recipe import builtin_recipes

    found = builtin_recipes()
    if name not in found:
        raise UserError(f"recipe '{name}': no such built-in recipe{did_you_mean(name, found)}; "
                        "`finetune recipes list` shows them")
    return found[name]


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version.")] = False) -> None:
    """Fine-tune transformer models (GPT, BERT, T5, ViT) with LoRA, full training or QLoRA."""


def main() -> None:
    app(prog_name="finetune")


if __name__ == "__main__":
    main()
