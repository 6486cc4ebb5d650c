"""`finetune eval RUN`: a finished run scored by lm-evaluation-harness on benchmarks or local tasks, with the
model object we trained handed to lm-eval's HFLM: a LoRA adapter folded into its base (`for_inference`, as
`generate` uses it) or the full model, in the run's weight dtype and mixed precision, on the GPU when there
is one. `--baseline` scores the base the same way (same tokenizer, prompts and chat template): a LoRA run's
base is the same loaded model with its adapter disabled; a full run's is the recipe's model.name.

Written per top-level task: RUN/eval/<task>.json (metrics, stderr, base and difference, the task config)
and RUN/eval/<task>.samples.jsonl (each row's response); the numbers are merged into RUN/metrics.json as
`<task>/<metric>` (and `_stderr`, `_base`) and the model card is rewritten with them, its model-index
listing every RUN/eval/*.json (an evaluation of the first --limit rows only goes to RUN/eval/). Each file is
written whole to a temporary file, then renamed.

A run trained on chat data (its chat.json) is evaluated through its chat template (lm-eval's
apply_chat_template): each prompt becomes a user message and the answer starts after the generation
prompt, as in `finetune generate`; the template writes BOS itself, so none is added.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from finetune.errors import UserError
from finetune.use import eval_tasks
from finetune.use.inference import check_model_dir, for_inference, run_recipe, run_task

# lm-eval's default of 100000 bootstrap draws takes minutes for chrF; 1000 give its stderr to two digits
BOOTSTRAP_ITERS = 1000


def check_run(run_dir: Path):
    """The recipe of a finished causal-LM run (None for a plain model directory); one line otherwise."""
    from finetune.recipe.tasks import task_info
    from finetune.training.rundir import read_marker, status

    check_model_dir(run_dir, "run")
    recipe = run_recipe(run_dir)
    if recipe is None:
        return None
    state = status(run_dir)
    if state == "running":
        pid = (read_marker(run_dir) or {}).get("pid")
        raise UserError(f"run: the run in '{run_dir}' is still running (pid {pid}); evaluate it when it has finished")
    if state != "finished":
        raise UserError(f"run: the run in '{run_dir}' has not finished ({state}); continue it with --resume -o "
                        f"{run_dir}, then evaluate it")
    if task_info(recipe.task).inference != "generate":
        raise UserError(f"run: '{run_dir}' was trained for the {recipe.task} task; finetune eval scores causal "
                        "language models (clm, dpo, ppo and grpo runs)")
    return recipe


def batch_value(batch_size: str | int) -> int | str:
    text = str(batch_size).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].replace(".", "", 1).isdigit()):
        return text
    raise UserError(f"--batch-size: '{batch_size}' is not a positive number or 'auto'; for example --batch-size 16")


def device_and_kwargs(recipe) -> tuple[str, dict[str, Any], Any]:
    """(device, from_pretrained kwargs, autocast dtype or None): the run's weight dtype and quantized base
    (QLoRA, on a GPU), and the mixed precision it trained in."""
    import torch

    from finetune.models.pretrained import quantization_config, torch_dtype

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    autocast = None
    if recipe is not None:
        kwargs["dtype"] = torch_dtype(recipe.model.dtype)
        if recipe.quant.bits and cuda:
            kwargs.update(quantization_config=quantization_config(recipe.quant), device_map={"": 0})
        if recipe.train.bf16:
            autocast = torch.bfloat16
        elif recipe.train.fp16 and cuda:
            autocast = torch.float16
    return ("cuda" if cuda else "cpu"), kwargs, autocast


def place(model, device: str, stop_ids: list[int]):
    """The model on its device, in eval mode. A chat run's turns end at the template's end-of-turn token:
    with it as eos, a batch's finished answers are padded while the others go on (lm-eval decodes the
    answers without special tokens, so an end-of-turn token inside one could not cut it)."""
    if getattr(model, "hf_device_map", None) is None:  # a quantized base was loaded onto its device
        model = model.to(device)
    if stop_ids:
        model.generation_config.eos_token_id = stop_ids
    return model.eval()


def precision(model, autocast) -> str:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    mixed = f", {str(autocast).removeprefix('torch.')} autocast" if autocast is not None else ""
    return f"{dtype} weights{mixed} on {model.device.type}"


def load_base(recipe, tokenizer, kwargs: dict):
    """A full run's base: the recipe's model.name as training loaded it, with the run's tokenizer rows."""
    from transformers import AutoModelForCausalLM

    from finetune.models.pretrained import load_model

    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}  # load_model applies model.dtype itself
    base = load_model(recipe.model, AutoModelForCausalLM, recipe.quant if "quantization_config" in kwargs else None,
                      **{k: v for k, v in kwargs.items() if k != "quantization_config"})
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):  # tokens the run added (pad, chat markers)
        base.resize_token_embeddings(len(tokenizer))
    return base


def check_baseline(run_dir: Path, recipe) -> None:
    from finetune.models.adapters import is_adapter_dir

    if is_adapter_dir(run_dir):
        return
    if recipe is None:
        raise UserError(f"--baseline: '{run_dir}' is not a finetune run (no recipe.yaml), so its base model is "
                        "unknown; evaluate the base on its own with finetune eval BASE_DIR")
    if recipe.method == "pretrain" or not recipe.model.name:
        raise UserError(f"--baseline: '{run_dir}' was pre-trained from scratch; it has no base model to compare "
                        "with")


def versions(storage: dict) -> None:
    import torch
    import transformers
    from lm_eval import __version__

    storage.update(lm_eval_version=__version__, transformers_version=transformers.__version__,
                   torch_version=torch.__version__)


@contextlib.contextmanager
def lm_eval_quiet(verbose: bool):
    """lm-eval's info logs and prints (bootstrap notices) off our stdout, which holds the table; bootstrap
    resampling in this process (its default forks a pool of workers from a process holding the model).
    Each simple_evaluate also collects torch's environment report (3.7 s of subprocesses here) and asks git
    for the current folder's commit (printing git's `fatal: not a git repository` outside one): the versions
    that matter are recorded instead."""
    import logging
    from unittest import mock

    import lm_eval.evaluator

    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()), \
                mock.patch.object(lm_eval.evaluator, "add_env_info", versions), \
                mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            yield
    finally:
        logger.setLevel(level)
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved


def score(model, tokenizer, tasks: list, manager, chat: bool, batch, limit, autocast, verbose: bool) -> dict:
    """lm-eval's results for one model: simple_evaluate on the built task objects."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from unittest import mock

    # HFLM ties the weights of the model it is given again: they are tied already, and tying fails on a
    # peft model whose embeddings carry trained token rows (a chat template's new tokens)
    with lm_eval_quiet(verbose), mock.patch.object(model, "tie_weights", lambda *args, **kwargs: None):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, mixed_precision_dtype=autocast,
                  add_bos_token=False if chat else None)
    with lm_eval_quiet(verbose):
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, apply_chat_template=chat,
                               bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sample_rows(run: dict, base: dict | None, name: str) -> list[dict]:
    theirs = {s["doc_id"]: s for s in (base or {}).get("samples", {}).get(name, [])}
    rows = []
    for s in run.get("samples", {}).get(name, []):
        scores = [k for k in s.get("metrics", []) if isinstance(s.get(k), (int, float))]  # chrF keeps pairs
        arguments = s.get("arguments") or [[None]]
        row = {"doc_id": s["doc_id"], "input": arguments[0][0], "target": s["target"],
               "response": s["filtered_resps"], **{k: s[k] for k in scores}}
        if s["doc_id"] in theirs:
            row["base_response"] = theirs[s["doc_id"]]["filtered_resps"]
            row.update({f"base_{k}": theirs[s["doc_id"]][k] for k in scores})
        rows.append(row)
    return rows


def write_results(run_dir: Path, summary: dict, run: dict, base: dict | None, about: dict) -> list[Path]:
    """RUN/eval/<task>.json and .samples.jsonl, each written whole then renamed."""
    folder = run_dir / "eval"
    folder.mkdir(exist_ok=True)
    written = []
    for name, result in summary.items():
        config = run.get("configs", {}).get(name) or {}
        doc = {"task": name, **about, "n_samples": run.get("n-samples", {}).get(name), **result,
               "dataset": config.get("dataset_path"), "config": config}
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        path = folder / f"{stem}.json"
        write_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")
        written.append(path)
        if rows := sample_rows(run, base, name):
            samples = folder / f"{stem}.samples.jsonl"
            write_atomic(samples, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
            written.append(samples)
    return written


def merge_metrics(run_dir: Path, summary: dict) -> dict | None:
    """`<task>/<metric>` (and `_stderr`, `_base`) added to RUN/metrics.json; None where the directory has
    none (a plain model directory)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    for name, result in summary.items():
        for metric, values in result["metrics"].items():
            for field, suffix in (("run", ""), ("run_stderr", "_stderr"), ("base", "_base")):
                key = f"{name}/{metric}{suffix}"
                if values.get(field) is not None:
                    metrics[key] = values[field]
                else:  # a number from an earlier evaluation would now be read as this one's
                    metrics.pop(key, None)
    write_atomic(path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


def update_card(run_dir: Path, recipe, metrics: dict) -> Path | None:
    """The model card rewritten with the merged metrics (as `finish_run` writes it), its model-index listing
    every evaluation in RUN/eval/."""
    if recipe is None or not (run_dir / "README.md").is_file():
        return None
    from huggingface_hub import EvalResult, ModelCard

    from finetune.hub.card import card_text

    card = ModelCard(card_text(recipe, run_dir, metrics, run_task(run_dir).usage(run_dir, recipe)))
    results = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("limit") is not None:
            continue
        config = doc.get("config") or {}
        # the Hub groups results by dataset type, config and split: a local file's task is its own dataset
        hub = doc.get("dataset") not in (None, "json", "csv", "parquet", "text", "arrow")
        where = dict(dataset_type=doc["dataset"], dataset_config=config.get("dataset_name")) if hub else \
            dict(dataset_type=doc["task"])
        for metric, values in (doc.get("metrics") or {}).items():
            if values.get("run") is not None:
                results.append(EvalResult(task_type="text-generation", task_name=doc["task"], dataset_name=doc["task"],
                                          dataset_split=config.get("test_split") or config.get("validation_split"),
                                          metric_type=metric, metric_value=values["run"], **where))
    if results:
        card.data.model_name = run_dir.name
        card.data.eval_results = results
    write_atomic(run_dir / "README.md", str(card))
    return run_dir / "README.md"


def evaluate_run(run: str | Path, tasks: list[str] | None = None, data: list[str | Path] | None = None,
                 baseline: bool = False, batch_size: str | int = 8, limit: int | float | None = None,
                 max_new_tokens: int | None = None, verbose: bool = False,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """Score a run (and its base with `baseline`) on lm-eval tasks by name, task YAML files (`tasks`) and
    local data files (`data`). Returns {"tasks": eval_tasks.combine(...), "files": [...], "seconds": {...},
    "precision": str}."""
    import tempfile

    run_dir = Path(run)
    recipe = check_run(run_dir)
    names, files = eval_tasks.split_tasks(tasks)
    data_files = [Path(d) for d in data or []]
    if not (names or files or data_files):
        raise UserError("--tasks: nothing to evaluate; give lm-eval task names or task files (--tasks "
                        "arc_easy,my_task.yaml) or a local data file (--data qa.jsonl)")
    for f in files:
        eval_tasks.check_yaml_task(f)
    batch = batch_value(batch_size)
    if baseline:
        check_baseline(run_dir, recipe)

    from transformers import AutoTokenizer

    from finetune.data.masks import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = (run_dir / "chat.json").is_file() or (recipe is None and bool(tokenizer.chat_template))
    stop_ids = end_of_turn_ids(tokenizer) if chat else []
    stops = [tokenizer.decode([t]) for t in stop_ids]

    from lm_eval import __version__ as lm_eval_version
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="finetune-eval-") as tmp:
        taken = set(names)
        specs: list = [eval_tasks.data_task(p, eval_tasks.task_name(p, taken), Path(tmp), chat, stops, max_new_tokens,
                                            lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
                       for p in data_files]
        specs += [str(f) for f in files]
        with lm_eval_quiet(verbose):  # the full index of lm-eval's tasks takes ~6 s: only for names
            manager = TaskManager(include_defaults=bool(names))
        if names:
            eval_tasks.check_names(names, manager.all_tasks)
            specs += eval_tasks.expand(names, manager.all_tasks)
        with lm_eval_quiet(verbose):
            built = eval_tasks.top_level(eval_tasks.load(manager, specs))  # their data read before any model loads
        top = [getattr(t, "task_name", None) or t.name for t in built]

        device, kwargs, autocast = device_and_kwargs(recipe)
        seconds, base_result = {}, None
        from finetune.models.adapters import is_adapter_dir

        lora = is_adapter_dir(run_dir)
        if baseline and not lora:
            log(f"evaluating the base {recipe.model.name} on {', '.join(top)} ...")
            start = time.perf_counter()
            model = place(load_base(recipe, tokenizer, kwargs), device, stop_ids)
            base_result = score(model, tokenizer, built, manager, chat, batch, limit, autocast, verbose)
            seconds["base"] = time.perf_counter() - start
            del model
        start = time.perf_counter()
        model = place(run_task(run_dir).load_trained(run_dir, **kwargs), device, stop_ids)
        if baseline and lora:
            log(f"evaluating the base (the run's adapter disabled) on {', '.join(top)} ...")
            with model.disable_adapter():
                base_result = score(model, tokenizer, built, manager, chat, batch, limit, autocast, verbose)
            seconds["base"] = time.perf_counter() - start
            start = time.perf_counter()
        model = for_inference(model)
        log(f"evaluating {run_dir} on {', '.join(top)} ({precision(model, autocast)}) ...")
        run_result = score(model, tokenizer, built, manager, chat, batch, limit, autocast, verbose)
        seconds["run"] = time.perf_counter() - start

    summary = eval_tasks.combine(top, run_result, base_result)
    about = {"run": str(run_dir), "lm_eval": lm_eval_version, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "precision": precision(model, autocast), "chat_template": chat, "limit": limit, "seconds": seconds}
    written = write_results(run_dir, summary, run_result, base_result, about)
    # scores of the first --limit rows are a quick look, not the run's result: metrics.json and the card keep
    # only whole evaluations
    metrics = merge_metrics(run_dir, summary) if limit is None else None
    if metrics is not None:
        written.append(run_dir / "metrics.json")
        if card := update_card(run_dir, recipe, metrics):
            written.append(card)
    return {"tasks": summary, "files": written, "seconds": seconds, "precision": about["precision"]}


def evaluate_after_run(recipe) -> None:
    """train.eval_tasks: score the finished run (on the process that owns the run directory, after training).
    A failed evaluation is reported and leaves the run finished: `finetune eval RUN` can try again."""
    if not recipe.train.eval_tasks:
        return
    from finetune.errors import UserError

    items = list(recipe.train.eval_tasks)
    data = [t for t in items if t.endswith(".jsonl")]
    tasks = [t for t in items if t not in data]
    print(f"eval: {', '.join(items)} (train.eval_tasks)", flush=True)
    try:
        result = evaluate_run(recipe.output_dir, tasks or None, data or None)
    except UserError as e:
        for problem in e.problems:
            print(f"warning: train.eval_tasks: {problem}; the run is finished: score it later with "
                  f"finetune eval {recipe.output_dir}", flush=True)
        return
    for line in eval_tasks.table(result["tasks"]):
        print(line, flush=True)
    print("results: " + ", ".join(str(p) for p in result["files"]), flush=True)
