"""Image captioning: an image in, a sentence out. A VisionEncoderDecoder model joins an image encoder
(ViT) to a text decoder (GPT-2 style) through cross-attention; it is trained on image/caption pairs
and evaluated by generating captions and scoring them with BLEU.

    finetune lora --task captioning --model google/vit-base-patch16-224-in21k \\
        --set captioning.decoder=openai-community/gpt2 --data photos/ -o runs/vit-gpt2-captions
    finetune full --task captioning --model nlpconnect/vit-gpt2-image-captioning --data photos/ -o runs/captions
    finetune caption runs/vit-gpt2-captions photo.png                       # caption an image

Model: `model.name` is either an image encoder, joined to the decoder in `captioning.decoder` (the
decoder's new cross-attention starts untrained), or a VisionEncoderDecoder checkpoint that is
already combined. The image processor comes from `model.name`; the tokenizer from
`model.tokenizer`, else the decoder.
Data: an image folder with a metadata.jsonl of `file_name` and `text` (the caption), or any dataset
or data file with an image column (`captioning.image_column`) and a caption column
(`data.text_column`); image paths in a .jsonl/.csv are relative to that file.
Recipe fields used: model.*, data.* (data.max_length: caption tokens, default 64), captioning.*,
lora.*, train.*. With LoRA, the self-attention and MLP layers of both halves get adapters and the
cross-attention is trained in full and saved with them.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from pathlib import Path

from finetune.data import images
from finetune.data import text as D
from finetune.errors import UserError, first_line
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import CaptioningSpec
from finetune.tasks.metrics import generation_metrics
from finetune.training import session

CAPTION_TOKENS = 64  # data.max_length when unset
NEW_MODULES = ("crossattention", "ln_cross_attn", "enc_to_dec_proj")  # created when two checkpoints are joined


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed

    set_seed(recipe.train.seed)
    spec = recipe.section(CaptioningSpec)
    if recipe.quant.bits:
        raise UserError("quant.bits: captioning trains without quantization (the new cross-attention cannot be "
                        "trained in 4/8 bits); drop quant.bits")

    # 1. Data: image files checked (undecoded), captions as text.
    train_raw, eval_raw = load_data(recipe, spec)

    # 2. Image processor, tokenizer, model: encoder + decoder joined (or one combined checkpoint).
    is_combined(recipe, spec)  # model.name and captioning.decoder agree, before anything loads
    processor = images.load_image_processor(recipe.model)
    tokenizer = load_caption_tokenizer(recipe, spec)
    model = build_model(recipe, spec, tokenizer)
    caption_tokens = recipe.data.max_length or CAPTION_TOKENS

    # 3. Pixels and caption tokens on the fly, batch by batch.
    rng = random.Random(recipe.train.seed) if spec.augment else None
    train_ds = train_raw.with_transform(transform(processor, tokenizer, caption_tokens, "data.train",
                                                  images.data_base(recipe.data.train), rng))
    eval_ds = None
    if eval_raw is not None:
        eval_base = images.data_base(recipe.data.eval or recipe.data.train)
        eval_ds = eval_raw.with_transform(transform(processor, tokenizer, caption_tokens, "data.eval", eval_base))

    # 4. LoRA: adapters on self-attention and MLPs; cross-attention (new when joined) trains in full.
    if recipe.method == "lora":
        with quiet_conv1d():
            model = apply_lora(model, recipe.lora, None, modules_to_save=new_modules(model))

    # 5. Train; evaluation generates captions and scores them.
    run_dir = session.start_run(recipe)
    # The image and caption columns must reach the transform; there are no input tokens to count.
    args = session.training_arguments(recipe, run_dir, args_cls=Seq2SeqTrainingArguments, predict_with_generate=True,
                                       generation_max_length=caption_tokens, generation_num_beams=spec.num_beams,
                                       remove_unused_columns=False, include_num_input_tokens_seen="no")
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=CaptionCollator(), processing_class=tokenizer,
                             compute_metrics=score_captions(tokenizer),
                             callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))
        processor.save_pretrained(str(run_dir))

    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    for key in ("tokens_seen", "tokens_per_s"):  # images, not tokens, go in
        metrics.pop(key, None)
    metrics["samples_per_s"] = train_output.metrics.get("train_samples_per_second")
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


# ---------------------------------------------------------------------------------------
# Data


def load_data(recipe: Recipe, spec: CaptioningSpec):
    train_raw, eval_raw = D.load_splits(recipe.data, recipe.train.seed)
    train = select(train_raw, recipe, spec, "data.train", recipe.data.train, warn=True)
    eval_ds = select(eval_raw, recipe, spec, "data.eval", recipe.data.eval or recipe.data.train) \
        if eval_raw is not None else None
    return train, eval_ds


def select(ds, recipe: Recipe, spec: CaptioningSpec, key: str, source: str, warn: bool = False):
    """Columns `image` (undecoded, every file checked) and `text` (a caption), empty captions dropped."""
    column = recipe.data.text_column
    if column not in ds.column_names and Path(source).expanduser().is_dir():
        raise UserError(f"{key}: image folder '{source}' has no captions; add a metadata.jsonl with one line per "
                        'image: {"file_name": "0.png", "text": "a red circle"}')
    D.require_columns(ds, {"captioning.image_column": spec.image_column, "data.text_column": column},
                      f"{key} '{source}'")
    ds = images.undecoded(ds.select_columns([spec.image_column, column]), spec.image_column)
    if spec.image_column != "image":
        ds = ds.rename_column(spec.image_column, "image")
    if column != "text":
        ds = ds.rename_column(column, "text")
    bad = [i for i, t in enumerate(ds["text"]) if t is not None and not isinstance(t, str)]
    if bad:
        raise UserError(f"{key}: captions in '{column}' must be strings (row {bad[0]} holds "
                        f"{type(ds[bad[0]]['text']).__name__}); give one caption per row")
    empty = D.empty_rows(ds, "text")
    if empty:
        if warn:
            print(f"warning: skipping {len(empty)} images without a caption in {key} (rows {empty[:5]}...)", flush=True)
        ds = D.drop_empty(ds, "text")
        if len(ds) == 0:
            raise UserError(f"{key}: no image in '{source}' has a caption")
    images.check_images(ds, "image", key, images.data_base(source))
    return ds


def transform(processor, tokenizer, caption_tokens: int, key: str, base: Path | None, rng: random.Random | None = None):
    """Decode and preprocess a batch of images; captions become labels ending in eos."""
    eos = tokenizer.eos_token_id

    def apply(batch):
        pics = [images.open_image(item, key, base) for item in batch["image"]]
        if rng is not None:
            pics = [images.augment(p, rng, flip=False) for p in pics]
        out = {"pixel_values": images.pixel_values(processor, pics)}
        if "text" in batch:
            ids = tokenizer([t.strip() for t in batch["text"]], add_special_tokens=False)["input_ids"]
            out["labels"] = [x[:caption_tokens - 1] + [eos] for x in ids]
        return out

    return apply


class CaptionCollator:
    """Stacks pixel values; pads labels with -100 by position, so the eos that ends each caption is
    always learned, even where the pad token is eos (GPT-2)."""

    def __call__(self, features):
        import torch

        batch = {"pixel_values": torch.stack([f["pixel_values"] for f in features])}
        if "labels" in features[0]:
            longest = max(len(f["labels"]) for f in features)
            batch["labels"] = torch.tensor([list(f["labels"]) + [-100] * (longest - len(f["labels"]))
                                            for f in features], dtype=torch.long)
        return batch


def score_captions(tokenizer):
    import numpy as np

    def compute(eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds = preds[0] if isinstance(preds, tuple) else preds
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        hyps = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return generation_metrics(hyps, refs)

    return compute


# ---------------------------------------------------------------------------------------
# Model


def load_caption_tokenizer(recipe: Recipe, spec: CaptioningSpec):
    """The decoder's tokenizer. Without a pad token, eos pads: labels are masked by position (see
    CaptionCollator), so eos is still learned, and no new, untrained embedding row is needed."""
    model_spec = recipe.model
    if not model_spec.tokenizer and spec.decoder:
        model_spec = model_spec.model_copy(update={"tokenizer": spec.decoder})
    tokenizer = pretrained.load_tokenizer(model_spec)
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:  # BERT-style decoders
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token_id is None and tokenizer.cls_token_id is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.tokenizer: the tokenizer of '{model_spec.tokenizer or model_spec.name}' has no eos "
                        "token to end captions with; use a decoder tokenizer that has one (GPT-2's does)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(recipe: Recipe, spec: CaptioningSpec, tokenizer):
    """A VisionEncoderDecoderModel from one combined checkpoint, or from an encoder and a decoder."""
    from transformers import VisionEncoderDecoderModel

    if is_combined(recipe, spec):
        model = pretrained.load_model(recipe.model, VisionEncoderDecoderModel)
    else:
        from transformers import AutoConfig

        encoder = pretrained.check_source(recipe.model.name, "model.name")
        decoder = pretrained.check_source(spec.decoder, "captioning.decoder")
        trust = recipe.model.trust_remote_code
        try:
            # The decoder config is made here, marked as a decoder with cross-attention: transformers 5
            # configs such as GPT2Config have no `is_decoder` until it is set, and the joining code
            # reads it (AttributeError) when it builds the config itself.
            decoder_config = AutoConfig.from_pretrained(decoder, trust_remote_code=trust)
            decoder_config.is_decoder = True
            decoder_config.add_cross_attention = True
            model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
                encoder, decoder, encoder_trust_remote_code=trust, decoder_trust_remote_code=trust,
                decoder_config=decoder_config)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"captioning.decoder: could not join '{recipe.model.name}' and '{spec.decoder}' into a "
                            f"VisionEncoderDecoder: {first_line(e)}") from e
    vocab = model.decoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UserError(f"model.tokenizer: {len(tokenizer)} tokens, but the decoder has {vocab} embeddings; "
                        "use the decoder's own tokenizer")
    set_generation(model, tokenizer, spec, recipe.data.max_length or CAPTION_TOKENS)
    return model


def is_combined(recipe: Recipe, spec: CaptioningSpec) -> bool:
    """Whether model.name is a VisionEncoderDecoder already; checks it agrees with captioning.decoder."""
    config = pretrained.load_config(recipe.model)
    combined = config.model_type == "vision-encoder-decoder"
    if combined and spec.decoder:
        raise UserError(f"captioning.decoder: model.name '{recipe.model.name}' already holds an encoder and a "
                        "decoder (a VisionEncoderDecoder); drop captioning.decoder")
    if not combined and not spec.decoder:
        raise UserError(f"captioning.decoder: model.name '{recipe.model.name}' is an image encoder only "
                        f"({config.model_type}); set captioning.decoder to a GPT-2-style decoder (for example "
                        "--set captioning.decoder=openai-community/gpt2), or use a VisionEncoderDecoder checkpoint")
    return combined


def set_generation(model, tokenizer, spec: CaptioningSpec, max_length: int, num_beams: int | None = None) -> None:
    """Token ids the decoder starts, pads and stops with; beam size and length for generation."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = start
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = start
    model.generation_config.max_length = max_length
    model.generation_config.max_new_tokens = None
    model.generation_config.num_beams = num_beams or spec.num_beams


@contextlib.contextmanager
def quiet_conv1d():
    """peft warns each time it switches fan_in_fan_out between the ViT's Linear layers and GPT-2's
    Conv1D layers; it sets it right per layer, so the warnings say nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        yield


def new_modules(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [m for m in NEW_MODULES if m in names]


# ---------------------------------------------------------------------------------------
# Using a run


def usage(run_dir: Path, recipe: Recipe) -> str:
    if recipe.method == "lora":
        load = (f"# a LoRA adapter over a model joined at training time: load it with finetune\n"
                "from finetune.tasks.captioning import load_trained\n"
                f'model = load_trained("{run_dir}")\n')
    else:
        load = ("from transformers import VisionEncoderDecoderModel\n"
                f'model = VisionEncoderDecoderModel.from_pretrained("{run_dir}")\n')
    return ("```python\nfrom PIL import Image\nfrom transformers import AutoImageProcessor, AutoTokenizer\n"
            f"{load}"
            f'processor = AutoImageProcessor.from_pretrained("{run_dir}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{run_dir}")\n'
            'pixels = processor(images=Image.open("photo.png").convert("RGB"), return_tensors="pt").pixel_values\n'
            "print(tokenizer.decode(model.generate(pixel_values=pixels)[0], skip_special_tokens=True))\n```\n\n"
            f"Or: `finetune caption {run_dir} photo.png` (or `--data FOLDER -o captions.jsonl`).")


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f"finetune caption {run_dir} photo.png"]
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained model of a run or a plain model directory (a PeftModel for LoRA runs).

    A LoRA run over two joined checkpoints has no base on disk: it is joined again from the run's
    recipe, and the adapter brings back the cross-attention trained in full."""
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    from finetune.use.inference import run_recipe

    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    if not is_adapter_dir(run_dir):
        return VisionEncoderDecoderModel.from_pretrained(str(run_dir), **kwargs)
    if recipe is None:
        raise UserError(f"run: '{run_dir}' holds a LoRA adapter but no recipe.yaml to rebuild its base from")
    from peft import PeftModel

    spec = recipe.section(CaptioningSpec)
    base = build_model(recipe, spec, AutoTokenizer.from_pretrained(str(run_dir)))
    with quiet_conv1d():
        return PeftModel.from_pretrained(base, str(run_dir), **kwargs)


def caption(run_dir: Path, inputs: list[str] | None, data: str | None, num_beams: int | None = None,
            max_length: int | None = None, batch_size: int = 16) -> list[dict]:
    """Caption images: paths in `inputs`, or every image of `data` (an image folder, or a file with an
    image column). One dict per image: image, caption, and the reference when `data` has captions."""
    import torch
    from transformers import AutoTokenizer

    from finetune.use.inference import check_model_dir, run_recipe

    run_dir = Path(run_dir)
    check_model_dir(run_dir, "run")
    recipe = run_recipe(run_dir)
    if recipe is not None and recipe.task != "captioning":
        raise UserError(f"run: '{run_dir}' is a {recipe.task} run; `finetune caption` needs a captioning run")
    spec = recipe.section(CaptioningSpec) if recipe else CaptioningSpec()
    text_column = recipe.data.text_column if recipe else "text"
    items, rows, base = images.prediction_inputs(inputs, data, spec.image_column)
    model = load_trained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    processor = images.load_image_processor(recipe.model if recipe else pretrained.ModelSpec(), str(run_dir))
    limit = max_length or (recipe.data.max_length if recipe else None) or model.generation_config.max_length
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_generation(model, tokenizer, spec, limit, num_beams)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pics = [images.open_image(item, "image" if inputs else "--data", base) for item in chunk]
        with torch.no_grad():
            generated = model.generate(pixel_values=images.pixel_values(processor, pics))
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for item, row, text in zip(chunk, rows[start:start + batch_size], texts):
            result = {"image": images.item_name(images.resolve(item, base)), "caption": text.strip()}
            if text_column in row:
                result["reference"] = row[text_column]
            out.append(result)
    return out


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data and model checks for `finetune validate`: (problems, notes)."""
    spec = recipe.section(CaptioningSpec)
    notes: list[str] = []
    try:
        train, eval_ds = load_data(recipe, spec)
        if not is_combined(recipe, spec):
            pretrained.check_source(spec.decoder, "captioning.decoder")
        tokenizer = load_caption_tokenizer(recipe, spec)
        images.load_image_processor(recipe.model)
    except UserError as e:
        return e.problems, notes
    notes.append(f"data.train: {len(train)} captioned images" + (f"; data.eval: {len(eval_ds)}" if eval_ds else ""))
    caption_tokens = recipe.data.max_length or CAPTION_TOKENS
    lengths = [len(ids) + 1 for ids in tokenizer(list(train["text"]), add_special_tokens=False)["input_ids"]]
    stats = D.length_stats(lengths)
    notes.append("caption tokens: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                 + f" (data.max_length {caption_tokens})")
    too_long = sum(n > caption_tokens for n in lengths)
    if too_long:
        notes.append(f"{too_long} captions ({too_long / len(lengths):.1%}) exceed data.max_length={caption_tokens} "
                     "and will be cut")
    return [], notes
