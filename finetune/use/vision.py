"""Answers from a vision-language run: images and a question in, the assistant's answer out.

    finetune generate runs/llava-shapes --image cat.png "What is this?"
    finetune generate runs/llava-shapes --data questions.jsonl -o answers.jsonl

Prompts are rendered by the run's processor exactly as training rendered them (finetune/data/vision_chat.py):
the user turns through the chat template with the generation prompt, each image expanded to its tokens by the
processor. Generation stops at the end of the assistant's turn, and only the answer is returned.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data import vision_chat as V
from finetune.data import vision_rows as R
from finetune.errors import UserError, first_line
from finetune.use.inference import chat_loop, check_model_dir, for_inference, run_recipe


def is_vision_run(source: str) -> bool:
    """A run directory trained with the vlm task, or a model folder (a merged run) whose config has a vision
    tower: read from the recipe or the config, without loading the model."""
    path = Path(source)
    if (path / "recipe.yaml").is_file():
        recipe = run_recipe(path)
        return recipe is not None and recipe.task == "vlm"
    return V.is_vision_folder(path)


def load_vision(source: str):
    """(model in eval mode, processor) of a vlm run or an image-text-to-text model folder with a processor."""
    path = Path(source)
    check_model_dir(path, "model")
    recipe = run_recipe(path)
    if recipe is not None and recipe.task != "vlm":
        raise UserError(f"--image: '{source}' is a {recipe.task} run, which takes no images; give images to a "
                        "vision-language run (finetune lora --task vlm) or drop --image")
    processor = V.load_processor(source, "--image")
    from finetune.recipe.tasks import load_task

    model = for_inference(load_task("vlm").load_trained(path))
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), processor


def stop_ids(processor) -> list[int]:
    """The tokens that end an assistant turn: the tokenizer's, and the special token that closes an answer in
    the processor's own rendering (the template may live on the processor only)."""
    from finetune.data.masks import end_of_turn_ids
    from finetune.data.templates import special_ids

    tokenizer = processor.tokenizer
    stops = set(end_of_turn_ids(tokenizer))
    probe = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    try:
        example = V.examples_of(processor, probe, [], "probe")[0]
    except UserError:  # a template that cannot render the probe: the tokenizer's alone
        return sorted(stops)
    trained = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100]
    stops.update(t for t in trained[-1:] if t in special_ids(tokenizer))
    return sorted(stops)


def image_files(images: list[str]) -> list[str]:
    for image in images:
        if not Path(image).expanduser().is_file():
            raise UserError(f"--image: no such file '{image}'; give the path of an image file")
    return [str(Path(image).expanduser()) for image in images]


def generate_batch(model, processor, prompts: list[tuple[list[dict], list]], max_new_tokens: int,
                   temperature: float, top_p: float, stops: list[int]) -> list[list[int]]:
    """New tokens for each (messages, decoded images) prompt, left-padded together, cut at the end of the turn."""
    import torch

    texts = [V.render(processor, messages, True) for messages, _ in prompts]
    pics = [list(images) for _, images in prompts]  # per example (a flat list is one example's to Gemma 3)
    batch = processor(text=texts, images=pics if any(pics) else None, padding=True, padding_side="left",
                      add_special_tokens=False, return_tensors="pt").to(model.device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_p=top_p if sample else None,
                             pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=stops)
    new = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        new.append(row[:next((k for k, t in enumerate(row) if t in stops), len(row))])
    return new


def generate_images(source: str, prompt: str, images: list[str], max_new_tokens: int, temperature: float,
                    top_p: float, seed: int) -> str:
    """The answer to one user turn: the images first, then the text (as LLaVA and Qwen2-VL data put them)."""
    from transformers import set_seed

    files = image_files(images)
    model, processor = load_vision(source)
    pics = [R.load_image(f, f"--image '{f}'") for f in files]
    content = [{"type": "image"} for _ in pics] + ([{"type": "text", "text": prompt}] if prompt else [])
    if not content:
        raise UserError("prompt: empty and no --image; give a question or an image")
    set_seed(seed)
    new = generate_batch(model, processor, [([{"role": "user", "content": content}], pics)], max_new_tokens,
                         temperature, top_p, stop_ids(processor))[0]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def caption_images(source: str, inputs: list[str] | None, data: str | None, max_new_tokens: int = 64,
                   batch_size: int = 16) -> list[dict]:
    """`finetune caption` for a vision-language run: each image alone as the user turn, as `image` + `caption`
    rows train it. One dict per image: image, caption, and the reference when `data` has a caption column."""
    from finetune.data.images import item_name, open_image, prediction_inputs, resolve

    items, rows, base = prediction_inputs(inputs, data, "image")
    model, processor = load_vision(source)
    stops, turn = stop_ids(processor), [{"role": "user", "content": [{"type": "image"}]}]
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pics = [open_image(item, "image" if inputs else "--data", base) for item in chunk]
        answers = generate_batch(model, processor, [(turn, [p]) for p in pics], max_new_tokens, 0.0, 1.0, stops)
        for item, row, new in zip(chunk, rows[start:start + batch_size], answers):
            result = {"image": item_name(resolve(item, base)),
                      "caption": processor.tokenizer.decode(new, skip_special_tokens=True).strip()}
            if "caption" in row:
                result["reference"] = row["caption"]
            out.append(result)
    return out


def prompt_row(row: dict, r: int, key: str) -> dict:
    """A data row in any shape training reads, as {"messages", "images"} ending in a user turn: a trailing
    assistant turn (the answer, when the file is training data) is dropped."""
    if not isinstance(row, dict):
        raise UserError(f"{key} row {r}: not a JSON object")
    row = dict(row)
    turns = row.pop("messages", row.pop("conversations", None))
    answer = {"role": "assistant", "content": "."}  # stands in for the answer R.normalize asks of training rows
    if isinstance(turns, list) and turns:
        last = turns[-1]
        if isinstance(last, dict) and R.ROLES.get(str(last.get("role", last.get("from")))) == "assistant":
            turns = turns[:-1]
        row["messages"] = [*turns, answer]
    elif turns is not None:
        row["messages"] = turns
    elif row.get("image") is not None:
        row["answer" if isinstance(row.get("question"), str) else "caption"] = "."
    example = R.normalize(row, r, key)
    messages = example["messages"][:-1]
    if not messages or messages[-1]["role"] != "user":
        raise UserError(f"{key} row {r}: no user turn to answer; end each row with the user's question")
    return {"messages": messages, "images": example["images"]}


def read_rows(data: Path) -> list[dict]:
    if not data.is_file():
        raise UserError(f"--data: no such file '{data}'")
    text = data.read_text()
    try:
        rows = json.loads(text) if data.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"--data: '{data}' is not valid JSON ({first_line(e)}); one object per line") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--data: '{data}' has no rows")
    return rows


def generate_image_file(source: str, data: Path, output: Path, batch_size: int, max_new_tokens: int,
                        temperature: float, top_p: float, seed: int) -> dict:
    """One JSON line per row of `data` (vision chat rows, images relative to the file) with the `generated`
    answer, in batches. Returns rows, new tokens and seconds."""
    import time

    from transformers import set_seed

    rows = read_rows(Path(data))
    base = Path(data).resolve().parent
    prompts = []
    for r, row in enumerate(rows, 1):  # numbered as the lines of a .jsonl file
        p = prompt_row(row, r, "--data")
        p["images"] = [R.check_image(item, f"--data row {r}, images[{j}]", base) for j, item in enumerate(p["images"])]
        prompts.append(p)
    model, processor = load_vision(source)
    stops = stop_ids(processor)
    set_seed(seed)
    answers: list[list[int]] = []
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        chunk = [(p["messages"], [R.load_image(item, f"--data row {b + k + 1}") for item in p["images"]])
                 for k, p in enumerate(prompts[b:b + batch_size])]
        answers += generate_batch(model, processor, chunk, max_new_tokens, temperature, top_p, stops)
    seconds = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as f:
        for row, new in zip(rows, answers):
            text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
            f.write(json.dumps({**row, "generated": text}, ensure_ascii=False) + "\n")
    return {"rows": len(rows), "new_tokens": sum(map(len, answers)), "seconds": seconds}


def vision_chat_session(source: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                        system: str | None = None, read=input, write=print) -> None:
    """`finetune chat` for a vision-language run: `/image PATH` attaches an image to the next message (several
    may be attached), the history keeps every image in its turn, `/reset`, `/system TEXT` and `/quit` as in
    text chat."""
    from transformers import set_seed

    model, processor = load_vision(source)
    stops = stop_ids(processor)
    set_seed(seed)
    history: list[dict] = []
    pictures: list = []  # the images of the history's turns, in order
    pending: list = []  # attached, for the next message

    def reset() -> None:
        history.clear()
        pictures.clear()
        pending.clear()

    def attach(line: str) -> bool:
        if not line.startswith("/image"):
            return False
        path = line[len("/image"):].strip()
        if not Path(path).expanduser().is_file():
            write(f"(/image: no such file '{path}'; give the path of an image file)")
            return True
        try:
            pending.append(R.load_image(str(Path(path).expanduser()), f"/image '{path}'"))
        except UserError as e:
            write(f"({e.problems[0]})")
            return True
        write(f"(image attached: {path})")
        return True

    def respond(line: str, system: str | None) -> None:
        if not line and not pending:
            return
        content = [{"type": "image"} for _ in pending] + ([{"type": "text", "text": line}] if line else [])
        history.append({"role": "user", "content": content})
        pictures.extend(pending)
        pending.clear()
        head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        new = generate_batch(model, processor, [(head + history, pictures)], max_new_tokens, temperature, top_p,
                             stops)[0]
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        write(f"assistant: {answer}")
        history.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})

    chat_loop(read, write, "chat: /image PATH attaches an image to your next message, /system TEXT sets the system "
              "prompt, /reset clears the history, /quit ends", system, respond, reset, attach)
