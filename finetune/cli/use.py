"""Commands that use a trained run: generate, chat, merge, fill-mask, predict, translate, caption.

Registered on the app in cli/app.py; each imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.cli.common import DebugOpt, OverwriteOpt, env_defaults, guarded
from finetune.errors import UserError
from finetune.recipe.tasks import load_task, task_info


# Sampling, shared by generate and chat (each with its own defaults).
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1)]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
SeedOpt = Annotated[int, typer.Option("--seed")]
ToolsOpt = Annotated[Optional[Path], typer.Option("--tools", help="A JSON list of function schemas offered to the "
                                                                  "model (its chat template renders them); a "
                                                                  "generated call is printed as parsed JSON.")]


def generate(
    model: Annotated[str, typer.Argument(help="A run directory (adapter or full model) or a model directory / Hub id.")],
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue, or the user's message for a run "
                                                        "trained on conversations.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="A .jsonl of `prompt` strings or `messages` "
                                                                "conversations (image rows for a vision-language "
                                                                "run): generate for every row.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --data: the .jsonl to write.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain text even for a chat run: no chat template.")] = False,
    images: Annotated[Optional[list[str]], typer.Option("--image", help="An image file for a vision-language run "
                                                                    "(repeatable), placed before the text.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="With --data: prompts per batch.")] = 8,
    max_new_tokens: MaxNewTokensOpt = 64, temperature: TemperatureOpt = 0.8, top_p: TopPOpt = 0.95,
    seed: SeedOpt = 0, tools: ToolsOpt = None,
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
        from finetune.use.inference import generate_file, generate_text, read_tools
        from finetune.use.vision import generate_image_file, generate_images, is_vision_run

        if images and data is not None:
            raise UserError("--image: with --data, each row names its own images; drop --image")
        vision = bool(images) or is_vision_run(model)
        offered = read_tools(tools)
        if prompt is not None:
            typer.echo(generate_images(model, prompt, images or [], max_new_tokens, temperature, top_p, seed)
                       if vision else generate_text(model, prompt, max_new_tokens, temperature, top_p, seed, raw,
                                                    offered))
            return
        stats = (generate_image_file(model, data, output, batch_size, max_new_tokens, temperature, top_p, seed)
                 if vision else generate_file(model, data, output, batch_size, max_new_tokens, temperature, top_p,
                                              seed, raw, offered))
        typer.echo(f"{stats['rows']} rows -> {output}: {stats['new_tokens']} new tokens in {stats['seconds']:.1f} s "
                   f"({stats['new_tokens'] / max(stats['seconds'], 1e-9):.0f} tokens/s, "
                   f"{stats['rows'] / max(stats['seconds'], 1e-9):.1f} rows/s)")

    guarded(debug, body)


def chat(
    model: Annotated[str, typer.Argument(help="A run trained on conversations, or a chat model's directory / Hub id.")],
    system: Annotated[Optional[str], typer.Option("--system", help="A system prompt to start with.")] = None,
    max_new_tokens: MaxNewTokensOpt = 256, temperature: TemperatureOpt = 0.7, top_p: TopPOpt = 0.95,
    seed: SeedOpt = 0, tools: ToolsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Chat with a run in the terminal: history kept, answers streamed, /system TEXT, /reset, /quit; /image PATH
    attaches an image (vision-language runs)."""

    def body():
        env_defaults()
        from finetune.use.inference import chat_session, read_tools
        from finetune.use.vision import is_vision_run, vision_chat_session

        if is_vision_run(model):  # /image PATH attaches images
            vision_chat_session(model, max_new_tokens, temperature, top_p, seed, system)
            return
        chat_session(model, max_new_tokens, temperature, top_p, seed, system, tools=read_tools(tools))

    guarded(debug, body)


def merge(
    run: Annotated[str, typer.Argument(help="A LoRA run directory.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the merged model.")],
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge a LoRA adapter into its base: a plain transformers model."""

    def body():
        env_defaults()
        from finetune.use.inference import merge_run

        out = merge_run(Path(run), Path(output), overwrite)
        typer.echo(f"merged model: {out}/\nload it with: AutoModel*.from_pretrained(\"{out}\")")

    guarded(debug, body)


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
        from finetune.use.inference import check_model_dir, run_recipe

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
    from finetune.recipe.tasks import REGISTRY

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
        from finetune.tasks.metrics import generation_metrics

        m = generation_metrics([r[field] for r in scored], [r["reference"] for r in scored])
        typer.echo(f"against the {len(scored)} references: BLEU {m['bleu']:.2f}, chrF {m['chrf']:.2f}, "
                   f"exact {m['exact_match']:.1%}")


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


def caption(
    run: Annotated[str, typer.Argument(help="A captioning or vision-language run directory (or a merged model "
                                            "directory).")],
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="An image folder, or a file with an image "
                                                                     "column, instead.")] = None,
    output: OutFileOpt = None, num_beams: BeamsOpt = None, max_length: MaxLenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Caption images with a trained captioning run, or a vision-language run trained on captions (each image
    alone as the prompt, as `image` + `caption` rows train it).

    Example: finetune caption runs/vit-gpt2-captions photo.png
    """

    def body():
        env_defaults()
        from finetune.use.vision import caption_images, is_vision_run

        if is_vision_run(run):
            if num_beams:
                raise UserError("--num-beams: a vision-language run captions greedily; drop --num-beams")
            rows = caption_images(run, images, data, max_length or 64)
        else:
            from finetune.tasks.captioning import caption as run_caption

            rows = run_caption(Path(run), images, data, num_beams, max_length)
        if not output:
            for row in rows:
                typer.echo(f"{row['image']}\t{row['caption']}" if len(rows) > 1 else row["caption"])
            return
        write_or_print(rows, output, "caption")

    guarded(debug, body)
