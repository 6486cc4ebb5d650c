"""Vision-language fine-tuning: rows, masks checked token by token on each family's processor rendering, no
cut inside an image's tokens, learnability, LoRA on the language model, adapter reload and merge.

The tiny models are built from their configs here (hidden 64, two layers, a two-layer vision tower) with a
processor assembled from a BPE tokenizer, an image processor and a chat template in the family's shape:
Qwen2-VL (dynamic resolution: the image size sets its token count) and LLaVA (a fixed count per image)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from finetune.errors import UserError

SHAPES = ["circle", "square", "triangle"]
COLOURS = {"circle": "red", "square": "green", "triangle": "blue"}
QUESTION = "what shape is this?"

QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# llava-1.5's template (images first in a turn, USER:/ASSISTANT:), with eos ending each answer
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for c in m['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ c['text'] }}{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}{{ ' ' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def corpus() -> list[str]:
    rng = random.Random(0)
    words = SHAPES + list(COLOURS.values()) + ["what", "shape", "is", "this", "a", "and", "the", "picture", "colour"]
    return [f"{QUESTION} a {c} {s}. " + " ".join(rng.choice(words) for _ in range(8)) for s, c in COLOURS.items()
            for _ in range(60)] + ["USER: ASSISTANT: system user assistant You are a helpful assistant."] * 20


def tokenizer_with(tokens: list[str]):
    from finetune.models.pretrained import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus(), vocab_size=320)
    tok.add_tokens(tokens, special_tokens=True)
    return tok


def tiny_qwen2_vl():
    """(model, processor): Qwen2-VL, patch 4 and merge 2: a 16x16 image is 4 tokens, 32x32 is 16."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        # Qwen2-VL's processor also wants a video processor, which needs torchvision; images need none
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tok = tokenizer_with(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<|video_pad|>"])
    ids = tok.convert_tokens_to_ids
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                      max_pixels=64 * 64)
    processor = ImageOnlyProcessor(image_processor=images, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


def tiny_llava(image: int = 16, vision_hidden: int = 32, vision_layers: int = 2):
    """(model, processor): LLaVA with a CLIP tower on 16x16 images (`image`), patch 4: 16 image tokens per image."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = tokenizer_with(["<image>"])
    images = CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=4, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                       num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image,
                                       patch_size=4, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(image // 4) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "llava": tiny_llava}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, processor = FAMILIES[request.param]()
    return request.param, model, processor


def draw(shape: str, rng: random.Random, size: int = 16, colour: str | None = None):
    """A coloured shape (the shape's own colour unless `colour`) at a random place and size on a grey
    background with 6 noise dots per 16x16."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    for _ in range(6 * max(1, size // 16) ** 2):
        x, y = rng.randrange(size), rng.randrange(size)
        pen.point((x, y), fill=tuple(rng.randrange(90, 170) for _ in range(3)))
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    colour = colour or COLOURS[shape]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def shape_rows(folder, n: int, seed: int, size: int = 16) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        shape = SHAPES[k % len(SHAPES)]
        name = f"s{seed}-{k}.png"
        draw(shape, rng, size).save(folder / name)
        rows.append({"images": [name], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"a {COLOURS[shape]} {shape}."}]}]})
    return rows


def two_turns(folder) -> dict:
    """Two images, two answers, a system turn: images in both user turns, one of them between texts."""
    rng = random.Random(1)
    draw("circle", rng).save(folder / "one.png")
    draw("square", rng, 32).save(folder / "two.png")
    return {"images": ["one.png", "two.png"], "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "and this"}, {"type": "image"},
                                     {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a green square."}]}]}


def check_reload_and_merge(model, peft_model, processor, tmp_path) -> None:
    """A trained adapter (not the zero-initialised one) saved, reloaded on a fresh base and merged gives the
    adapter's logits, which differ from the base's."""
    import torch

    from finetune.data import vision_chat as V
    from finetune.tasks.vlm import VisionCollator, load_trained

    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "run")
    examples, _ = V.prepare(processor, shape_rows(tmp_path, 2, 3), base=tmp_path)
    batch = VisionCollator(processor)(examples)
    batch.pop("labels")
    with torch.no_grad():
        want = peft_model(**batch).logits
        base = type(model).from_pretrained(tmp_path / "base").eval()
        assert not torch.allclose(base(**batch).logits, want, atol=1e-4)
        reloaded = load_trained(tmp_path / "run", base=base).eval()
        assert torch.allclose(reloaded(**batch).logits, want, atol=1e-5)
        assert torch.allclose(reloaded.merge_and_unload()(**batch).logits, want, atol=1e-4)


def trained_runs(example: dict) -> list[list[int]]:
    """The contiguous spans of trained tokens of an example (each label is the token itself)."""
    runs, current = [], []
    for t, lab in zip(example["input_ids"], example["labels"]):
        if lab != -100:
            assert lab == t
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def padded_batch(model, processor, example: dict, tmp_path):
    """The collator's batch of `example` and a shorter one-image example: the first row's labels are its own, the
    short row's padding carries no loss, and the model takes the batch."""
    import torch

    from finetune.data import vision_chat as V
    from finetune.tasks.vlm import VisionCollator

    short = V.prepare(processor, shape_rows(tmp_path, 1, 5), base=tmp_path)[0][0]
    batch = VisionCollator(processor)([example, short])
    assert batch["labels"][0].tolist() == example["labels"]
    row = batch["labels"][1].tolist()
    assert row[:len(short["labels"])] == short["labels"] and set(row[len(short["labels"]):]) == {-100}
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    return batch, short


def held_out_accuracy(model, processor, tmp_path) -> float:
    """LoRA on the language model alone trained on 60 shape images (8 epochs); the share of 30 held-out images
    answered exactly, greedily."""
    import torch

    from finetune.data import vision_chat as V
    from finetune.data import vision_rows as R
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import train_vlm

    model, stats, _ = train_vlm(model, processor, shape_rows(tmp_path, 60, 0), tmp_path / "out", base=tmp_path,
                                lora=LoraSpec(r=16, alpha=32), num_train_epochs=8, per_device_train_batch_size=6,
                                learning_rate=1e-2, lr_scheduler_type="constant", seed=0)
    assert stats["examples"] == 60
    model.eval()
    held_out = shape_rows(tmp_path, 30, 1)
    correct = 0
    for row in held_out:
        prompt = V.render(processor, R.normalize(row, 0, "data.eval")["messages"][:1], True)
        inputs = processor(text=[prompt], images=[R.load_image(tmp_path / row["images"][0], "data.eval")],
                           add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += answer.strip() == row["messages"][1]["content"][0]["text"]
    return correct / len(held_out)


# ---------------------------------------------------------------------------------------
# Rows


def test_row_shapes_become_one_format(tmp_path):
    from finetune.data import vision_rows as R

    (tmp_path / "a.png").write_bytes(b"")
    trl = R.normalize({"images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ans"}]}]}, 0, "data.train")
    sharegpt = R.normalize({"images": ["a.png"], "conversations": [
        {"from": "human", "value": "<image>q?"}, {"from": "gpt", "value": "ans"}]}, 0, "data.train")
    vqa = R.normalize({"image": "a.png", "question": "q?", "answer": "ans"}, 0, "data.train")
    assert trl == sharegpt == vqa
    caption = R.normalize({"image": "a.png", "caption": "ans"}, 0, "data.train")
    assert caption["messages"][0]["content"] == [{"type": "image"}]


def test_an_imagefolder_with_captions_trains_on_the_captions(tmp_path):
    """An `imagefolder` (images + metadata.jsonl with a caption column) reads as image + caption rows: the
    image is the user turn, the caption the trained answer."""
    from finetune.data import vision_chat as V
    from finetune.data import vision_rows as R
    from finetune.tasks.vlm import read_data

    rng = random.Random(0)
    with (tmp_path / "metadata.jsonl").open("w") as f:
        for k, shape in enumerate(SHAPES):
            draw(shape, rng).save(tmp_path / f"{k}.png")
            f.write(json.dumps({"file_name": f"{k}.png", "caption": f"a {COLOURS[shape]} {shape}."}) + "\n")
    rows, base = read_data(str(tmp_path), "data.train")
    _, processor = tiny_llava()
    examples, stats = V.prepare(processor, rows, base=base)
    assert stats["examples"] == 3 and stats["image_sizes"] == [(16, 16)] * 3
    assert R.mapping_notes(stats, "data.train") == [
        "note: data.train: 3 image + caption rows read as a user turn holding the image alone and the caption as "
        "the answer; give question + answer rows (or messages) to prompt with text"]
    answers = sorted(processor.tokenizer.decode([t for t in e["labels"] if t != -100], skip_special_tokens=True)
                     for e in examples)
    assert [a.strip() for a in answers] == sorted(f"a {COLOURS[s]} {s}." for s in SHAPES)


@pytest.mark.parametrize("row, needle", [
    ({"images": ["a.png", "a.png"], "messages": [{"role": "user", "content": "<image>q"},
                                                 {"role": "assistant", "content": "a"}]}, "1 image places"),
    ({"images": ["missing.png"], "messages": [{"role": "user", "content": "<image>q"},
                                              {"role": "assistant", "content": "a"}]}, "does not exist"),
    ({"images": ["https://example.com/a.png"], "messages": [{"role": "user", "content": "<image>q"},
                                                            {"role": "assistant", "content": "a"}]}, "offline"),
    ({"images": [], "messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                   "content": [{"type": "image"}]}]}, "turn 2"),
    ({"picture": "a.png", "text": "x"}, "not a vision chat row"),
])
def test_bad_rows_are_one_line_naming_the_row(tmp_path, monkeypatch, row, needle):
    from finetune.data import vision_rows as R

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a.png").write_bytes(b"")
    rows = [{"image": "a.png", "caption": "fine"}, row]
    with pytest.raises(UserError) as e:
        R.read_rows(rows, "data.train", tmp_path)
    message = str(e.value)
    assert "data.train row 2" in message and needle in message and "\n" not in message


# ---------------------------------------------------------------------------------------
# Masks, token by token


def test_mask_trains_exactly_the_answers(family, tmp_path):
    from finetune.data import vision_chat as V

    name, model, processor = family
    tok = processor.tokenizer
    (example,), stats = V.prepare(processor, [two_turns(tmp_path)], base=tmp_path)
    ids, labels = example["input_ids"], example["labels"]
    image_ids = V.image_token_ids(processor)
    n_image = sum(t == processor.image_token_id for t in ids)
    assert n_image == (4 + 16 if name == "qwen2_vl" else 16 + 16)  # Qwen2-VL: tokens follow the image size
    trained = [j for j, lab in enumerate(labels) if lab != -100]
    assert all(labels[j] == ids[j] for j in trained)
    assert not any(ids[j] in image_ids for j in trained)
    runs = trained_runs(example)
    end = "<|im_end|>" if name == "qwen2_vl" else tok.eos_token
    assert [tok.decode(r) for r in runs] == [f"{a}{end}" for a in (
        "a red circle.", "a green square.")] if name == "qwen2_vl" else [f" {a}{end}" for a in (
            "a red circle.", "a green square.")]
    untrained = tok.decode([t for t, lab in zip(ids, labels) if lab == -100 and t not in image_ids])
    assert QUESTION in untrained and "circle" not in untrained and "square" not in untrained

    # the collator pads to the longest, and neither padding nor the second row's prompt carries loss
    batch, short = padded_batch(model, processor, example, tmp_path)
    assert (batch["attention_mask"][1] == 0).sum() == len(ids) - len(short["input_ids"])


def test_template_that_breaks_the_prefix_property_is_expanded_or_refused(tmp_path):
    from finetune.data import vision_chat as V

    _, processor = tiny_llava()
    row = two_turns(tmp_path)
    # a template that marks past answers (as Qwen3 drops past reasoning): one example per answer
    processor.chat_template = LLAVA_TEMPLATE.replace(
        "{% if m['content'] is string %}", "{% if m['role'] == 'assistant' and not loop.last %}[old] {% endif %}"
        "{% if m['content'] is string %}", 1)
    examples, _ = V.prepare(processor, [row], base=tmp_path)
    assert [len(e["images"]) for e in examples] == [1, 2]
    tok = processor.tokenizer
    assert [tok.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab != -100]) for e in examples] == [
        f" a red circle.{tok.eos_token}", f" a green square.{tok.eos_token}"]
    assert "[old] a red circle." in tok.decode(examples[1]["input_ids"])
    # one whose generation prompt is not what precedes the answer: refused, turn named
    processor.chat_template = LLAVA_TEMPLATE.replace("'ASSISTANT:'", "'BOT:'")
    with pytest.raises(UserError, match="row 1, turn 3: the chat template renders the prompt differently"):
        V.prepare(processor, [row], base=tmp_path)


def test_an_overlong_example_is_dropped_or_refused_never_cut(tmp_path):
    from finetune.data import vision_chat as V

    _, processor = tiny_qwen2_vl()
    rows = shape_rows(tmp_path, 2, 0) + shape_rows(tmp_path, 1, 9, size=64)  # 64x64: 64 image tokens
    lengths = [len(e["input_ids"]) for e in V.prepare(processor, rows, base=tmp_path)[0]]
    limit = lengths[0] + 10
    assert lengths[2] > limit > lengths[0]
    kept, stats = V.prepare(processor, rows, base=tmp_path, max_length=limit)
    assert stats["dropped"] == 1 and stats["dropped_rows"] == [3] and len(kept) == 2
    with pytest.raises(UserError, match=r"row 3: \d+ tokens with its 1 images expanded, over data.max_length"):
        V.prepare(processor, rows, base=tmp_path, max_length=limit, on_overflow="error")
    # rows kept apart for evaluation keep their line numbers in the file
    _, stats = V.prepare(processor, rows, base=tmp_path, max_length=limit, lines=[2, 5, 7])
    assert stats["dropped_rows"] == [7]
    with pytest.raises(UserError, match=r"data.train row 7: \d+ tokens"):
        V.prepare(processor, rows, base=tmp_path, max_length=limit, on_overflow="error", lines=[2, 5, 7])
    with pytest.raises(V.NothingFits, match="data.train: no example fits data.max_length=5 "):
        V.prepare(processor, rows, base=tmp_path, max_length=5)


def test_rows_held_out_for_evaluation():
    """data.eval_fraction of the rows by the run's seed, as 1-based line numbers; none with data.eval or
    data.eval_split, and never every row."""
    from finetune.recipe.load import load_recipe
    from finetune.tasks.vlm import hold_out

    def recipe(*sets):
        return load_recipe(None, {"task": "vlm", "model": {"name": "m"}, "data": {"train": "t.jsonl"}}, list(sets))

    train, held, note = hold_out(40, recipe())
    assert len(held) == 2 and sorted(train + held) == list(range(1, 41)) and hold_out(40, recipe())[1] == held
    assert hold_out(40, recipe("train.seed=1"))[1] != held
    assert note == ("data.eval: 2 of the 40 rows of data.train held out for evaluation (data.eval_fraction 0.05; "
                    "data.eval names a file instead, data.eval_fraction=0 trains on all)")
    for sets in (["data.eval=e.jsonl"], ["data.eval_split=test"], ["data.eval_fraction=0"]):
        assert hold_out(40, recipe(*sets)) == (list(range(1, 41)), [], "")
    assert len(hold_out(4, recipe("data.eval_fraction=0.9"))[0]) == 1


# ---------------------------------------------------------------------------------------
# LoRA: the language model only, reload and merge


def test_lora_targets_the_language_model_and_reloads(family, tmp_path):
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import with_lora

    name, _, processor = family
    model = FAMILIES[name]()[0]
    model.save_pretrained(tmp_path / "base")
    peft_model = with_lora(model, LoraSpec(r=4, alpha=8))
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    assert not any(k in n for n in adapted for k in ("visual", "vision_tower", "projector", "merger", "lm_head"))
    check_reload_and_merge(model, peft_model, processor, tmp_path)


# ---------------------------------------------------------------------------------------
# Learnability


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_tiny_vlm_learns_which_shape_an_image_shows(name, tmp_path):
    """LoRA on the language model alone (the random vision tower frozen): held-out images, answers generated
    greedily, exact matches counted; chance is one in three."""
    accuracy = held_out_accuracy(*FAMILIES[name](), tmp_path)
    print(f"{name}: held-out exact answers {accuracy:.2f} (chance {1 / len(SHAPES):.2f})")
    assert accuracy >= 0.8


# ---------------------------------------------------------------------------------------
# The task through the command line


def test_lora_task_vlm_validates_trains_reloads_and_merges(tmp_path):
    """`finetune validate` and `finetune lora --task vlm` on a tiny LLaVA saved to disk, then the run reloads and
    merges into a plain model that gives the adapter's logits."""
    import math

    import torch
    from conftest import invoke

    from PIL import Image

    from finetune.data import vision_chat as V
    from finetune.tasks.vlm import load_trained

    model, processor = tiny_llava()
    base = tmp_path / "llava"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    data = tmp_path / "data"
    data.mkdir()
    rows = shape_rows(data, 24, seed=0)
    with (data / "shapes.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    common = ["--task", "vlm", "--model", base, "--data", data / "shapes.jsonl", "--set", "data.max_length=64"]
    code, stdout, stderr = invoke("validate", *common)
    assert code == 0, stdout + stderr
    assert "data.train: 24 rows, 24 examples, 24 images" in stdout and "image sizes: width 16-16" in stdout
    # the estimate that follows counts the data's images: 16 image tokens per example, the tower frozen
    assert "memory per device (lora, fp32, batch 8 x 44 tokens" in stdout
    assert ("vision: 16 image tokens per example, 16 tower positions; the pixels only (the tower is frozen: it "
            "keeps nothing for backward)") in stdout
    # the first example with its answer marked and its image's 16 tokens written once; what is held out
    examples, _ = V.prepare(processor, rows, base=data)
    share = sum(t != -100 for e in examples for t in e["labels"]) / sum(len(e["labels"]) for e in examples)
    assert f"  loss on {share:.1%} of the tokens (data.train_on: assistant); no image token carries loss" in stdout
    assert f"USER: <image>×16\n    {QUESTION} ASSISTANT:[[ {rows[0]['messages'][1]['content'][0]['text']}" in stdout
    assert "data.eval: 1 of the 24 rows of data.train held out for evaluation (data.eval_fraction 0.05;" in stdout
    assert "training: about 9 optimizer steps (3 epochs of 3); 23 rows of up to 44 tokens" in stdout
    run = tmp_path / "run"
    code, stdout, stderr = invoke("lora", *common, "-o", run, "--max-steps", "4", "--set", "train.batch_size=4")
    assert code == 0, stdout + stderr
    assert "data.eval: 1 of the 24 rows of data.train held out" in stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["eval_loss"])
    assert (run / "adapter_model.safetensors").is_file() and (run / "processor_config.json").is_file()
    merged_dir = tmp_path / "merged"
    code, stdout, stderr = invoke("merge", run, "-o", merged_dir)
    assert code == 0, stdout + stderr
    assert (merged_dir / "processor_config.json").is_file()  # the merged folder is a whole model
    batch = processor(text=processor.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True),
                      images=[Image.open(data / rows[0]["images"][0])], return_tensors="pt")
    with torch.no_grad():
        adapted = load_trained(run)(**batch).logits
        merged = load_trained(merged_dir)(**batch).logits
    assert torch.allclose(adapted, merged, atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_vision_and_projector_add_those_parts_only(name):
    import re

    import torch

    from finetune.models.adapters import VLM_PROJECTOR as PROJECTOR
    from finetune.models.adapters import VLM_VISION as VISION
    from finetune.models.adapters import vlm_targets

    model, _ = FAMILIES[name]()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def picked(**kw) -> set[str]:
        pattern = vlm_targets(model, **kw)
        return {n for n in linear if re.fullmatch(pattern, n)}

    base = picked()
    assert base and all("language_model" in n for n in base) and not any("lm_head" in n for n in base)
    vision, projector = picked(vision=True) - base, picked(projector=True) - base
    assert vision and all(any(f".{v}." in f".{n}" for v in VISION) for n in vision)
    assert projector and all(any(p.split(".")[-1] in n.split(".") for p in PROJECTOR) for n in projector)


# ---------------------------------------------------------------------------------------
# Using a run: finetune generate with images


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A LoRA vlm run on the tiny LLaVA, trained through the command line on the shapes until it answers
    held-out images (the learnability test's settings)."""
    from conftest import invoke

    tmp_path = tmp_path_factory.mktemp("shapes-run")
    model, processor = tiny_llava()
    base = tmp_path / "llava"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    data = tmp_path / "data"
    data.mkdir()
    with (data / "shapes.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in shape_rows(data, 60, seed=0))
    run = tmp_path / "run"
    settings = ["train.epochs=8", "train.batch_size=6", "train.learning_rate=1e-2", "train.scheduler=constant",
                "train.warmup=0", "train.seed=0", "train.fit_memory=false", "lora.r=16", "lora.alpha=32"]
    code, stdout, stderr = invoke("lora", "--task", "vlm", "--model", base, "--data", data / "shapes.jsonl", "-o", run,
                                  *[a for s in settings for a in ("--set", s)])
    assert code == 0, stdout + stderr
    return run, tmp_path


def caption_folder(folder, n: int, seed: int) -> None:
    """An imagefolder of shape images with a metadata.jsonl of their captions."""
    rng = random.Random(seed)
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as f:
        for k in range(n):
            shape = SHAPES[k % len(SHAPES)]
            draw(shape, rng).save(folder / f"{k}.png")
            f.write(json.dumps({"file_name": f"{k}.png", "caption": f"a {COLOURS[shape]} {shape}."}) + "\n")


def test_caption_with_a_vlm_run_trained_on_captions(tmp_path):
    """`finetune caption` on a vlm run trained on an imagefolder of captions: each image alone is the prompt,
    as the caption rows trained it; held-out images get their captions, the references beside them."""
    from conftest import invoke

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    caption_folder(tmp_path / "train", 60, 0)
    caption_folder(tmp_path / "held", 15, 1)
    settings = ["train.epochs=8", "train.batch_size=6", "train.learning_rate=1e-2", "train.scheduler=constant",
                "train.warmup=0", "train.fit_memory=false", "data.eval_fraction=0", "lora.r=16", "lora.alpha=32"]
    code, stdout, stderr = invoke("lora", "--task", "vlm", "--model", tmp_path / "llava", "--data", tmp_path / "train",
                                  "-o", tmp_path / "run", *[a for s in settings for a in ("--set", s)])
    assert code == 0, stdout + stderr
    assert "note: data.train: 60 image + caption rows read as a user turn holding the image alone" in stdout
    code, stdout, stderr = invoke("caption", tmp_path / "run", "--data", tmp_path / "held", "-o", tmp_path / "c.jsonl")
    assert code == 0, stdout + stderr
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and all(r["reference"].startswith("a ") for r in rows)
    assert sum(r["caption"] == r["reference"] for r in rows) >= 12
    code, stdout, stderr = invoke("caption", tmp_path / "run", tmp_path / "held" / "0.png")
    assert code == 0 and stdout.strip() == rows[0]["caption"]


def test_generate_answers_held_out_images_of_a_vlm_run(shapes_run):
    from conftest import invoke

    run, tmp_path = shapes_run
    held = tmp_path / "held"
    held.mkdir()
    rows = shape_rows(held, 6, seed=1)
    for row in rows:
        code, stdout, stderr = invoke("generate", run, "--image", held / row["images"][0], QUESTION,
                                      "--temperature", "0", "--max-new-tokens", "8")
        assert code == 0, stdout + stderr
        assert stdout.strip() == row["messages"][1]["content"][0]["text"]
    # merged into a plain model folder, the run answers the same (its config names the vision tower)
    code, stdout, stderr = invoke("merge", run, "-o", tmp_path / "merged")
    assert code == 0, stdout + stderr
    code, stdout, stderr = invoke("generate", tmp_path / "merged", "--image", held / rows[0]["images"][0], QUESTION,
                                  "--temperature", "0")
    assert code == 0 and stdout.strip() == rows[0]["messages"][1]["content"][0]["text"], stdout + stderr


def test_generate_data_writes_an_answer_per_image_row(shapes_run):
    from conftest import invoke

    run, tmp_path = shapes_run
    held = tmp_path / "held-data"
    held.mkdir()
    rows = shape_rows(held, 9, seed=2)
    rows[1] = {"image": rows[1]["images"][0], "question": QUESTION, "want": rows[1]["messages"][1]["content"]}
    rows[2]["messages"] = rows[2]["messages"][:1]  # a prompt alone: no answer turn to drop
    with (held / "rows.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = invoke("generate", run, "--data", held / "rows.jsonl", "-o", out, "--batch-size", "4",
                                  "--temperature", "0", "--max-new-tokens", "8")
    assert code == 0, stdout + stderr
    assert f"9 rows -> {out}" in stdout
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(written) == 9 and [w.get("images", w.get("image")) for w in written] == [
        r.get("images", r.get("image")) for r in rows]
    wanted = [SHAPES[k % 3] for k in range(9)]
    right = sum(w["generated"] == f"a {COLOURS[s]} {s}." for w, s in zip(written, wanted))
    assert right >= 8, [w["generated"] for w in written]


def test_generate_image_errors_are_one_line(shapes_run, tiny_gpt, tmp_path):
    from conftest import invoke

    run, _ = shapes_run
    code, stdout, stderr = invoke("generate", run, "--image", tmp_path / "missing.png", "what?")
    assert code == 2 and stderr.strip() == f"error: --image: no such file '{tmp_path / 'missing.png'}'; give the " \
                                           "path of an image file"
    draw("circle", random.Random(0)).save(tmp_path / "a.png")
    code, stdout, stderr = invoke("generate", tiny_gpt, "--image", tmp_path / "a.png", "what?")
    assert code == 2 and stderr.strip() == (
        f"error: --image: '{tiny_gpt}' is not a vision-language model (its processor takes no images); use an "
        "image-text-to-text model (qwen2_vl, qwen2_5_vl, llava, llava_next, idefics3, smolvlm, gemma3)")
    clm_run = tmp_path / "clm-run"
    clm_run.mkdir()
    (clm_run / "config.json").write_text("{}")
    (clm_run / "recipe.yaml").write_text(f"task: clm\nmodel:\n  name: {tiny_gpt}\ndata:\n  train: x.jsonl\n")
    code, stdout, stderr = invoke("generate", clm_run, "--image", tmp_path / "a.png", "what?")
    assert code == 2 and stderr.strip() == (
        f"error: --image: '{clm_run}' is a clm run, which takes no images; give images to a vision-language run "
        "(finetune lora --task vlm) or drop --image")
    code, stdout, stderr = invoke("generate", run, "--image", tmp_path / "a.png", "--data", tmp_path / "r.jsonl",
                                  "-o", tmp_path / "o.jsonl")
    assert code == 2 and stderr.strip() == "error: --image: with --data, each row names its own images; drop --image"


def test_models_and_data_that_cannot_train_images_are_refused_in_one_line(tiny_gpt, tmp_path):
    """A text-only model for --task vlm, a VLM saved without its processor, image rows for a text task: each
    one line naming the field and the fix, exit 2, nothing written."""
    from conftest import invoke

    data = tmp_path / "shapes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in shape_rows(tmp_path, 3, 0)))
    takes = "qwen2_vl, qwen2_5_vl, llava, llava_next, idefics3, smolvlm, gemma3"
    for verb in ("validate", "lora"):
        code, _, stderr = invoke(verb, "--task", "vlm", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "a")
        assert code == 2 and stderr.strip() == (f"error: model.name: '{tiny_gpt}' is a gpt2 model, which takes no "
                                                f"images; use an image-text-to-text model ({takes})")
    model, _ = tiny_llava()
    model.save_pretrained(tmp_path / "weights-only")
    code, _, stderr = invoke("lora", "--task", "vlm", "--model", tmp_path / "weights-only", "--data", data,
                             "-o", tmp_path / "b")
    assert code == 2 and stderr.strip() == (
        f"error: model.name: '{tmp_path / 'weights-only'}' has no processor files (preprocessor_config.json or "
        "processor_config.json); a vision-language model needs its processor (tokenizer, chat template, image "
        "processor): save it beside the weights (processor.save_pretrained) or copy those files from the base "
        "checkpoint")
    # a Qwen2-VL checkpoint as published: its video processor needs torchvision, which this machine lacks
    model, processor = tiny_qwen2_vl()
    real = tmp_path / "qwen2-vl"
    model.save_pretrained(real)
    processor.image_processor.save_pretrained(real)
    processor.tokenizer.save_pretrained(real)
    (real / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    (real / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (real / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type":
                                                                     "Qwen2VLVideoProcessor"}))
    code, _, stderr = invoke("lora", "--task", "vlm", "--model", real, "--data", data, "-o", tmp_path / "d")
    if importlib.util.find_spec("torchvision") is None:
        import torch

        assert code == 2 and stderr.strip() == (
            f"error: model.name: the processor of '{real}' needs a package that is not installed "
            "(Qwen2VLVideoProcessor requires the Torchvision library but it was not found in your environment); "
            f"install it (torchvision: the build that matches torch {torch.__version__.split('+')[0]})")
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "c")
    assert code == 2 and stderr.splitlines()[0] == (
        "error: data.train row 1: an image row (images, or image items in the messages), and this task trains on "
        f"text only; train images with --task vlm on a vision-language model ({takes})")
    assert not any((tmp_path / d).exists() for d in "abcd")


# ---------------------------------------------------------------------------------------
# Idefics3 (SmolVLM): each image framed by <fake_token_around_image>, its tiles named <row_i_col_j>, the whole
# image <global-img>; the parts are model.text_model, model.vision_model and model.connector

# SmolVLM's template: "User:<image>..." with no space before an image, answers end in <end_of_utterance>
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}{% if m['content'] is string %}{{ ': ' + "
    "m['content'] }}{% else %}{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}"
    "{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def tiny_idefics3(split: bool = False):
    """(model, processor): Idefics3 with a SigLIP-style tower on 32x32 tiles, patch 4 and scale factor 2: 16
    `<image>` tokens a tile. Unsplit, an image is one global tile; split, it is upscaled to 64x64: four tiles
    and the global one."""
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, LlamaConfig)

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = tokenizer_with(["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                          "<global-img>", *grid])
    tok.eos_token = "<end_of_utterance>"
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64 if split else 32}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=split)
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=16,
                                  chat_template=IDEFICS3_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                eos_token_id=ids("<end_of_utterance>"), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id),
        scale_factor=2, image_token_id=ids("<image>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return Idefics3ForConditionalGeneration(config).eval(), processor


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_idefics3_mask_trains_exactly_the_answers_never_the_image_frames(split, tmp_path):
    from finetune.data import vision_chat as V

    model, processor = tiny_idefics3(split)
    tok = processor.tokenizer
    (example,), _ = V.prepare(processor, [two_turns(tmp_path)], base=tmp_path)
    ids, labels = example["input_ids"], example["labels"]
    image_ids = V.image_token_ids(processor)
    frames = ["<fake_token_around_image>", "<global-img>", "<image>", "<row_1_col_1>", "<row_6_col_6>"]
    assert set(tok.convert_tokens_to_ids(frames)) <= image_ids
    assert tok.convert_tokens_to_ids("<end_of_utterance>") not in image_ids
    tiles = 5 if split else 1  # per image: four tiles and the global one, or the global one alone
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens.count("<image>") == 2 * tiles * 16 and tokens.count("<global-img>") == 2
    assert tokens.count("<fake_token_around_image>") == 2 * (tiles + 1)
    assert sum(t.startswith("<row_") for t in tokens) == (8 if split else 0)
    runs = trained_runs(example)
    assert labels[-1] == -100 and not any(t in image_ids for r in runs for t in r)
    assert [tok.decode(r) for r in runs] == [" a red circle.<end_of_utterance>", " a green square.<end_of_utterance>"]
    untrained = tok.decode([t for t, lab in zip(ids, labels) if lab == -100 and t not in image_ids])
    assert QUESTION in untrained and "circle" not in untrained and "square" not in untrained

    padded_batch(model, processor, example, tmp_path)


def test_idefics3_lora_targets_the_text_model_and_reloads(tmp_path):
    import re

    import torch

    from finetune.recipe.sections import LoraSpec
    from finetune.models.adapters import vlm_targets
    from finetune.tasks.vlm import with_lora

    model, processor = tiny_idefics3()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def picked(**kw) -> set[str]:
        return {n for n in linear if re.fullmatch(vlm_targets(model, **kw), n)}

    base_targets = picked()
    assert base_targets and all(n.startswith("model.text_model.") for n in base_targets)
    assert picked(vision=True) - base_targets and all(
        n.startswith("model.vision_model.") for n in picked(vision=True) - base_targets)
    assert picked(projector=True) - base_targets and all(
        n.startswith("model.connector.") for n in picked(projector=True) - base_targets)

    model.save_pretrained(tmp_path / "base")
    peft_model = with_lora(model, LoraSpec(r=4, alpha=8))
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert adapted and all(".text_model." in n for n in adapted)
    assert not any(k in n for n in adapted for k in ("vision_model", "connector", "lm_head"))
    check_reload_and_merge(model, peft_model, processor, tmp_path)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_tiny_idefics3_learns_which_shape_an_image_shows(split, tmp_path):
    """The learnability test's settings on Idefics3, whole images and split into tiles."""
    assert held_out_accuracy(*tiny_idefics3(split), tmp_path) >= 0.8


def test_chat_with_images_attached_by_slash_image(shapes_run):
    from typer.testing import CliRunner

    from finetune.cli.app import app

    run, tmp_path = shapes_run
    held = tmp_path / "held-chat"
    held.mkdir()
    rows = shape_rows(held, 2, seed=3)
    turns = (f"/image {held / rows[0]['images'][0]}\n{QUESTION}\n/image {held / 'missing.png'}\n/reset\n"
             f"/image {held / rows[1]['images'][0]}\n{QUESTION}\n/quit\n")
    result = CliRunner().invoke(app, ["chat", str(run), "--temperature", "0", "--max-new-tokens", "8"], input=turns)
    assert result.exit_code == 0, result.output
    answers = [part.splitlines()[0].strip() for part in result.output.split("assistant: ")[1:]]
    assert answers == [r["messages"][1]["content"][0]["text"] for r in rows], result.output
    assert f"(/image: no such file '{held / 'missing.png'}'; give the path of an image file)" in result.output
    assert "(history cleared)" in result.output


def test_qlora_quantises_the_language_model_and_keeps_the_vision_tower_in_16_bits(tmp_path):
    """`--quant 4bit` on a vlm run: the language model's linear layers load in 4 bits, the vision tower, the
    projector and the head do not; it trains and its adapter reloads."""
    pytest.importorskip("bitsandbytes")
    import torch
    from conftest import invoke

    from finetune.recipe.load import build_recipe
    from finetune.tasks.vlm import load_model

    model, processor = tiny_llava()
    base = tmp_path / "llava"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    recipe = build_recipe({"task": "vlm", "method": "lora", "model": {"name": str(base)},
                           "data": {"train": "x.jsonl"}, "quant": {"bits": 4}})
    loaded = load_model(recipe)
    kinds = {n: type(m).__name__ for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    four_bit = {n for n, k in kinds.items() if k == "Linear4bit"}
    assert four_bit and all("language_model" in n for n in four_bit), kinds
    assert not any(k == "Linear4bit" for n, k in kinds.items()
                   if "vision_tower" in n or "multi_modal_projector" in n or n.endswith("lm_head")), kinds
    data = tmp_path / "data"
    data.mkdir()
    with (data / "shapes.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in shape_rows(data, 8, seed=0))
    code, stdout, stderr = invoke("lora", "--task", "vlm", "--model", base, "--data", data / "shapes.jsonl", "-o",
                                  tmp_path / "run", "--quant", "4bit", "--max-steps", "2",
                                  "--set", "train.batch_size=4", "--set", "data.max_length=64")
    assert code == 0, stdout + stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics3"])
def test_a_batch_mixes_rows_with_and_without_images(name, tmp_path):
    """A text-only conversation in an image data set trains beside image rows, and alone in a batch: the
    collator's labels are the prepared ones, the loss is finite and reaches the language model's adapters."""
    import math

    import torch

    from finetune.data import vision_chat as V
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import VisionCollator, with_lora

    model, processor = {**FAMILIES, "idefics3": tiny_idefics3}[name]()
    text_only = {"messages": [{"role": "user", "content": "what is a circle?"},
                              {"role": "assistant", "content": "a round shape."}]}
    examples, _ = V.prepare(processor, [text_only, *shape_rows(tmp_path, 2, 0)], base=tmp_path)
    assert [len(e["images"]) for e in examples] == [0, 1, 1]
    answer = processor.tokenizer.decode([t for t in examples[0]["labels"] if t != -100], skip_special_tokens=True)
    assert answer.strip() == "a round shape."
    model = with_lora(model, LoraSpec(r=4, alpha=8))
    for batch_examples in (examples, examples[:1]):
        batch = VisionCollator(processor)(batch_examples)
        for row, example in zip(batch["labels"], batch_examples):
            assert row[:len(example["labels"])].tolist() == example["labels"]
            assert (row[len(example["labels"]):] == -100).all()
        loss = model(**batch).loss
        assert math.isfinite(loss.item())
        model.zero_grad()
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
        assert grads and any(torch.count_nonzero(g) for g in grads)


# ---------------------------------------------------------------------------------------
# Memory: the estimate counts the vision tower when it trains; a frozen tower keeps nothing for backward


def train_steps(model, processor, rows, folder, steps: int = 2, callbacks=(), **args):
    from transformers import TrainingArguments

    from finetune.data import vision_chat as V
    from finetune.tasks.vlm import make_trainer

    examples, stats = V.prepare(processor, rows, "data.train", folder, 4096, "drop")
    training = TrainingArguments(output_dir=str(folder / "out"), report_to=[], save_strategy="no", max_steps=steps,
                                 per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True,
                                 remove_unused_columns=False, learning_rate=1e-2, **args)
    make_trainer(model, processor, examples, None, training, list(callbacks)).train()
    return stats


@pytest.mark.parametrize("method, vision", [("lora", False), ("lora", True), ("full", False)])
def test_estimate_counts_the_vision_tower_when_it_trains(method, vision, tmp_path):
    """A LLaVA with a tower of 64 positions an image, width 96 and 4 layers: the estimate is within 1.5x of the
    measured peak of live tensors, and when the tower trains its vision term is what an estimate of the language
    model alone misses (measured: 0.88 of it with lora.vision, 0.73 in full fine-tuning)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from peak_memory import peak_memory_callback

    from finetune.models.memory import estimate
    from finetune.recipe.load import load_recipe
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import with_lora

    model, processor = tiny_llava(image=32, vision_hidden=96, vision_layers=4)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    spec = LoraSpec(r=8, alpha=16, dropout=0.0, vision=vision)
    trained = with_lora(model, spec) if method == "lora" else model
    peak = peak_memory_callback()
    stats = train_steps(trained, processor, shape_rows(tmp_path, 8, 0, size=32), tmp_path, callbacks=[peak])
    recipe = load_recipe(None, {"method": method, "task": "vlm", "model": {"name": str(tmp_path / "model")},
                                "data": {"train": "rows.jsonl"}},
                         ["train.batch_size=4", f"lora.vision={vision}", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
                          "train.bf16=false"])
    est = estimate(recipe, seq=max(stats["tokens"]), image_tokens=max(stats["image_tokens"]))
    assert max(stats["image_tokens"]) == 64
    assert 1 / 1.5 < est.tensors / peak.peak < 1.5, (est.tensors, peak.peak)
    if method == "full" or vision:  # the vision term is what an estimate of the language model alone misses
        assert 0.6 < (peak.peak - (est.tensors - est.vision)) / est.vision < 1.4
    else:  # a frozen tower: its pixels only (4 examples x 64 positions x 3 x 4 x 4 float32 values)
        assert est.vision == 4 * 64 * 3 * 4 * 4 * 4


def test_a_frozen_tower_runs_no_backward_under_gradient_checkpointing(tmp_path):
    """transformers' and peft's input hook for gradient checkpointing is kept off a frozen vision tower: its
    layers build no graph, whatever enabled checkpointing first; with lora.vision the tower's adapters still
    receive gradients and move."""
    import torch

    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import with_lora

    from finetune.tasks.vlm import input_grads_where_needed

    # as a run loads a model, and with checkpointing enabled before LoRA, as QLoRA's preparation does
    for vision, early in ((False, False), (True, False), (False, True), (True, True)):
        model, processor = tiny_llava()
        if early:  # transformers' hooks on every embedding, the tower's too, twice: the first handles are lost
            model.gradient_checkpointing_enable()
            model.gradient_checkpointing_enable()
        input_grads_where_needed(model)
        if early:
            model.gradient_checkpointing_enable()
        model = with_lora(model, LoraSpec(r=4, alpha=8, vision=vision))
        layer = [m for n, m in model.named_modules() if n.endswith("vision_tower.encoder.layers.1")][0]
        graphs = []
        layer.register_forward_hook(lambda m, i, out: graphs.append(out[0].requires_grad if isinstance(out, tuple)
                                                                    else out.requires_grad))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train_steps(model, processor, shape_rows(tmp_path, 8, 0), tmp_path, gradient_checkpointing=True)
        moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
        assert graphs and set(graphs) == {vision}
        assert any("language_model" in n for n in moved)
        assert any("vision_tower" in n for n in moved) == vision


# ---------------------------------------------------------------------------------------
# The run lifecycle: a vlm run stopped by SIGTERM resumes to the same adapter


def test_a_vlm_run_stopped_by_sigterm_resumes_bit_exact(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from test_run_lifecycle import at_step, sigterm

    from finetune.errors import Stopped
    from finetune.recipe.load import load_recipe
    from finetune.run.lifecycle import execute, resolve

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    data = tmp_path / "shapes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in shape_rows(tmp_path, 16, 0)))

    def recipe(out):
        return load_recipe(None, {"method": "lora", "task": "vlm", "model.name": str(tmp_path / "llava"),
                                  "data.train": str(data), "train.output_dir": str(out), "train.max_steps": 6,
                                  "train.save_steps": 2, "train.batch_size": 4, "data.eval_fraction": 0})

    execute(recipe(tmp_path / "whole"))
    with pytest.raises(Stopped) as stopped:
        execute(recipe(tmp_path / "stopped"), callbacks=[at_step(4, sigterm)])
    saved = tmp_path / "stopped" / "checkpoints" / "checkpoint-4"
    assert stopped.value.lines[0] == f"interrupted at step 4: saved {saved}"
    capsys.readouterr()
    resumed = resolve(None, None, {"train.output_dir": str(tmp_path / "stopped")}, None, resume=True)
    assert execute(resumed, resume=True)["steps"] == 6
    assert "resuming from checkpoint-4 (step 4)" in capsys.readouterr().out
    whole, again = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "stopped"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
