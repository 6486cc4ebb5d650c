"""Images for the vision tasks: find and check image files, decode them with errors that name the
file, light augmentation, and the checkpoint's image processor.

Datasets keep their image column undecoded (`{"path", "bytes"}` items, or plain path strings in a
.jsonl/.csv): the files are checked before training (`check_images`, which opens each header, so
a missing or non-image file stops the run before it starts) and decoded batch by batch when the
Trainer asks for them (`open_image`), so a large dataset never sits in memory decoded.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from finetune.data.sources import IMAGE_SUFFIXES, load_source
from finetune.errors import UserError, first_line
from finetune.recipe.sections import ModelSpec


def undecoded(ds, column: str):
    """The dataset with `column` as undecoded image items (datasets Image columns) or path strings."""
    import datasets

    if isinstance(ds.features.get(column), datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def item_name(item: Any) -> str:
    if isinstance(item, dict):
        return item.get("path") or "<image bytes>"
    return str(item)


def resolve(item: Any, base: Path | None) -> Any:
    """Path strings in a data file are relative to that file's folder."""
    if isinstance(item, str) and base is not None and not Path(item).expanduser().is_absolute():
        return str(base / item)
    return item


def open_image(item: Any, key: str, base: Path | None = None):
    """A decoded RGB PIL image from a path, an undecoded {"path", "bytes"} item or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    item = resolve(item, base)
    name = item_name(item)
    try:
        if isinstance(item, dict) and item.get("bytes"):
            image = Image.open(io.BytesIO(item["bytes"]))
        elif isinstance(item, (dict, str)) and (item.get("path") if isinstance(item, dict) else item):
            path = Path(item["path"] if isinstance(item, dict) else item).expanduser()
            if not path.is_file():
                raise UserError(f"{key}: image file '{name}' does not exist; fix the path or remove the row")
            image = Image.open(path)
        else:
            raise UserError(f"{key}: an empty image entry ({item!r}); every row needs an image file or image bytes")
        image.load()
        return image.convert("RGB")
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:

        raise UserError(f"{key}: cannot read image '{name}' ({first_line(e)}); replace or remove the file") from e


def check_images(ds, column: str, key: str, base: Path | None = None) -> None:
    """Open every image's header (cheap: no pixel decoding); one problem per bad file, at most 10."""
    from PIL import Image, UnidentifiedImageError

    problems = []
    rows = (item for batch in ds.iter(batch_size=512) for item in batch[column])  # one batch in memory at a time
    for row, item in enumerate(rows):
        item = resolve(item, base)
        if not item or (isinstance(item, dict) and not item.get("bytes") and not item.get("path")):
            problems.append(f"{key}: row {row} has no image; give every row an image file, or remove it")
            continue
        try:
            if isinstance(item, dict) and item.get("bytes"):
                Image.open(io.BytesIO(item["bytes"])).close()
            else:
                path = Path(item["path"] if isinstance(item, dict) else item).expanduser()
                if not path.is_file():
                    problems.append(f"{key}: image file '{item_name(item)}' does not exist; fix the path or "
                                    "remove the row")
                    continue
                Image.open(path).close()
        except (UnidentifiedImageError, OSError, TypeError, ValueError) as e:

            problems.append(f"{key}: cannot read image '{item_name(item)}' ({first_line(e)}); replace or "
                            "remove the file")
        if len(problems) == 10:
            problems.append(f"{key}: stopped after 10 unreadable images; fix these and run again")
            break
    if problems:
        raise UserError(problems)


def data_base(source: str | None) -> Path | None:
    """The folder that relative image paths in a data file are resolved against."""
    if source and Path(source).expanduser().is_file():
        return Path(source).expanduser().resolve().parent
    return None


# ---------------------------------------------------------------------------------------
# Inputs for prediction: image paths on the command line, or a folder / data file


def prediction_inputs(images: list[str] | None, data: str | None, column: str) -> tuple[list, list[dict], Path | None]:
    """(image items, the other fields of each row, base folder) for `predict`/`caption`.

    Images given as paths come back as paths; `data` is an image folder (with or without class
    sub-folders or metadata.jsonl) or a .jsonl/.csv/.parquet file with an image column.
    """
    if bool(images) == bool(data):
        raise UserError("give image files or --data FOLDER_OR_FILE (one of the two)")
    if images:
        for name in images:
            if not Path(name).expanduser().is_file():
                raise UserError(f"image: no such file '{name}'")
        return list(images), [{} for _ in images], None
    ds = load_source(data, "--data")
    if column not in ds.column_names:
        raise UserError(f"--data: no column '{column}' in '{data}'; its columns are: {', '.join(ds.column_names)}")
    import datasets

    ds = undecoded(ds, column)
    others = ds.remove_columns(column)
    rows = [{} for _ in range(len(ds))]
    for name in others.column_names:  # class ids of an image folder back to their names
        feature, values = others.features[name], others[name]
        if isinstance(feature, datasets.ClassLabel):
            values = [feature.int2str(v) for v in values]
        for row, value in zip(rows, values):
            row[name] = value
    return list(ds[column]), rows, data_base(data)


def class_folders(path: str) -> list[str]:
    """Sub-folders of an image folder that hold images directly (one per class)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return []
    return sorted({p.parent.name for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.parent != root})


# ---------------------------------------------------------------------------------------
# Processing


def load_image_processor(spec: ModelSpec, source: str | None = None):
    """The checkpoint's own image processor (resize, rescale, normalise as in pre-training)."""
    import importlib.util

    from transformers import AutoImageProcessor

    from finetune.models.pretrained import check_source

    source = source or check_source(spec.name, "model.name", "preprocessor_config.json")
    if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
        raise UserError(f"model.name: directory '{source}' has no preprocessor_config.json (the image "
                        "processor); save one into it with AutoImageProcessor.save_pretrained")
    # Without torchvision the fast processors are unavailable; ask for the PIL ones directly rather
    # than get a fallback warning on every load.
    backend = None if importlib.util.find_spec("torchvision") else "pil"
    try:
        return AutoImageProcessor.from_pretrained(source, revision=spec.revision, backend=backend,
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: could not load an image processor from '{source}': {first_line(e)}") from e


def augment(image, rng: random.Random, flip: bool):
    """Light augmentation: a random crop of 80-100% of the area, brightness +-10% and, with `flip`,
    a horizontal flip half of the time.

    Written with PIL because torchvision (which has these transforms) is not a dependency: it pins
    torch to one version, and the image processors of transformers 5 work without it.
    """
    from PIL import Image, ImageEnhance

    w, h = image.size
    scale = rng.uniform(0.8, 1.0) ** 0.5
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def pixel_values(processor, images: list):
    return processor(images=images, return_tensors="pt")["pixel_values"]
