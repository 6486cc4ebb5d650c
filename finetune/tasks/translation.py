"""Translation: an encoder-decoder (T5 family, or any AutoModelForSeq2SeqLM) maps a source text
to a target text, evaluated by generating translations and scoring them with BLEU and chrF.

    finetune lora --task translation --model google-t5/t5-small --data wmt16 --set data.train_split=train \\
        --set translation.source_lang=en --set translation.target_lang=de -o runs/t5-ende   # LoRA
    finetune full --task translation --model google-t5/t5-small --data pairs.jsonl -o runs/t5-full
    finetune translate runs/t5-ende "The house is small."                               # one text
    finetune translate runs/t5-ende --data test.jsonl -o translations.jsonl             # a file

Data: rows with a source and a target column (`translation.source_column`/`.target_column`,
default `source`/`target`), or a `translation` column of {language code: text} dicts as in wmt16 and
opus_books (`translation.source_lang`/`.target_lang` pick the pair). Every source gets a prefix,
"translate English to German: " by default for an en-de pair (what T5 was pre-trained with);
set `translation.prefix: ""` for models trained without one (Marian, mBART).
Recipe fields used: model.*, data.* (data.max_length: source tokens, default 128), translation.*,
lora.*, quant.*, train.*.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data import text as D
from finetune.data.sources import load_source
from finetune.errors import UserError
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import TranslationSpec
from finetune.tasks.metrics import generation_metrics
from finetune.training import session

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "cs": "Czech", "fi": "Finnish", "tr": "Turkish",
             "zh": "Chinese", "ja": "Japanese", "hi": "Hindi", "et": "Estonian", "lv": "Latvian"}
SOURCE_TOKENS = 128  # data.max_length when unset


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers import set_seed

    set_seed(recipe.train.seed)
    spec = recipe.section(TranslationSpec)

    # 1. Data: (source, target) pairs from plain columns or a `translation` column; empty pairs skipped.
    train_raw, eval_raw = D.load_splits(recipe.data, recipe.train.seed)
    train_raw = text_pairs(train_raw, spec, "data.train", recipe.data.train, warn=True)
    eval_raw = text_pairs(eval_raw, spec, "data.eval", recipe.data.eval or recipe.data.train) if eval_raw else None

    # 2. Tokenizer and model.
    tokenizer = pretrained.load_tokenizer(recipe.model)
    model = pretrained.load_model(recipe.model, AutoModelForSeq2SeqLM, recipe.quant if recipe.quant.bits else None)
    source_tokens = pretrained.max_length(recipe.data.max_length, model.config, default_cap=SOURCE_TOKENS)
    set_generation(model, tokenizer, spec)

    # 3. Tokenize: prefix + source -> input_ids; target -> labels ending in eos (so generation stops).
    prefix = source_prefix(spec)
    train_ds = tokenize(train_raw, tokenizer, prefix, source_tokens, spec.max_target_length)
    eval_ds = tokenize(eval_raw, tokenizer, prefix, source_tokens, spec.max_target_length) if eval_raw else None
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    # 4. LoRA: freeze the base, train low-rank adapters (peft's default targets for T5: q and v).
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.models.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        model = apply_lora(model, recipe.lora, "SEQ_2_SEQ_LM")

    # 5. Train; evaluation generates translations and scores them.
    run_dir = session.start_run(recipe)
    args = session.training_arguments(recipe, run_dir, args_cls=Seq2SeqTrainingArguments, predict_with_generate=True,
                                       generation_max_length=spec.max_target_length,
                                       generation_num_beams=spec.num_beams)
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=collator, processing_class=tokenizer,
                             compute_metrics=score_generations(tokenizer),
                             callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))

    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


# ---------------------------------------------------------------------------------------
# Data


def source_prefix(spec: TranslationSpec) -> str:
    if spec.prefix is not None:
        return spec.prefix
    if spec.source_lang and spec.target_lang:
        name = lambda code: LANGUAGES.get(code, code)  # noqa: E731
        return f"translate {name(spec.source_lang)} to {name(spec.target_lang)}: "
    return ""


def text_pairs(ds, spec: TranslationSpec, key: str, source: str, warn: bool = False):
    """A dataset of `source` and `target` strings, empty pairs dropped."""
    import datasets

    if spec.source_lang and spec.target_lang and "translation" in ds.column_names:
        pairs = list(ds["translation"])
        found = sorted(set().union(*(p.keys() for p in pairs if isinstance(p, dict))))
        for field, lang in (("source_lang", spec.source_lang), ("target_lang", spec.target_lang)):
            if lang not in found:
                raise UserError(f"translation.{field}: no '{lang}' texts in the `translation` column of {key} "
                                f"'{source}'; its languages are: {', '.join(found)}")
        sources = [p.get(spec.source_lang) for p in pairs]
        targets = [p.get(spec.target_lang) for p in pairs]
    else:
        if "translation" in ds.column_names and spec.source_column not in ds.column_names:
            raise UserError(f"{key}: '{source}' holds a `translation` column of language pairs; set "
                            "translation.source_lang and translation.target_lang (e.g. en and de) to pick one")
        D.require_columns(ds, {"translation.source_column": spec.source_column,
                               "translation.target_column": spec.target_column}, f"{key} '{source}'")
        sources, targets = list(ds[spec.source_column]), list(ds[spec.target_column])
    keep = [i for i, (s, t) in enumerate(zip(sources, targets)) if s and t and str(s).strip() and str(t).strip()]
    if len(keep) < len(sources) and warn:
        kept = set(keep)
        empty = [i for i in range(len(sources)) if i not in kept]
        print(f"warning: skipping {len(empty)} pairs with an empty source or target in {key} (rows {empty[:5]}...)",
              flush=True)
    if not keep:
        raise UserError(f"{key}: every pair in '{source}' has an empty source or target")
    return datasets.Dataset.from_dict({"source": [str(sources[i]) for i in keep],
                                       "target": [str(targets[i]) for i in keep]})


def tokenize(ds, tokenizer, prefix: str, source_tokens: int, target_tokens: int):
    eos = tokenizer.eos_token_id

    def encode(batch):
        enc = tokenizer([prefix + s for s in batch["source"]], max_length=source_tokens, truncation=True)
        labels = tokenizer(text_target=batch["target"], max_length=target_tokens, truncation=True)["input_ids"]
        # T5's tokenizer appends eos; others may not, and without it the model never learns to stop.
        enc["labels"] = [ids if eos is None or (ids and ids[-1] == eos) else ids[:target_tokens - 1] + [eos]
                         for ids in labels]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def set_generation(model, tokenizer, spec: TranslationSpec, num_beams: int | None = None,
                   max_length: int | None = None) -> None:
    """Beam size and length limit for evaluation and `finetune translate` (saved with the model)."""
    config = model.generation_config
    config.num_beams = num_beams or spec.num_beams
    config.max_length = max_length or spec.max_target_length
    config.max_new_tokens = None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id


def score_generations(tokenizer):
    """compute_metrics for the Seq2SeqTrainer: decode generated ids and references, BLEU and chrF."""
    import numpy as np

    def compute(eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds = preds[0] if isinstance(preds, tuple) else preds
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)  # batches are padded with -100
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        hyps = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return generation_metrics(hyps, refs)

    return compute


# ---------------------------------------------------------------------------------------
# Using a run


def usage(run_dir: Path, recipe: Recipe) -> str:
    prefix = source_prefix(recipe.section(TranslationSpec))
    cls = "AutoPeftModelForSeq2SeqLM" if recipe.method == "lora" else "AutoModelForSeq2SeqLM"
    module = "peft" if recipe.method == "lora" else "transformers"
    return ("```python\n"
            f"from {module} import {cls}\nfrom transformers import AutoTokenizer\n\n"
            f'model = {cls}.from_pretrained("{run_dir}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{run_dir}")\n'
            f'inputs = tokenizer("{prefix}" + "The house is small.", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True))\n```\n\n"
            f'Or: `finetune translate {run_dir} "The house is small."` '
            f"(a file: `--data test.jsonl -o translations.jsonl`).")


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune translate {run_dir} "The house is small."']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained model of a run or a plain model directory (a PeftModel for LoRA runs), with the
    run's beam size and length limit."""
    if is_adapter_dir(run_dir):
        from peft import AutoPeftModelForSeq2SeqLM as cls
    else:
        from transformers import AutoModelForSeq2SeqLM as cls
    model = cls.from_pretrained(str(run_dir), **kwargs)
    from finetune.use.inference import run_recipe

    recipe = run_recipe(Path(run_dir))
    if recipe is not None:
        from transformers import AutoTokenizer

        set_generation(model, AutoTokenizer.from_pretrained(str(run_dir)), recipe.section(TranslationSpec))
    return model


def translate(run_dir: Path, texts: list[str] | None, data: str | None, num_beams: int | None = None,
              max_length: int | None = None, prefix: str | None = None, batch_size: int = 16) -> list[dict]:
    """Translate `texts`, or the sources of a data file (.jsonl/.csv/.parquet with the run's source
    column or `translation` pairs, or .txt with one text per line). One dict per text: source,
    translation, and the reference when the file has targets."""
    import torch
    from transformers import AutoTokenizer

    from finetune.use.inference import check_model_dir, run_recipe

    run_dir = Path(run_dir)
    check_model_dir(run_dir, "run")
    recipe = run_recipe(run_dir)
    if recipe is not None and recipe.task != "translation":
        raise UserError(f"run: '{run_dir}' is a {recipe.task} run; `finetune translate` needs a translation run")
    spec = recipe.section(TranslationSpec) if recipe else TranslationSpec()
    if bool(texts) == bool(data):
        raise UserError("give texts to translate or --data FILE (one of the two)")
    references = None
    if data:
        ds = load_source(data, "--data")
        plain = "text" in ds.column_names and not {spec.source_column, "translation"} & set(ds.column_names)
        if plain:  # a .txt file: one text per line
            texts = [t for t in ds["text"] if t and t.strip()]
        else:
            with_targets = spec.target_column in ds.column_names or "translation" in ds.column_names
            if not with_targets:
                ds = ds.add_column(spec.target_column, ["-"] * len(ds))
            pairs = text_pairs(ds, spec, "--data", data)
            texts = list(pairs["source"])
            references = list(pairs["target"]) if with_targets else None
    model = load_trained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    set_generation(model, tokenizer, spec, num_beams, max_length)
    prefix = source_prefix(spec) if prefix is None else prefix
    source_tokens = (recipe.data.max_length if recipe else None) or SOURCE_TOKENS
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = tokenizer([prefix + t for t in chunk], max_length=source_tokens, truncation=True, padding=True,
                        return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**enc)
        decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for i, (text, translation) in enumerate(zip(chunk, decoded)):
            row = {"source": text, "translation": translation.strip()}
            if references is not None:
                row["reference"] = references[start + i]
            out.append(row)
    return out


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes)."""
    spec = recipe.section(TranslationSpec)
    notes: list[str] = []
    try:
        train_raw, eval_raw = D.load_splits(recipe.data, recipe.train.seed)
        train = text_pairs(train_raw, spec, "data.train", recipe.data.train)
        if eval_raw is not None:
            eval_ds = text_pairs(eval_raw, spec, "data.eval", recipe.data.eval or recipe.data.train)
            notes.append(f"data.eval: {len(eval_ds)} pairs")
        tokenizer = pretrained.load_tokenizer(recipe.model)
        config = pretrained.load_config(recipe.model)
        source_tokens = pretrained.max_length(recipe.data.max_length, config, default_cap=SOURCE_TOKENS)
    except UserError as e:
        return e.problems, notes
    prefix = source_prefix(spec)
    notes.insert(0, f"data.train: {len(train)} pairs; source prefix {prefix!r}")
    src = [len(ids) for ids in tokenizer([prefix + s for s in train["source"]])["input_ids"]]
    tgt = [len(ids) for ids in tokenizer(text_target=list(train["target"]))["input_ids"]]
    for name, lengths, limit, key in (("source", src, source_tokens, "data.max_length"),
                                      ("target", tgt, spec.max_target_length, "translation.max_target_length")):
        stats = D.length_stats(lengths)
        notes.append(f"{name} tokens: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                     + f" ({key} {limit})")
        too_long = sum(n > limit for n in lengths)
        if too_long:
            notes.append(f"{too_long} {name}s ({too_long / len(lengths):.1%}) exceed {key}={limit} and will be cut")
    return [], notes
