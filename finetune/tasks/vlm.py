"""Vision-language fine-tuning: images and text in, text out, the loss on the answers only.

    finetune lora --task vlm --model Qwen/Qwen2-VL-2B-Instruct --data vqa.jsonl -o runs/qwen2vl-vqa
    finetune lora --task vlm --model llava-hf/llava-1.5-7b-hf --data pets.jsonl --set lora.vision=true -o runs/llava

Model: an image-text-to-text checkpoint (Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 / SmolVLM, ...) with its
processor, whose chat template renders the conversations and whose image processor expands each image.
Data: vision chat rows (finetune/data/vision_rows.py; masks: vision_chat.py): trl's `images` + `messages`,
`<image>` placeholders (ShareGPT), or `image` + `question` + `answer` / `image` + `caption`; image paths
relative to the data file.
Recipe fields used: model.*, data.train/eval (or data.eval_split, or data.eval_fraction held out),
data.train_split, data.config, data.max_length (tokens with images expanded; unset: 2048), data.on_overflow
(drop|error), data.train_on, lora.* (lora.vision, lora.projector), train.*.
With LoRA the language model's linear layers get adapters; the vision tower and the projector stay frozen
unless lora.vision / lora.projector add them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from finetune.data import vision_chat as V
from finetune.data import vision_rows as R
from finetune.errors import UserError, first_line
from finetune.models.adapters import (VLM_PROJECTOR, VLM_VISION, apply_lora, is_adapter_dir, part_names,
                                      trained_towers)
from finetune.recipe.schema import Recipe
from finetune.training import session
from finetune.training.fit import fit_to_memory

MAX_LENGTH = 2048  # data.max_length when unset


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import set_seed

    set_seed(recipe.train.seed)
    d = recipe.data
    # 1. Processor: the chat template, the tokenizer and the image processor.
    check_takes_images(recipe.model)
    processor = load_processor(recipe.model)
    # 2. Data: rows checked, masks derived and checked per example, over-long examples dropped (never cut).
    max_length = d.max_length or MAX_LENGTH
    on_overflow = d.on_overflow
    rows, base = read_data(d.train, "data.train", d.train_split, d.config)
    train_lines, held_lines, note = hold_out(len(rows), recipe)
    train, stats = V.prepare(processor, [rows[i - 1] for i in train_lines], "data.train", base, max_length,
                             on_overflow, d.train_on, lines=train_lines)
    report(stats, "data.train", max_length)
    eval_ds = None
    if d.eval or d.eval_split:
        eval_rows, eval_base = read_data(d.eval or d.train, "data.eval", d.eval_split or "validation", d.config)
        eval_ds, _ = V.prepare(processor, eval_rows, "data.eval", eval_base, max_length, on_overflow, d.train_on)
    elif held_lines:
        print(note, flush=True)
        try:
            eval_ds, _ = V.prepare(processor, [rows[i - 1] for i in held_lines], "data.train", base, max_length,
                                   on_overflow, d.train_on, lines=held_lines)
        except V.NothingFits:
            print(f"warning: data.eval_fraction: none of the {len(held_lines)} held-out rows fits "
                  f"data.max_length={max_length} once its images are expanded; training without evaluation",
                  flush=True)
    # Batch and steps: the largest micro-batch that fits (the longest example, its images' tokens and, when
    # the tower trains, its activations counted), and small data trained for enough optimizer steps.
    recipe = fit_to_memory(recipe, seq=max(stats["tokens"]), image_tokens=max(stats["image_tokens"]))
    recipe, lines = session.plan_steps(recipe, len(train), max(stats["tokens"]))
    for line in lines:
        print(line, flush=True)
    # 3. Model and LoRA on the language model (the vision tower and projector on request).
    model = load_model(recipe)
    if recipe.method == "lora":
        model = with_lora(model, recipe.lora)
    # 4. Train: images decoded batch by batch, ids checked against the prepared masks.
    run_dir = session.start_run(recipe)
    args = session.training_arguments(recipe, run_dir, remove_unused_columns=False)
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    trainer = make_trainer(model, processor, train, eval_ds, args,
                           [*session.callbacks(recipe, run_dir, session.checkpoint_step(checkpoint) or 0),
                            *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(run_dir))
    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    metrics["examples_dropped"] = stats["dropped"]
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


# ---------------------------------------------------------------------------------------
# Data


def read_data(source: str, key: str, split: str = "train", config: str | None = None
              ) -> tuple[list[dict], Path | None]:
    """Rows of a .jsonl/.json file (image paths relative to it) or a dataset's split (its image columns kept)."""
    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        try:
            rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{key}: '{source}' is not valid JSON ({first_line(e)}); one object per line") from e
        return rows, path.resolve().parent
    from finetune.data.sources import load_source

    return [dict(r) for r in load_source(str(source), key, split, config)], R.data_base_of(str(source))


def hold_out(rows: int, recipe: Recipe) -> tuple[list[int], list[int], str]:
    """(training rows, held-out rows, a line saying so), as 1-based row numbers of data.train: data.eval_fraction
    of the rows drawn with the run's seed when neither data.eval nor data.eval_split is set (as text data is
    split; rows, not examples, so a conversation stays on one side)."""
    import random

    d = recipe.data
    every = list(range(1, rows + 1))
    if d.eval or d.eval_split or d.eval_fraction <= 0 or rows < 4:
        return every, [], ""
    n = min(rows - 1, max(1, round(rows * d.eval_fraction)))
    held = set(random.Random(recipe.train.seed).sample(every, n))
    return ([i for i in every if i not in held], sorted(held),
            f"data.eval: {n} of the {rows} rows of data.train held out for evaluation (data.eval_fraction "
            f"{d.eval_fraction:g}; data.eval names a file instead, data.eval_fraction=0 trains on all)")


def report(stats: dict, key: str, max_length: int) -> None:
    from finetune.data.text import length_stats

    lengths = length_stats(stats["tokens"])
    print(f"{key}: {stats['rows']} rows, {stats['examples']} examples; tokens with images expanded: "
          + ", ".join(f"{k} {v:.0f}" for k, v in lengths.items() if k != "count"), flush=True)
    for note in R.mapping_notes(stats, key):
        print(note, flush=True)
    if stats["dropped"]:
        print(f"warning: {key}: dropped {stats['dropped']} examples longer than data.max_length={max_length} once "
              f"their images are expanded (rows {stats['dropped_rows'][:5]}); they are never cut, since a cut image "
              "no longer matches its features", flush=True)


class VisionCollator:
    """Renders a batch with the processor (images decoded now) and puts each example's prepared labels on its
    tokens. The processor must give back the very ids the mask was derived on: checked row by row."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, features: list[dict]) -> dict:
        import torch

        # the images of each example in a list of their own: Gemma 3's processor reads a flat list as all one
        # example's images
        pics = [[R.load_image(item, f"row {f.get('row', '?')}") for item in f["images"]] for f in features]
        batch = self.processor(text=[f["text"] for f in features], images=pics if any(pics) else None, padding=True,
                               add_special_tokens=False, return_tensors="pt", padding_side="right")
        labels = torch.full_like(batch["input_ids"], -100)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            if batch["input_ids"][b, :n].tolist() != list(f["input_ids"]) or int(batch["attention_mask"][b].sum()) != n:
                raise RuntimeError(f"row {f.get('row', '?')}: the processor's tokens differ from those the loss mask "
                                   "was derived on")
            labels[b, :n] = torch.tensor(f["labels"])
        batch["labels"] = labels
        return dict(batch)


# ---------------------------------------------------------------------------------------
# Model


def load_processor(spec):
    """The model's processor (finetune.data.vision_chat.load_processor), refusals naming model.name."""
    return V.load_processor(spec.name, "model.name", spec.trust_remote_code)


def check_takes_images(spec) -> None:
    """A model whose config has no vision tower is refused before anything loads."""
    from finetune.models import pretrained

    config = pretrained.load_config(spec)
    if not hasattr(config, "vision_config"):
        raise UserError(f"model.name: '{spec.name}' is a {config.model_type} model, which takes no images; "
                        f"use an image-text-to-text model ({R.TAKES_IMAGES})")


def load_model(recipe: Recipe):
    from transformers import AutoModelForImageTextToText

    from finetune.models import pretrained

    # QLoRA quantises the language model only: the vision tower, the projector and the head stay in 16 bits
    # (small, and 4-bit image features cost accuracy for little memory).
    model = pretrained.load_model(recipe.model, AutoModelForImageTextToText,
                                  recipe.quant if recipe.quant.bits else None,
                                  keep=[".*" + re.escape(n) for n in (*VLM_VISION, *VLM_PROJECTOR)] + ["lm_head"]
                                  if recipe.quant.bits else None)
    model.config.use_cache = False
    input_grads_where_needed(model)  # before QLoRA's preparation enables checkpointing
    if recipe.quant.bits:
        from finetune.models.quantization import prepare_quantized

        model = prepare_quantized(model, recipe)
    return model


def with_lora(model, spec, vision: bool = False, projector: bool = False):
    """LoRA on the language model's linear layers (finetune.models.adapters.vlm_targets), and on the vision
    tower and the projector when `vision` / `projector` (or lora.vision / lora.projector) ask for them."""
    return apply_lora(model, spec.model_copy(update={"vision": spec.vision or vision,
                                                     "projector": spec.projector or projector}), None)


def input_grads_where_needed(model) -> None:
    """Gradient checkpointing with frozen weights needs the checkpointed blocks' inputs to require grad, so
    transformers and peft hook every input embedding (`enable_input_require_grads`): the vision tower's patch
    embedding too. A frozen vision tower then builds a graph, keeps each layer's input and runs backward to
    no parameter (a tiny LLaVA with a 4-layer tower, batch 4: a 20.9 MiB peak, 12.5 without). Here the hook
    goes on the language model's embeddings, and on a vision tower's only once some of its parameters train
    (lora.vision, full fine-tuning), decided each time checkpointing is enabled (QLoRA's preparation, peft,
    the Trainer). Installed as soon as the model loads; hooks placed before are taken off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def requires_grad(module, inputs, output):
        output.requires_grad_(True)

    def input_embeddings(module):
        try:
            return module.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None

    def enable_input_require_grads() -> None:
        for hook in getattr(base, "_require_grads_hooks", None) or []:
            hook.remove()
        found = (input_embeddings(m) for m in (base, *trained_towers(base)))
        hooks = [e.register_forward_hook(requires_grad) for e in found if e is not None]
        base._require_grads_hooks = hooks
        if hooks:
            base._require_grads_hook = hooks[0]

    if getattr(base.enable_input_require_grads, "__func__", None) is None:
        return  # installed already
    # transformers' own hooks have no handle left once replaced: found by their function's name
    for tower in (base.get_submodule(n) for n in part_names(base, VLM_VISION)):
        embeddings = input_embeddings(tower)
        for key, hook in list(getattr(embeddings, "_forward_hooks", {}).items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del embeddings._forward_hooks[key]
    base.enable_input_require_grads = enable_input_require_grads


def make_trainer(model, processor, train: list[dict], eval_ds: list[dict] | None, args, callbacks: list | None = None):
    from transformers import Trainer

    input_grads_where_needed(model)
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_ds,
                   data_collator=VisionCollator(processor), callbacks=callbacks or None)


def train_vlm(model, processor, rows: list[dict], output_dir: str | Path, base: Path | None = None, lora=None,
              max_length: int = MAX_LENGTH, on_overflow: str = "drop", **training_args):
    """Prepare `rows` and train `model` on them with the VisionCollator; `lora` (a LoraSpec) adds adapters
    on the language model first. Returns (model, examples' stats, the Trainer's output)."""
    from transformers import TrainingArguments

    examples, stats = V.prepare(processor, rows, "data.train", base, max_length, on_overflow)
    if lora is not None:
        model = with_lora(model, lora)
    defaults = dict(output_dir=str(output_dir), report_to=[], save_strategy="no", logging_steps=10,
                    remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    args = TrainingArguments(**{**defaults, **training_args})
    output = make_trainer(model, processor, examples, None, args).train()
    return model, stats, output


# ---------------------------------------------------------------------------------------
# Using a run


def usage(run_dir: Path, recipe: Recipe) -> str:
    if recipe.method == "lora":
        load = f'from finetune.tasks.vlm import load_trained\nmodel = load_trained("{run_dir}")  # a PeftModel over its base\n'
    else:
        load = f'model = AutoModelForImageTextToText.from_pretrained("{run_dir}")\n'
    return ("```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n" + load
            + f'processor = AutoProcessor.from_pretrained("{run_dir}")\n```')


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune generate {run_dir} --image photo.png "What is in this picture?"']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained model of a run (a PeftModel over its base for LoRA runs) or a plain model directory;
    `base=MODEL` puts a LoRA run's adapter on a model already in memory."""
    base = kwargs.pop("base", None)
    from transformers import AutoModelForImageTextToText

    run_dir = Path(run_dir)
    if not is_adapter_dir(run_dir):
        return AutoModelForImageTextToText.from_pretrained(str(run_dir), **kwargs)
    from peft import PeftModel

    if base is None:
        config = json.loads((run_dir / "adapter_config.json").read_text())
        base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"], **kwargs)
    return PeftModel.from_pretrained(base, str(run_dir))


def check(recipe: Recipe) -> tuple[list[str], list[str]] | tuple[list[str], list[str], int, int]:
    """`finetune validate`: rows and masks checked, token statistics with images expanded, image sizes; then
    the longest example's tokens and image tokens, for the memory estimate."""
    from finetune.data.text import length_stats

    d = recipe.data
    max_length = d.max_length or MAX_LENGTH
    try:
        check_takes_images(recipe.model)
        processor = load_processor(recipe.model)
        rows, base = read_data(d.train, "data.train", d.train_split, d.config)
        examples, stats = V.prepare(processor, rows, "data.train", base, max_length, d.on_overflow, d.train_on)
    except UserError as e:
        return e.problems, []
    lengths = length_stats(stats["tokens"])
    widths = sorted(w for w, _ in stats["image_sizes"]) or [0]
    heights = sorted(h for _, h in stats["image_sizes"]) or [0]
    notes = [f"data.train: {stats['rows']} rows, {stats['examples']} examples, {len(stats['image_sizes'])} images",
             "tokens with images expanded: " + ", ".join(f"{k} {v:.0f}" for k, v in lengths.items() if k != "count")
             + f" (data.max_length {max_length})",
             f"image sizes: width {widths[0]}-{widths[-1]}, height {heights[0]}-{heights[-1]}",
             *R.mapping_notes(stats, "data.train")]
    if stats["dropped"]:
        notes.append(f"{stats['dropped']} examples exceed data.max_length={max_length} with their images expanded "
                     "and will be dropped (data.on_overflow: drop)")
    trained = sum(t != -100 for e in examples for t in e["labels"])
    notes.append(f"loss on {trained / max(1, sum(stats['tokens'])):.1%} of the tokens (data.train_on: {d.train_on}); "
                 "no image token carries loss")
    colour = sys.stdout.isatty()
    notes.append("the first example, trained tokens " + ("in green:" if colour else "in [[brackets]]:"))
    shown = V.show_example(processor, examples[0], colour)
    notes.append("  " + shown.rstrip("\n").replace("\n", "\n    "))
    train_lines, _, held = hold_out(len(rows), recipe)
    if held:
        notes.append(held)
    per_row = stats["examples"] / max(1, stats["rows"])
    _, lines = session.plan_steps(recipe, max(1, round(len(train_lines) * per_row)), max(stats["tokens"]))
    notes += [line.replace("training: ", "training: about ", 1) for line in lines]
    return [], notes, max(stats["tokens"]), max(stats["image_tokens"])
