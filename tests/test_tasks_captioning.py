"""Captioning: a tiny ViT encoder joined to a tiny GPT-2 decoder learns to describe generated scenes
(a coloured block on a background) from an image folder with metadata.jsonl; LoRA moves only its
adapters and the new cross-attention; a saved run captions exactly like the trained model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import invoke

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}


def scene(colour: str, background: str, rng: random.Random, size: int = 32):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    r = rng.randint(6, 10)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    ImageDraw.Draw(image).rectangle([x - r, y - r, x + r, y + r], fill=COLOURS[colour])
    return image


def caption_of(colour: str, background: str) -> str:
    return f"a {colour} block on a {background} background"


def scene_folder(root: Path, per_scene: int, seed: int) -> str:
    """Images plus metadata.jsonl (file_name, text): the layout `datasets` reads as an image folder."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    lines = []
    for colour in COLOURS:
        for background in BACKGROUNDS:
            for _ in range(per_scene):
                name = f"{len(lines)}.png"
                scene(colour, background, rng).save(root / name)
                lines.append(json.dumps({"file_name": name, "text": caption_of(colour, background)}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
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
def scenes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("scenes")
    return {"train": scene_folder(root / "train", 12, 0), "eval": scene_folder(root / "eval", 2, 1)}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Two checkpoints, as on the Hub: a ViT encoder (hidden 32, 32x32 images, 8x8 patches) with its
    image processor, and a 2-layer GPT-2 (hidden 32) with a BPE tokenizer trained on the captions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel

    from finetune.models.pretrained import train_bpe_tokenizer

    torch.manual_seed(0)
    vit = tmp_path_factory.mktemp("tiny-vit-encoder")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    gpt = tmp_path_factory.mktemp("tiny-gpt-decoder")
    tok = train_bpe_tokenizer([caption_of(c, b) for c in COLOURS for b in BACKGROUNDS] * 10, vocab_size=320)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(gpt)
    tok.save_pretrained(gpt)
    return {"encoder": str(vit), "decoder": str(gpt)}


@pytest.fixture(scope="module")
def full_run(tiny_models, scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "vit-gpt2-full"
    code, _, stderr = invoke("full", "tiny-vit-gpt2-full-scenes", "--model", tiny_models["encoder"],  # shipped recipe
                             "--data", scenes["train"], "--eval-data", scenes["eval"], "-o", out,
                             "--set", f"captioning.decoder={tiny_models['decoder']}")
    assert code == 0, stderr
    return out


def test_full_training_captions_match_the_references(full_run, scenes, tmp_path):
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["eval_bleu"] >= 80 and metrics["eval_exact_match"] >= 0.9, metrics
    log = [json.loads(line) for line in (full_run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] / 10
    for name in ("model.safetensors", "preprocessor_config.json", "tokenizer.json", "generation_config.json"):
        assert (full_run / name).is_file(), name

    # the caption command, on one image and on the evaluation folder
    code, stdout, stderr = invoke("caption", full_run, Path(scenes["eval"]) / "0.png")
    assert code == 0, stderr
    assert stdout.strip() == caption_of("red", "white")
    out = tmp_path / "captions.jsonl"
    code, stdout, _ = invoke("caption", full_run, "--data", scenes["eval"], "-o", out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(written) == 24 and f"wrote 24 lines to {out}" in stdout
    assert sum(r["caption"] == r["reference"] for r in written) / 24 >= 0.9


def test_lora_trains_adapters_and_cross_attention_only_and_reloads_identically(tiny_models, scenes, tmp_path):
    import torch
    from transformers import TrainerCallback

    from finetune.data import images
    from finetune.recipe.load import build_recipe
    from finetune.tasks import captioning

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    capture = Capture()
    run_dir = tmp_path / "lora"
    recipe = build_recipe({"task": "captioning", "method": "lora", "model": {"name": tiny_models["encoder"]},
                           "data": {"train": scenes["train"], "eval": scenes["eval"], "max_length": 12},
                           "captioning": {"decoder": tiny_models["decoder"], "num_beams": 1, "augment": True},
                           "lora": {"r": 4},
                           "train": {"output_dir": str(run_dir), "max_steps": 6, "batch_size": 16,
                                     "learning_rate": 1e-2}})
    captioning.run(recipe, callbacks=[capture])
    model = capture.model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("encoder.layers.0.attention.q_proj.lora_A" in n for n in trainable)
    assert any("decoder.transformer.h.0.attn.c_attn.lora_B" in n for n in trainable)
    assert any("crossattention.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert not any("crossattention" in n and "lora_" in n for n in trainable)  # trained in full instead
    for name, param in model.named_parameters():
        assert (not torch.equal(param.detach(), capture.before[name])) == (name in trainable), name

    # the base is joined again from the recipe; the adapter brings back everything that was trained
    reloaded = captioning.load_trained(run_dir).eval()
    processor = images.load_image_processor(recipe.model, str(run_dir))
    files = sorted(Path(scenes["eval"]).glob("*.png"))
    pixels = images.pixel_values(processor, [images.open_image(str(f), "test") for f in files])
    labels = torch.full((len(files), 4), 50)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=pixels, labels=labels).logits,
                              reloaded(pixel_values=pixels, labels=labels).logits, atol=1e-6)
        assert torch.equal(model.generate(pixel_values=pixels), reloaded.generate(pixel_values=pixels))


def test_bad_captioning_inputs_exit_2_with_the_fix(tiny_models, scenes, tmp_path):
    import shutil

    enc = tiny_models["encoder"]
    code, _, stderr = invoke("full", "--task", "captioning", "--model", enc, "--data", scenes["eval"],
                             "-o", tmp_path / "r")
    assert code == 2
    assert errors(stderr) == [f"error: captioning.decoder: model.name '{enc}' is an image encoder only (vit); set "
                              "captioning.decoder to a GPT-2-style decoder (for example --set "
                              "captioning.decoder=openai-community/gpt2), or use a VisionEncoderDecoder checkpoint"]

    uncaptioned = tmp_path / "photos"
    shutil.copytree(scenes["eval"], uncaptioned)
    (uncaptioned / "metadata.jsonl").unlink()
    code, _, stderr = invoke("validate", "--task", "captioning", "--model", enc, "--data", uncaptioned,
                             "--set", f"captioning.decoder={tiny_models['decoder']}")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: image folder '{uncaptioned}' has no captions; add a metadata.jsonl "
                              'with one line per image: {"file_name": "0.png", "text": "a red circle"}']

    broken = tmp_path / "broken"
    shutil.copytree(scenes["eval"], broken)
    (broken / "3.png").write_bytes(b"")
    (broken / "5.png").unlink()
    code, _, stderr = invoke("full", "--task", "captioning", "--model", enc, "--data", broken, "-o", tmp_path / "r",
                             "--set", f"captioning.decoder={tiny_models['decoder']}", "--set", "data.eval_fraction=0")
    assert code == 2
    assert errors(stderr) == [
        f"error: data.train: cannot read image '{broken / '3.png'}' (cannot identify image file "
        f"'{broken / '3.png'}'); replace or remove the file",
        f"error: data.train: image file '{broken / '5.png'}' does not exist; fix the path or remove the row"]
    assert not (tmp_path / "r").exists()

    code, _, stderr = invoke("caption", tmp_path / "r", Path(scenes["eval"]) / "0.png")
    assert code == 2 and errors(stderr) == [f"error: run: no such directory '{tmp_path / 'r'}'"]
