"""Causal language modelling: predict the next token under causal attention (GPT-style decoders).

    finetune lora --model gpt2 --data train.jsonl -o runs/gpt2-lora      # LoRA fine-tuning
    finetune full --model gpt2 --data train.jsonl -o runs/gpt2-full      # all parameters
    finetune pretrain --data corpus.txt --set model.config=small         # from scratch
    finetune lora qwen2.5-0.5b-instruct-lora-chat                        # chat fine-tuning

Recipe fields used: model.*, data.format, data.*_column, data.chat_template, data.train_on,
data.max_length, data.packing, lora.*, quant.*, train.*.
The data format decides what carries the loss: plain text trains on every token; prompt/completion
data on the completion; conversations (`messages`, ShareGPT `conversations`), rendered with the chat
template, on the assistant's turns only (finetune/chat.py derives the mask).
Pre-training builds a GPT-2 from a size preset or a config file and, when no tokenizer is given,
trains a byte-level BPE tokenizer on the corpus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune import chat
from finetune import data as D
from finetune import models, training
from finetune.adapters import apply_lora, is_adapter_dir, save_adapter
from finetune.errors import UserError
from finetune.recipe import Recipe

CHAT_FILE = "chat.json"  # in a run trained on chat data: `generate` and `chat` apply the template


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, set_seed

    set_seed(recipe.train.seed)
    column = recipe.data.text_column

    # 1. Data: load and check every row; the format (text, prompt/completion, conversations) is detected.
    train_raw, eval_raw, fmt = D.load_causal_splits(recipe.data, recipe.train.seed)
    templated = uses_template(fmt, train_raw, recipe)

    # 2. Tokenizer: the model's, or (pre-training without one) a BPE trained on this corpus; the chat
    #    template for conversations. Pad is eos: labels are masked by position, so no new embedding row.
    if recipe.method == "pretrain" and fmt != "text" and not recipe.model.tokenizer:
        raise UserError(f"model.tokenizer: pre-training on {fmt} data needs a tokenizer (with a chat template); "
                        "set model.tokenizer, or pre-train on a text column")
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        tokenizer = training.corpus_tokenizer(recipe.output_dir, resume, lambda: models.train_bpe_tokenizer(
            train_raw[column], recipe.model.vocab_size))
    else:
        tokenizer = models.load_tokenizer(recipe.model)
    new_tokens = chat.set_template(tokenizer, recipe.data.chat_template) if templated else []
    models.pad_with_eos(tokenizer)

    # 3. Model: from a config (pre-training) or a checkpoint; rows for the template's new tokens.
    if recipe.method == "pretrain":
        config = models.gpt_config(recipe.model, len(tokenizer), recipe.data.max_length, tokenizer)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = models.load_model(recipe.model, AutoModelForCausalLM, recipe.quant if recipe.quant.bits else None)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.data.packing:
        refuse_packing_without_boundaries(model.config)
    max_length = models.max_length(recipe.data.max_length, model.config)
    # A KV cache in training also disables the packed-sequence mask (documents would see each other).
    model.config.use_cache = False

    # 4. Tokenize: text with eos after every document; other formats with labels -100 outside the trained
    #    tokens. Packing fills blocks of max_length with whole examples, masks carried along.
    packing = packs(recipe, model.config)
    train_ds, eval_ds = (tokenize(ds, tokenizer, recipe, fmt, max_length, packing) if ds is not None else None
                         for ds in (train_raw, eval_raw))
    if packing:
        train_ds = D.packed_dataset(train_ds, max_length)
        eval_ds = D.packed_dataset(eval_ds, max_length) if eval_ds is not None else None

    # 5. LoRA: freeze the base, train low-rank adapters (and the embedding rows of new template tokens).
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        new_ids = tokenizer.convert_tokens_to_ids(new_tokens)
        model = apply_lora(model, recipe.lora, "CAUSAL_LM", tokenizer=tokenizer, trainable_tokens=new_ids or None)
        if new_ids:
            print(f"note: the template added {len(new_ids)} tokens ({', '.join(new_tokens)}); their embedding rows "
                  f"train through peft's trainable_token_indices and are saved with the adapter "
                  f"({len(new_ids)} x {model.get_input_embeddings().weight.shape[1]} values)", flush=True)

    # 6. Train, evaluate, save.
    run_dir = training.start_run(recipe)
    args = training.training_arguments(recipe, run_dir)
    checkpoint = training.resume_checkpoint(run_dir) if resume else None
    resume_step = training.checkpoint_step(checkpoint) or 0
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=D.CausalCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=[*training.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    if templated and recipe.method != "lora":  # plain transformers `generate` then stops at the end of a turn
        model.generation_config.eos_token_id = chat.end_of_turn_ids(tokenizer)
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        save_adapter(model, run_dir)  # PiSSA/OLoRA: as a plain LoRA on the original base
        tokenizer.save_pretrained(str(run_dir))
        if recipe.method == "lora" and new_tokens:  # the new rows only (peft would save whole embedding matrices)
            model.save_pretrained(str(run_dir), save_embedding_layers=False)
        if templated:  # generate and chat render prompts with the template and stop at the end of a turn
            (run_dir / CHAT_FILE).write_text(json.dumps({"format": fmt, "end_of_turn": tokenizer.convert_ids_to_tokens(
                chat.end_of_turn_ids(tokenizer))}, indent=1) + "\n")

    metrics = training.run_metrics(trainer, train_output, eval_metrics, model)
    training.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


# Recurrent / linear-attention layers carry state along the whole row and ignore restarting position ids,
# so packed documents would leak into each other.
NO_PACKING = {"mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid",
              "nemotron_h", "qwen3_next", "lfm2", "recurrent_gemma", "rwkv", "minimax", "plamo2"}


def refuse_packing_without_boundaries(config) -> None:
    if getattr(config, "model_type", None) in NO_PACKING:
        raise UserError(f"data.packing: {config.model_type} models have recurrent or linear-attention layers that "
                        "cannot keep packed examples apart; set data.packing: false")


def uses_template(fmt: str, train_raw, recipe: Recipe) -> bool:
    return fmt in ("messages", "conversations") or chat.is_chat(fmt, train_raw[0], recipe.data)


def tokenize(ds, tokenizer, recipe: Recipe, fmt: str, max_length: int, packing: bool):
    if fmt == "text":
        return D.tokenize_documents(ds, tokenizer, recipe.data.text_column, max_length, split_long=packing)
    return D.tokenize_examples(ds, tokenizer, recipe.data, fmt, max_length)


def packs(recipe: Recipe, config=None) -> bool:
    """Packing is the default: the same logits as one example per row (position_ids restart per
    example), and on short texts about twice the useful tokens/s of padding (BENCHMARKS.md). Models
    whose layers cannot keep packed examples apart pad instead, unless data.packing asks (refused)."""
    if recipe.data.packing is not None:
        return recipe.data.packing
    return getattr(config, "model_type", None) not in NO_PACKING


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
    if (run_dir / CHAT_FILE).is_file():
        steps = [f"finetune chat {run_dir}", f'finetune generate {run_dir} "Hello!"']
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
    """Data checks for `finetune validate`: (problems, notes). Chat data: every bad row, then one
    rendered example with its trained tokens marked and the share of tokens that carry the loss."""
    problems, notes = [], []
    d = recipe.data
    try:  # the files as they are (no held-out split), so that row numbers match the file
        train_raw = D.load_source(d.train, "data.train", d.train_split, d.config)
        eval_raw = D.load_source(d.eval, "data.eval", d.eval_split or "validation", d.config) if d.eval else None
    except UserError as e:
        rows = chat.read_rows(None, d.train)  # JSON Lines that datasets cannot load (mixed types): row by row
        if not rows:
            return e.problems, notes
        columns = list(dict.fromkeys(k for r in rows for k in r))
        fmt = chat.detect_format(columns, d)
        return chat.check_rows(rows, fmt, d, "data.train") or e.problems, notes
    try:
        fmt = chat.detect_format(train_raw.column_names, d)
    except UserError as e:
        return e.problems, notes
    column = d.text_column if fmt == "text" else None
    for ds, key, source in ((train_raw, "data.train", d.train), (eval_raw, "data.eval", d.eval)):
        if ds is None:
            continue
        if fmt != "text":
            problems += chat.check_rows(chat.read_rows(ds, source), fmt, d, key)
        else:
            try:
                D.require_columns(ds, {"data.text_column": column}, f"{key} '{source}'")
            except UserError as e:
                problems += e.problems
                continue
            empty = [i + 1 for i in D.empty_rows(ds, column)]
            if empty:
                rows = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
                problems.append(f"{key}: {len(empty)} empty texts (rows {rows} of '{source}'); remove them "
                                "(training skips them)")
        notes.append(f"{key}: {len(ds)} examples ({fmt.replace('_', '/')})" + (
            "" if d.eval or key == "data.eval" else f", {d.eval_fraction:.0%} held out for evaluation"))
    if fmt == "conversations":
        notes.append("data: ShareGPT 'conversations' are mapped to messages (human -> user, gpt -> assistant)")
    if problems:
        return problems, notes

    tokenizer = None
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        notes.append(f"tokenizer: a byte-level BPE of {recipe.model.vocab_size} tokens will be trained on data.train")
    else:
        try:
            tokenizer = models.load_tokenizer(recipe.model)
            if uses_template(fmt, train_raw, recipe):
                added = chat.set_template(tokenizer, d.chat_template)
                if added:
                    notes.append(f"tokenizer: the template adds {', '.join(added)} (new embedding rows, trained "
                                 "and saved with the adapter)")
        except UserError as e:
            problems += e.problems
    if tokenizer is None:
        return problems, notes
    if tokenizer.pad_token_id is None:
        notes.append("tokenizer: no pad token; eos pads (labels are masked by position, so eos is still learned)")
    try:
        if recipe.method == "pretrain":
            config = models.gpt_config(recipe.model, len(tokenizer), d.max_length, tokenizer)
        else:
            config = models.load_config(recipe.model)
        max_length = models.max_length(d.max_length, config)
    except UserError as e:
        return problems + e.problems, notes
    sample = train_raw.select(range(min(len(train_raw), 10_000 if fmt == "text" else 1_000)))
    try:
        tokenized = tokenize(sample, tokenizer, recipe, fmt, 10 ** 9, packs(recipe, config))
    except UserError as e:
        return problems + e.problems, notes
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    stats = D.length_stats(lengths)
    notes.append("tokens per example: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                 + f" (max_length {max_length}, model context {models.context_length(config)})")
    too_long = sum(n > max_length for n in lengths)
    if too_long:
        fate = "split" if fmt == "text" and packs(recipe, config) else "cut"
        notes.append(f"{too_long} examples ({too_long / len(lengths):.1%}) exceed data.max_length={max_length} and "
                     f"will be {fate}" + (" (data.packing: true splits them instead)"
                                          if fmt == "text" and not packs(recipe, config) else ""))
    if packs(recipe, config):
        notes.append(f"packing: whole examples packed into rows of {max_length} tokens (exact: each sees only "
                     "itself); data.packing: false pads each batch instead")
    if fmt != "text":
        trained = sum(t != -100 for labels in tokenized["labels"] for t in labels)
        colour = sys.stdout.isatty()
        notes.append(f"loss on {trained / max(1, sum(lengths)):.1%} of the tokens (data.train_on: {d.train_on}); "
                     "the first example, trained tokens " + ("in green:" if colour else "in [[brackets]]:"))
        shown = chat.show_mask(tokenizer, tokenized[0]["input_ids"], tokenized[0]["labels"], colour).rstrip("\n")
        notes.append("  " + shown.replace("\n", "\n    "))
    return problems, notes
