"""The model card (README.md) of a run, through huggingface_hub's `ModelCard`/`ModelCardData`, so the
metadata block is what the Hub validates: base_model only when the run has one on the Hub, datasets
only when they are Hub ids, the pipeline tag of the task, the license of the base where its card is
on this machine (a local directory or the Hub cache: nothing is downloaded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finetune.data import sources
from finetune.recipe.schema import Recipe

DISTRIBUTION = "finetune-toolkit"  # the PyPI name (`finetune` on PyPI is an unrelated project)
HOME = f"https://pypi.org/project/{DISTRIBUTION}/"

PIPELINE_TAGS = {
    "clm": "text-generation", "mlm": "fill-mask", "classification": "text-classification",
    "translation": "translation", "image-classification": "image-classification", "captioning": "image-to-text",
    "reward": "text-classification", "dpo": "text-generation", "ppo": "text-generation", "grpo": "text-generation",
}
WHAT = {"lora": "a LoRA adapter (peft)", "full": "a full fine-tune", "pretrain": "a model pre-trained from scratch"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CURVES = "curves.png"


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id (gpt2, org/name), not a local path or a file."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    return bool(HUB_ID.match(name)) and not Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet",
                                                                         ".txt")


def base_card_data(name: str | None) -> dict[str, Any]:
    """Metadata of the base model's own card, where it is on this machine (never downloaded)."""
    if not name:
        return {}
    path = Path(name).expanduser() / "README.md"
    if not path.is_file() and is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a malformed card of someone else's must not fail the run at its very end
        return {}


def base_model(recipe: Recipe) -> str | None:
    """The Hub id the run starts from: model.name, or the base recorded in a local model's card."""
    name = recipe.model.name
    if recipe.method == "pretrain" or not name:
        return None
    if is_hub_id(name):
        return name
    found = base_card_data(name).get("base_model")
    if isinstance(found, list):
        found = found[0] if found else None
    return found if isinstance(found, str) and is_hub_id(found) else None


def card_data(recipe: Recipe):
    from huggingface_hub import ModelCardData

    base = base_model(recipe)
    datasets = [d for d in sources.paths(recipe.data) if is_hub_id(d)]
    license_ = base_card_data(recipe.model.name).get("license") if recipe.model.name else None
    tags = list(dict.fromkeys(["finetune", recipe.task, recipe.method, *(["lora", "peft"] if recipe.method == "lora"
                                                                         else [])]))
    return ModelCardData(base_model=base, datasets=list(dict.fromkeys(datasets)) or None, tags=tags,
                         library_name="peft" if recipe.method == "lora" else "transformers",
                         pipeline_tag=PIPELINE_TAGS.get(recipe.task), license=license_)


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
            if v is not None and not isinstance(v, (list, dict))]
    return "| metric | value |\n| --- | --- |\n" + "\n".join(rows)


def card_text(recipe: Recipe, run_dir: Path, metrics: dict[str, Any], usage: str) -> str:
    from huggingface_hub import ModelCard

    data = card_data(recipe)
    base = recipe.model.name or f"a new model from config '{recipe.model.config or 'tiny'}'"
    evaluation = (sources.describe(recipe.data, "eval") if recipe.data.eval
                  else f"{recipe.data.eval_fraction:.0%} held out of the training data")
    curves = (f"\n## Training curves\n\n![loss, learning rate and tokens/s]({CURVES})\n"
              if (run_dir / CURVES).is_file() else "")
    content = f"""---
{data.to_yaml()}
---
# {run_dir.name}

{WHAT[recipe.method].capitalize()} for the `{recipe.task}` task, made with [finetune]({HOME}) (`pip install {DISTRIBUTION}`).

- **Base**: {base}
- **Training data**: {sources.describe(recipe.data)}
- **Evaluation data**: {evaluation}
- **Recipe**: `recipe.yaml` in this directory; run it again with `finetune {recipe.method} recipe.yaml`

## Metrics

{metrics_table(metrics)}
{curves}
## Use

{usage}

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```
"""
    return str(ModelCard(content))


def write_card(recipe: Recipe, run_dir: Path, metrics: dict[str, Any], usage: str) -> Path:
    path = run_dir / "README.md"
    path.write_text(card_text(recipe, run_dir, metrics, usage))
    return path
