"""The tasks `finetune eval` runs through lm-evaluation-harness: lm-eval names, task YAML files, and the
`--data FILE` shorthand, each checked before a model is loaded.

`--data qa.jsonl` becomes an lm-eval task config built here (lm-eval's TaskManager takes a dict as it takes a
YAML file), over a normalised copy of the rows in a temporary folder:
  - rows with `prompt` and `reference`: generate_until, greedy, scored by exact match (surrounding whitespace
    ignored) and chrF;
  - rows with `prompt` (or `question`), `choices` and `answer` (an index or the text of a choice):
    multiple_choice, each choice scored by its log-likelihood after the prompt (acc, and acc_norm, which
    divides by the choice's length in characters).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from finetune.errors import UserError

GENERATE_COLUMNS = ("prompt", "reference")
CHOICE_COLUMNS = ("prompt", "choices", "answer")
SHAPES = "every row needs 'prompt' and 'reference' (generation) or 'prompt', 'choices' and 'answer' (multiple choice)"


def task_name(path: Path, taken: set[str]) -> str:
    """The file's stem as a task name (the name of RUN/eval/<name>.json), made unique."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "data"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def read_rows(path: Path, key: str) -> list[dict]:
    """The rows of a .jsonl file (or a .json list), with their line numbers in `_line`."""
    if not path.is_file():
        raise UserError(f"{key}: no such file '{path}'")
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [{**r, "_line": n} if isinstance(r, dict) else r for n, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise UserError(f"{key} '{path}': not JSON ({e.msg} at line {e.lineno}); give a .jsonl file") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{key} '{path}' line {n}: not JSON ({e.msg}); one JSON object per line") from e
        rows.append({**row, "_line": n} if isinstance(row, dict) else row)
    return rows


def first_problem(path: Path, key: str, problems: list[str]) -> None:
    """One line: the first bad row (a file with a missing column has it missing in every row)."""
    if problems:
        more = f" (and {len(problems) - 1} more rows)" if len(problems) > 1 else ""
        raise UserError(f"{key} '{path}' {problems[0]}{more}")


def normalise(rows: list[dict], path: Path, key: str) -> tuple[str, list[dict]]:
    """("generate" | "choice", rows with prompt + reference, or prompt + choices + answer index)."""
    if not rows:
        raise UserError(f"{key}: '{path}' has no rows")
    kind = "choice" if isinstance(rows[0], dict) and "choices" in rows[0] else "generate"
    needed = CHOICE_COLUMNS if kind == "choice" else GENERATE_COLUMNS
    problems, out = [], []
    for i, row in enumerate(rows):
        where = f"line {row['_line']}" if isinstance(row, dict) else f"row {i + 1}"
        if not isinstance(row, dict):
            problems.append(f"{where}: not a JSON object; {SHAPES}")
            continue
        if "prompt" not in row and "question" in row:
            row = {**row, "prompt": row["question"]}
        missing = [c for c in needed if c not in row]
        if missing:
            problems.append(f"{where}: no {' or '.join(repr(c) for c in missing)} column; {SHAPES}")
            continue
        if not isinstance(row["prompt"], str):
            problems.append(f"{where}: 'prompt' is not a string")
            continue
        if kind == "generate":
            if not isinstance(row["reference"], str):
                problems.append(f"{where}: 'reference' is not a string")
                continue
            out.append({"prompt": row["prompt"], "reference": row["reference"]})
            continue
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            problems.append(f"{where}: 'choices' is not a list of two or more strings")
            continue
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            problems.append(f"{where}: 'answer' {json.dumps(answer)} is neither an index of 'choices' "
                            f"(0-{len(choices) - 1}) nor one of them")
            continue
        out.append({"prompt": row["prompt"], "choices": choices, "answer": answer})
    first_problem(path, key, problems)
    return kind, out


def data_task(path: Path, name: str, folder: Path, chat: bool, stops: list[str], max_new_tokens: int | None,
              count_tokens) -> dict[str, Any]:
    """The lm-eval config of a `--data` file: its rows normalised into `folder`. `stops`: strings that end an
    answer besides eos (a chat template's end of turn); `count_tokens(text)`: for the generation budget."""
    kind, rows = normalise(read_rows(path, "--data"), path, "--data")
    copy = folder / f"{name}.jsonl"
    copy.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    config: dict[str, Any] = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(copy)}},
        "test_split": "test", "doc_to_text": "{{prompt}}", "num_fewshot": 0, "metadata": {"version": 1.0,
                                                                                          "source": str(path)}}
    if kind == "choice":
        # a chat run's answer starts right after the template's generation prompt; a plain prompt is
        # continued after a space, as lm-eval's own multiple-choice tasks do
        return {**config, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}", "target_delimiter": "" if chat else " ",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    # a one-line answer ends at its newline; a multi-line one at eos or the end of the turn
    until = list(stops) + ([] if any("\n" in r["reference"] for r in rows) else ["\n"])
    budget = max_new_tokens or max(count_tokens(r["reference"]) for r in rows) + 8
    return {**config, "output_type": "generate_until", "doc_to_target": "{{reference}}",
            "generation_kwargs": {"until": until, "max_gen_toks": budget, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": [r"^\s+|\s+$"]},
                            {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}]}


def read_yaml(path: Path) -> dict:
    """A task YAML as plain data; lm-eval's own tags (`!function utils.process`) read as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError as e:
        raise UserError(f"--tasks '{path}': not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict) or not (data.get("task") or data.get("group") or data.get("include")):
        raise UserError(f"--tasks '{path}': not an lm-eval task file (no `task:` name)")
    return data


def template_columns(config: dict) -> set[str]:
    """The columns the prompt, target and choice templates of a task read."""
    import jinja2
    from jinja2 import meta

    env, found = jinja2.Environment(), set()
    for field in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = config.get(field)
        if isinstance(value, str) and "{" in value:
            try:
                found |= meta.find_undeclared_variables(env.parse(value))
            except jinja2.TemplateSyntaxError as e:
                raise UserError(f"{field}: not a valid Jinja template ({e.message})") from e
    return found


def check_yaml_task(path: Path) -> None:
    """A local task file: its local json data holds every column its templates read (lm-eval would fail
    on the first row without one, with a KeyError deep in a Jinja template)."""
    if not path.is_file():
        raise UserError(f"--tasks: no such file '{path}'")
    config = read_yaml(path)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") != "json" or not files:
        return
    if isinstance(files, dict):
        split = config.get("test_split") or config.get("validation_split")
        files = files.get(split) or [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    needed = sorted(template_columns(config))
    for name in files if isinstance(files, list) else [files]:
        data = Path(name)
        if not data.is_absolute() and not data.is_file() and (path.parent / data).is_file():
            raise UserError(f"--tasks '{path}': data file '{name}' is read from the current folder, not the task "
                            f"file's; give its absolute path or run from {path.parent}")
        problems = []
        for i, row in enumerate(read_rows(data, f"--tasks '{path}': data_files")):
            missing = [c for c in needed if not isinstance(row, dict) or c not in row]
            if missing:
                where = f"line {row['_line']}" if isinstance(row, dict) else f"row {i + 1}"
                problems.append(f"{where}: no {' or '.join(repr(c) for c in missing)} column, which the task's "
                                "templates read")
        first_problem(data, f"--tasks '{path}': data file", problems)


def split_tasks(tasks: list[str] | None) -> tuple[list[str], list[Path]]:
    """(lm-eval names, local task files) from --tasks values (each comma-separated)."""
    names, files = [], []
    for item in (t.strip() for value in tasks or [] for t in value.split(",")):
        if not item:
            continue
        if item.endswith((".yaml", ".yml")) or Path(item).is_file():
            files.append(Path(item))
        else:
            names.append(item)
    return names, files


def check_names(names: list[str], known: list[str]) -> None:
    """Every name is an lm-eval task, group or tag (or a glob matching some)."""
    import difflib
    import fnmatch

    for name in names:
        if name in known or (any(c in name for c in "*?[") and fnmatch.filter(known, name)):
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "`lm-eval ls tasks` lists the names it knows"
        raise UserError(f"--tasks: lm-eval knows no task '{name}'; {hint}")


def expand(names: list[str], known: list[str]) -> list[str]:
    import fnmatch

    out = []
    for name in names:
        out += [name] if name in known else sorted(fnmatch.filter(known, name))
    return out


def load(manager, specs: list) -> dict:
    """lm-eval's tasks built (their data read): a task whose data is only on the Hub fails here, offline."""
    from finetune.errors import first_line

    try:
        return manager.load(specs)
    except ConnectionError as e:
        raise UserError(f"--tasks: an lm-eval task's data set is not on this machine ({first_line(e)}); run it "
                        "once where the Hub is reachable (datasets keeps a copy), or evaluate on local data "
                        "(--data FILE or a task YAML with dataset_path: json)") from e
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(f"--tasks: lm-eval could not build a task: {first_line(e)}") from e


# ---------------------------------------------------------------------------------------
# lm-eval's results: per task and metric, run and base, and the table

def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def metrics_of(entry: dict) -> dict[str, tuple[float | None, float | None]]:
    """{metric: (value, stderr)} from an lm-eval results entry ("acc,none", "acc_stderr,none"); a filter
    other than none is kept in the name (exact_match/strict-match)."""
    out = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        label = metric if filt == "none" else f"{metric}/{filt}"
        out[label] = (number(value), number(entry.get(f"{metric}_stderr,{filt}")))
    return out


def top_level(loaded: dict) -> list:
    """The requested tasks and groups, not their members."""
    inner = set()
    for group in loaded["groups"].values():
        inner |= {t.task_name for t in group.get_all_tasks()} | {g.name for g in group.get_all_groups()}
    return [g for n, g in loaded["groups"].items() if n not in inner] + \
        [t for n, t in loaded["tasks"].items() if n not in inner]


def combine(names: list[str], run: dict, base: dict | None) -> dict[str, dict]:
    """{task: {metric: {run, run_stderr[, base, base_stderr, difference]}}}, groups with their subtasks."""
    def one(name: str) -> dict:
        ours = metrics_of(run["results"].get(name, {}))
        theirs = metrics_of(base["results"].get(name, {})) if base else {}
        out = {}
        for metric, (value, stderr) in ours.items():
            out[metric] = {"run": value, "run_stderr": stderr}
            if base is not None:
                b, b_err = theirs.get(metric, (None, None))
                diff = value - b if value is not None and b is not None else None
                out[metric].update(base=b, base_stderr=b_err, difference=diff)
        return out

    return {name: {"metrics": one(name), "subtasks": {s: one(s) for s in run.get("group_subtasks", {}).get(name, [])}}
            for name in names}


def fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}" if abs(value) <= 1 else f"{value:.2f}"
    if stderr is not None:
        text += f" ± {stderr:.4f}" if abs(value) <= 1 and stderr <= 1 else f" ± {stderr:.2f}"
    return text


def table(summary: dict) -> list[str]:
    """One row per task and metric: run (± stderr), and with a baseline: base, run and the difference."""
    with_base = any("base" in v for r in summary.values() for v in r["metrics"].values())
    cells = [["task", "metric"] + (["base", "run", "difference"] if with_base else ["value"])]
    for name, result in summary.items():
        for label, group in [(name, result["metrics"])] + [(f"  {s}", m) for s, m in result["subtasks"].items()]:
            for metric, v in group.items():
                row = [label, metric]
                if with_base:
                    diff = v.get("difference")
                    row += [fmt(v.get("base"), v.get("base_stderr")), fmt(v["run"], v["run_stderr"]),
                            "-" if diff is None else (f"{diff:+.4f}" if abs(diff) <= 1 else f"{diff:+.2f}")]
                else:
                    row.append(fmt(v["run"], v["run_stderr"]))
                cells.append(row)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
