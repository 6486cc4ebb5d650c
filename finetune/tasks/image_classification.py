"""Image classification: one label per image, with ViT or any AutoModelForImageClassification.

    finetune lora --task image-classification --model google/vit-base-patch16-224-in21k --data beans \\
        --set image_classification.label_column=labels -o runs/vit-beans       # LoRA + a new head
    finetune full --task image-classification --model google/vit-base-patch16-224-in21k \\
        --data photos/train --eval-data photos/validation -o runs/vit-photos   # all parameters
    finetune predict runs/vit-beans leaf.png                                     # label an image

Data: an image folder with one sub-folder per class (`train/<class>/*.png`), or a dataset / data
file with an image column and a label column (`image_classification.image_column`, `.label_column`;
image paths in a .jsonl/.csv are relative to that file). Labels may be names or ids.
Recipe fields used: model.*, data.*, image_classification.*, lora.*, train.*.

The model gets a new classification head sized to the labels (the checkpoint's head, if any, is
replaced). With LoRA the attention and MLP layers get adapters and the head is trained in full and
saved with them (peft `modules_to_save`); the label names are saved in labels.json, since an
adapter does not store them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from finetune.data import images
from finetune.data import text as D
from finetune.errors import UserError
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import ImageClassificationSpec
from finetune.training import session


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForImageClassification, Trainer, set_seed

    set_seed(recipe.train.seed)
    spec = recipe.section(ImageClassificationSpec)
    reject_quantization(recipe)

    # 1. Data: image files checked (undecoded), labels turned into ids of the training set's classes.
    train_raw, eval_raw, names = load_data(recipe, spec)

    # 2. Image processor and model: the checkpoint's own preprocessing, a new head for these labels.
    processor = images.load_image_processor(recipe.model)
    id2label = dict(enumerate(names))
    model = pretrained.load_model(recipe.model, AutoModelForImageClassification, num_labels=len(names),
                              id2label=id2label, label2id={n: i for i, n in id2label.items()},
                              ignore_mismatched_sizes=True)

    # 3. Pixels on the fly, batch by batch (augmented for training only, when asked).
    rng = random.Random(recipe.train.seed) if spec.augment else None
    train_ds = train_raw.with_transform(transform(processor, "data.train", images.data_base(recipe.data.train), rng))
    eval_ds = None
    if eval_raw is not None:
        eval_base = images.data_base(recipe.data.eval or recipe.data.train)
        eval_ds = eval_raw.with_transform(transform(processor, "data.eval", eval_base))

    # 4. LoRA: adapters on attention and MLP layers; the new head trains in full and is saved.
    if recipe.method == "lora":
        model = apply_lora(model, recipe.lora, None, modules_to_save=head_modules(model))

    # 5. Train, evaluate, save.
    run_dir = session.start_run(recipe)
    # The image column must reach the transform (the Trainer would drop it: the model takes no
    # `image`); there are no tokens to count.
    args = session.training_arguments(recipe, run_dir, remove_unused_columns=False,
                                       include_num_input_tokens_seen="no")
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=processor, compute_metrics=accuracy,
                      callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(run_dir))
        (run_dir / "labels.json").write_text(json.dumps({"id2label": id2label}, indent=2) + "\n")

    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    for key in ("tokens_seen", "tokens_per_s", "perplexity"):  # images, not tokens; no perplexity of labels
        metrics.pop(key, None)
    metrics["samples_per_s"] = train_output.metrics.get("train_samples_per_second")
    metrics["num_labels"] = len(names)
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


def reject_quantization(recipe: Recipe) -> None:
    if recipe.quant.bits:
        raise UserError(f"quant.bits: {recipe.task} trains small vision models without quantization "
                        "(the new head cannot be trained in 4/8 bits); drop quant.bits")


# ---------------------------------------------------------------------------------------
# Data


def load_data(recipe: Recipe, spec: ImageClassificationSpec):
    """(train, eval | None, class names): datasets with an undecoded `image` and an integer `label`."""
    train_raw, eval_raw = D.load_splits(recipe.data, recipe.train.seed)
    train = select(train_raw, spec, "data.train", recipe.data.train)
    names = class_names(train, "data.train", recipe.data.train)
    train = to_ids(train, names, "data.train")
    images.check_images(train, "image", "data.train", images.data_base(recipe.data.train))
    eval_ds = None
    if eval_raw is not None:
        source = recipe.data.eval or recipe.data.train
        eval_ds = to_ids(select(eval_raw, spec, "data.eval", source), names, "data.eval")
        images.check_images(eval_ds, "image", "data.eval", images.data_base(source))
    return train, eval_ds, names


def select(ds, spec: ImageClassificationSpec, key: str, source: str):
    """Columns `image` (undecoded) and `label` (class names as strings)."""
    import datasets

    if spec.label_column not in ds.column_names and spec.image_column in ds.column_names:
        folders = images.class_folders(source)
        if len(folders) == 1:
            raise UserError(one_class(key, source, folders[0]))
        if Path(source).expanduser().is_dir():
            raise UserError(f"{key}: image folder '{source}' has no class sub-folders; put the images of each "
                            "class in a sub-folder named after it (train/<class>/*.png)")
    D.require_columns(ds, {"image_classification.image_column": spec.image_column,
                           "image_classification.label_column": spec.label_column}, f"{key} '{source}'")
    ds = images.undecoded(ds.select_columns([spec.image_column, spec.label_column]), spec.image_column)
    feature = ds.features[spec.label_column]
    values = ds[spec.label_column]
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise UserError(f"{key}: {len(missing)} rows without a label (rows {', '.join(map(str, missing[:5]))}); "
                        f"give every image a label in '{spec.label_column}'")
    if isinstance(feature, datasets.ClassLabel):
        labels = [feature.int2str(v) for v in values]
    else:
        labels = [str(v) for v in values]
    ds = ds.remove_columns(spec.label_column).add_column("label", labels)
    return ds.rename_column(spec.image_column, "image") if spec.image_column != "image" else ds


def one_class(key: str, source: str, name: str) -> str:
    return (f"{key}: '{source}' has a single class ('{name}'); image classification needs at least two, "
            "one sub-folder per class (train/<class>/*.png)")


def class_names(ds, key: str, source: str) -> list[str]:
    names = sorted(set(ds["label"]), key=lambda n: (0, int(n), n) if n.lstrip("-").isdigit() else (1, 0, n))
    if len(names) < 2:
        raise UserError(one_class(key, source, names[0]))
    return names


def to_ids(ds, names: list[str], key: str):
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(ds["label"]) - set(index))
    if unknown:
        raise UserError(f"{key}: labels {', '.join(map(repr, unknown[:5]))} are not classes of data.train "
                        f"({', '.join(names)}); train on data that has them, or drop those rows")
    ids = [index[n] for n in ds["label"]]
    return ds.remove_columns("label").add_column("label", ids)


def transform(processor, key: str, base: Path | None, rng: random.Random | None = None):
    """Decode a batch of images (errors name the file), augment when `rng` is given, preprocess."""
    import torch

    def apply(batch):
        pics = [images.open_image(item, key, base) for item in batch["image"]]
        if rng is not None:
            pics = [images.augment(p, rng, flip=True) for p in pics]
        out = {"pixel_values": images.pixel_values(processor, pics)}
        if "label" in batch:
            out["labels"] = torch.tensor(batch["label"], dtype=torch.long)
        return out

    return apply


def head_modules(model) -> list[str]:
    """The task head(s): the top-level children other than the pre-trained body (`classifier` for ViT)."""
    return [name for name, _ in model.named_children() if name != model.base_model_prefix]


def accuracy(eval_pred) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels))}


# ---------------------------------------------------------------------------------------
# Using a run


def usage(run_dir: Path, recipe: Recipe) -> str:
    load = ("from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
            f'model = AutoModelForImageClassification.from_pretrained("{run_dir}")\n')
    if recipe.method == "lora":
        load = ("import json\nfrom peft import PeftModel\n"
                "from transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
                f'id2label = json.load(open("{run_dir}/labels.json"))["id2label"]\n'
                f'base = AutoModelForImageClassification.from_pretrained("{recipe.model.name}", '
                "num_labels=len(id2label),\n    id2label=id2label, ignore_mismatched_sizes=True)\n"
                f'model = PeftModel.from_pretrained(base, "{run_dir}")\n')
    return (f"```python\n{load}processor = AutoImageProcessor.from_pretrained(\"{run_dir}\")\n```\n\n"
            f"Or: `finetune predict {run_dir} image.png` (or `--data FOLDER -o predictions.jsonl`).")


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f"finetune predict {run_dir} image.png"]
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained classifier (a PeftModel for LoRA runs), with its label names."""
    from transformers import AutoModelForImageClassification

    run_dir = Path(run_dir)
    if not is_adapter_dir(run_dir):
        return AutoModelForImageClassification.from_pretrained(str(run_dir), **kwargs)
    from peft import PeftConfig, PeftModel

    labels_file = run_dir / "labels.json"
    if not labels_file.is_file():
        raise UserError(f"run: '{run_dir}' has a LoRA adapter but no labels.json (the class names); "
                        "it was not made by `finetune ... --task image-classification`")
    id2label = {int(k): v for k, v in json.loads(labels_file.read_text())["id2label"].items()}
    base_name = PeftConfig.from_pretrained(str(run_dir)).base_model_name_or_path
    base = AutoModelForImageClassification.from_pretrained(
        base_name, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True, **kwargs)
    return PeftModel.from_pretrained(base, str(run_dir))


def predict(run_dir: Path, inputs: list[str] | None, data: str | None, batch_size: int = 32) -> list[dict]:
    """Label images: paths in `inputs`, or every image of `data` (an image folder, or a file with an
    image column). One dict per image: image, label, score, and the reference label when `data` has one."""
    import torch

    from finetune.use.inference import check_model_dir, run_recipe

    run_dir = Path(run_dir)
    check_model_dir(run_dir, "run")
    recipe = run_recipe(run_dir)
    spec = recipe.section(ImageClassificationSpec) if recipe else ImageClassificationSpec()
    items, rows, base = images.prediction_inputs(inputs, data, spec.image_column)
    model = load_trained(run_dir).eval()
    processor = images.load_image_processor(recipe.model if recipe else pretrained.ModelSpec(), str(run_dir))
    id2label = model.config.id2label
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pics = [images.open_image(item, "image" if inputs else "--data", base) for item in chunk]
        with torch.no_grad():
            probs = model(pixel_values=images.pixel_values(processor, pics)).logits.softmax(-1)
        for item, row, p in zip(chunk, rows[start:start + batch_size], probs):
            score, idx = p.max(-1)
            result = {"image": images.item_name(images.resolve(item, base)), "label": id2label[int(idx)],
                      "score": round(float(score), 4)}
            if spec.label_column in row:
                result["reference"] = str(row[spec.label_column])
            out.append(result)
    return out


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes)."""
    spec = recipe.section(ImageClassificationSpec)
    notes = []
    try:
        reject_quantization(recipe)
        train, eval_ds, names = load_data(recipe, spec)
    except UserError as e:
        return e.problems, notes
    labels = list(train["label"])
    counts = [labels.count(i) for i in range(len(names))]
    notes.append(f"data.train: {len(train)} images, {len(names)} classes: "
                 + ", ".join(f"{n} ({c})" for n, c in zip(names, counts)))
    if eval_ds is not None:
        notes.append(f"data.eval: {len(eval_ds)} images")
    problems = []
    try:
        images.load_image_processor(recipe.model)
    except UserError as e:
        problems += e.problems
    return problems, notes
