"""Metric builders for evaluation: plain functions over predictions and references.

The math comes from scikit-learn and sacrebleu, so no metric needs the network; `evaluate`
(which fetches metric scripts from the Hub, and ignores HF_HUB_OFFLINE) is only used for the
extra metrics a recipe names, and only when it can load them.
"""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --- classification metrics (accuracy, F1, per-class report) ---


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
