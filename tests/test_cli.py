"""The command line: bad input ends in one line per problem, exit code 2, no traceback, no lost work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli, invoke, write_jsonl


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_help_imports_no_torch_or_transformers():
    code = ("import sys; sys.argv = ['finetune', '--help']\n"
            "from finetune.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'trl') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
    assert "HEAVY []" in out
    assert "lora" in out and "pretrain" in out


def test_missing_data_file(tiny_gpt, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "r"))
    assert code == 2
    assert errors(stderr) == [f"error: data.train: no such file '{tmp_path / 'nope.jsonl'}'"]
    assert "Traceback" not in stderr
    assert not (tmp_path / "r").exists()


def test_unknown_set_key_with_suggestion(tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", str(tmp_path / "r"),
                             "--set", "train.lerning_rate=1e-3", "--set", "lora.rank=4")
    assert code == 2
    assert sorted(errors(stderr)) == ["error: lora.rank: unknown key",
                                      "error: train.lerning_rate: unknown key (did you mean 'learning_rate'?)"]


def test_unknown_flag_suggests_the_right_one(tiny_gpt):
    code, stdout, stderr = invoke("lora", "--modle", tiny_gpt)
    assert code == 2
    assert "No such option: --modle" in stderr and "--model" in stderr


def test_wrong_type(tiny_gpt, toy_text):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "--set", "train.batch_size=big")
    assert code == 2
    assert errors(stderr) == ["error: train.batch_size: input should be a valid integer, unable to parse string "
                              "as an integer, got 'big'"]


def test_missing_text_column_lists_columns(tiny_gpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 10)
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", data, "-o", str(tmp_path / "r"))
    assert code == 2
    assert errors(stderr) == [f"error: data.train '{data}': no column for any format; its columns are: prompt, "
                              "response. Provide 'text' (plain text), 'prompt' and 'completion', or 'messages' "
                              "(role/content turns); or set data.text_column, data.prompt_column, "
                              "data.completion_column or data.messages_column to yours"]
    assert not (tmp_path / "r").exists()


def test_empty_dataset(tiny_gpt, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", str(tmp_path / "empty.txt"))
    assert code == 2
    assert errors(stderr)[0].startswith(f"error: data.train: ")
    assert "empty.txt" in errors(stderr)[0]


def test_model_path_that_does_not_exist(toy_text):
    code, _, stderr = invoke("lora", "--model", "./no/such/model", "--data", toy_text)
    assert code == 2
    assert errors(stderr) == ["error: model.name: no such directory './no/such/model'"]


def test_hub_id_offline_fails_fast(toy_text):
    start = time.perf_counter()
    code, _, stderr = invoke("lora", "--model", "someone/not-cached-model", "--data", toy_text)
    assert time.perf_counter() - start < 10
    assert code == 2
    assert errors(stderr) == ["error: model.name: 'someone/not-cached-model' is not a local directory, and offline "
                              "mode is on (HF_HUB_OFFLINE=1) with no cached copy; pass a directory written by "
                              "save_pretrained, or go online"]


def test_model_dir_without_tokenizer(tiny_gpt, toy_text, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_gpt}/{f}", bare / f)
    code, _, stderr = invoke("lora", "--model", str(bare), "--data", toy_text)
    assert code == 2
    assert errors(stderr) == [f"error: model.name: directory '{bare}' has no tokenizer; pass "
                              "--set model.tokenizer=<directory or Hub id> (or save one into it)"]


def test_existing_run_is_refused_and_survives(tiny_gpt, toy_text, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("task: clm\n")
    (run / "adapter_model.safetensors").write_bytes(b"precious")
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", str(run), "--max-steps", "1")
    assert code == 2
    assert errors(stderr) == [f"error: --output: '{run}' already holds a run; pass --overwrite to replace it, "
                              "or choose another --output"]
    assert (run / "adapter_model.safetensors").read_bytes() == b"precious"


def test_non_run_directory_is_never_replaced(tiny_gpt, toy_text, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", str(tmp_path), "--overwrite")
    assert code == 2
    assert errors(stderr) == [f"error: --output: '{tmp_path}' is not empty and is not a finetune run (it holds "
                              "notes.txt); finetune only ever replaces its own runs: choose another --output"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_without_checkpoint(tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", str(tmp_path / "r"), "--resume")
    assert code == 2
    assert errors(stderr) == [f"error: --resume: '{tmp_path / 'r'}' holds no finetune run (no recipe.yaml); "
                              "start one there without --resume"]


def test_debug_shows_the_traceback(toy_text):
    with pytest.raises(Exception) as e:
        from typer.testing import CliRunner

        from finetune.cli.app import app

        result = CliRunner().invoke(app, ["lora", "--model", "./no/such", "--data", toy_text, "--debug"],
                                    catch_exceptions=False)
        assert result.exit_code != 0
    assert "no such directory" in str(e.value)


def test_validate_reports_every_problem_at_once(tiny_gpt_nopad, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on the mat."}] * 20 + [{"text": "  "}] * 2)
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt_nopad, "--data", data, "--set", "data.max_length=4")
    assert code == 2
    assert errors(stderr) == [f"error: data.train: 2 empty texts (rows 21, 22 of '{data}'); remove them "
                              "(training skips them)"]
    assert "recipe: ok" in stdout
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "the cat sat on the mat."}] * 20)
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt_nopad, "--data", ok, "--set", "data.max_length=4")
    assert code == 0, stderr
    assert "<|pad|>" not in stdout  # eos pads causal-LM training: nothing to add
    assert "20 examples (100.0%) exceed data.max_length=4 and will be split" in stdout  # packing: the default
    assert "packing: whole examples packed into rows of 4 tokens (exact" in stdout
    assert "\ndata: ok\n" in stdout
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt_nopad, "--data", ok, "--set", "data.max_length=4",
                                  "--set", "data.packing=false")
    assert code == 0, stderr
    assert "20 examples (100.0%) exceed data.max_length=4 and will be cut (data.packing: true splits them" in stdout
    assert "packing: whole examples" not in stdout


def test_validate_refuses_max_length_beyond_context(tiny_gpt, toy_text):
    code, _, stderr = invoke("validate", "--model", tiny_gpt, "--data", toy_text, "--set", "data.max_length=4096")
    assert code == 2
    assert errors(stderr) == ["error: data.max_length: 4096 exceeds the model's context of 128 tokens; "
                              "set data.max_length <= 128"]


def test_recipes_list_show_copy(tmp_path):
    code, stdout, _ = invoke("recipes", "list")
    assert code == 0 and "tiny-gpt-lora-animal-qa" in stdout
    code, stdout, _ = invoke("recipes", "show", "tiny-gpt-lora-animal-qa")
    assert code == 0 and stdout.startswith("# ")
    code, stdout, _ = invoke("recipes", "copy", "tiny-gpt-lora-animal-qa", str(tmp_path))
    assert code == 0 and (tmp_path / "tiny-gpt-lora-animal-qa.yaml").exists()
    code, _, stderr = invoke("recipes", "copy", "tiny-gpt-lora-animal-qa", str(tmp_path))
    assert code == 2 and "already exists" in stderr
    code, _, stderr = invoke("recipes", "show", "tiny-gpt-lora-animal-q")
    assert code == 2 and "(did you mean 'tiny-gpt-lora-animal-qa'?)" in stderr


def test_env_reports_offline():
    from finetune import __version__

    code, stdout, _ = invoke("env")
    assert code == 0 and "offline mode" in stdout and "transformers" in stdout
    assert stdout.splitlines()[0] == f"{'finetune':<14} {__version__}"  # the distribution is finetune-toolkit
    assert "GiB free (" in stdout


def test_two_processes_train_on_disjoint_data_and_write_once(tiny_gpt_lm, toy_qa_text, tmp_path):
    """`--num-processes 2` really starts two ranks (gloo on CPU); each sees its own batches."""
    probe = tmp_path / "probe"
    probe.mkdir()
    # sitecustomize runs in every rank: it records the rows each rank's dataloader hands out.
    (probe / "sitecustomize.py").write_text(
        "import os, json\n"
        "if os.environ.get('FINETUNE_CHILD') == '1':\n"
        "    import transformers.trainer as T\n"
        "    orig = T.Trainer.training_step\n"
        "    def step(self, model, inputs, *a, **k):\n"
        "        rank = os.environ.get('RANK', '?')\n"
        "        with open(os.path.join(os.environ['PROBE_DIR'], f'rank{rank}.jsonl'), 'a') as f:\n"
        "            f.write(json.dumps(inputs['input_ids'].tolist()) + '\\n')\n"
        "        return orig(self, model, inputs, *a, **k)\n"
        "    T.Trainer.training_step = step\n")
    import os

    env_path = os.pathsep.join([str(probe), REPO, os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "finetune", "lora", "--model", tiny_gpt_lm, "--data", toy_qa_text,
                           "-o", str(out), "--max-steps", "4", "--num-processes", "2",
                           "--set", "train.batch_size=4", "--set", "data.max_samples=64",
                           "--set", "train.logging_steps=1",
                           "--set", "data.packing=false"],  # 64 texts packed make too few rows for 2x4x4
                          env={**os.environ, "PYTHONPATH": env_path, "PROBE_DIR": str(probe)},
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for rank in ("0", "1"):
        batches = [json.loads(line) for line in (probe / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(batches) == 4
        rows[rank] = {tuple(r) for b in batches for r in b}
    assert rows["0"].isdisjoint(rows["1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # one writer, each step once


def test_peft_note_on_saving_grown_embeddings_is_not_shown():
    """A LoRA run whose chat template added tokens: peft's note at each save says nothing to act on."""
    import warnings

    from finetune.cli.common import guarded

    def save():
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", UserWarning)
        warnings.warn("something else", UserWarning)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        guarded(False, save)
    assert [str(w.message) for w in shown] == ["something else"]
