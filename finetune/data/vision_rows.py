"""Vision-language chat rows: four shapes brought to trl's conversational vision format, checked, one line per
problem naming the row.

    {"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", ...}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}
    {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>What is this?"}, ...]}  (ShareGPT /
        LLaMA-Factory: `<image>` placeholders in the text, `conversations` with from/value also read)
    {"image": "a.png", "question": "...", "answer": "..."}  (VQA: one user turn, one answer)
    {"image": "a.png", "caption": "..."}  (captioning: the user turn is the image alone, the caption the answer)

Image paths are relative to the data file; URLs are refused offline; the number of image places in the
messages must equal the number of images. The masks are finetune/data/vision_chat.py's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.data.masks import trains
from finetune.errors import UserError, first_line

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
         "model": "assistant"}
PLACEHOLDER = "<image>"
# The model types that take images in a chat (named in errors; any image-text-to-text model with a processor
# and a chat template works)
TAKES_IMAGES = "qwen2_vl, qwen2_5_vl, llava, llava_next, idefics3, smolvlm, gemma3"
SHAPES = ("`images` + `messages` (trl), `<image>` placeholders in `messages`/`conversations` (ShareGPT), "
          "`image` + `question` + `answer` (VQA) or `image` + `caption`")


# ---------------------------------------------------------------------------------------
# Rows


def is_url(item: Any) -> bool:
    return isinstance(item, str) and item.split("://", 1)[0] in ("http", "https")


def offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0", "false") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def content_items(content: Any, where: str) -> list[dict]:
    """A message's content as a list of {"type": "image"} / {"type": "text", "text"} items."""
    if content is None:
        return []
    if isinstance(content, str):
        parts = content.split(PLACEHOLDER)
        items: list[dict] = []
        for k, part in enumerate(parts):
            if k:
                items.append({"type": "image"})
            if part:
                items.append({"type": "text", "text": part})
        return items
    if not isinstance(content, list):
        raise UserError(f"{where}: content must be a string or a list of image/text items, not "
                        f"{type(content).__name__}")
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image" or (kind is None and isinstance(item, dict) and "image" in item):
            items.append({"type": "image"})
        elif kind == "text" and isinstance(item.get("text"), str):
            items.extend(content_items(item["text"], where) if PLACEHOLDER in item["text"] else [item])
        else:
            raise UserError(f"{where}: content items must be {{\"type\": \"image\"}} or {{\"type\": \"text\", "
                            f"\"text\": \"...\"}}, not {str(item)[:60]}")
    return items


def normalize(row: dict, r: int, key: str) -> dict:
    """One row as {"messages": [{role, content: [items]}], "images": [items]}; one-line errors name the row."""
    where = f"{key} row {r}"
    images = row.get("images")
    if images is None:
        images = [] if row.get("image") is None else [row["image"]]
    if not isinstance(images, list):
        images = [images]
    turns = row.get("messages", row.get("conversations"))
    if turns is None:
        image = row.get("image")
        if image is not None and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
            turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                     {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
        elif image is not None and isinstance(row.get("caption"), str):
            turns = [{"role": "user", "content": [{"type": "image"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]}]
        else:
            raise UserError(f"{where}: not a vision chat row (fields {sorted(row)[:6]}); give {SHAPES}")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: `messages` must be a non-empty list of turns")
    messages = []
    for t, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise UserError(f"{where}, turn {t}: a turn must be an object with role and content")
        role = ROLES.get(str(turn.get("role", turn.get("from"))))
        if role is None:
            raise UserError(f"{where}, turn {t}: unknown role '{turn.get('role', turn.get('from'))}'; use "
                            "system, user or assistant")
        items = content_items(turn.get("content", turn.get("value")), f"{where}, turn {t}")
        if role == "assistant" and any(i["type"] == "image" for i in items):
            raise UserError(f"{where}, turn {t}: an assistant turn holds an image; the model answers in text, so "
                            "put images in user turns")
        message = {"role": role, "content": items}
        for k in ("train", "weight"):
            if k in turn:
                message[k] = turn[k]
        messages.append(message)
    places = [t for t, m in enumerate(messages, 1) for i in m["content"] if i["type"] == "image"]
    if len(places) != len(images):
        shown = f" (in turns {sorted(set(places))})" if places else ""
        raise UserError(f"{where}: {len(places)} image places{shown} but {len(images)} images in `images`; give "
                        f"one image per {PLACEHOLDER} placeholder or {{\"type\": \"image\"}} item")
    if not any(m["role"] == "assistant" and trains(m) and m["content"] for m in messages):
        raise UserError(f"{where}: no assistant turn to train on; every row needs an answer")
    return {"messages": messages, "images": images}


def data_base_of(source: str) -> Path | None:
    """The folder relative image paths of a data file are resolved against (None for a dataset)."""
    path = Path(source).expanduser()
    return path.resolve().parent if path.is_file() else (path.resolve() if path.is_dir() else None)


def check_image(item: Any, where: str, base: Path | None) -> Any:
    """The image item with a relative path resolved; a URL offline or a missing file is one line."""
    from finetune.data.images import item_name, resolve

    item = str(item) if isinstance(item, os.PathLike) else item
    if is_url(item):
        if offline():
            raise UserError(f"{where}: image '{item}' is a URL and this machine is offline (HF_HUB_OFFLINE); "
                            "download the images and give their paths")
        return item
    if isinstance(item, dict) and item.get("bytes"):
        return item
    if hasattr(item, "convert"):  # a PIL image, from a dataset or a caller
        return item
    item = resolve(item, base)
    path = item.get("path") if isinstance(item, dict) else item
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: an empty image entry ({str(item)[:60]}); give an image path")
    if not Path(path).expanduser().is_file():
        raise UserError(f"{where}: image file '{item_name(item)}' does not exist; fix the path or remove the row")
    return item


def load_image(item: Any, where: str):
    """A decoded RGB image (URLs fetched, only when online)."""
    from finetune.data.images import open_image

    item = str(item) if isinstance(item, os.PathLike) else item
    if is_url(item):
        import io
        import urllib.request

        from PIL import Image

        try:
            with urllib.request.urlopen(item, timeout=30) as response:  # noqa: S310 (http(s) only, checked)
                return Image.open(io.BytesIO(response.read())).convert("RGB")
        except OSError as e:
            raise UserError(f"{where}: cannot fetch image '{item}' ({first_line(e)}); download it and give its "
                            "path") from e
    return open_image(item, where)


def read_rows(rows: list[dict], key: str, base: Path | None, lines: list[int] | None = None) -> list[dict]:
    """Every row normalized and its image files checked (URLs kept as they are). `lines`: the rows' numbers in
    their file (1, 2, ... unless given)."""
    out = []
    for r, row in zip(lines or range(1, len(rows) + 1), rows):  # numbered as the lines of a .jsonl file
        ex = normalize(row, r, key)
        ex["images"] = [check_image(item, f"{key} row {r}, images[{j}]", base) for j, item in enumerate(ex["images"])]
        out.append(ex)
    return out


def mapped_rows(rows: list[dict]) -> dict[str, int]:
    """How many rows were VQA (`image` + `question` + `answer`) or captions (`image` + `caption`)."""
    found = {"vqa": 0, "caption": 0}
    for row in rows:
        if isinstance(row, dict) and row.get("messages", row.get("conversations")) is None:
            found["vqa" if isinstance(row.get("question"), str) else "caption"] += 1
    return found


def mapping_notes(stats: dict, key: str) -> list[str]:
    """What the VQA and caption rows became."""
    vqa, caption = stats["mapped"]["vqa"], stats["mapped"]["caption"]
    notes = []
    if vqa:
        notes.append(f"note: {key}: {vqa} image + question + answer rows read as a user turn (the image, then the "
                     "question) and the answer")
    if caption:
        notes.append(f"note: {key}: {caption} image + caption rows read as a user turn holding the image alone and "
                     "the caption as the answer; give question + answer rows (or messages) to prompt with text")
    return notes
