"""The label column of classification data: label names in id order, a value's id, the problems of a
training and an evaluation set's labels, and their counts (`finetune validate`)."""

from __future__ import annotations

import math
from collections import Counter

from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import ClassificationSpec


def label_names(train, spec: ClassificationSpec) -> tuple[list[str], bool]:
    """(names in id order, whether integer labels are indices into them).

    classification.labels wins; then the names of a ClassLabel column (Hub datasets such as imdb);
    else the distinct values of train, sorted (numerically for integers), as strings.
    """
    if spec.labels:
        return list(spec.labels), True
    feature = train.features.get(spec.label_column)
    if hasattr(feature, "names"):
        return list(feature.names), True
    values = {v for v in map(plain_label, train[spec.label_column]) if v is not None}
    numeric = all(isinstance(v, int) for v in values)
    return [str(v) for v in sorted(values, key=int if numeric else str)], False


def plain_label(value):
    """A label value as int or str; None when missing (None, NaN)."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def missing_labels(ds, column: str) -> list[int]:
    return [i for i, v in enumerate(ds[column]) if plain_label(v) is None]


def label_id(value, lookup: dict[str, int], by_index: bool) -> int | None:
    value = plain_label(value)
    if value is None:
        return None
    if by_index and isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(lookup) else None
    return lookup.get(str(value))


def label_problems(train, eval_ds, names: list[str], by_index: bool, recipe: Recipe) -> list[str]:
    """Train labels outside classification.labels, eval labels never seen in training."""
    spec = recipe.section(ClassificationSpec)
    column, lookup = spec.label_column, {n: i for i, n in enumerate(names)}
    eval_key = "data.eval" if recipe.data.eval or recipe.data.eval_split else "the eval split held out of data.train"
    problems: list[str] = []
    trained: set[int] = set()
    for ds, key in ((train, "data.train"), (eval_ds, eval_key)):
        if ds is None:
            continue
        values = [plain_label(v) for v in ds[column]]
        ids = [label_id(v, lookup, by_index) for v in values]
        if key == "data.train":
            unknown = Counter(v for v, i in zip(values, ids) if i is None and v is not None)
            for value, count in unknown.most_common(5):
                problems.append(f"data.train: label {value!r} ({count} rows) is not one of the labels "
                                f"({', '.join(names)}); add it to classification.labels or fix the data")
            trained = {i for i in ids if i is not None}
            if len(trained) == 1:
                problems.append(f"data.train: every example has the label {names[min(trained)]!r}; classification "
                                "needs examples of at least two labels")
        else:  # unknown labels, and known names that no training example has
            unseen = Counter(names[i] if i is not None else v for v, i in zip(values, ids)
                             if v is not None and i not in trained)
            for value, count in unseen.most_common(5):
                problems.append(f"{key}: label {value!r} ({count} rows) does not occur in data.train, so the model "
                                f"cannot learn it (training labels: {', '.join(names[i] for i in sorted(trained))}); "
                                "fix or remove those rows, or add training examples with this label")
    return problems


def label_counts(ds, names: list[str], by_index: bool, column: str) -> str:
    lookup = {n: i for i, n in enumerate(names)}
    counts = Counter(label_id(v, lookup, by_index) for v in ds[column])
    total = sum(counts.values())
    parts = [f"{name} {counts[i]} ({counts[i] / total:.0%})" for i, name in enumerate(names) if counts[i]]
    if counts[None]:
        parts.append(f"missing or unknown {counts[None]} ({counts[None] / total:.0%})")
    return ", ".join(parts)
