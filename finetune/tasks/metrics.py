"""Metric builders for evaluation: plain functions over predictions and references.

The math comes from scikit-learn and sacrebleu, so no metric needs the network; `evaluate`
(which fetches metric scripts from the Hub, and ignores HF_HUB_OFFLINE) is only used for the
extra metrics a recipe names, and only when it can load them.
"""

from __future__ import annotations

from finetune.errors import first_line


# --- classification metrics (accuracy, F1, per-class report) ---


def classification_metrics(predictions, labels, label_names: list[str]) -> dict:
    """Accuracy, macro-F1 and a per-class report for predicted vs true class ids (0..len(label_names)-1).

    Macro-F1 averages over the classes present in `labels` or `predictions`, as scikit-learn
    does; `per_class` lists every class in `label_names`, with support 0 for absent ones.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                     zero_division=0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(label_names)}
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
            "per_class": per_class}


def report_table(per_class: dict[str, dict]) -> str:
    """The per-class report of `classification_metrics` as a text table."""
    width = max([5, *(len(name) for name in per_class)])
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for name, m in per_class.items():
        lines.append(f"{name:<{width}}  {m['precision']:>9.3f}  {m['recall']:>6.3f}  {m['f1']:>5.3f}  {m['support']:>7}")
    return "\n".join(lines)


def masked_token_accuracy(predictions, labels, ignore_index: int = -100) -> float:
    """Share of the labelled positions (labels != ignore_index) whose predicted token is right."""
    import numpy as np

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scored = labels != ignore_index
    return float((predictions[scored] == labels[scored]).mean()) if scored.any() else 0.0



# --- generation metrics (BLEU, chrF) ---


def _reference_streams(references: list[str] | list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one list per reference *position*; accept one reference (a string) or several
    (a list) per prediction, padding shorter lists with their last item."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max((len(r) for r in refs), default=1)
    return [[r[min(i, len(r) - 1)] for r in refs] for i in range(width)]


def bleu(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's default 13a tokenization, as reported in papers."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus chrF (0-100): character n-gram F-score, kinder than BLEU to morphology and short texts."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def generation_metrics(predictions: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
    """BLEU, chrF and the share of predictions equal to (one of) their references."""
    exact = [p.strip() in {x.strip() for x in ([r] if isinstance(r, str) else r)}
             for p, r in zip(predictions, references)]
    return {"bleu": bleu(predictions, references), "chrf": chrf(predictions, references),
            "exact_match": sum(exact) / max(len(exact), 1)}


# --- extra `evaluate` metrics named by a recipe ---


def load_extra_metrics(names: list[str], key: str) -> dict:
    """`evaluate` modules for the metric names a recipe lists under `key`, skipping (with a warning)
    those that cannot be loaded: evaluate fetches metric scripts from the Hub, so offline only
    cached metrics and local script paths load. The built-in metrics never need this."""
    if not names:
        return {}

    try:
        import evaluate  # ~4-6 s to import: only when a recipe asks for it
    except ImportError as e:
        print(f"warning: {key}: cannot import evaluate ({first_line(e)}); skipping {', '.join(names)}", flush=True)
        return {}
    loaded = {}
    for name in names:
        try:
            loaded[name] = evaluate.load(name)
        except Exception as e:  # offline: FileNotFoundError hiding the ConnectionError; bad names alike
            print(f"warning: {key}: could not load the evaluate metric '{name}' ({first_line(e)}); "
                  "evaluate downloads metric scripts from the Hugging Face Hub, so run once online (they are "
                  f"cached) or drop it from {key}. Continuing without it.", flush=True)
    return loaded


def extra_metric_values(metrics: dict, predictions, references, taken=()) -> dict[str, float]:
    """Numbers from the loaded `evaluate` metrics; a key already in `taken` is prefixed with the
    metric's name. A metric that fails (e.g. it needs extra arguments) is skipped with a warning."""

    out: dict[str, float] = {}
    for name, metric in metrics.items():
        try:
            result = metric.compute(predictions=list(predictions), references=list(references))
        except Exception as e:
            print(f"warning: evaluate metric '{name}' failed ({first_line(e)}); skipping it", flush=True)
            continue
        for k, v in (result or {}).items():
            try:
                value = float(v)
            except (TypeError, ValueError):  # per-class lists, strings: not a single number
                continue
            out[f"{name}_{k}" if k in taken or k in out else k] = value
    return out
