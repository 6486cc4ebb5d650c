"""Using a finished run: load it, generate text, merge a LoRA adapter into its base."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe import Recipe, read_recipe_file
from finetune.tasks import load_task


def run_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run directory was made with, or None for a plain model directory."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    return Recipe.model_validate(read_recipe_file(path))


def run_task(run_dir: Path, default: str = "clm"):
    recipe = run_recipe(run_dir)
    return load_task(recipe.task if recipe else default)


def check_model_dir(path: Path, key: str) -> None:
    if not path.is_dir():
        raise UserError(f"{key}: no such directory '{path}'")
    markers = ("config.json", "adapter_config.json")
    if not any((path / m).exists() for m in markers):
        if (path / "recipe.yaml").exists():
            raise UserError(f"{key}: run '{path}' holds no trained model yet (interrupted?); "
                            f"continue it with --resume -o {path}")
        raise UserError(f"{key}: '{path}' holds no model (no config.json or adapter_config.json)")


def generate_text(source: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int) -> str:
    import torch
    from transformers import AutoTokenizer, set_seed

    from finetune.models import check_source

    path = Path(source)
    if path.exists() or source.startswith((".", "/", "~")):
        check_model_dir(path, "model")
        model = run_task(path).load_trained(path)
        tok_source = str(path)
    else:
        tok_source = check_source(source, "model")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tok_source)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    model.eval()
    set_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_p=top_p if sample else None,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def merge_run(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Merge the run's LoRA adapter into its base (in full precision) and save a plain model."""
    from finetune.adapters import is_adapter_dir, merge_adapter

    check_model_dir(run_dir, "run")
    if not is_adapter_dir(run_dir):
        raise UserError(f"run: '{run_dir}' holds no LoRA adapter (adapter_config.json); it is already a plain model")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"--output: '{out_dir}' is not empty; pass --overwrite or choose another directory")
        if not (out_dir / "config.json").exists():
            raise UserError(f"--output: '{out_dir}' is not empty and holds no model; choose another directory")
        shutil.rmtree(out_dir)
    model = run_task(run_dir).load_trained(run_dir)
    merged = merge_adapter(model)
    merged.save_pretrained(str(out_dir))
    for f in run_dir.iterdir():  # tokenizer / processor files travel with the model
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "preprocessor", "spiece")):
            shutil.copy2(f, out_dir / f.name)
    return out_dir
