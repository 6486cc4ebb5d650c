"""Translation: a tiny T5 learns a word-for-word English->"German" mapping and translates sentences
it never saw; LoRA moves only its adapters; a saved run translates exactly like the trained model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import invoke, write_jsonl

COLOURS = {"red": "rot", "blue": "blau", "green": "gruen", "black": "schwarz", "white": "weiss", "yellow": "gelb",
           "brown": "braun", "grey": "grau"}
ANIMALS = {"cat": "katze", "dog": "hund", "bird": "vogel", "fish": "fisch", "horse": "pferd", "mouse": "maus",
           "cow": "kuh", "fox": "fuchs"}
VERBS = {"sees": "sieht", "likes": "mag", "finds": "findet", "wants": "will", "paints": "malt", "builds": "baut"}
PLACES = {"house": "haus", "tree": "baum", "boat": "boot", "car": "auto", "bed": "bett", "box": "kiste",
          "roof": "dach", "door": "tuer"}


def pair(colour, animal, verb, place) -> dict:
    return {"source": f"the {colour} {animal} {verb} the {place}",
            "target": f"die {COLOURS[colour]} {ANIMALS[animal]} {VERBS[verb]} das {PLACES[place]}"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory) -> dict[str, str]:
    """600 training pairs and 40 evaluation pairs whose word combinations never occur in training."""
    combos = [(c, a, v, p) for c in COLOURS for a in ANIMALS for v in VERBS for p in PLACES]
    random.Random(0).shuffle(combos)
    root = tmp_path_factory.mktemp("translation-data")
    return {"train": write_jsonl(root / "train.jsonl", [pair(*c) for c in combos[:600]]),
            "eval": write_jsonl(root / "eval.jsonl", [pair(*c) for c in combos[600:640]])}


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    """A 2-layer T5 (d_model 64) with a word-level tokenizer that appends </s> as T5's does."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for words in (COLOURS, ANIMALS, VERBS, PLACES):
        for en, de in words.items():
            vocab.setdefault(en, len(vocab))
            vocab.setdefault(de, len(vocab))
    for word in ["the", "die", "das", "translate", "English", "to", "German:"]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def full_run(tiny_t5, toy_pairs, tmp_path_factory) -> Path:
    """The shipped tiny recipe, with this session's model and data."""
    out = tmp_path_factory.mktemp("runs") / "t5-full"
    code, _, stderr = invoke("full", "tiny-t5-full-toy-pairs", "--model", tiny_t5, "--data", toy_pairs["train"],
                             "--eval-data", toy_pairs["eval"], "-o", out)
    assert code == 0, stderr
    return out


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_full_translation_learns_the_mapping_on_unseen_sentences(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["eval_bleu"] >= 50, metrics
    assert metrics["eval_chrf"] >= 70, metrics
    losses = [r["loss"] for r in rows(full_run / "log.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] / 5
    for name in ("recipe.yaml", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (full_run / name).is_file(), name
    assert "translate English to German: " in (full_run / "README.md").read_text()


def test_translate_command_on_texts_and_a_file(full_run, toy_pairs, tmp_path):
    held_out = rows(toy_pairs["eval"])[:2]
    code, stdout, stderr = invoke("translate", full_run, held_out[0]["source"], held_out[1]["source"])
    assert code == 0, stderr
    assert stdout.splitlines() == [held_out[0]["target"], held_out[1]["target"]]

    out = tmp_path / "translations.jsonl"
    code, stdout, _ = invoke("translate", full_run, "--data", toy_pairs["eval"], "-o", out, "--num-beams", "1")
    written = rows(out)
    assert code == 0 and f"wrote 40 lines to {out}" in stdout
    assert [r["source"] for r in written] == [r["source"] for r in rows(toy_pairs["eval"])]
    exact = sum(r["translation"] == r["reference"] for r in written) / len(written)
    assert exact >= 0.8
    assert "against the 40 references: BLEU" in stdout

    txt = tmp_path / "texts.txt"
    txt.write_text(held_out[0]["source"] + "\n")
    code, stdout, _ = invoke("translate", full_run, "--data", txt)
    assert code == 0 and stdout.strip() == held_out[0]["target"]


def test_lora_moves_adapters_only_and_reloads_identically(tiny_t5, toy_pairs, tmp_path):
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from finetune.recipe.load import build_recipe
    from finetune.tasks import translation

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    capture = Capture()
    recipe = build_recipe({"task": "translation", "method": "lora", "model": {"name": tiny_t5},
                           "data": {"train": toy_pairs["train"], "eval": toy_pairs["eval"]},
                           "translation": {"source_lang": "en", "target_lang": "de", "num_beams": 1,
                                           "max_target_length": 16},
                           "lora": {"r": 8, "target_modules": ["q", "v"]},
                           "train": {"output_dir": str(tmp_path / "lora"), "max_steps": 10, "batch_size": 16,
                                     "learning_rate": 1e-2}})
    translation.run(recipe, callbacks=[capture])
    model = capture.model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), capture.before[name])
        assert moved == (name in trainable), name

    run_dir = tmp_path / "lora"
    assert (run_dir / "adapter_config.json").is_file() and not (run_dir / "model.safetensors").exists()
    reloaded = translation.load_trained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    sources = ["translate English to German: " + r["source"] for r in rows(toy_pairs["eval"])[:8]]
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        labels = tokenizer(text_target=[r["target"] for r in rows(toy_pairs["eval"])[:8]], return_tensors="pt",
                           padding=True)["input_ids"]
        assert torch.allclose(model(**batch, labels=labels).logits, reloaded(**batch, labels=labels).logits,
                              atol=1e-5)
        assert torch.equal(model.generate(**batch), reloaded.generate(**batch))
    by_command = translation.translate(run_dir, [r["source"] for r in rows(toy_pairs["eval"])[:8]], None)
    with torch.no_grad():
        expected = tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
    assert [r["translation"] for r in by_command] == [t.strip() for t in expected]


def test_bad_translation_inputs_exit_2_with_the_fix(tiny_t5, toy_pairs, tmp_path):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"en": "the red cat", "de": "die rot katze"}] * 4)
    train = ("full", "--task", "translation", "--model", tiny_t5, "-o", tmp_path / "r", "--data")
    code, _, stderr = invoke(*train, wrong)
    assert code == 2
    assert errors(stderr) == [
        f"error: translation.source_column: no column 'source' in data.train '{wrong}'; its columns are: en, de. "
        "Set translation.source_column to one of them",
        f"error: translation.target_column: no column 'target' in data.train '{wrong}'; its columns are: en, de. "
        "Set translation.target_column to one of them"]
    assert not (tmp_path / "r").exists()  # nothing written before the inputs are checked

    nested = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"en": "the red cat", "de": "die rot katze"}}] * 4)
    code, _, stderr = invoke(*train, nested)
    assert code == 2
    assert errors(stderr) == [(f"error: data.train: '{nested}' holds a `translation` column of language pairs; set "
                              "translation.source_lang and translation.target_lang (e.g. en and de) to pick one")]
    code, _, stderr = invoke("validate", "--task", "translation", "--model", tiny_t5, "--data", nested,
                             "--set", "translation.source_lang=en", "--set", "translation.target_lang=fr")
    assert code == 2
    assert errors(stderr) == [(f"error: translation.target_lang: no 'fr' texts in the `translation` column of "
                              f"data.train '{nested}'; its languages are: de, en")]
    code, stdout, _ = invoke("validate", "--task", "translation", "--model", tiny_t5, "--data", nested,
                             "--set", "translation.source_lang=en", "--set", "translation.target_lang=de")
    assert code == 0 and "source prefix 'translate English to German: '" in stdout and "data: ok" in stdout

    code, _, stderr = invoke("translate", tmp_path / "missing-run", "hello")
    assert code == 2 and errors(stderr) == [f"error: run: no such directory '{tmp_path / 'missing-run'}'"]
