"""Publish a finished run on the Hub through huggingface_hub (`finetune push RUN REPO_ID`, or
`train.push_to_hub: REPO_ID` at the end of a run).

What goes up is what a user of the model needs: the adapter or the model, the tokenizer/processor,
the card, the recipe, the metrics, the log and the curves picture. An export (`finetune export`) goes up
as it is: a .gguf file, an Ollama folder (its GGUF and Modelfile), or a model folder for vLLM. Never `checkpoints/` (optimizer
state, and `training_args.bin` stores a Hub token in plain text), tracker folders, or any file in which
a Hugging Face token appears. The selection is ours (`files_to_push`), passed to `upload_folder` as
its allow patterns, with the never-list as ignore patterns on top.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from finetune.errors import UserError

PUSHED = ("*.safetensors", "adapter_config.json", "config.json", "generation_config.json", "tokenizer*.json",
          "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "preprocessor_config.json",
          "processor_config.json", "chat_template.*", "added_tokens.json", "README.md", "recipe.yaml",
          "metrics.json", "log.jsonl", "curves.png")
NEVER = ("checkpoints/*", "checkpoints", "*.bin", "*.pt", "*.pth", "tensorboard/*", "mlruns/*", "wandb/*",
         "trackio/*", "merged/*", ".env", "*.env", ".git/*")
TOKEN = re.compile(rb"hf_[A-Za-z0-9]{30,}")


def holds_token(path: Path) -> bool:
    return bool(TOKEN.search(path.read_bytes()))


def push_folder(path: Path) -> Path:
    """The folder the upload is made from: a .gguf file's own folder, or the path itself."""
    return path.parent if path.is_file() else path


def files_to_push(run_dir: Path) -> list[str]:
    """Paths relative to `push_folder`, sorted: a finished run's selection, a .gguf file, an Ollama folder's
    GGUF and Modelfile, or a model folder's files (a vLLM export); refuses a run with no trained model."""
    if run_dir.is_file():
        if run_dir.suffix != ".gguf":
            raise UserError(f"run: '{run_dir}' is a file but not a .gguf export; give a run directory, a .gguf "
                            "file or an export folder")
        return [run_dir.name]
    if (run_dir / "Modelfile").is_file():
        return sorted(p.name for p in run_dir.iterdir() if p.name == "Modelfile" or p.suffix == ".gguf")
    exported = not (run_dir / "recipe.yaml").is_file() and (run_dir / "config.json").is_file()
    if not exported and not (run_dir / "metrics.json").is_file():
        raise UserError(f"run: '{run_dir}' is not a finished run (no metrics.json); finish it first "
                        f"(finetune <command> --resume -o {run_dir})")
    if not any((run_dir / f).is_file() for f in ("adapter_config.json", "config.json")):
        raise UserError(f"run: '{run_dir}' holds no model (no adapter_config.json or config.json)")
    chosen = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        if any(fnmatch.fnmatch(rel, n) for n in NEVER) or "/" in rel:
            continue
        if not any(fnmatch.fnmatch(rel, p) for p in PUSHED):
            continue
        if not rel.endswith((".safetensors", ".png", ".model")) and holds_token(path):
            raise UserError(f"run: '{path}' contains a Hugging Face token; remove it from the file before pushing")
        chosen.append(rel)
    return chosen


def push_problems(key: str = "push") -> list[str]:
    """Before training or uploading: the Hub must be reachable and a token present."""
    from huggingface_hub import get_token

    from finetune.launch.offline import hub_reachable

    if not hub_reachable():
        return [f"{key}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1); pushing needs a connection"]
    if not get_token():
        return [f"{key}: no Hugging Face token; set HF_TOKEN or run `hf auth login` (a token with write access)"]
    return []


def card_for_hub(run_dir: Path, repo_id: str) -> bytes:
    """The run's card with its local paths replaced by the repo id (the usage code loads from the Hub)."""
    text = (run_dir / "README.md").read_text()
    return text.replace(f'"{run_dir}"', f'"{repo_id}"').replace(f"{run_dir}/", "").encode()


def push_run(run_dir: Path, repo_id: str, private: bool = False, revision: str | None = None, api=None) -> str:
    """Create the repo (if needed) and upload the run's files in one commit; returns the repo URL."""
    files = files_to_push(Path(run_dir))
    run_dir = push_folder(Path(run_dir))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    others = [f for f in files if f != "README.md"]
    api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, revision=revision, allow_patterns=others,
                      ignore_patterns=list(NEVER), commit_message=f"Upload {run_dir.name} (finetune)")
    if "README.md" in files:
        api.upload_file(path_or_fileobj=card_for_hub(run_dir, repo_id), path_in_repo="README.md", repo_id=repo_id,
                        revision=revision, commit_message="Model card")
    return str(url)


def push_after_run(recipe) -> None:
    """`train.push_to_hub`: upload the finished run (the run lifecycle calls it on the process that owns
    the run directory)."""
    if recipe.train.push_to_hub:
        url = push_run(recipe.output_dir, recipe.train.push_to_hub)
        print(f"pushed to {url}", flush=True)
