"""Causal language modelling: predict the next token under causal attention (GPT-style decoders).

    finetune lora --model gpt2 --data train.jsonl -o runs/gpt2-lora      # LoRA fine-tuning
    finetune full --model gpt2 --data train.jsonl -o runs/gpt2-full      # all parameters
    finetune pretrain --data corpus.txt --set model.config=small         # from scratch

Recipe fields used: model.*, data.text_column, data.max_length, data.packing, lora.*, quant.*, train.*.
Pre-training builds a GPT-2 from a size preset or a config file and, when no tokenizer is given,
trains a byte-level BPE tokenizer on the corpus.
"""

from __future__ import annotations

from pathlib import Path

from finetune import data as D
from finetune import models, training
from finetune.adapters import apply_lora, is_adapter_dir
from finetune.errors import UserError
from finetune.recipe import Recipe


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, set_seed

    set_seed(recipe.train.seed)
    column = recipe.data.text_column

    # 1. Data: load, check the text column, drop empty texts.
    train_raw, eval_raw = D.load_text_splits(recipe.data, recipe.train.seed)

    # 2. Tokenizer: the model's, or (pre-training without one) a BPE trained on this corpus.
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        tokenizer = training.corpus_tokenizer(recipe.output_dir, resume, lambda: models.train_bpe_tokenizer(
            train_raw[column], recipe.model.vocab_size))
    else:
        tokenizer = models.load_tokenizer(recipe.model)
    models.ensure_pad_token(tokenizer)

    # 3. Model: from a config (pre-training) or a checkpoint, with a pad token distinct from eos.
    if recipe.method == "pretrain":
        config = models.gpt_config(recipe.model, len(tokenizer), recipe.data.max_length, tokenizer)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = models.load_model(recipe.model, AutoModelForCausalLM, recipe.quant if recipe.quant.bits else None)
        models.ensure_pad_token(tokenizer, model)
    max_length = models.max_length(recipe.data.max_length, model.config)
    # A KV cache in training also disables the packed-sequence mask (documents would see each other).
    model.config.use_cache = False

    # 4. Tokenize: eos after every document; packing fills blocks of max_length with whole documents.
    packing = packs(recipe)
    train_ds = D.tokenize_documents(train_raw, tokenizer, column, max_length, split_long=packing)
    eval_ds = D.tokenize_documents(eval_raw, tokenizer, column, max_length, split_long=packing) if eval_raw else None
    if packing:
        train_ds = D.packed_dataset(train_ds, max_length)
        eval_ds = D.packed_dataset(eval_ds, max_length) if eval_ds is not None else None

    # 5. LoRA: freeze the base, train low-rank adapters.
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        model = apply_lora(model, recipe.lora, "CAUSAL_LM")

    # 6. Train, evaluate, save.
    run_dir = training.start_run(recipe)
    args = training.training_arguments(recipe, run_dir)
    checkpoint = training.resume_checkpoint(run_dir) if resume else None
    resume_step = int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=D.CausalCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=[training.log_callback(run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))

    metrics = training.run_metrics(trainer, train_output, eval_metrics, model)
    training.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


def packs(recipe: Recipe) -> bool:
    """Packing is the default: the same logits as one text per row (position_ids restart per
    text), and on short texts about twice the useful tokens/s of padding (BENCHMARKS.md)."""
    return recipe.data.packing is not False


def usage(run_dir: Path, recipe: Recipe) -> str:
    if recipe.method == "lora":
        return ("```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{run_dir}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{run_dir}")\n```\n\n'
                f'Or: `finetune generate {run_dir} "Once upon a time"`; merge with `finetune merge {run_dir} -o merged/`.')
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{run_dir}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{run_dir}")\n```\n\n'
            f'Or: `finetune generate {run_dir} "Once upon a time"`.')


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune generate {run_dir} "Once upon a time"']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    else:
        steps.append(f"finetune lora --model {run_dir} --data <task data> -o <new run>   # fine-tune it")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained model of a run or a plain model directory (a PeftModel for LoRA runs)."""
    if is_adapter_dir(run_dir):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(run_dir), **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(run_dir), **kwargs)


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes)."""
    problems, notes = [], []
    column = recipe.data.text_column
    d = recipe.data
    try:  # the files as they are (no held-out split), so that row numbers match the file
        train_raw = D.load_source(d.train, "data.train", d.train_split, d.config)
        eval_raw = D.load_source(d.eval, "data.eval", d.eval_split or "validation", d.config) if d.eval else None
    except UserError as e:
        return e.problems, notes
    for ds, key, source in ((train_raw, "data.train", d.train), (eval_raw, "data.eval", d.eval)):
        if ds is None:
            continue
        try:
            D.require_columns(ds, {"data.text_column": column}, f"{key} '{source}'")
        except UserError as e:
            problems += e.problems
            continue
        empty = [i + 1 for i in D.empty_rows(ds, column)]
        if empty:
            problems.append(f"{key}: {len(empty)} empty texts (rows {', '.join(map(str, empty[:5]))}"
                            f"{', ...' if len(empty) > 5 else ''} of '{source}'); remove them (training skips them)")
        notes.append(f"{key}: {len(ds)} examples" + ("" if d.eval or key == "data.eval" else
                                                     f", {d.eval_fraction:.0%} held out for evaluation"))
    if problems:
        return problems, notes

    tokenizer = None
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        notes.append(f"tokenizer: a byte-level BPE of {recipe.model.vocab_size} tokens will be trained on data.train")
    else:
        try:
            tokenizer = models.load_tokenizer(recipe.model)
        except UserError as e:
            problems += e.problems
    if tokenizer is not None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            notes.append("tokenizer: no pad token distinct from eos; finetune adds '<|pad|>' (one new embedding "
                         "row), so that eos stays in the labels and the model learns to stop")
        try:
            if recipe.method == "pretrain":
                config = models.gpt_config(recipe.model, len(tokenizer), recipe.data.max_length, tokenizer)
            else:
                config = models.load_config(recipe.model)
            max_length = models.max_length(recipe.data.max_length, config)
        except UserError as e:
            return problems + e.problems, notes
        lengths = [len(ids) + 1 for ids in tokenizer(list(train_raw[column]), add_special_tokens=False)["input_ids"]]
        stats = D.length_stats(lengths)
        notes.append("tokens per text: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                     + f" (max_length {max_length}, model context {models.context_length(config)})")
        too_long = sum(n > max_length for n in lengths)
        if too_long and not packs(recipe):
            notes.append(f"{too_long} texts ({too_long / len(lengths):.1%}) exceed data.max_length={max_length} "
                         "and will be cut (data.packing: true splits them instead)")
        if packs(recipe):
            notes.append(f"packing: whole texts packed into rows of {max_length} tokens (exact: each text sees only "
                         "itself; texts longer than that are split); data.packing: false pads each batch instead")
    return problems, notes
