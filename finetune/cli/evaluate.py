"""`finetune eval RUN`: score a finished run with lm-evaluation-harness (finetune/use/evaluate.py).

Registered on the app in cli/app.py as `eval`; lm-eval, torch and transformers are imported when it runs.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from finetune.cli.common import DebugOpt, env_defaults, guarded
from finetune.errors import UserError


def eval_(
    run: Annotated[str, typer.Argument(help="A finished run directory (LoRA or full), or a model directory.")],
    tasks: Annotated[Optional[list[str]], typer.Option(
        "--tasks", "-t", help="lm-eval task names (arc_easy,hellaswag; their data must be on this machine when "
                              "offline) and task YAML files, comma-separated or repeated.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(
        "--data", "-d", help="A local .jsonl task: rows with `prompt` and `reference` (generation: exact match, "
                             "chrF), or `prompt`, `choices` and `answer` (multiple choice: acc, acc_norm). "
                             "Repeatable.")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also score the base model the same way, and show "
                                                              "base, run and difference.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Score only the first N rows of each task "
                                                                        "(a quick look, not a result).")] = None,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Rows per forward pass, or auto (largest "
                                                                      "that fits, on a GPU).")] = "8",
    debug: DebugOpt = False,
) -> None:
    """Score a trained run on benchmarks (lm-evaluation-harness) or local tasks; results go to RUN/eval/,
    RUN/metrics.json and the model card.

    Example: finetune eval runs/smollm2-lora --data qa.jsonl --baseline
             finetune eval runs/smollm2-lora --tasks arc_easy,my_task.yaml --limit 200
    """

    def body():
        env_defaults()
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise UserError("eval: lm-evaluation-harness is not installed; pip install 'finetune-toolkit[eval]' (or lm-eval)")
        from finetune.use.eval_tasks import table
        from finetune.use.evaluate import evaluate_run

        result = evaluate_run(run, tasks, data, baseline, batch_size, limit, verbose=debug,
                              log=lambda line: typer.echo(line, err=True))
        for line in table(result["tasks"]):
            typer.echo(line)
        took = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
        typer.echo(f"({result['precision']}; {took})")
        typer.echo("results: " + ", ".join(str(p) for p in result["files"]))
        if limit is not None:
            typer.echo(f"--limit {limit}: a quick look at the first rows of each task; metrics.json and the model "
                       "card are unchanged")

    guarded(debug, body)
