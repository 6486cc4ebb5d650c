"""The `finetune` command line: one short function per verb.

Nothing heavy is imported at module level (no torch, no transformers), so `finetune --help`
answers at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from finetune import __version__
from finetune.errors import Stopped, UserError
from finetune.tasks import load_task, method_tasks, task_info

app = typer.Typer(
    name="finetune",
    help="Fine-tune transformer models (GPT, BERT, T5, ViT) with LoRA, full training or QLoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: rich's panels cost more start-up than the rest of `finetune --help` together
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and copy the built-in recipes.", no_args_is_help=True, rich_markup_mode=None)
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
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # three bars per split otherwise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "Loading weights" bar
        # Already imported (the CLI called in-process): too late for the environment variables.
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
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
        from finetune.models import first_line

        fail([f"{type(e).__name__}: {first_line(e)}", "run again with --debug for the full traceback"], code=1)


def env_defaults() -> None:
    """Offline-safe defaults before any Hugging Face import."""
    from finetune.hub import use_offline_defaults

    use_offline_defaults()


# ---------------------------------------------------------------------------------------
# Training commands: lora, full, pretrain share one signature.

RecipeArg = Annotated[Optional[str], typer.Argument(help="Recipe: a YAML file or a built-in name "
                                                          "(`finetune recipes list`).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local model directory.")]
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
    from finetune.run import resolve

    return resolve(method, recipe, overrides, sets, resume, allow_chain)


def run_training(method: str, recipe_name, overrides, sets, overwrite, resume) -> None:
    from finetune.run import execute

    execute(resolve_recipe(method, recipe_name, overrides, sets, resume), resume=resume, overwrite=overwrite)


def make_train_command(name: str, summary: str, task: str | None = None) -> None:
    """Register `finetune NAME`. For lora/full/pretrain NAME is the method and --task picks the
    task; for a task verb (reward, dpo, ...) NAME is the task and --method picks the method."""
    is_method = task is None

    def command(
        recipe: RecipeArg = None, model: ModelOpt = None,
        task_: TaskOpt = None, method_: MethodOpt = None,
        data: DataOpt = None, eval_data: EvalOpt = None, output: OutputOpt = None, max_steps: StepsOpt = None,
        epochs: EpochsOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False,
        resume: ResumeOpt = False, num_processes: ProcsOpt = None,
        quant: QuantOpt = None, bf16: Bf16Opt = False, fp16: Fp16Opt = False, distributed: DistOpt = None,
        num_machines: MachinesOpt = None, machine_rank: RankOpt = None, main_process_ip: IpOpt = None,
        main_process_port: PortOpt = None, debug: DebugOpt = False,
    ) -> None:
        def body():
            if is_method and method_:
                raise UserError(f"--method: `finetune {name}` always uses {name}; drop --method")
            if not is_method and task_:
                raise UserError(f"--task: `finetune {name}` always runs the {name} task; drop --task")
            scale = scale_overrides(quant, bf16, fp16, distributed, num_machines, machine_rank, main_process_ip,
                                    main_process_port)
            overrides = flag_overrides(model, task_ or task, data, eval_data, output, max_steps, epochs,
                                       num_processes, scale)
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

make_train_command("ppo", "Reinforce a policy with PPO against a reward model or a Python reward function, "
                          "with a KL penalty to the starting policy.\n\n"
                          "Example: finetune ppo --model gpt2 --data prompts.jsonl "
                          "--set ppo.reward=runs/gpt2-reward -o runs/gpt2-ppo", task="ppo")


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
             num_processes: ProcsOpt = None, quant: QuantOpt = None, bf16: Bf16Opt = False, fp16: Fp16Opt = False,
             distributed: DistOpt = None, debug: DebugOpt = False) -> None:
    """Check a recipe AND its data before training; report every problem at once, then the memory estimate."""

    def body():
        from finetune.recipe import Recipe

        scale = scale_overrides(quant, bf16, fp16, distributed)
        overrides = flag_overrides(model, task, data, eval_data, output, max_steps, epochs, num_processes, scale)
        from finetune.chain import describe, resolve_chain

        try:
            r: Recipe = resolve_recipe(method, recipe, overrides, set_, False, allow_chain=True)
            chain = resolve_chain(r) if r.stages else None
        except UserError as e:
            typer.echo(f"recipe: {len(e.problems)} problem(s)")
            raise
        if chain:  # every stage's recipe is valid; later stages' inputs do not exist yet
            typer.echo(f"recipe: ok\n{describe(chain)}")
            return
        typer.echo(f"recipe: ok ({r.task}, {r.method}, model {r.model.name or r.model.config or 'tiny'})")
        env_defaults()
        mod = load_task(r.task)
        problems, notes = mod.check(r)
        from finetune.extras import extras_problems

        problems = [*problems, *extras_problems(r)]  # LoRA variants, trackers, kernels, best checkpoint, push
        for n in notes:
            typer.echo(f"  {n}")
        if problems:
            raise UserError(problems)
        typer.echo("data: ok")
        if r.model.name:
            try:
                print_plan(r)
            except UserError:
                raise
            except Exception as e:  # an architecture the estimate does not understand: not a data problem
                typer.echo(f"memory: no estimate for this model ({type(e).__name__}: {e})")

    guarded(debug, body)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run directory (adapter or full model) or a model directory / Hub id.")],
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue, or the user's message for a run "
                                                        "trained on conversations.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="A .jsonl of `prompt` strings or `messages` "
                                                                "conversations: generate for every row.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --data: the .jsonl to write.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain text even for a chat run: no chat template.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="With --data: prompts per batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: DebugOpt = False,
) -> None:
    """Continue a prompt with a trained run or any causal LM; runs trained on conversations answer it as a
    user message (their chat template applied)."""

    def body():
        if (prompt is None) == (data is None):
            raise UserError("generate: give a prompt or --data FILE (not both)")
        if data is not None and output is None:
            raise UserError("--output: with --data, name the .jsonl to write (-o out.jsonl)")
        env_defaults()
        from finetune.inference import generate_file, generate_text

        if prompt is not None:
            typer.echo(generate_text(model, prompt, max_new_tokens, temperature, top_p, seed, raw))
            return
        stats = generate_file(model, data, output, batch_size, max_new_tokens, temperature, top_p, seed, raw)
        typer.echo(f"{stats['rows']} rows -> {output}: {stats['new_tokens']} new tokens in {stats['seconds']:.1f} s "
                   f"({stats['new_tokens'] / max(stats['seconds'], 1e-9):.0f} tokens/s, "
                   f"{stats['rows'] / max(stats['seconds'], 1e-9):.1f} rows/s)")

    guarded(debug, body)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A run trained on conversations, or a chat model's directory / Hub id.")],
    system: Annotated[Optional[str], typer.Option("--system", help="A system prompt to start with.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: DebugOpt = False,
) -> None:
    """Chat with a run in the terminal: history kept, answers streamed, /system TEXT, /reset, /quit."""

    def body():
        env_defaults()
        from finetune.inference import chat_session

        chat_session(model, max_new_tokens, temperature, top_p, seed, system)

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
        from finetune.environment import environment_report

        typer.echo(environment_report())

    guarded(debug, body)


@app.command()
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Where the demo runs go.")] = "runs/demo",
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole workflow offline in a few minutes: pre-train a small GPT on a built-in corpus,
    LoRA-fine-tune it on a small task, generate from it, then chat-fine-tune it and chat."""

    def body():
        env_defaults()
        from finetune.demo import run_demo

        run_demo(Path(output), overwrite)

    guarded(debug, body)


# --- task commands that use a trained run (fill-mask, predict, translate, caption) go here ---


@app.command("fill-mask")
def fill_mask(
    model: Annotated[str, typer.Argument(help="An mlm run directory, a masked-LM model directory or a Hub id.")],
    text: Annotated[str, typer.Argument(help="Text with [MASK] where tokens are to be predicted.")],
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", min=1,
                                                 help="Candidates per mask (default: the run's mlm.top_k, 5).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Show the most likely tokens for each [MASK] in a text, with their probabilities.

    Example: finetune fill-mask runs/bert-mlm "the cat [MASK] sleeping on the floor"
    """

    def body():
        env_defaults()
        from finetune.tasks.mlm import fill_mask as fill

        for n, candidates in enumerate(fill(model, text, top_k), 1):
            typer.echo(f"[MASK] {n}: " + "  ".join(f"{token} ({p:.3f})" for token, p in candidates))

    guarded(debug, body)


@app.command()
def predict(
    run: Annotated[str, typer.Argument(help="A run directory (classification, image-classification).")],
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Inputs to label: texts, or image files for an "
                                                                "image run.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="A data file with the run's input columns "
                                                                     "(and, optionally, its label column).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write JSON lines to this file "
                                                                         "instead of printing.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output file.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Label inputs with a trained classifier: one line per input, or JSON lines with -o.

    Example: finetune predict runs/sentiment "a wonderful film" "a waste of time"
             finetune predict runs/sentiment --data test.jsonl -o preds.jsonl
    """

    def body():
        import json

        if inputs and data:
            raise UserError("inputs and --data: give inputs on the command line or --data FILE, not both")
        if not inputs and not data:
            raise UserError("nothing to predict: pass inputs after the run directory, or --data FILE")
        if output and Path(output).is_dir():
            raise UserError(f"--output: '{output}' is a directory; give a file name such as predictions.jsonl")
        if output and Path(output).exists() and not overwrite:
            raise UserError(f"--output: '{output}' already exists; pass --overwrite to replace it, or choose another file")
        env_defaults()
        from finetune.inference import check_model_dir, run_recipe

        run_dir = Path(run)
        check_model_dir(run_dir, "run")
        recipe = run_recipe(run_dir)
        task = recipe.task if recipe else classifier_task(run_dir)
        if task_info(task).inference != "predict":
            raise UserError(f"run: '{run}' was trained for the {task} task, which has no predict; "
                            "predict works with classification and image-classification runs")
        rows = load_task(task).predict(run_dir, list(inputs) if inputs else None, data)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            typer.echo(f"wrote {len(rows)} predictions to {output}")
        else:
            for r in rows:
                typer.echo(prediction_line(r))
        if rows and all("reference" in r for r in rows):
            right = sum(str(r["label"]) == str(r["reference"]) for r in rows)
            typer.echo(f"accuracy: {right / len(rows):.4f} ({right} of {len(rows)} labelled rows)")

    guarded(debug, body)


def classifier_task(model_dir: Path) -> str:
    """The task of a plain model directory (a merged run, a downloaded classifier) from its config."""
    import json

    config = model_dir / "config.json"
    architectures = (json.loads(config.read_text()).get("architectures") if config.is_file() else None) or [""]
    from finetune.tasks import REGISTRY

    for task in REGISTRY.values():  # AutoModelForSequenceClassification -> *ForSequenceClassification
        if task.inference == "predict" and architectures[0].endswith(task.auto_class.removeprefix("AutoModel")):
            return task.name
    raise UserError(f"run: '{model_dir}' has no recipe.yaml and is not a classifier; predict needs a "
                    "classification or image-classification run (or a model directory of one)")


def prediction_line(row: dict) -> str:
    """`label  score  input  key=value...` for one prediction of any task."""
    rest = [(k, v) for k, v in row.items() if k not in ("label", "score")]
    parts = [str(row.get("label", "")), f"{row['score']:.4f}" if isinstance(row.get("score"), float) else ""]
    parts += [str(v) if i == 0 else f"{k}={v}" for i, (k, v) in enumerate(rest)]
    return "\t".join(p for p in parts if p)

BeamsOpt = Annotated[Optional[int], typer.Option("--num-beams", min=1, help="Beam size (default: the run's).")]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-length", min=2, help="Longest output in tokens "
                                                                                "(default: the run's).")]
OutFileOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write one JSON line per input here "
                                                                           "instead of printing.")]


def write_or_print(rows: list[dict], output: str | None, field: str) -> None:
    """Print each result (one per line), or write them all to a .jsonl file with a short report."""
    import json

    if not output:
        for row in rows:
            typer.echo(row[field])
        return
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output: '{output}' is a directory; give a file name such as predictions.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    typer.echo(f"wrote {len(rows)} lines to {path}")
    scored = [r for r in rows if "reference" in r]
    if scored:
        from finetune.metrics import generation_metrics

        m = generation_metrics([r[field] for r in scored], [r["reference"] for r in scored])
        typer.echo(f"against the {len(scored)} references: BLEU {m['bleu']:.2f}, chrF {m['chrf']:.2f}, "
                   f"exact {m['exact_match']:.1%}")


@app.command()
def translate(
    run: Annotated[str, typer.Argument(help="A translation run directory (or a merged model directory).")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to translate.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="A file of texts instead: .jsonl/.csv/.parquet "
                                                                     "with the run's source column, or .txt.")] = None,
    output: OutFileOpt = None, num_beams: BeamsOpt = None, max_length: MaxLenOpt = None,
    prefix: Annotated[Optional[str], typer.Option("--prefix", help="Source prefix (default: the run's).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Translate texts with a trained translation run.

    Example: finetune translate runs/t5-ende "The house is small."
    """

    def body():
        env_defaults()
        from finetune.tasks.translation import translate as run_translate

        rows = run_translate(Path(run), texts, data, num_beams, max_length, prefix)
        write_or_print(rows, output, "translation")

    guarded(debug, body)


@app.command()
def caption(
    run: Annotated[str, typer.Argument(help="A captioning run directory (or a merged model directory).")],
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="An image folder, or a file with an image "
                                                                     "column, instead.")] = None,
    output: OutFileOpt = None, num_beams: BeamsOpt = None, max_length: MaxLenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Caption images with a trained captioning run.

    Example: finetune caption runs/vit-gpt2-captions photo.png
    """

    def body():
        env_defaults()
        from finetune.tasks.captioning import caption as run_caption

        rows = run_caption(Path(run), images, data, num_beams, max_length)
        if not output:
            for row in rows:
                typer.echo(f"{row['image']}\t{row['caption']}" if len(rows) > 1 else row["caption"])
            return
        write_or_print(rows, output, "caption")

    guarded(debug, body)


# --- scale-out commands (launch-config, plan) go here ---


def print_plan(recipe, capacity_gib: float | None = None) -> None:
    """The memory estimate, and a warning when it does not fit one device."""
    from finetune.memory import estimate, fit_problems, report
    from finetune.quantization import check_quantizable, skeleton

    model = skeleton(recipe.model, recipe.task)  # once, for both
    check_quantizable(recipe, model)
    est = estimate(recipe, model, capacity=capacity_gib * 2**30 if capacity_gib else None)
    typer.echo("\n".join(report(recipe, est)))
    for p in fit_problems(recipe, est):
        typer.secho(f"warning: {p}", err=True, fg=typer.colors.YELLOW)


@app.command()
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
        from finetune.recipe import find_recipe, load_recipe

        if recipe is not None:
            find_recipe(recipe)
        r = load_recipe(recipe, {"method": method, **overrides}, set_, ignore=("data.train",))
        env_defaults()
        print_plan(r, device_memory)

    guarded(debug, body)


@app.command("launch-config")
def launch_config_command(
        recipe: RecipeArg = None, set_: SetOpt = None, num_processes: ProcsOpt = None, bf16: Bf16Opt = False,
        fp16: Fp16Opt = False, distributed: DistOpt = None, num_machines: MachinesOpt = None,
        machine_rank: RankOpt = None, main_process_ip: IpOpt = None, main_process_port: PortOpt = None,
        debug: DebugOpt = False) -> None:
    """Print the accelerate config a run with these flags uses (a preset with the run's values filled in).

    Example: finetune launch-config --distributed fsdp -n 16 --num-machines 2 --main-process-ip 10.0.0.1"""

    def body():
        from finetune.presets import launch_config_yaml
        from finetune.recipe import find_recipe, load_recipe

        scale = scale_overrides(None, bf16, fp16, distributed, num_machines, machine_rank, main_process_ip,
                                main_process_port)
        overrides = flag_overrides(None, None, None, None, None, None, None, num_processes, scale)
        if recipe is not None:
            find_recipe(recipe)
        r = load_recipe(recipe, overrides, set_, ignore=("data.train", "model.name"))
        typer.echo(launch_config_yaml(r), nl=False)

    guarded(debug, body)


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


# ---------------------------------------------------------------------------------------
# The ecosystem: publish, compare and list runs


@app.command()
def push(
    run: Annotated[str, typer.Argument(help="A finished run directory.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id: user/name or org/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created if "
                                                                       "missing; default main).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Upload a run to the Hugging Face Hub: model or adapter, tokenizer, card, recipe, metrics, log.

    Never checkpoints/ or files holding a token. Needs HF_TOKEN or `hf auth login`.
    Example: finetune push runs/gpt2-lora me/gpt2-lora --private"""

    def body():
        import re

        from finetune.push import files_to_push, push_problems, push_run

        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise UserError(f"REPO_ID: '{repo_id}' is not a Hub repo id; write it as user/name or org/name")
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise UserError(f"run: '{run}' is not a directory")
        files = files_to_push(run_dir)
        problems = push_problems("push")
        if problems:
            raise UserError(problems)
        url = push_run(run_dir, repo_id, private, revision)
        typer.echo(f"pushed {len(files)} files to {url}" + (f" (branch {revision})" if revision else ""))

    guarded(debug, body)


@app.command()
def plot(
    runs: Annotated[list[str], typer.Argument(help="Run directories (several: drawn on one figure).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="PNG to write (default RUN/curves.png "
                                                                         "for one run, ./curves.png for several).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Draw loss, eval loss, learning rate and tokens/s (reward for RL) from the runs' log.jsonl.

    Example: finetune plot runs/a runs/b -o compare.png"""

    def body():
        from finetune.plot import plot_runs

        typer.echo(f"wrote {plot_runs([Path(r) for r in runs], Path(output) if output else None)}")

    guarded(debug, body)


@app.command("runs")
def runs_command(
    folder: Annotated[str, typer.Argument(help="Folder holding runs (default runs/).")] = "runs",
) -> None:
    """List the runs under a folder: task, method, base, steps, final metrics, status."""
    from finetune.runs import runs_table

    for line in runs_table(Path(folder)):
        typer.echo(line)


def main() -> None:
    app(prog_name="finetune")


if __name__ == "__main__":
    main()
