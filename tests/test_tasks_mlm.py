"""Masked language modelling: masking statistics, pre-training from scratch, LoRA continued
pre-training, fill-mask, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import invoke, toy_sentences, write_jsonl


def errors(stderr: str) -> list[str]:
    """The `error: ...` lines of a command's stderr (progress bars are also written there)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bert_config(vocab_size: int | None = None, **kw):
    from transformers import BertConfig

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**({"vocab_size": vocab_size} if vocab_size else {}), **{**sizes, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlm-data") / "corpus.txt"
    path.write_text("\n".join(toy_sentences(600, seed=3)) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert_mlm(tmp_path_factory) -> str:
    """A 2-layer BERT masked LM (hidden 64, random weights) with a one-token-per-word BERT tokenizer
    (a trained WordPiece numbers its tokens differently in every process)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import BertForMaskedLM, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert-mlm")
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    words = sorted({w for t in toy_sentences(500, seed=1) for w, _ in split(t)})
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    torch.manual_seed(0)
    BertForMaskedLM(bert_config(len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_collator_labels_about_15_percent_of_tokens(tiny_bert_mlm):
    """15% of the non-special tokens carry labels; of those ~80% show [MASK], ~10% a random token,
    ~10% themselves; special tokens and padding never carry labels."""
    from transformers import AutoTokenizer

    from finetune.recipe.task_sections import MlmSpec
    from finetune.tasks.mlm import masking_collator

    tok = AutoTokenizer.from_pretrained(tiny_bert_mlm)
    collate = masking_collator(tok, MlmSpec(), seed=0)
    texts = toy_sentences(2000, seed=5)
    examples = [{"input_ids": ids} for ids in tok(texts)["input_ids"]]
    labelled = total = as_mask = unchanged = 0
    for start in range(0, len(examples), 100):
        chunk = examples[start:start + 100]
        batch = collate(chunk)
        original = collate.tokenizer.pad(chunk, return_tensors="pt")["input_ids"]
        special = original.clone().apply_(lambda t: t in tok.all_special_ids).bool()
        has_label = batch["labels"] != -100
        assert not has_label[special].any(), "a [CLS]/[SEP]/[PAD] position got a label"
        assert (batch["labels"][has_label] == original[has_label]).all(), "labels must be the original tokens"
        assert (batch["input_ids"][~has_label] == original[~has_label]).all(), "unselected tokens must not change"
        labelled += int(has_label.sum())
        total += int((~special).sum())
        as_mask += int((batch["input_ids"][has_label] == tok.mask_token_id).sum())
        unchanged += int((batch["input_ids"][has_label] == original[has_label]).sum())
    assert total > 15000
    assert labelled / total == pytest.approx(0.15, abs=0.01)
    assert as_mask / labelled == pytest.approx(0.80, abs=0.03)
    # unchanged: the 10% kept plus random draws that hit the same token
    assert unchanged / labelled == pytest.approx(0.10, abs=0.03)


def test_pretrain_from_scratch_learns_and_fills_masks(tmp_path, corpus):
    """The tiny-bert-pretrain-toy recipe: a WordPiece tokenizer and a BERT from the `tiny` preset,
    trained from scratch; masked-token accuracy rises from chance, and fill-mask predicts the
    template word."""
    run = tmp_path / "run"
    code, out, err = invoke("pretrain", "tiny-bert-pretrain-toy", "--data", corpus, "-o", run,
                            "--set", "train.eval_steps=30", "--set", "train.trainer_args.eval_on_start=true",
                            "--set", "train.trainer_args.disable_tqdm=true")
    assert code == 0, err
    assert "finetune pretrain (mlm) finished" in out

    evals = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] < 0.1  # untrained: about 1 / vocabulary
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.5, metrics
    assert metrics["eval_loss"] < evals[0]["eval_loss"] - 1.5
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-3)

    tok_config = json.loads((run / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "BertTokenizer"
    vocab = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"} <= set(vocab)

    code, out, err = invoke("fill-mask", run, "the red cat sat [MASK] the mat.", "--top-k", "3")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[MASK] 1: on (")
    assert len(lines[0].split("  ")) == 3


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, corpus):
    """Pre-training resumed from a checkpoint reuses the checkpoint's tokenizer (a WordPiece trained
    again could number its tokens differently) and ends with the uninterrupted run's weights."""
    import shutil

    import torch
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    sets = ["--set", "train.save_steps=10", "--set", "train.save_total_limit=5",
            "--set", "train.trainer_args.disable_tqdm=true"]
    code, out, err = invoke("pretrain", "tiny-bert-pretrain-toy", "--data", corpus, "-o", straight,
                            "--max-steps", 20, *sets)
    assert code == 0, err

    # The same run, "killed" while writing checkpoint-20: only checkpoint-10 is complete.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        (resumed / f).unlink()
    (resumed / "checkpoints" / "checkpoint-20" / "trainer_state.json").unlink()
    recipe_file = resumed / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(straight), str(resumed)))

    code, out, err = invoke("pretrain", "--resume", "-o", resumed)
    assert code == 0, err
    assert (resumed / "tokenizer.json").read_text() == (straight / "tokenizer.json").read_text()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 20


def test_lora_continued_pretraining_moves_only_adapters_and_reloads(tmp_path, tiny_bert_mlm, corpus):
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from finetune.recipe.load import build_recipe
    from finetune.tasks import mlm

    probe = "the green dog sat on the [MASK]."

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_train_end(self, args, state, control, model=None, processing_class=None, **kw):
            self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
            model.eval()
            with torch.no_grad():
                self.logits = model(**processing_class(probe, return_tensors="pt")).logits
            model.train()

    capture = Capture()
    run = tmp_path / "run"
    recipe = build_recipe({"task": "mlm", "method": "lora", "model": {"name": tiny_bert_mlm},
                           "data": {"train": str(corpus), "eval_fraction": 0.1},
                           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                           "train": {"output_dir": str(run), "max_steps": 30, "batch_size": 16,
                                     "learning_rate": 1e-2,
                                     "trainer_args": {"disable_tqdm": True, "eval_on_start": True}}})
    metrics = mlm.run(recipe, callbacks=[capture])
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and "eval_loss" in start
    assert metrics["eval_loss"] < start["eval_loss"] - 0.15  # a random base: slow, but it learns
    assert metrics["eval_accuracy"] > start["eval_accuracy"] + 0.1

    moved = {n for n in capture.before if not torch.equal(capture.before[n], capture.after[n])}
    trainable = {n for n, _ in capture.before.items() if "lora_" in n}
    assert trainable and moved == trainable, f"only LoRA weights may change; moved: {sorted(moved - trainable)}"
    assert (run / "adapter_config.json").is_file() and (run / "tokenizer.json").is_file()

    reloaded = mlm.load_trained(run).eval()
    tok = AutoTokenizer.from_pretrained(run)
    with torch.no_grad():
        logits = reloaded(**tok(probe, return_tensors="pt")).logits
    torch.testing.assert_close(logits, capture.logits)

    # merge folds the adapter into the base; fill-mask gives the same answer on both
    merged = tmp_path / "merged"
    assert invoke("merge", run, "-o", merged)[0] == 0
    results = [invoke("fill-mask", m, probe, "-k", "4") for m in (run, merged)]
    assert all(code == 0 for code, _, _ in results), results
    assert results[0][1] == results[1][1] and results[0][1].startswith("[MASK] 1: ")

    code, out, err = invoke("predict", run, "the green dog")
    assert code == 2
    assert errors(err) == [f"error: run: '{run}' was trained for the mlm task, which has no predict; predict works "
                           "with classification and image-classification runs"]


def test_fill_mask_without_a_mask_is_a_clear_error(tiny_bert_mlm):
    code, out, err = invoke("fill-mask", tiny_bert_mlm, "no mask here")
    assert code == 2
    assert errors(err) == ["error: text: no [MASK] in 'no mask here'; put [MASK] where a token should be predicted"]


def test_bad_masking_shares_and_maskless_tokenizer(tmp_path, tiny_gpt, corpus):
    code, out, err = invoke("validate", "--task", "mlm", "--model", tiny_gpt, "--data", corpus,
                            "--set", "mlm.mask_replace=0.95")
    assert code == 2
    assert errors(err) == ["error: mlm: mask_replace + random_replace is 1.05; they split the selected tokens, "
                           "so their sum must be at most 1"]

    code, out, err = invoke("full", "--task", "mlm", "--model", tiny_gpt, "--data", corpus, "-o", tmp_path / "r")
    assert code == 2
    assert errors(err) == [f"error: model.name: the tokenizer of '{tiny_gpt}' has no mask token, so it cannot "
                           "train a masked LM; use an encoder (BERT, RoBERTa, ...) or set model.tokenizer to one "
                           "with a mask token"]
    assert not (tmp_path / "r").exists()


def test_validate_reports_texts_and_masking(tmp_path, tiny_bert_mlm):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in toy_sentences(40)] + [{"text": " "}])
    code, out, err = invoke("validate", "--task", "mlm", "--method", "full", "--model", tiny_bert_mlm, "--data", data)
    assert code == 2
    assert "data.train: 41 texts, 5% held out for evaluation" in out
    assert "about 15% of them are masked per batch" in out
    assert errors(err) == [f"error: data.train: 1 empty texts (rows 41 of '{data}'); remove them (training skips them)"]


@pytest.mark.parametrize("task, presets", [("clm", "presets: tiny, small, gpt2"),
                                           ("mlm", "presets for the mlm task: tiny, mini, small, medium, base")])
def test_an_unknown_model_config_names_the_presets(task, presets, toy_text, tmp_path):
    code, _, stderr = invoke("pretrain", "--task", task, "--data", toy_text, "-o", tmp_path / "r",
                             "--set", "model.config=tinny")
    assert code == 2 and not (tmp_path / "r").exists()
    assert stderr.strip().splitlines()[-1] == (f"error: model.config: 'tinny' is neither a preset nor a file (did you "
                                               f"mean 'tiny'?); {presets}")
