"""Sequence classification: one label per text or text pair (sentiment, topic, NLI), BERT- or GPT-style.

    finetune lora --task classification --model bert-base-uncased --data train.jsonl -o runs/sentiment
    finetune full --task classification --model distilbert-base-uncased --data reviews.csv \\
        --set classification.label_column=stars
    finetune predict runs/sentiment "a wonderful, moving film"
    finetune predict runs/sentiment --data test.jsonl -o preds.jsonl

Recipe fields used: model.*, data.text_column, data.max_length, classification.*, lora.*, train.*.
Encoders (BERT, RoBERTa, ...) classify from the [CLS] token through a new head; GPT-style decoders from
the last token (a pad token is added when the tokenizer has none). Labels are integers or strings; their
names go into the model config (id2label/label2id) and labels.json, and come back on reload. With LoRA
the head, and every layer the checkpoint lacks (the pooler of a masked-LM checkpoint), are trained in
full and saved with the adapter. Evaluation reports accuracy, macro-F1 and a per-class report
(eval_report.txt), plus the `evaluate` metrics named in classification.metrics when they can be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data import text as D
from finetune.data.labels import label_counts, label_id, label_names, label_problems, missing_labels, plain_label
from finetune.data.sources import load_source
from finetune.errors import UserError, raise_if
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import ClassificationSpec
from finetune.training import session

LABELS_FILE = "labels.json"  # label names in id order (the adapter does not store id2label), and
# whether integer labels in data are indices into them (else they are names: 1..5 stars -> "1".."5")
HEADS = ("classifier", "score")  # peft trains and saves these in full for SEQ_CLS
STATS_SAMPLE = 10_000  # `finetune validate` measures token lengths on at most this many examples


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    from finetune.tasks.metrics import load_extra_metrics

    raise_if_unsupported(recipe)
    spec = recipe.section(ClassificationSpec)
    set_seed(recipe.train.seed)
    column = recipe.data.text_column

    # 1. Data: the text, pair and label columns; empty texts dropped; every eval label seen in train.
    train_raw, eval_raw = D.load_splits(recipe.data, recipe.train.seed)
    for ds, key, source in ((train_raw, "data.train", recipe.data.train), (eval_raw, "data.eval", recipe.data.eval)):
        if ds is not None:
            D.require_columns(ds, required_columns(recipe, spec), f"{key} '{source or recipe.data.train}'")
    empty = D.empty_rows(train_raw, column)
    if empty:
        print(f"warning: skipping {len(empty)} empty texts in data.train (`finetune validate` lists the rows)",
              flush=True)
        train_raw = D.drop_empty(train_raw, column)
    if eval_raw is not None:
        eval_raw = D.drop_empty(eval_raw, column)
    problems = []
    for ds, key in ((train_raw, "data.train"), (eval_raw, "data.eval")):
        missing = missing_labels(ds, spec.label_column) if ds is not None else []
        if missing:
            problems.append(f"{key}: {len(missing)} rows have no {spec.label_column}; fill them in or remove them "
                            "(`finetune validate` lists the rows)")
    names, by_index = label_names(train_raw, spec)
    raise_if(problems + label_problems(train_raw, eval_raw, names, by_index, recipe))

    # 2. Tokenizer, with a pad token (GPT-style tokenizers have none; batches need one).
    tokenizer = pretrained.load_tokenizer(recipe.model)
    pretrained.ensure_pad_token(tokenizer)

    # 3. Model: the checkpoint with a new head of len(names) outputs that knows the label names.
    model, info = pretrained.load_model(recipe.model, AutoModelForSequenceClassification, num_labels=len(names),
                                    id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                                    ignore_mismatched_sizes=True, output_loading_info=True)
    pretrained.ensure_pad_token(tokenizer, model)  # also sets config.pad_token_id: the last-token head looks for it
    model.config.use_cache = False  # GPT-style models would return their cache as extra "logits"
    keep_token_type_ids(tokenizer, model.config)
    new = new_layers(info)
    if new:
        where = "trained in full and saved with the adapter" if recipe.method == "lora" else "trained"
        print(f"note: layers not in the checkpoint, newly initialised and {where}: {', '.join(new + ['head'])}",
              flush=True)
    max_length = pretrained.max_length(recipe.data.max_length, model.config, default_cap=512)

    # 4. Tokenize: [CLS] text [SEP] (pair [SEP]), cut at max_length; labels as ids. The eval split runs
    #    longest first: its metrics do not depend on the order, and like lengths pad less.
    train_ds = encode(train_raw, tokenizer, recipe, spec, max_length, names, by_index)
    eval_ds = encode(eval_raw, tokenizer, recipe, spec, max_length, names, by_index) if eval_raw else None
    eval_ds = session.longest_first(eval_ds) if eval_ds is not None else None

    # 5. LoRA: adapters on the encoder; the head and the new layers stay fully trainable and are saved.
    if recipe.method == "lora":
        model = apply_lora(model, recipe.lora, "SEQ_CLS", modules_to_save=new)

    # 6. Train, evaluate, save (with the label names), report per class.
    extra = load_extra_metrics(spec.metrics, "classification.metrics")
    report: dict = {}
    run_dir = session.start_run(recipe)
    args = session.training_arguments(recipe, run_dir)
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=metrics_function(names, extra, report),
                      preprocess_logits_for_metrics=predicted_class,
                      callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    trainer.save_model(str(run_dir))
    table = ""
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))
        saved = {"id2label": dict(enumerate(names)), "integers_are_indices": by_index}
        (run_dir / LABELS_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        if report:
            from finetune.tasks.metrics import report_table

            table = report_table(report)
            (run_dir / "eval_report.txt").write_text(table + "\n")
            print(f"\nper-class report on the eval split:\n{table}", flush=True)

    metrics = session.run_metrics(trainer, train_output, eval_metrics, model)
    metrics.pop("perplexity", None)  # exp(cross-entropy) over labels means nothing here
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe, table), next_steps(run_dir, recipe))
    return metrics


def raise_if_unsupported(recipe: Recipe) -> None:
    problems = []  # (`finetune pretrain` is refused by the recipe: the task registry lists its methods)
    if recipe.quant.bits:
        problems.append("quant.bits: the classification task trains unquantized models; drop quant.bits")
    raise_if(problems)


# ---------------------------------------------------------------------------------------
# Columns and labels


def required_columns(recipe: Recipe, spec: ClassificationSpec) -> dict[str, str]:
    columns = {"data.text_column": recipe.data.text_column}
    if spec.text_pair_column:
        columns["classification.text_pair_column"] = spec.text_pair_column
    columns["classification.label_column"] = spec.label_column
    return columns


# ---------------------------------------------------------------------------------------
# Model and tokens


def new_layers(loading_info: dict) -> list[str]:
    """Modules whose weights the checkpoint lacked, other than the head (peft keeps that itself):
    the pooler of a masked-LM checkpoint, DistilBERT's pre_classifier. They start random, so with
    LoRA they must be trained and saved too, or every reload would draw them afresh."""
    keys = [*loading_info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                                     for k in loading_info.get("mismatched_keys", ()))]
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    return [m for m in modules if m.split(".")[0] not in HEADS]


def keep_token_type_ids(tokenizer, config) -> None:
    """Models with segment embeddings (BERT) tell the two texts of a pair apart by token_type_ids,
    which the generic tokenizer class drops unless model_input_names lists them."""
    if getattr(config, "type_vocab_size", 1) > 1 and "token_type_ids" not in tokenizer.model_input_names:
        tokenizer.model_input_names = [*tokenizer.model_input_names, "token_type_ids"]


def encode(ds, tokenizer, recipe: Recipe, spec: ClassificationSpec, max_length: int, names: list[str],
           by_index: bool):
    column, pair = recipe.data.text_column, spec.text_pair_column
    lookup = {n: i for i, n in enumerate(names)}

    def fn(batch):
        enc = tokenizer(batch[column], batch[pair] if pair else None, truncation=True, max_length=max_length)
        enc["labels"] = [label_id(v, lookup, by_index) for v in batch[spec.label_column]]
        return enc

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


# ---------------------------------------------------------------------------------------
# Metrics


def predicted_class(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def metrics_function(names: list[str], extra: dict, report: dict):
    """compute_metrics for the Trainer: accuracy and macro-F1 (+ extra evaluate metrics); the
    per-class report of the latest evaluation lands in `report`."""
    from finetune.tasks.metrics import classification_metrics, extra_metric_values

    def compute(eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        values = classification_metrics(preds, labels, names)
        report.clear()
        report.update(values.pop("per_class"))
        values.update(extra_metric_values(extra, preds, labels, taken=values))
        return values

    return compute


# ---------------------------------------------------------------------------------------
# Using a run


def usage(run_dir: Path, recipe: Recipe, table: str = "") -> str:
    text = (f'```\nfinetune predict {run_dir} "some text"\nfinetune predict {run_dir} --data test.jsonl -o preds.jsonl\n'
            f"```\n\nIn Python: `finetune.tasks.classification.load_trained(\"{run_dir}\")` returns the model with its "
            "label names (`model.config.id2label`)")
    if recipe.method == "lora":
        text += f"; `finetune merge {run_dir} -o merged/` makes a plain transformers model of it"
    text += "."
    if table:
        text += f"\n\n### Per-class report (eval split)\n\n```\n{table}\n```"
    return text


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune predict {run_dir} "some text"', f"finetune predict {run_dir} --data test.jsonl -o preds.jsonl"]
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def read_labels(run_dir: Path) -> tuple[list[str], bool]:
    """(label names in id order, whether integer labels are indices into them) saved with a run."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise UserError(f"run: '{run_dir}' has no {LABELS_FILE} (the label names); was it made by "
                        "`finetune ... --task classification`?")
    saved = json.loads(path.read_text())
    return [saved["id2label"][str(i)] for i in range(len(saved["id2label"]))], saved["integers_are_indices"]


def load_trained(run_dir: Path, **kwargs):
    """The trained classifier of a run (a PeftModel for LoRA runs) with its label names restored,
    or any sequence-classification model directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not is_adapter_dir(run_dir):
        return AutoModelForSequenceClassification.from_pretrained(str(run_dir), **kwargs)
    from peft import PeftConfig, PeftModel

    names, _ = read_labels(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    base = PeftConfig.from_pretrained(str(run_dir)).base_model_name_or_path
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        pad_token_id=tokenizer.pad_token_id, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # a pad token was added in training
        model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, str(run_dir))


def predict(run_dir: Path, inputs: list[str] | None, data: str | None, batch_size: int = 32) -> list[dict]:
    """One dict per input: the text (and pair), the predicted `label` and its probability `score`;
    with --data that holds the label column, also the `reference` label."""
    import torch
    from transformers import AutoTokenizer

    from finetune.use.inference import check_model_dir, run_recipe

    run_dir = Path(run_dir)
    check_model_dir(run_dir, "run")
    recipe = run_recipe(run_dir)
    spec = recipe.section(ClassificationSpec) if recipe else ClassificationSpec()
    column = recipe.data.text_column if recipe else "text"
    pair = spec.text_pair_column
    if data:
        ds = load_source(data, "--data")
        missing = [c for c in (column, pair) if c and c not in ds.column_names]
        if missing:
            raise UserError(f"--data: no column {', '.join(map(repr, missing))} in '{data}' (the run was trained on "
                            f"those columns); its columns are: {', '.join(ds.column_names)}. Rename the columns")
        texts, pairs = ds[column], ds[pair] if pair else None
        truths = ds[spec.label_column] if spec.label_column in ds.column_names else None
    else:
        if pair:
            raise UserError(f"inputs: this run classifies text pairs ({column}, {pair}); pass --data with "
                            "both columns")
        texts, pairs, truths = list(inputs or []), None, None
    bad = [i + 1 for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise UserError(f"--data: {len(bad)} rows have no {column} (rows {', '.join(map(str, bad[:5]))}"
                        f"{', ...' if len(bad) > 5 else ''} of '{data}'); fill them in or remove them")

    model = load_trained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    keep_token_type_ids(tokenizer, model.config)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = pretrained.max_length(recipe.data.max_length if recipe else None, model.config, default_cap=512)
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        batch_pairs = pairs[start:start + batch_size] if pairs else None
        enc = tokenizer(batch, batch_pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits.softmax(dim=-1)
        for j, p in enumerate(probs):
            row = {column: batch[j]}
            if batch_pairs:
                row[pair] = batch_pairs[j]
            row.update(label=names[int(p.argmax())], score=round(float(p.max()), 6))
            out.append(row)
    if truths is not None:
        lookup = {n: i for i, n in enumerate(names)}
        by_index = read_labels(run_dir)[1] if (run_dir / LABELS_FILE).is_file() else True
        for row, value in zip(out, truths):
            i = label_id(value, lookup, by_index)
            row["reference"] = names[i] if i is not None else plain_label(value)
    return out


# ---------------------------------------------------------------------------------------
# finetune validate


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes), with the label distribution."""
    problems, notes = [], []
    spec, d = recipe.section(ClassificationSpec), recipe.data
    column = d.text_column
    try:
        raise_if_unsupported(recipe)
        # the files as they are (nothing held out), so that row numbers match the files
        as_files = d.model_copy(update={"eval_fraction": 0.0, "max_samples": None, "max_eval_samples": None})
        train_file, eval_file = D.load_splits(as_files, recipe.train.seed)
        train_raw, eval_raw = D.load_splits(d, recipe.train.seed)  # what training sees
        for ds, key, source in ((train_file, "data.train", d.train), (eval_file, "data.eval", d.eval or d.train)):
            if ds is not None:
                D.require_columns(ds, required_columns(recipe, spec), f"{key} '{source}'")
    except UserError as e:
        return e.problems, notes
    for ds, key, source in ((train_file, "data.train", d.train), (eval_file, "data.eval", d.eval or d.train)):
        if ds is None:
            continue
        for rows, what, fix in ((D.empty_rows(ds, column), "empty texts", "remove them (training skips them)"),
                                (missing_labels(ds, spec.label_column), f"rows without a {spec.label_column}",
                                 "fill them in or remove them")):
            if rows:
                problems.append(f"{key}: {len(rows)} {what} (rows {', '.join(str(i + 1) for i in rows[:5])}"
                                f"{', ...' if len(rows) > 5 else ''} of '{source}'); {fix}")
    names, by_index = label_names(train_raw, spec)
    problems += label_problems(train_raw, eval_raw, names, by_index, recipe)
    notes.append(f"labels: {len(names)} ({', '.join(names)})")
    held_out = "" if eval_file is not None else f" ({d.eval_fraction:.0%} of data.train held out)"
    for ds, key in ((train_raw, "data.train"), (eval_raw, "data.eval" + held_out)):
        if ds is not None:
            notes.append(f"{key}: {len(ds)} examples; {label_counts(ds, names, by_index, spec.label_column)}")

    try:
        tokenizer = pretrained.load_tokenizer(recipe.model)
        config = pretrained.load_config(recipe.model)
        max_length = pretrained.max_length(d.max_length, config, default_cap=512)
    except UserError as e:
        return problems + e.problems, notes
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        notes.append("tokenizer: no pad token distinct from eos; finetune adds '<|pad|>' (one new embedding row) "
                     "so that batches can be padded and the last-token head finds the last real token")
    sample = train_raw.select(range(min(len(train_raw), STATS_SAMPLE)))  # large datasets: a sample is enough
    texts = [t if isinstance(t, str) else "" for t in sample[column]]
    pairs = [t if isinstance(t, str) else "" for t in sample[spec.text_pair_column]] if spec.text_pair_column else None
    lengths = [len(ids) for ids in tokenizer(texts, pairs)["input_ids"]]
    stats = D.length_stats(lengths)
    sampled = f" (first {len(sample):,})" if len(sample) < len(train_raw) else ""
    notes.append(f"tokens per example{sampled}: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k != "count")
                 + f" (max_length {max_length})")
    too_long = sum(n > max_length for n in lengths)
    if too_long:
        notes.append(f"{too_long} examples ({too_long / len(lengths):.1%}) exceed data.max_length={max_length} "
                     "and will be cut")
    return problems, notes
