"""Image classification: a tiny ViT learns generated shapes/colours from an image folder; LoRA moves
only its adapters and the new head; a saved run predicts exactly like the trained model, labels
included; bad images and one-class folders end in a clear error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import invoke, write_jsonl

CLASSES = {"red_circle": ("circle", (220, 40, 40)), "green_square": ("square", (40, 180, 60)),
           "blue_triangle": ("triangle", (50, 70, 220))}


def scene(shape: str, colour, rng: random.Random, size: int = 32):
    """One shape of one colour, at a random place and size, on a random light background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(190, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    r = rng.randint(6, 10)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return image


def image_folder(root: Path, per_class: int, seed: int) -> str:
    rng = random.Random(seed)
    for name, (shape, colour) in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            scene(shape, colour, rng).save(root / name / f"{i}.png")
    return str(root)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shapes")
    return {"train": image_folder(root / "train", 40, 0), "validation": image_folder(root / "validation", 8, 1)}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A 2-layer ViT body (hidden 32, 32x32 images, 8x8 patches) and its image processor; no head, as
    in google/vit-base-patch16-224-in21k."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def full_run(tiny_vit, shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "vit-full"
    code, _, stderr = invoke("full", "tiny-vit-full-shapes", "--model", tiny_vit, "--data", shapes["train"],
                             "--eval-data", shapes["validation"], "-o", out)  # the shipped tiny recipe
    assert code == 0, stderr
    return out


def test_full_training_classifies_unseen_shapes(full_run, shapes):
    from finetune.tasks import image_classification

    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9, metrics
    log = [json.loads(line) for line in (full_run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] / 3
    for name in ("recipe.yaml", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (full_run / name).is_file(), name

    # predict on files and on a folder: the label names come back, with the folder's own labels as references
    red = sorted(Path(shapes["validation"], "red_circle").glob("*.png"))[:2]
    by_path = image_classification.predict(full_run, [str(p) for p in red], None)
    assert [r["label"] for r in by_path] == ["red_circle", "red_circle"]
    assert [r["image"] for r in by_path] == [str(p) for p in red] and all(0 < r["score"] <= 1 for r in by_path)
    by_folder = image_classification.predict(full_run, None, shapes["validation"])
    assert len(by_folder) == 24 and {r["reference"] for r in by_folder} == set(CLASSES)
    assert sum(r["label"] == r["reference"] for r in by_folder) / 24 >= 0.9


def test_lora_trains_adapters_and_head_only_and_reloads_identically(tiny_vit, shapes, tmp_path):
    import torch
    from transformers import TrainerCallback

    from finetune.data import images
    from finetune.recipe.load import build_recipe
    from finetune.tasks import image_classification

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    capture = Capture()
    run_dir = tmp_path / "lora"
    recipe = build_recipe({"task": "image-classification", "method": "lora", "model": {"name": tiny_vit},
                           "data": {"train": shapes["train"], "eval": shapes["validation"]},
                           "image_classification": {"augment": True}, "lora": {"r": 4},
                           "train": {"output_dir": str(run_dir), "max_steps": 6, "batch_size": 16,
                                     "learning_rate": 5e-3}})
    image_classification.run(recipe, callbacks=[capture])
    model = capture.model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("attention.q_proj.lora_A" in n for n in trainable) and any("mlp.fc2.lora_B" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)
    for name, param in model.named_parameters():
        assert (not torch.equal(param.detach(), capture.before[name])) == (name in trainable), name

    labels = json.loads((run_dir / "labels.json").read_text())["id2label"]
    assert sorted(labels.values()) == sorted(CLASSES)
    reloaded = image_classification.load_trained(run_dir).eval()
    assert reloaded.config.id2label == model.config.id2label
    processor = images.load_image_processor(recipe.model, str(run_dir))
    files = sorted(Path(shapes["validation"]).rglob("*.png"))
    pixels = images.pixel_values(processor, [images.open_image(str(f), "test") for f in files])
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits, atol=1e-6)
        expected = [model.config.id2label[i] for i in model(pixel_values=pixels).logits.argmax(-1).tolist()]
    assert [r["label"] for r in image_classification.predict(run_dir, [str(f) for f in files], None)] == expected

    # merged into a plain model: same labels, same predictions
    code, _, stderr = invoke("merge", run_dir, "-o", tmp_path / "merged")
    assert code == 0, stderr
    merged = image_classification.predict(tmp_path / "merged", [str(f) for f in files], None)
    assert [r["label"] for r in merged] == expected


def test_bad_images_and_one_class_folders_exit_2(tiny_vit, shapes, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(shapes["validation"], train)
    corrupt = train / "red_circle" / "broken.png"
    corrupt.write_bytes(b"not a png")
    code, _, stderr = invoke("full", "--task", "image-classification", "--model", tiny_vit, "--data", train,
                             "-o", tmp_path / "run", "--set", "data.eval_fraction=0")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: cannot read image '{corrupt}' (cannot identify image file "
                              f"'{corrupt}'); replace or remove the file"]
    assert not (tmp_path / "run").exists()

    listed = write_jsonl(tmp_path / "images.jsonl", [{"image": "train/green_square/0.png", "label": "green"},
                                                     {"image": "train/red_circle/0.png", "label": "red"},
                                                     {"image": "train/nowhere.png", "label": "red"}])
    code, _, stderr = invoke("validate", "--task", "image-classification", "--model", tiny_vit, "--data", listed,
                             "--set", "data.eval_fraction=0")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: image file '{tmp_path / 'train/nowhere.png'}' does not exist; "
                              "fix the path or remove the row"]

    one = tmp_path / "one" / "cats"
    one.mkdir(parents=True)
    for f in sorted(Path(shapes["validation"], "red_circle").glob("*.png")):
        shutil.copy(f, one / f.name)
    code, _, stderr = invoke("full", "--task", "image-classification", "--model", tiny_vit,
                             "--data", tmp_path / "one", "-o", tmp_path / "run")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: '{tmp_path / 'one'}' has a single class ('cats'); image "
                              "classification needs at least two, one sub-folder per class (train/<class>/*.png)"]


def test_predict_rejects_missing_and_corrupt_images(full_run, tmp_path):
    from finetune.errors import UserError
    from finetune.tasks import image_classification

    with pytest.raises(UserError) as e:
        image_classification.predict(full_run, [str(tmp_path / "nope.png")], None)
    assert e.value.problems == [f"image: no such file '{tmp_path / 'nope.png'}'"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError) as e:
        image_classification.predict(full_run, [str(bad)], None)
    assert e.value.problems[0].startswith(f"image: cannot read image '{bad}' (")
    assert e.value.problems[0].endswith("); replace or remove the file")
