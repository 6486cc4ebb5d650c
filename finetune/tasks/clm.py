"""Causal language modelling: predict the next token under causal attention (GPT-style decoders).

    finetune lora --model gpt2 --data train.jsonl -o runs/gpt2-lora      # LoRA fine-tuning
    finetune full --model gpt2 --data train.jsonl -o runs/gpt2-full      # all parameters
    finetune pretrain --data corpus.txt --set model.config=small         # from scratch
    finetune lora qwen2.5-0.5b-instruct-lora-chat                        # chat fine-tuning

Recipe fields used: model.*, data.format, data.*_column, data.chat_template, data.train_on,
data.max_length, data.packing, lora.*, quant.*, train.*.
The data format decides what carries the loss: plain text trains on every token; prompt/completion
data on the completion; conversations (`messages`, ShareGPT `conversations`), rendered with the chat
template, on the assistant's turns only (finetune/data/chat.py derives the mask).
Pre-training builds a GPT-2 from a size preset or a config file and, when no tokenizer is given,
trains a byte-level BPE tokenizer on the corpus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune.data import chat
from finetune.data import corpus
from finetune.data import masks
from finetune.data import text as D
from finetune.data.packing import CausalCollator, fitted_block, needs_boundaries, packed_dataset
from finetune.data.sources import load_source
from finetune.errors import UserError
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir, save_adapter
from finetune.recipe.schema import Recipe
from finetune.training import session
from finetune.training.fit import fit_to_memory

CHAT_FILE = "chat.json"  # in a run trained on chat data: `generate` and `chat` apply the template


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, set_seed

    set_seed(recipe.train.seed)
    d = recipe.data

    # 1-2. Tokenizer and data (prepare_data below): sources read and checked, tokenized, mixed, packed.
    tokenizer, _, data = prepare_data(recipe, resume)
    pretrained.pad_with_eos(tokenizer)  # labels are masked by position, so eos pads without a new embedding row

    # Batch and steps, now that the rows are known: the largest micro-batch this machine's memory holds
    # (grad_accum keeps the effective batch), and small data trained for enough optimizer steps.
    recipe = fit_to_memory(recipe, seq=data.block)
    if not d.streaming:
        recipe, lines = session.plan_steps(recipe, len(data.train), data.block)
        for line in lines:
            print(line, flush=True)

    # 3. Model: from a config (pre-training) or a checkpoint; rows for the template's new tokens.
    if recipe.method == "pretrain":
        model = AutoModelForCausalLM.from_config(pretrain_config(recipe, tokenizer))
    else:
        model = pretrained.load_model(recipe.model, AutoModelForCausalLM, recipe.quant if recipe.quant.bits else None)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    # A KV cache in training also disables the packed-sequence mask (documents would see each other).
    model.config.use_cache = False
    train_ds, eval_ds, templated, new_tokens = data.train, data.eval, data.templated, data.new_tokens

    # 4. LoRA: freeze the base, train low-rank adapters (and the embedding rows of new template tokens).
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.models.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        new_ids = tokenizer.convert_tokens_to_ids(new_tokens)
        model = apply_lora(model, recipe.lora, "CAUSAL_LM", tokenizer=tokenizer, trainable_tokens=new_ids or None)
        if new_ids:
            print(f"note: the template added {len(new_ids)} tokens ({', '.join(new_tokens)}); their embedding rows "
                  f"train through peft's trainable_token_indices and are saved with the adapter "
                  f"({len(new_ids)} x {model.get_input_embeddings().weight.shape[1]} values)", flush=True)

    # 5. Train, evaluate, save.
    run_dir = session.start_run(recipe)
    args = session.training_arguments(recipe, run_dir)
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    exact = packs(recipe, model.config) and needs_boundaries(model)  # flash attention: packed rows carry boundaries
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=CausalCollator(tokenizer.pad_token_id, with_boundaries=exact),
                      processing_class=tokenizer,
                      callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    if d.streaming:
        corpus.own_dataloader(trainer, checkpoint)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    if templated and recipe.method != "lora":  # plain transformers `generate` then stops at the end of a turn
        model.generation_config.eos_token_id = masks.end_of_turn_ids(tokenizer, d.chat_template_kwargs)
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        save_adapter(model, run_dir)  # PiSSA/OLoRA: as a plain LoRA on the original base
        tokenizer.save_pretrained(str(run_dir))
        if recipe.method == "lora" and new_tokens:  # the new rows only (peft would save whole embedding matrices)
            model.save_pretrained(str(run_dir), save_embedding_layers=False)
        if templated:  # generate and chat render prompts with the template and stop at the end of a turn
            (run_dir / CHAT_FILE).write_text(json.dumps({"format": data.fmt, "end_of_turn": tokenizer.convert_ids_to_tokens(
                masks.end_of_turn_ids(tokenizer, d.chat_template_kwargs))}
                | ({"chat_template_kwargs": d.chat_template_kwargs} if d.chat_template_kwargs else {}), indent=1) + "\n")

    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


# Recurrent / linear-attention layers carry state along the whole row and ignore restarting position ids,
# so packed documents would leak into each other.
NO_PACKING = {"mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid",
              "nemotron_h", "qwen3_next", "lfm2", "recurrent_gemma", "rwkv", "minimax", "plamo2"}


def refuse_packing_without_boundaries(config) -> None:
    if getattr(config, "model_type", None) in NO_PACKING:
        raise UserError(f"data.packing: {config.model_type} models have recurrent or linear-attention layers that "
                        "cannot keep packed examples apart; set data.packing: false")


def prepare_data(recipe: Recipe, resume: bool = False):
    """(tokenizer, model config, prepared data): what `run` trains on, and all `finetune prepare` does."""
    d = recipe.data
    # 1. Tokenizer: the model's, or (pre-training without one) a BPE trained on this corpus.
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        tokenizer = session.corpus_tokenizer(recipe.output_dir, resume, lambda: pretrained.train_bpe_tokenizer(
            corpus_texts(recipe), recipe.model.vocab_size))
    else:
        tokenizer = pretrained.load_tokenizer(recipe.model)

    # 2. Data: every source read and checked in its format (text, prompt/completion, conversations), the
    #    chat template set for conversations, tokenized (text with eos after every document, other formats
    #    with labels -100 outside the trained tokens), mixed, and packed into blocks of max_length tokens.
    #    Cached for the next run on the same data, or streamed (finetune/data/corpus.py).
    config = (pretrain_config(recipe, tokenizer) if recipe.method == "pretrain"
              else pretrained.load_config(recipe.model))
    if d.packing:
        refuse_packing_without_boundaries(config)
    max_length = pretrained.max_length(d.max_length, config)
    return tokenizer, config, corpus.prepare(recipe, tokenizer, max_length, packs(recipe, config))


def pretrain_config(recipe: Recipe, tokenizer):
    """The GPT-2 config pre-training builds: a size preset or a config file, sized to the tokenizer."""
    return pretrained.gpt_config(recipe.model, len(tokenizer), recipe.data.max_length, tokenizer)


def corpus_texts(recipe: Recipe):
    """The texts a tokenizer is trained on when pre-training without one: the text sources of data.train."""
    from finetune.data.sources import listed

    texts = []
    for source in listed(recipe.data, "train"):
        rows, _, fmt = D.load_causal_splits(source.spec, recipe.train.seed, source.key)
        if fmt != "text":
            raise UserError(f"model.tokenizer: pre-training on {fmt} data ({source.key}) needs a tokenizer (with a "
                            "chat template); set model.tokenizer, or pre-train on a text column")
        texts += rows[source.spec.text_column]
    return texts


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


def check(recipe: Recipe) -> tuple:
    """Data checks for `finetune validate`: (problems, notes[, tokens per row]). Every source of a mixture with
    its rows, tokens and share; the row length and the optimizer steps; chat data: every bad row, then one
    rendered example with its trained tokens marked and the share of tokens that carry the loss."""
    from finetune.data.sources import listed

    problems, notes = [], []
    d = recipe.data
    train_sources = listed(d, "train")
    whole = train_sources[0].spec is d
    checked = []  # (source, rows, format)
    for source in train_sources + ([] if whole else listed(d, "eval")):
        found, said, rows, fmt = check_source(source, whole)
        problems += found
        notes += said
        if rows is not None:
            checked.append((source, rows, fmt))
    if d.streaming:
        notes.append(f"data.streaming: rows are read as training asks for them; training checks the first "
                     f"{corpus.CHECK_ROWS} rows of each source before it starts")
    if problems or not checked:
        return problems, notes

    tokenizer = None
    if recipe.method == "pretrain" and not recipe.model.tokenizer:
        notes.append(f"tokenizer: a byte-level BPE of {recipe.model.vocab_size} tokens will be trained on data.train")
    else:
        try:
            tokenizer = pretrained.load_tokenizer(recipe.model)
            _, _, added = corpus.template_rules(tokenizer, d, [(rows[0], fmt, s.spec) for s, rows, fmt in checked])
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
        config = (pretrain_config(recipe, tokenizer) if recipe.method == "pretrain"
              else pretrained.load_config(recipe.model))
        max_length = pretrained.max_length(d.max_length, config)
    except UserError as e:
        return problems + e.problems, notes
    packing = packs(recipe, config)
    samples = []
    for source, rows, fmt in checked:
        sample = rows.select(range(min(len(rows), 10_000 if fmt == "text" else 1_000)))
        try:
            samples.append((source, rows, fmt, corpus.tokenize(sample, tokenizer, source.spec, fmt, 10 ** 9, packing)))
        except UserError as e:
            problems += e.problems
    if problems:
        return problems, notes
    if len(checked) > 1:
        notes += mixture_notes(samples, d.stopping_strategy)
    source, rows, fmt, tokenized = samples[0]
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    stats = D.length_stats(lengths)
    notes.append("tokens per example: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                 + (f" ({source.key})" if len(checked) > 1 else "")
                 + f" (max_length {max_length}, model context {pretrained.context_length(config)})")
    too_long = sum(n > max_length for n in lengths)
    if too_long:
        fate = "split" if fmt == "text" and packing else "cut"
        notes.append(f"{too_long} examples ({too_long / len(lengths):.1%}) exceed data.max_length={max_length} and "
                     f"will be {fate}" + (" (data.packing: true splits them instead)"
                                          if fmt == "text" and not packing else ""))
    more, block = step_notes(recipe, samples, max_length, packing)
    notes += more
    chats = [(s, r, f, t) for s, r, f, t in samples if f != "text"]
    if chats:
        source, rows, fmt, tokenized = chats[0]
        trained = sum(t != -100 for labels in tokenized["labels"] for t in labels)
        total = sum(len(ids) for ids in tokenized["input_ids"])
        notes.append(f"loss on {trained / max(1, total):.1%} of the tokens (data.train_on: {source.spec.train_on})")
        if chat.is_chat(fmt, rows[0], source.spec):
            convs = [(*chat.to_messages(r, fmt, source.spec), chat.row_tools(r, source.spec)[0])
                     for r in rows.select(range(min(len(rows), 200)))]
            notes += masks.mask_report(tokenizer, convs, source.spec, sys.stdout.isatty())
        else:
            colour = sys.stdout.isatty()
            notes.append("the first example, trained tokens " + ("in green:" if colour else "in [[brackets]]:"))
            shown = masks.show_mask(tokenizer, tokenized[0]["input_ids"], tokenized[0]["labels"], colour)
            notes.append("  " + shown.rstrip("\n").replace("\n", "\n    "))
    return problems, notes, block  # the row length: the memory estimate's


def check_source(source, whole: bool) -> tuple[list[str], list[str], object, str]:
    """(problems, notes, rows, format) of one source, read as it is (no held-out split, so that row
    numbers match the file); with `whole`, data.eval is checked with it."""
    problems, notes = [], []
    d, key = source.spec, source.key
    try:
        if d.streaming:  # the rows training checks before it starts, not the whole stream
            from datasets import Dataset

            from finetune.data.sources import load_stream

            head = list(load_stream(d.train, key, d.train_split, d.config).take(corpus.CHECK_ROWS))
            if not head:
                raise UserError(f"{key}: '{d.train}' has no rows")
            train_raw = Dataset.from_list(head)
        else:
            train_raw = load_source(d.train, key, d.train_split, d.config)
        eval_raw = load_source(d.eval, "data.eval", d.eval_split or "validation", d.config) if whole and d.eval else None
    except UserError as e:
        rows = list(chat.read_rows(None, d.train))  # JSON Lines that datasets cannot load (mixed types): row by row
        if not rows:
            return e.problems, notes, None, ""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        fmt = chat.detect_format(columns, d, key=key)
        return chat.check_rows(rows, fmt, d, key) or e.problems, notes, None, fmt
    try:
        fmt = chat.detect_format(train_raw.column_names, d, key=key)
    except UserError as e:
        return e.problems, notes, None, ""
    for ds, k, name in ((train_raw, key, d.train), (eval_raw, "data.eval", d.eval)):
        if ds is None:
            continue
        if fmt != "text":
            problems += chat.check_rows(chat.read_rows(ds, name), fmt, d, k)
        else:
            try:
                D.require_columns(ds, {"data.text_column": d.text_column}, f"{k} '{name}'")
            except UserError as e:
                problems += e.problems
                continue
            empty = [i + 1 for i in D.empty_rows(ds, d.text_column)]
            if empty:
                rows = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
                problems.append(f"{k}: {len(empty)} empty texts (rows {rows} of '{name}'); remove them "
                                "(training skips them)")
        held = "" if d.eval or d.eval_split or k.startswith("data.eval") or not d.eval_fraction or d.streaming else \
            f", {d.eval_fraction:.0%} held out for evaluation"
        what = f"the first {len(ds)} rows of the stream" if d.streaming and k == key else f"{len(ds)} examples"
        notes.append(f"{k}: {what} ({fmt.replace('_', '/')})" + ("" if whole else f" in '{name}'") + held)
    if fmt == "conversations":
        notes.append(f"{key}: ShareGPT 'conversations' are mapped to messages (human -> user, gpt -> assistant)")
    return problems, notes, train_raw, fmt


def mixture_notes(samples: list, stopping_strategy: str) -> list[str]:
    """Rows, tokens and share of each training source (tokens estimated from the tokenized sample)."""
    train = [(s, len(rows), sum(len(i) for i in t["input_ids"]) / max(1, len(t)))
             for s, rows, _, t in samples if s.key.startswith("data.train")]
    weights = [s.weight for s, _, _ in train]
    out = [f"data.train: a mixture of {len(train)} sources"]
    if any(w is None for w in weights):
        total_tokens = sum(n * mean for _, n, mean in train)
        out += [f"  {s.key}: {n:,} rows, about {n * mean:,.0f} tokens, {n * mean / max(1, total_tokens):.0%} of the "
                "tokens (every row once)" for s, n, mean in train]
        return out
    p = [w / sum(weights) for w in weights]  # type: ignore[arg-type, misc]
    token_total = sum(pi * mean for pi, (_, _, mean) in zip(p, train))
    for pi, (source, n, mean) in zip(p, train):
        out.append(f"  {source.key}: {n:,} rows, about {n * mean:,.0f} tokens; drawn for {pi:.0%} of the rows and about "
                   f"{pi * mean / max(1e-9, token_total):.0%} of the tokens (weight {source.weight:g})")
    ends = min(n / pi for pi, (_, n, _) in zip(p, train)) if stopping_strategy == "first_exhausted" else \
        max(n / pi for pi, (_, n, _) in zip(p, train))
    first = min(zip(p, train), key=lambda x: x[1][1] / x[0])[1][0].key
    out.append(f"  the mixture ends after about {ends:,.0f} rows ({stopping_strategy}" +
               (f": {first} runs out first)" if stopping_strategy == "first_exhausted" else ")"))
    return out


def step_notes(recipe: Recipe, samples: list, max_length: int, packing: bool) -> tuple[list[str], int]:
    """(notes, row length): the row length, and how many optimizer steps the run will take (from the tokenized
    sample of each source, scaled to its rows), as training will print them."""
    parts = [t for s, _, _, t in samples if s.key.startswith("data.train")]
    block = max_length if recipe.data.max_length else fitted_block(parts, max_length, packing)
    notes = []
    if packing:
        notes.append(f"packing: whole examples packed into rows of {block} tokens (exact: each sees only "
                     "itself); data.packing: false pads each batch instead")
        if not recipe.data.max_length:
            notes.append("  the row length follows the data: the longest example rounded up to a power of two, at "
                         f"most {max_length} (data.max_length sets it)")
    if recipe.data.streaming:  # a stream has no length: train.max_steps decides
        return notes, block
    rows = 0.0
    for source, all_rows, _, tokenized in samples:
        if not source.key.startswith("data.train") or not len(tokenized):
            continue
        n = len(packed_dataset(tokenized, block)) if packing else len(tokenized)
        rows += n * len(all_rows) / len(tokenized)
    held = recipe.data.eval_fraction if not recipe.data.eval and not recipe.data.eval_split else 0.0
    _, lines = session.plan_steps(recipe, max(1, round(rows * (1 - held))), block)
    return notes + [line.replace("training: ", "training: about ", 1) for line in lines], block
