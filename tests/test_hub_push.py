"""`finetune push` / train.push_to_hub (finetune/hub/push.py), against a fake huggingface_hub API object:
the selection has the model, tokenizer, card, recipe, metrics and log, never checkpoints or secrets."""

from __future__ import annotations

import json

import pytest

from conftest import invoke
from finetune.errors import UserError
from finetune.hub.push import files_to_push, push_problems, push_run


class FakeApi:
    """Records what would reach the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))

    def upload_file(self, **kw):
        self.calls.append(("upload_file", kw["repo_id"], kw))


def make_run(root):
    run = root / "run"
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "checkpoints/checkpoint-10/adapter_model.safetensors",
                 "checkpoints/checkpoint-10/training_args.bin", "training_args.bin", "optimizer.pt"):
        (run / name).write_bytes(b"\0weights")
    for name in ("adapter_config.json", "tokenizer.json", "tokenizer_config.json", "recipe.yaml", "log.jsonl",
                 "curves.png", "notes.txt"):
        (run / name).write_text("{}")
    (run / "metrics.json").write_text(json.dumps({"steps": 10}))
    (run / "README.md").write_text(f'---\nlibrary_name: peft\n---\nmodel = X.from_pretrained("{run}")\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    return run


def test_selection_excludes_checkpoints_and_secrets(tmp_path):
    run = make_run(tmp_path)
    assert files_to_push(run) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "curves.png",
                                  "log.jsonl", "metrics.json", "recipe.yaml", "tokenizer.json",
                                  "tokenizer_config.json"]
    (run / "tokenizer_config.json").write_text('{"token": "hf_' + "a" * 34 + '"}')
    with pytest.raises(UserError, match="tokenizer_config.json' contains a Hugging Face token"):
        files_to_push(run)


def test_push_uploads_the_selection_and_a_card_for_the_hub(tmp_path):
    run = make_run(tmp_path)
    api = FakeApi()
    url = push_run(run, "me/tiny", private=True, revision="v1", api=api)
    assert url == "https://huggingface.co/me/tiny"
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["branch"] == "v1"
    upload = api.calls[2][2]
    assert "README.md" not in upload["allow_patterns"] and "adapter_model.safetensors" in upload["allow_patterns"]
    assert not any(p.startswith("checkpoints") or p.endswith(".bin") for p in upload["allow_patterns"])
    assert "checkpoints/*" in upload["ignore_patterns"] and upload["revision"] == "v1"
    card = api.calls[3][2]["path_or_fileobj"].decode()
    assert 'from_pretrained("me/tiny")' in card and str(run) not in card


def test_unfinished_run_is_refused(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.json").unlink()
    code, out, err = invoke("push", str(run), "me/tiny")
    assert code == 2
    assert f"error: run: '{run}' is not a finished run (no metrics.json)" in err


def test_offline_or_without_token_fails_before_training(tiny_gpt, toy_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push_problems("train.push_to_hub") == [
        "train.push_to_hub: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1); pushing needs a connection"]
    code, out, err = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "run",
                            "--set", "train.push_to_hub=me/tiny")
    assert code == 2 and "error: train.push_to_hub: the Hugging Face Hub is unreachable" in err
    assert not (tmp_path / "run").exists()
    import finetune.launch.offline
    import huggingface_hub

    monkeypatch.setattr(finetune.launch.offline, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert push_problems("push") == ["push: no Hugging Face token; set HF_TOKEN or run `hf auth login` (a token "
                                     "with write access)"]


def test_exports_go_up_as_they_are(tmp_path):
    """A .gguf file, an Ollama folder (its GGUF and Modelfile) and a vLLM folder (a model without a recipe)."""
    gguf = tmp_path / "sft.q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "other.txt").write_text("not this")
    assert files_to_push(gguf) == ["sft.q8_0.gguf"]
    api = FakeApi()
    push_run(gguf, "me/sft-gguf", api=api)
    upload = api.calls[-1][2]
    assert upload["folder_path"] == str(tmp_path) and upload["allow_patterns"] == ["sft.q8_0.gguf"]
    ollama = tmp_path / "sft-ollama"
    ollama.mkdir()
    (ollama / "sft.q8_0.gguf").write_bytes(b"GGUF")
    (ollama / "Modelfile").write_text("FROM ./sft.q8_0.gguf\n")
    (ollama / "notes.txt").write_text("x")
    assert files_to_push(ollama) == ["Modelfile", "sft.q8_0.gguf"]
    vllm = tmp_path / "sft-vllm"
    vllm.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        (vllm / name).write_text("{}")
    (vllm / "model.safetensors").write_bytes(b"\0")
    assert files_to_push(vllm) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is a file but not a .gguf export"):
        files_to_push(tmp_path / "notes.txt")
