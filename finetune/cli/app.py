"""The `finetune` command line: the app, the training verbs, chain, validate and demo.

Commands that use a trained run live in use.py, the tools around runs in tools.py, and what
they all share (the error contract, option types, flags -> overrides) in cli/common.py; they are
registered here, in the order `finetune --help` lists them. Nothing heavy is imported at module
level (no torch, no transformers), so `finetune --help` answers at once; each command imports what
it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune import __version__
from finetune.cli import ship
from finetune.cli.evaluate import eval_
from finetune.cli import tools
from finetune.cli import use
from finetune.cli.common import (Bf16Opt, DataOpt, MethodOpt, DebugOpt, DistOpt, EpochsOpt, EvalOpt, Fp16Opt, IpOpt,
                                 MachinesOpt, ModelOpt, OutputOpt, OverwriteOpt, PortOpt, ProcsOpt, QuantOpt,
                                 RankOpt, RecipeArg, ResumeOpt, SetOpt, StepsOpt, TaskOpt, TASK_HELP, env_defaults,
                                 flag_overrides, guarded, resolve_recipe, scale_overrides)
from finetune.cli.tools import print_plan
from finetune.errors import UserError
from finetune.recipe.tasks import load_task

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


def run_training(method: str, recipe_name, overrides, sets, overwrite, resume) -> None:
    from finetune.run.lifecycle import execute

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
        from finetune.run.chain import load_chain, run_chain

        plan = load_chain(recipe, output, set_)
        env_defaults()
        run_chain(plan, resume=resume, overwrite=overwrite)

    guarded(debug, body)


@app.command()
def validate(recipe: RecipeArg = None, model: ModelOpt = None, task: TaskOpt = None, data: DataOpt = None,
             eval_data: EvalOpt = None, output: OutputOpt = None, max_steps: StepsOpt = None,
             epochs: EpochsOpt = None, set_: SetOpt = None,
             method: Annotated[str, typer.Option("--method", help="lora, full or pretrain.")] = "lora",
             num_processes: ProcsOpt = None, quant: QuantOpt = None, bf16: Bf16Opt = False, fp16: Fp16Opt = False,
             distributed: DistOpt = None, debug: DebugOpt = False) -> None:
    """Check a recipe AND its data before training; report every problem at once, then the memory estimate."""

    def body():
        from finetune.recipe.schema import Recipe

        scale = scale_overrides(quant, bf16, fp16, distributed)
        overrides = flag_overrides(model, task, data, eval_data, output, max_steps, epochs, num_processes, scale)
        from finetune.run.chain import describe, resolve_chain

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
        # a task whose rows follow the data says how long they are (and a vision-language task how many of
        # their tokens are images')
        problems, notes, *lengths = mod.check(r)
        from finetune.training.extras import extras_problems

        problems = [*problems, *extras_problems(r)]  # LoRA variants, trackers, kernels, best checkpoint, push
        for n in notes:
            typer.echo(f"  {n}")
        if problems:
            raise UserError(problems)
        typer.echo("data: ok")
        if r.model.name:
            try:
                seq, image_tokens = (*lengths, None, None)[:2]
                print_plan(r, seq=seq, image_tokens=image_tokens)
            except UserError:
                raise
            except Exception as e:  # an architecture the estimate does not understand: not a data problem
                typer.echo(f"memory: no estimate for this model ({type(e).__name__}: {e})")

    guarded(debug, body)


def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Where the demo runs go.")] = "runs/demo",
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole workflow offline in a few minutes: pre-train a small GPT on a built-in corpus,
    LoRA-fine-tune it on a small task, generate from it, then chat-fine-tune it and chat."""

    def body():
        env_defaults()
        from finetune.cli.demo import run_demo

        run_demo(Path(output), overwrite)

    guarded(debug, body)


# Commands that use a trained run, then the tools around runs (use.py, evaluate.py, ship.py, tools.py).
for name, command in (("generate", use.generate), ("chat", use.chat), ("merge", use.merge),
                      ("eval", eval_), ("export", ship.export), ("env", tools.env)):
    app.command(name)(command)
app.command("demo")(demo)
for name, command in (("fill-mask", use.fill_mask), ("predict", use.predict),
                      ("translate", use.translate), ("caption", use.caption), ("plan", tools.plan),
                      ("prepare", tools.prepare),
                      ("launch-config", tools.launch_config_command)):
    app.command(name)(command)
app.add_typer(tools.recipes_app, name="recipes")
for name, command in (("push", tools.push), ("plot", tools.plot), ("runs", tools.runs_command)):
    app.command(name)(command)


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
