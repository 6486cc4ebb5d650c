"""Masked language modelling: BERT-style pre-training from scratch, or continued pre-training of an encoder.

    finetune pretrain --task mlm --data corpus.txt --set model.config=mini -o runs/bert-mini   # from scratch
    finetune full --task mlm --model bert-base-uncased --data corpus.txt -o runs/bert-cpt     # continue a checkpoint
    finetune lora --task mlm --model bert-base-uncased --data corpus.txt -o runs/bert-lora    # adapters only
    finetune fill-mask runs/bert-mini "the cat [MASK] sleeping on the floor"

Recipe fields used: model.*, data.text_column, data.max_length, data.packing, mlm.*, lora.*, train.*.
In every batch, mlm.mask_probability (15%) of the tokens are selected afresh; of those, 80% are shown as
[MASK], 10% as a random token and 10% unchanged, and only the selected tokens carry labels. Evaluation
reports the loss, perplexity and masked-token accuracy (`eval_accuracy`: the share of selected tokens
predicted right). Pre-training builds a BERT from a size preset (tiny, mini, small, medium, base) or a
config file and, when no tokenizer is given, trains a WordPiece tokenizer on the corpus. data.packing
concatenates the texts and cuts blocks of data.max_length tokens, as BERT pre-training did.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data import text as D
from finetune.errors import UserError
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.sections import ModelSpec
from finetune.recipe.task_sections import MlmSpec
from finetune.training import session

# BERT sizes for `finetune pretrain --task mlm` (the BERT miniatures of Turc et al., 2019, and BERT-base).
BERT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),  # CPU demos
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),  # 110M
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
STATS_SAMPLE = 10_000  # `finetune validate` measures token lengths on at most this many texts


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForMaskedLM, Trainer, set_seed

    raise_if_unsupported(recipe)
    spec = recipe.section(MlmSpec)
    set_seed(recipe.train.seed)
    column = recipe.data.text_column

    # 1. Data: load, check the text column, drop empty texts.
    train_raw, eval_raw = D.load_text_splits(recipe.data, recipe.train.seed)

    # 2. Tokenizer: the model's (it must have a mask token), or a WordPiece trained on this corpus; on
    #    --resume the one saved with the checkpoint (training it again can number the tokens differently).
    checkpoint = session.resume_checkpoint(recipe.output_dir) if resume else None
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        tokenizer = session.corpus_tokenizer(recipe.output_dir, resume, lambda: train_wordpiece_tokenizer(
            train_raw[column], recipe.model.vocab_size))
    else:
        tokenizer = pretrained.load_tokenizer(recipe.model)
        require_mask_token(tokenizer, recipe.model)

    # 3. Model: a BERT built from a preset or config (pre-training), or a masked-LM checkpoint.
    if recipe.method == "pretrain":
        model = AutoModelForMaskedLM.from_config(bert_config(recipe.model, tokenizer, recipe.data.max_length))
    else:
        model = pretrained.load_model(recipe.model, AutoModelForMaskedLM)
    max_length = pretrained.max_length(recipe.data.max_length, model.config, default_cap=512)

    # 4. Tokenize: [CLS] text [SEP], cut at max_length; packing cuts the concatenated corpus into blocks.
    train_ds = tokenize(train_raw, tokenizer, column, max_length, recipe.data.packing)
    eval_ds = tokenize(eval_raw, tokenizer, column, max_length, recipe.data.packing) if eval_raw else None

    # 5. LoRA: freeze the base, train low-rank adapters (peft has no masked-LM task type: a plain PeftModel).
    if recipe.method == "lora":
        model = apply_lora(model, recipe.lora, None)

    # 6. Train, evaluate, save. The collator selects and masks the tokens anew in every batch.
    run_dir = session.start_run(recipe)
    args = session.training_arguments(recipe, run_dir)
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=masking_collator(tokenizer, spec, recipe.train.seed), processing_class=tokenizer,
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=predicted_tokens,
                      callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))

    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


def raise_if_unsupported(recipe: Recipe) -> None:
    if recipe.quant.bits:
        raise UserError("quant.bits: the mlm task trains encoders unquantized (QLoRA is for large decoders); "
                        "drop quant.bits")


# ---------------------------------------------------------------------------------------
# Tokenizer, model config, data


def train_wordpiece_tokenizer(texts, vocab_size: int):
    """A lower-casing WordPiece tokenizer (BERT uncased style) trained on `texts`.

    Wrapped in `BertTokenizer`, so it saves with that class and keeps `token_type_ids` (the generic
    tokenizer class drops them) when the model is later fine-tuned on text pairs.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece
    from transformers import BertTokenizer

    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BertTokenizer(vocab=tok.get_vocab(), do_lower_case=True)


def require_mask_token(tokenizer, spec: ModelSpec) -> None:
    if tokenizer.mask_token is None:
        raise UserError(f"model.name: the tokenizer of '{spec.tokenizer or spec.name}' has no mask token, so it "
                        "cannot train a masked LM; use an encoder (BERT, RoBERTa, ...) or set model.tokenizer "
                        "to one with a mask token")


def bert_config(spec: ModelSpec, tokenizer, max_length: int | None):
    """A BERT config from a preset name or a config file/directory, sized to the tokenizer."""
    from transformers import BertConfig

    config = pretrained.preset_config(spec, BERT_PRESETS, BertConfig, "presets for the mlm task")
    config.vocab_size = len(tokenizer)
    if max_length and getattr(config, "max_position_embeddings", max_length) < max_length:
        config.max_position_embeddings = max_length
    config.pad_token_id = tokenizer.pad_token_id
    return config


def tokenize(ds, tokenizer, column: str, max_length: int, packing: bool):
    """input_ids per text ([CLS] ... [SEP], at most max_length), or with `packing` blocks of
    max_length cut from the concatenated texts (each text keeps its own [CLS] and [SEP])."""

    def encode(batch):
        ids = tokenizer(batch[column], truncation=not packing, max_length=max_length)["input_ids"]
        if not packing:
            return {"input_ids": ids}
        flat = [t for doc in ids for t in doc]
        return {"input_ids": [flat[i:i + max_length] for i in range(0, len(flat), max_length)]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def masking_collator(tokenizer, spec: MlmSpec, seed: int = 0):
    """Pads a batch and picks the tokens to predict: `mask_probability` of the non-special tokens,
    shown as [MASK] (mask_replace), a random token (random_replace) or unchanged; labels are -100
    everywhere else. transformers' collator does exactly BERT's recipe.

    Each batch is masked with a generator seeded from `seed` and the batch's own token ids, not from
    a running random state: the Trainer draws the first batch after --resume before it restores its
    random state, so a stateful collator would mask a resumed run differently from an uninterrupted
    one. It also makes every evaluation use the same masks, so eval metrics are comparable over a run.
    """
    import hashlib

    import torch
    from transformers import DataCollatorForLanguageModeling

    class BatchSeededMasking(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            digest = hashlib.blake2b(str(seed).encode(), digest_size=8)
            for example in examples:
                digest.update(torch.as_tensor(example["input_ids"], dtype=torch.int64).numpy().tobytes())
            self.generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
            return super().torch_call(examples)

    return BatchSeededMasking(tokenizer, mlm=True, mlm_probability=spec.mask_probability,
                              mask_replace_prob=spec.mask_replace, random_replace_prob=spec.random_replace)


# ---------------------------------------------------------------------------------------
# Metrics


def predicted_tokens(logits, labels):
    """Keep only the argmax per position: the full logits (positions x vocabulary) of a whole eval
    set would not fit in memory."""
    return logits.argmax(dim=-1)


def compute_metrics(eval_pred) -> dict[str, float]:
    from finetune.tasks.metrics import masked_token_accuracy

    return {"accuracy": masked_token_accuracy(eval_pred.predictions, eval_pred.label_ids)}


# ---------------------------------------------------------------------------------------
# Using a run


def usage(run_dir: Path, recipe: Recipe) -> str:
    load = (f'base = AutoModelForMaskedLM.from_pretrained("{recipe.model.name}")\n'
            f'model = PeftModel.from_pretrained(base, "{run_dir}")\n') if recipe.method == "lora" else \
        f'model = AutoModelForMaskedLM.from_pretrained("{run_dir}")\n'
    peft_import = "from peft import PeftModel\n" if recipe.method == "lora" else ""
    return (f"```python\n{peft_import}from transformers import AutoModelForMaskedLM, AutoTokenizer\n\n{load}"
            f'tokenizer = AutoTokenizer.from_pretrained("{run_dir}")\n```\n\n'
            f'Or: `finetune fill-mask {run_dir} "the cat [MASK] sleeping on the floor"`.')


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune fill-mask {run_dir} "the cat [MASK] sleeping on the floor"']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    else:
        steps.append(f"finetune lora --task classification --model {run_dir} --data <labelled data> -o <new run>"
                     "   # fine-tune it")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained masked LM of a run or a plain model directory (a PeftModel for LoRA runs)."""
    from transformers import AutoModelForMaskedLM

    if is_adapter_dir(run_dir):
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(str(run_dir)).base_model_name_or_path
        return PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(base, **kwargs), str(run_dir))
    return AutoModelForMaskedLM.from_pretrained(str(run_dir), **kwargs)


def fill_mask(source: str, text: str, top_k: int | None = None) -> list[list[tuple[str, float]]]:
    """For each mask token in `text`, the `top_k` most likely tokens with their probabilities.

    `source` is a run directory, a masked-LM model directory or a Hub id. `[MASK]` in the text is
    read as the model's own mask token (e.g. `<mask>` for RoBERTa).
    """
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from finetune.use.inference import check_model_dir, run_recipe

    path = Path(source).expanduser()
    recipe, local = None, path.exists() or pretrained.looks_like_path(source)
    if local:
        check_model_dir(path, "run")
        recipe = run_recipe(path)
        if recipe is not None and recipe.task != "mlm":
            raise UserError(f"run: '{source}' was trained for the {recipe.task} task; fill-mask needs an mlm run "
                            "or a masked-LM model")
        tok_source = str(path)
    else:
        tok_source = pretrained.check_source(source, "model")
    top_k = top_k or (recipe.section(MlmSpec) if recipe else MlmSpec()).top_k
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    mask = tokenizer.mask_token
    if mask is None:
        raise UserError(f"model: the tokenizer of '{source}' has no mask token; fill-mask needs a masked LM")
    text = text.replace("[MASK]", mask) if mask != "[MASK]" else text
    enc = tokenizer(text, return_tensors="pt", truncation=True)
    positions = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten()
    if len(positions) == 0:
        raise UserError(f"text: no {mask} in '{text}'; put {mask} where a token should be predicted")
    model = load_trained(path) if local else AutoModelForMaskedLM.from_pretrained(tok_source)
    model.eval()
    with torch.no_grad():
        probs = model(**enc).logits[0, positions].softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[(tokenizer.decode([int(i)]).strip(), float(p)) for p, i in zip(ps, ids)]
            for ps, ids in zip(top.values, top.indices)]


# ---------------------------------------------------------------------------------------
# finetune validate


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes)."""
    problems, notes = [], []
    d = recipe.data
    column = d.text_column
    try:
        raise_if_unsupported(recipe)
        # the files as they are (nothing held out), so that row numbers match the files
        as_files = d.model_copy(update={"eval_fraction": 0.0, "max_samples": None, "max_eval_samples": None})
        train_file, eval_file = D.load_splits(as_files, recipe.train.seed)
        for ds, key, source in ((train_file, "data.train", d.train), (eval_file, "data.eval", d.eval or d.train)):
            if ds is not None:
                D.require_columns(ds, {"data.text_column": column}, f"{key} '{source}'")
        train_raw, _ = D.load_splits(d, recipe.train.seed)  # what training sees
    except UserError as e:
        return e.problems, notes
    for ds, key, source in ((train_file, "data.train", d.train), (eval_file, "data.eval", d.eval or d.train)):
        if ds is None:
            continue
        empty = D.empty_rows(ds, column)
        if empty:
            problems.append(f"{key}: {len(empty)} empty texts (rows {', '.join(str(i + 1) for i in empty[:5])}"
                            f"{', ...' if len(empty) > 5 else ''} of '{source}'); remove them (training skips them)")
        held_out = key == "data.train" and eval_file is None and d.eval_fraction > 0
        notes.append(f"{key}: {len(ds)} texts" + (f", {d.eval_fraction:.0%} held out for evaluation" if held_out else ""))
    # token statistics from a sample: pre-training corpora can be large
    train_raw = D.drop_empty(train_raw, column)
    texts = list(train_raw.select(range(min(len(train_raw), STATS_SAMPLE)))[column])
    sampled = f" (first {len(texts):,} texts)" if len(texts) < len(train_raw) else ""

    try:
        if recipe.method == "pretrain" and not recipe.model.tokenizer:
            notes.append(f"tokenizer: a WordPiece of {recipe.model.vocab_size} tokens will be trained on data.train")
            tokenizer = train_wordpiece_tokenizer(texts, recipe.model.vocab_size)
        else:
            tokenizer = pretrained.load_tokenizer(recipe.model)
            require_mask_token(tokenizer, recipe.model)
        config = bert_config(recipe.model, tokenizer, recipe.data.max_length) if recipe.method == "pretrain" \
            else pretrained.load_config(recipe.model)
        max_length = pretrained.max_length(recipe.data.max_length, config, default_cap=512)
    except UserError as e:
        return problems + e.problems, notes
    spec = recipe.section(MlmSpec)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    stats = D.length_stats(lengths)
    notes.append(f"tokens per text{sampled}: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                 + f" (max_length {max_length}); about {spec.mask_probability:.0%} of them are masked per batch")
    too_long = sum(n > max_length for n in lengths)
    if too_long and not recipe.data.packing:
        notes.append(f"{too_long} texts ({too_long / len(lengths):.1%}) exceed data.max_length={max_length} "
                     "and will be cut (data.packing: true cuts the concatenated texts into blocks instead)")
    return problems, notes
