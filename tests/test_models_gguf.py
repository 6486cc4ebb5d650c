"""GGUF files as models: a tiny llama written here with the `gguf` package is converted once into a cached
plain folder that loads exactly as transformers reads the GGUF, is reused afterwards, fails with one clear
line for what transformers cannot read, and trains end to end with `finetune lora --model x.gguf`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke, write_jsonl

gguf = pytest.importorskip("gguf")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGES = ["t h", "th e", "Ġ t", "Ġt h", "Ġth e", "a t", "Ġ c", "Ġc at", "Ġ s", "Ġs at"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_gguf(path: Path, arch: str = "llama") -> str:
    """A 2-layer llama (hidden 64, 4 heads, 2 kv heads, F32) with a byte-level BPE tokenizer of 269 tokens
    and a chat template, in llama.cpp's tensor and metadata names."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + SPECIAL
    vocab, hidden, layers, heads, kv_heads, ffn = len(tokens), 64, 2, 4, 2, 128
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - len(SPECIAL)) + [3] * len(SPECIAL))  # 3: control (special) tokens
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def test_converted_folder_loads_as_transformers_reads_the_gguf(tiny_gguf, cache, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models.gguf import plain_model

    folder = plain_model(tiny_gguf, None)
    assert Path(folder).parent == cache and Path(folder).name.startswith("tiny-llama.F32-")
    assert capsys.readouterr().out == (f"model: converted {tiny_gguf} (GGUF, llama) to a plain model in {folder} "
                                       "(once; later runs reuse it)\n")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert "quantization_config" not in config and "_model_name_or_path" not in config

    directory, name = os.path.split(tiny_gguf)
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 70, 257, 263, 265, 3, 200, 266]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, reference(ids).logits, atol=1e-6)

    tok, ref_tok = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert tok.chat_template == CHATML
    chat = [{"role": "user", "content": "the cat sat"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(chat, add_generation_prompt=True)
    assert tok.convert_ids_to_tokens(tok("the cat sat").input_ids) == ["the", "Ġcat", "Ġsat"]
    assert tok.eos_token == "<|im_end|>"


def test_second_call_reuses_the_folder_and_a_changed_file_converts_again(tiny_gguf, cache, capsys, monkeypatch,
                                                                          tmp_path):
    import shutil

    from finetune.models import gguf as finetune_gguf

    folder = finetune_gguf.plain_model(tiny_gguf, None)
    capsys.readouterr()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(finetune_gguf, "convert", no_conversion)
        assert finetune_gguf.plain_model(tiny_gguf, None) == folder
        # the same file named as model.gguf_file inside its folder is the same entry
        directory, name = os.path.split(tiny_gguf)
        assert finetune_gguf.plain_model(directory, name) == folder
    assert capsys.readouterr().out == ""
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    copy = tmp_path / "tiny-llama.F32.gguf"  # another file (same name, other place): its own entry
    shutil.copy(tiny_gguf, copy)
    assert finetune_gguf.plain_model(str(copy), None) != folder


def test_what_transformers_cannot_read_is_one_line(tmp_path, cache, monkeypatch):
    from finetune.errors import UserError
    from finetune.models.gguf import plain_model, supported_architectures

    rwkv = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(UserError) as e:
        plain_model(rwkv, None)
    readable = supported_architectures()
    assert {"llama", "qwen2", "mistral", "gemma2"} <= set(readable) and "general" not in readable
    assert e.value.problems == [f"model.name: '{rwkv}' holds a 'rwkv6' model, which transformers cannot read from "
                                f"GGUF; it reads {', '.join(readable)}"]

    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(UserError, match=r"^model.name: '.*fake.gguf' is not a GGUF file \(it does not start"):
        plain_model(str(fake), None)
    with pytest.raises(UserError, match=r"^model.gguf_file: no such file 'missing.gguf' in folder"):
        plain_model(str(tmp_path), "missing.gguf")

    monkeypatch.setitem(sys.modules, "gguf", None)  # the package not installed
    with pytest.raises(UserError, match=r"needs the gguf package: pip install gguf$"):
        plain_model(rwkv, None)
    assert not cache.exists() or not any(cache.iterdir())


def test_lora_and_validate_on_a_gguf_file(tiny_gguf, cache, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"the cat sat {i}"},
                          {"role": "assistant", "content": "the cat sat."}]} for i in range(24)]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    code, stdout, stderr = invoke("lora", "--model", tiny_gguf, "--data", data, "--max-steps", "2",
                                  "-o", tmp_path / "run", "--set", "train.batch_size=4")
    assert code == 0, stdout + stderr
    assert stdout.count("model: converted") == 1  # converted once, for the pre-flight, the tokenizer and the model
    run = tmp_path / "run"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(run))
    base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).parent == cache  # the plain folder: generate, chat and merge load it like any model

    code, stdout, stderr = invoke("generate", run, "the cat", "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0, stdout + stderr

    code, stdout, stderr = invoke("validate", "--model", tiny_gguf, "--data", data)
    assert code == 0, stdout + stderr
    assert "data: ok" in stdout and "model: converted" not in stdout


def test_gguf_file_in_a_hub_repo_is_the_recipe_field(tiny_gguf, cache, monkeypatch, tmp_path):
    """model.name a Hub repo and model.gguf_file a file in it: fetched through the Hub cache (faked here,
    offline), keyed by repo, file, revision and snapshot, and read by every loader of the recipe's model."""
    import shutil

    import huggingface_hub

    from finetune.errors import UserError
    from finetune.models import pretrained
    from finetune.recipe.sections import ModelSpec

    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_gguf, snapshot / "tiny.Q8_0.gguf")
    asked = []

    def fake_download(repo, filename, revision=None, local_files_only=False):
        asked.append((repo, filename, revision, local_files_only))
        if not (snapshot / filename).is_file():
            raise FileNotFoundError(f"{filename} is not in the cache")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = ModelSpec(name="someone/tiny-GGUF", gguf_file="tiny.Q8_0.gguf")
    config = pretrained.load_config(spec)
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    assert asked == [("someone/tiny-GGUF", "tiny.Q8_0.gguf", None, True)]  # offline: the Hub cache only
    folder = pretrained.model_source(spec)
    assert Path(folder).parent == cache and Path(folder).name.startswith("tiny.Q8_0-")
    assert pretrained.tokenizer_source(spec) == folder
    assert pretrained.model_source(ModelSpec(name="someone/tiny-GGUF", gguf_file="tiny.Q8_0.gguf",
                                         revision="v2")) != folder  # another revision: another entry
    with pytest.raises(UserError, match=r"^model.gguf_file: could not get 'other.gguf' from the Hub repo "
                                        r"'someone/tiny-GGUF': .* with no cached copy$"):
        pretrained.model_source(ModelSpec(name="someone/tiny-GGUF", gguf_file="other.gguf"))
