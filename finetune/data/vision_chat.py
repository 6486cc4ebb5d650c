"""Vision-language chat data: rows of images and messages (finetune/data/vision_rows.py: four shapes, checked) and
their loss masks on the processor's rendering with every image expanded to its tokens.

The mask is found as text chat finds it (finetune/data/masks.py), on what the model will see: the processor
renders messages[:i] with the generation prompt and messages[:i+1], and tokenizes each with the images of
those turns expanded (a dynamic-resolution model's count depends on the image size, so the images are
processed, not guessed). When each rendering is a prefix of the whole, an answer is exactly the tokens between
the two. Every example is checked: no trained token is an image token, no answer is empty. A template that
breaks the prefix property gets one example per answer (as `turn_mode: auto`); one that breaks even that is
refused. Examples are never cut: one longer than `max_length` is dropped and counted, or refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.masks import NotPrefix, trim_after_end_of_turn, trains
from finetune.data.templates import special_ids
from finetune.data.vision_rows import TAKES_IMAGES, load_image, mapped_rows, read_rows
from finetune.errors import UserError, first_line

OVERFLOW = ("drop", "error")


# ---------------------------------------------------------------------------------------
# The processor


def load_processor(name: str, key: str, trust_remote_code: bool = False):
    """A vision-language model's processor (tokenizer, chat template, image processor), for training and for
    using a run alike; what it lacks is one line naming `key`."""
    from transformers import AutoProcessor

    folder = Path(str(name)).expanduser()
    if is_vision_folder(folder) and not any((folder / f).is_file() for f in ("preprocessor_config.json",
                                                                              "processor_config.json")):
        raise UserError(f"{key}: '{name}' has no processor files (preprocessor_config.json or "
                        "processor_config.json); a vision-language model needs its processor (tokenizer, chat "
                        "template, image processor): save it beside the weights (processor.save_pretrained) or copy "
                        "those files from the base checkpoint")
    try:
        processor = AutoProcessor.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except ImportError as e:  # Qwen2-VL's video processor, say, needs torchvision even for image-only data
        import torch

        raise UserError(f"{key}: the processor of '{name}' needs a package that is not installed "
                        f"({first_line(e).split('. ')[0]}); install it (torchvision: the build that matches torch "
                        f"{torch.__version__.split('+')[0]})") from e
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{key}: could not load a processor from '{name}': {first_line(e)}; a vision-language "
                        "model needs its processor (tokenizer, chat template, image processor)") from e
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise UserError(f"{key}: '{name}' is not a vision-language model (its processor takes no images); use an "
                        f"image-text-to-text model ({TAKES_IMAGES})")
    if not processor.chat_template:
        raise UserError(f"data.chat_template: the processor of '{name}' has no chat template; use an instruct "
                        "checkpoint or give the processor a template")
    return processor


def is_vision_folder(folder: Path) -> bool:
    """A model folder whose config.json has a vision tower."""
    import json

    try:
        return "vision_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------
# Rendering and the mask


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens an image expands to, or that frame it (never trained): Idefics3's
    `<fake_token_around_image>`, `<global-img>` and `<row_i_col_j>` tiles included."""
    tokenizer = processor.tokenizer
    found: set[int] = set()
    for name in dir(processor):
        if not any(w in name for w in ("image", "vision", "video", "boi", "eoi", "row_col")) or name.startswith("_"):
            continue
        try:
            value = getattr(processor, name)
        except Exception:  # properties that need inputs
            continue
        if name.endswith("_token_id") and isinstance(value, int):
            found.add(value)
        elif name.endswith("_ids") and isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
        elif name.endswith("_token") and isinstance(value, str) and value:
            found.update(tokenizer.encode(value, add_special_tokens=False))
    for name in ("boi_token", "eoi_token", "image_token"):  # Gemma 3 names its image frame on the tokenizer only
        value = getattr(tokenizer, name, None)
        ids = tokenizer.encode(value, add_special_tokens=False) if isinstance(value, str) and value else []
        if len(ids) == 1:  # a token of the vocabulary, not text that happens to spell its name
            found.update(ids)
    unk = tokenizer.unk_token_id
    return {i for i in found if i is not None and i != unk}


def feature_token_id(processor) -> int | None:
    """The id of the token each image feature replaces (LLaVA's `<image>`, Qwen2-VL's `<|image_pad|>`, Gemma 3's
    `<image_soft_token>`, where `image_token_id` is the `<start_of_image>` that frames them)."""
    ids = getattr(processor, "image_token_ids", None)
    if isinstance(ids, (list, tuple)) and len(ids) == 1 and isinstance(ids[0], int):
        return ids[0]
    found = getattr(processor, "image_token_id", None)
    if isinstance(found, int):
        return found
    token = getattr(processor, "image_token", None)
    return processor.tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None


def show_example(processor, example: dict, colour: bool) -> str:
    """An example's text with the trained tokens marked (green on a terminal, [[...]] otherwise) and each run of
    an image's tokens written once with its count (`<image>×64`). Text is decoded a stretch at a time, so that
    characters made of several byte-level tokens come out whole."""
    tokenizer, images = processor.tokenizer, image_token_ids(processor)
    ids, labels = example["input_ids"], example["labels"]
    out, inside, k = [], False, 0
    while k < len(ids):
        trained = labels[k] != -100
        if trained != inside:
            out.append(("\033[32m" if trained else "\033[0m") if colour else ("[[" if trained else "]]"))
            inside = trained
        end = k + 1
        if ids[k] in images:  # one image token, repeated
            while end < len(ids) and ids[end] == ids[k] and (labels[end] != -100) == trained:
                end += 1
            out.append(tokenizer.decode([ids[k]]) + (f"×{end - k}" if end - k > 1 else ""))
        else:  # text up to the next image token or change of mark
            while end < len(ids) and ids[end] not in images and (labels[end] != -100) == trained:
                end += 1
            out.append(tokenizer.decode(ids[k:end]))
        k = end
    if inside:
        out.append("\033[0m" if colour else "]]")
    return "".join(out)


def render(processor, messages: list[dict], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    shaped = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return processor.apply_chat_template(shaped, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError) as e:
        raise UserError(f"data.chat_template: the processor's chat template refuses a conversation: {first_line(e)}; "
                        "fix the data or choose another template") from e


def tokenize(processor, text: str, pics: list) -> list[int]:
    """The ids the model sees: the rendering with each image expanded by the processor (the template writes
    BOS itself, so the tokenizer adds no special tokens)."""
    out = processor(text=[text], images=pics or None, add_special_tokens=False)
    return list(out["input_ids"][0])


def n_images(messages: list[dict]) -> int:
    return sum(i["type"] == "image" for m in messages for i in m["content"])


def examples_of(processor, messages: list[dict], pics: list, where: str, train_on: str = "assistant",
                specials: set[int] | None = None, image_ids: set[int] | None = None) -> list[dict]:
    """The examples of one conversation ({"input_ids", "labels", "text", "images"}: the image items they use),
    masked by the prefix method on the processor's rendering and checked token by token."""
    tokenizer = processor.tokenizer
    specials = special_ids(tokenizer) if specials is None else specials
    image_ids = image_token_ids(processor) if image_ids is None else image_ids
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and trains(m)]
    if train_on == "last_assistant":
        turns = turns[-1:]

    def ids_of(k: int, generation_prompt: bool) -> list[int]:
        return tokenize(processor, render(processor, messages[:k], generation_prompt), pics[:n_images(messages[:k])])

    def example(k: int, spans: list[tuple[int, int]], ids: list[int]) -> dict:
        labels = [-100] * len(ids)
        for start, end in spans:
            end = trim_after_end_of_turn(ids, start, end, specials, tokenizer)
            if start >= end:
                raise UserError(f"{where}: the chat template renders an answer as no tokens, so nothing would be "
                                "trained; use another template (data.chat_template)")
            labels[start:end] = ids[start:end]
        leaked = sorted({t for t, lab in zip(ids, labels) if lab != -100 and t in image_ids})
        if leaked:
            raise UserError(f"{where}: image tokens {tokenizer.convert_ids_to_tokens(leaked)} fall inside an answer "
                            "in the chat template's rendering, so the mask would train them; use another template")
        text = render(processor, messages[:k], False)
        return {"input_ids": ids, "labels": labels, "text": text, "images": pics[:n_images(messages[:k])]}

    if train_on == "all":
        ids = ids_of(len(messages), False)
        return [{"input_ids": ids, "labels": [t if t not in image_ids else -100 for t in ids],
                 "text": render(processor, messages, False), "images": list(pics)}]
    ids = ids_of(len(messages), False)
    try:
        spans = []
        for i in turns:
            bounds = []
            for k, gen in ((i, True), (i + 1, False)):
                prefix = ids_of(k, gen)
                if ids[:len(prefix)] != prefix:
                    raise NotPrefix(k)
                bounds.append(len(prefix))
            spans.append((bounds[0], bounds[1]))
        return [example(len(messages), spans, ids)]
    except NotPrefix:
        pass
    out = []
    for i in turns:  # the template rewrites earlier turns: one example per answer, the answer last
        ids = ids_of(i + 1, False)
        prompt = ids_of(i, True)
        if ids[:len(prompt)] != prompt:
            raise UserError(f"{where}, turn {i + 1}: the chat template renders the prompt differently once the "
                            "answer follows it, even as the last turn (the prefix property fails on the rendering "
                            "with images expanded), so the answer's tokens cannot be found exactly; use another "
                            "template (data.chat_template)")
        out.append(example(i + 1, [(len(prompt), len(ids))], ids))
    return out


class NothingFits(UserError):
    """No example of a data set fits data.max_length."""


def prepare(processor, rows: list[dict], key: str = "data.train", base: Path | None = None,
            max_length: int | None = None, on_overflow: str = "drop", train_on: str = "assistant",
            lines: list[int] | None = None) -> tuple[list[dict], dict]:
    """(examples, stats) of raw rows: normalized, images checked and opened, masked and checked, examples
    longer than `max_length` (images expanded) dropped or refused. Each example keeps the image items it
    uses, so a collator decodes them again batch by batch. stats: rows, examples, dropped, tokens (lengths),
    image_tokens (the tokens image features fill, per example), image_sizes. `lines`: the rows' numbers in
    their file, for messages (1, 2, ... unless given)."""
    if on_overflow not in OVERFLOW:
        raise UserError(f"data.on_overflow: '{on_overflow}' is not one of {', '.join(OVERFLOW)}")
    if getattr(processor, "image_processor", None) is None:
        raise UserError("model.name: the model's processor has no image processor, so images cannot be read; "
                        "use a vision-language model's processor")
    specials, image_ids = special_ids(processor.tokenizer), image_token_ids(processor)
    feature = feature_token_id(processor)
    examples: list[dict] = []
    stats: dict[str, Any] = {"rows": len(rows), "examples": 0, "dropped": 0, "dropped_rows": [], "tokens": [],
                             "image_tokens": [], "image_sizes": [], "mapped": mapped_rows(rows)}
    for r, row in zip(lines or range(1, len(rows) + 1), read_rows(rows, key, base, lines)):
        where = f"{key} row {r}"
        pics = [load_image(item, f"{where}, images[{j}]") for j, item in enumerate(row["images"])]
        stats["image_sizes"].extend(p.size for p in pics)
        found = examples_of(processor, row["messages"], pics, where, train_on, specials, image_ids)
        for ex in found:
            n = len(ex["input_ids"])
            if max_length is not None and n > max_length:
                if on_overflow == "error":
                    raise UserError(f"{where}: {n} tokens with its {len(pics)} images expanded, over data.max_length="
                                    f"{max_length}; raise data.max_length, shrink the images, or set "
                                    "data.on_overflow: drop")
                stats["dropped"] += 1
                stats["dropped_rows"].append(r)
                continue
            ex["images"] = row["images"][:len(ex["images"])]
            ex["row"] = r
            stats["tokens"].append(n)
            stats["image_tokens"].append(sum(t == feature for t in ex["input_ids"]))
            examples.append(ex)
    stats["examples"] = len(examples)
    if not examples:
        raise NothingFits(f"{key}: no example fits data.max_length={max_length} once its images are expanded; "
                          "raise data.max_length or shrink the images")
    return examples, stats
