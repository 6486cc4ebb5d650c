"""Sequence classification: LoRA on a BERT masked-LM checkpoint (new pooler and head), GPT-style
last-token classification, text pairs, predict, label handling and bad inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import invoke, toy_sentences, write_jsonl

POSITIVE = ["great", "wonderful", "lovely", "superb", "fun"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "bad"]
NOUNS = ["film", "movie", "plot", "cast", "story", "ending"]
FILLER = ["today", "again", "indeed", "overall", "really", "for me"]


def reviews(n: int, seed: int, labels=("negative", "positive")) -> list[dict]:
    """A separable toy sentiment task: the adjective decides the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append({"text": f"the {rng.choice(NOUNS)} was {adjective} {rng.choice(FILLER)}",
                     "label": labels[int(positive)]})
    return rows


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def words(texts: list[str]) -> list[str]:
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    return sorted({w for t in texts for w, _ in split(t.lower())})


VOCAB_TEXTS = [r["text"] for r in reviews(300, seed=9)] + toy_sentences(200) + ["the film was fine"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT masked LM (hidden 32, random weights): like bert-base-uncased, a masked-LM
    checkpoint without the pooler a classifier uses. Its tokenizer has one token per word (a trained
    WordPiece numbers its tokens differently in every process, which would make the runs differ).
    Random weights a little wider than BERT's (0.1, not 0.02) carry the input tokens up to [CLS]
    well enough for the toy tasks to train in a few dozen steps."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(specials + words(VOCAB_TEXTS))})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)
    BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sentiment")
    write_jsonl(path / "train.jsonl", reviews(320, seed=0))
    write_jsonl(path / "eval.jsonl", reviews(80, seed=1))
    return path


@pytest.fixture(scope="module")
def metric_script(tmp_path_factory) -> str:
    """A local `evaluate` metric (loads offline): the number of wrong predictions."""
    path = tmp_path_factory.mktemp("metric") / "errors.py"
    path.write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class Errors(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='', features=datasets."
        "Features({'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'errors': sum(p != r for p, r in zip(predictions, references))}\n")
    return str(path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert, sentiment, metric_script):
    """The tiny-bert-lora-toy-reviews recipe (LoRA on the BERT checkpoint), run in-process with a
    callback that records the weights before and after training and the in-memory model's
    probabilities on the eval texts."""
    import contextlib
    import io

    import torch
    from transformers import TrainerCallback

    from finetune.recipe.load import load_recipe
    from finetune.tasks import classification

    texts = [r["text"] for r in reviews(80, seed=1)]

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_evaluate(self, args, state, control, eval_dataloader=None, **kw):
            self.eval_lengths = [batch["attention_mask"].sum(-1).tolist() for batch in eval_dataloader]

        def on_train_end(self, args, state, control, model=None, processing_class=None, **kw):
            self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
            model.eval()
            with torch.no_grad():
                self.probs = model(**processing_class(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
            model.train()

    capture = Capture()
    run = tmp_path_factory.mktemp("runs") / "sentiment-lora"
    recipe = load_recipe("tiny-bert-lora-toy-reviews", overrides={
        "model.name": tiny_bert, "data.train": str(sentiment / "train.jsonl"),
        "data.eval": str(sentiment / "eval.jsonl"), "train.output_dir": str(run),
        "classification.metrics": [metric_script, "no_such_metric_anywhere"],
        "train.trainer_args": {"disable_tqdm": True}})
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = classification.run(recipe, callbacks=[capture])
    return {"dir": run, "metrics": metrics, "capture": capture, "texts": texts, "stdout": stdout.getvalue()}


def test_lora_bert_learns_the_toy_sentiment_task(lora_run):
    metrics = lora_run["metrics"]
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_f1"] >= 0.9
    assert "perplexity" not in metrics
    report = (lora_run["dir"] / "eval_report.txt").read_text()
    assert report.splitlines()[0].split() == ["label", "precision", "recall", "f1", "support"]
    assert [line.split()[0] for line in report.splitlines()[1:]] == ["negative", "positive"]
    assert sum(int(line.split()[-1]) for line in report.splitlines()[1:]) == 80
    assert "per-class report on the eval split" in lora_run["stdout"]
    assert "Per-class report" in (lora_run["dir"] / "README.md").read_text()


def test_evaluation_runs_longest_first(lora_run):
    """Batches of like lengths pad less; the metrics do not depend on the order."""
    lengths = [n for batch in lora_run["capture"].eval_lengths for n in batch]
    assert len(lengths) == 80 and len(set(lengths)) > 1
    assert lengths == sorted(lengths, reverse=True)


def test_lora_trains_adapters_head_and_missing_pooler_only(lora_run):
    import torch

    capture = lora_run["capture"]
    moved = {n for n in capture.before if not torch.equal(capture.before[n], capture.after[n])}
    trainable = {n for n in capture.before if "lora_" in n or "modules_to_save" in n}
    assert any("pooler" in n for n in trainable), "the pooler, absent from the checkpoint, must be trained"
    assert any("classifier" in n for n in trainable)
    assert moved == trainable, f"frozen weights changed: {sorted(moved - trainable)}; unmoved: {sorted(trainable - moved)}"
    assert "note: layers not in the checkpoint, newly initialised and trained in full and saved with the adapter: " \
           "bert.pooler.dense, head" in lora_run["stdout"]


def test_extra_evaluate_metrics_load_when_possible(lora_run):
    metrics = lora_run["metrics"]
    # the local metric script loads offline and agrees with the built-in accuracy
    assert metrics["eval_errors"] == round((1 - metrics["eval_accuracy"]) * 80)
    assert "warning: classification.metrics: could not load the evaluate metric 'no_such_metric_anywhere'" \
        in lora_run["stdout"]


def test_save_reload_gives_identical_predictions_and_labels(lora_run):
    import torch

    from finetune.tasks import classification

    run = lora_run["dir"]
    assert json.loads((run / "labels.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    model = classification.load_trained(run)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}

    predictions = classification.predict(run, lora_run["texts"], None)
    probs = lora_run["capture"].probs
    assert [p["label"] for p in predictions] == [["negative", "positive"][i] for i in probs.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor([p["score"] for p in predictions]), probs.max(-1).values,
                               atol=2e-6, rtol=0)


def test_predict_command_prints_and_writes_json_lines(lora_run, sentiment, tmp_path):
    run = lora_run["dir"]
    code, out, err = invoke("predict", run, "the plot was wonderful again", "the cast was dull today")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["positive", "negative"]
    assert lines[0].split("\t")[2] == "the plot was wonderful again"
    assert 0.5 < float(lines[0].split("\t")[1]) <= 1.0

    preds = tmp_path / "preds.jsonl"
    code, out, err = invoke("predict", run, "--data", sentiment / "eval.jsonl", "-o", preds)
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 80 and set(rows[0]) == {"text", "label", "score", "reference"}
    accuracy = sum(r["label"] == r["reference"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(lora_run["metrics"]["eval_accuracy"])
    assert f"wrote 80 predictions to {preds}" in out and f"accuracy: {accuracy:.4f}" in out

    code, out, err = invoke("predict", run, "--data", sentiment / "eval.jsonl", "-o", preds)
    assert code == 2
    assert errors(err) == [f"error: --output: '{preds}' already exists; pass --overwrite to replace it, "
                           "or choose another file"]
    assert invoke("predict", run, "--data", sentiment / "eval.jsonl", "-o", preds, "--overwrite")[0] == 0

    other = write_jsonl(tmp_path / "other.jsonl", [{"sentence": "the film was great", "label": "positive"}])
    code, out, err = invoke("predict", run, "--data", other)
    assert code == 2
    assert errors(err) == [f"error: --data: no column 'text' in '{other}' (the run was trained on those columns); "
                           "its columns are: sentence, label. Rename the columns"]
    code, out, err = invoke("predict", run)
    assert code == 2
    assert errors(err) == ["error: nothing to predict: pass inputs after the run directory, or --data FILE"]

    code, out, err = invoke("fill-mask", run, "the film was [MASK]")
    assert code == 2
    assert errors(err) == [f"error: run: '{run}' was trained for the classification task; fill-mask needs an mlm "
                           "run or a masked-LM model"]

    # a merged run is a plain transformers classifier that keeps the label names
    merged = tmp_path / "merged"
    assert invoke("merge", run, "-o", merged)[0] == 0
    assert json.loads((merged / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    code, out_merged, err = invoke("predict", merged, "the plot was wonderful again", "the cast was dull today")
    assert code == 0, err
    assert out_merged == invoke("predict", run, "the plot was wonderful again", "the cast was dull today")[1]


@pytest.fixture(scope="module")
def word_gpt_nopad(tmp_path_factory) -> str:
    """A 2-layer GPT-2 (hidden 32, random weights) with a word-level tokenizer whose pad token is eos,
    as GPT-2's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt-nopad")
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>"] + words(VOCAB_TEXTS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_bert, sentiment):
    """LoRA with a new pooler and head: --resume from the last complete checkpoint ends with the
    weights of an uninterrupted run, adapters and fully trained layers alike."""
    import shutil

    import torch
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    code, out, err = invoke("lora", "tiny-bert-lora-toy-reviews", "--model", tiny_bert, "--data",
                            sentiment / "train.jsonl", "--eval-data", sentiment / "eval.jsonl", "-o", straight,
                            "--max-steps", 16, "--set", "train.save_steps=8",
                            "--set", "train.trainer_args.disable_tqdm=true")
    assert code == 0, err

    # The same run, "killed" while writing checkpoint-16: only checkpoint-8 is complete.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for f in ("adapter_model.safetensors", "adapter_config.json", "labels.json", "metrics.json"):
        (resumed / f).unlink()
    (resumed / "checkpoints" / "checkpoint-16" / "trainer_state.json").unlink()
    recipe_file = resumed / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(straight), str(resumed)))

    code, out, err = invoke("lora", "--resume", "-o", resumed)
    assert code == 0, err
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("pooler" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert (resumed / "labels.json").read_text() == (straight / "labels.json").read_text()


def test_gpt_style_model_without_pad_token_classifies_from_the_last_token(tmp_path, word_gpt_nopad):
    """GPT-2 style: pad == eos, so a pad token is added; integer labels; LoRA; predict after reload."""

    def adjective_last(rows):  # a decoder reads left to right and scores the last token
        for r in rows:
            words = r["text"].split()
            r["text"] = " ".join(words[:3] + words[4:] + words[3:4])
        return rows

    data = write_jsonl(tmp_path / "train.jsonl", adjective_last(reviews(320, seed=3, labels=(0, 1))))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", adjective_last(reviews(80, seed=4, labels=(0, 1))))
    run = tmp_path / "run"
    code, out, err = invoke("lora", "--task", "classification", "--model", word_gpt_nopad, "--data", data,
                            "--eval-data", eval_, "-o", run, "--max-steps", 30, "--set", "train.batch_size=16",
                            "--set", "train.learning_rate=5e-3", "--set", "lora.r=8", "--set", "lora.dropout=0",
                            "--set", "train.trainer_args.disable_tqdm=true")
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert json.loads((run / "tokenizer_config.json").read_text())["pad_token"] == "<|pad|>"
    assert json.loads((run / "labels.json").read_text())["id2label"] == {"0": "0", "1": "1"}

    code, out, err = invoke("predict", run, "the story indeed was superb", "the ending overall was awful")
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == ["1", "0"]


def test_text_pairs_reach_the_model_with_a_generic_tokenizer(tmp_path, tiny_bert):
    """The label is in the second text only, so it is learnable only if pairs are encoded; the tokenizer
    is the generic class (which drops token_type_ids unless told otherwise)."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    from finetune.tasks.classification import keep_token_type_ids

    generic = tmp_path / "generic-bert"
    bert = AutoTokenizer.from_pretrained(tiny_bert)
    PreTrainedTokenizerFast(tokenizer_object=bert.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]").save_pretrained(generic)
    for f in Path(tiny_bert).glob("*.safetensors"):
        (generic / f.name).write_bytes(f.read_bytes())
    (generic / "config.json").write_text((Path(tiny_bert) / "config.json").read_text())
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(generic)("a", "b")
    tok = AutoTokenizer.from_pretrained(generic)
    keep_token_type_ids(tok, AutoConfig.from_pretrained(generic))
    assert tok("film", "great")["token_type_ids"] == [0, 0, 0, 1, 1]

    def pairs(n, seed):  # "the film was great today" -> ("the film was today", "great")
        return [{"text": " ".join(w for i, w in enumerate(r["text"].split()) if i != 3),
                 "verdict": r["text"].split()[3], "label": r["label"]} for r in reviews(n, seed)]

    write_jsonl(tmp_path / "train.jsonl", pairs(320, 5))
    write_jsonl(tmp_path / "test.jsonl", pairs(60, 6))
    run = tmp_path / "run"
    code, out, err = invoke("full", "--task", "classification", "--model", generic, "--data", tmp_path / "train.jsonl",
                            "-o", run, "--max-steps", 40, "--set", "classification.text_pair_column=verdict",
                            "--set", "train.batch_size=16", "--set", "train.learning_rate=3e-3",
                            "--set", "train.scheduler=constant", "--set", "data.eval_fraction=0.15",
                            "--set", "train.trainer_args.disable_tqdm=true")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["eval_accuracy"] >= 0.9

    code, out, err = invoke("predict", run, "--data", tmp_path / "test.jsonl")
    assert code == 0, err
    assert float(out.strip().splitlines()[-1].split()[1]) >= 0.9  # "accuracy: 0.98 (59 of 60 labelled rows)"
    assert out.splitlines()[0].split("\t")[3].startswith("verdict=")

    code, out, err = invoke("predict", run, "the film was today")
    assert code == 2
    assert errors(err) == ["error: inputs: this run classifies text pairs (text, verdict); pass --data with both columns"]


def test_missing_label_column_is_a_clear_error(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r["text"], "sentiment": r["label"]} for r in reviews(20, 0)])
    code, out, err = invoke("lora", "--task", "classification", "--model", tiny_bert, "--data", data,
                            "-o", tmp_path / "run")
    assert code == 2
    assert errors(err) == [f"error: classification.label_column: no column 'label' in data.train '{data}'; its "
                           "columns are: text, sentiment. Set classification.label_column to one of them"]
    assert not (tmp_path / "run").exists()


def test_unknown_label_at_eval_is_a_clear_error(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", reviews(20, 0))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", reviews(6, 1) + [{"text": "the film was fine", "label": "neutral"}] * 2)
    args = ["--task", "classification", "--model", tiny_bert, "--data", train, "--eval-data", eval_]
    expected = ["error: data.eval: label 'neutral' (2 rows) does not occur in data.train, so the model cannot learn "
                "it (training labels: negative, positive); fix or remove those rows, or add training examples "
                "with this label"]

    code, out, err = invoke("full", *args, "-o", tmp_path / "run")
    assert code == 2 and errors(err) == expected
    assert not (tmp_path / "run").exists()

    # validate shows the label distribution and flags the same label
    code, out, err = invoke("validate", *args)
    assert code == 2 and errors(err) == expected
    counts = {r["label"] for r in reviews(20, 0)}
    assert "labels: 2 (negative, positive)" in out and len(counts) == 2
    n_pos = sum(r["label"] == "positive" for r in reviews(20, 0))
    assert f"data.train: 20 examples; negative {20 - n_pos} ({(20 - n_pos) / 20:.0%}), positive {n_pos} " \
           f"({n_pos / 20:.0%})" in out


def test_validate_lists_rows_without_a_label(tmp_path, tiny_bert):
    rows = reviews(20, 0)
    rows[4]["label"] = None
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    code, out, err = invoke("validate", "--task", "classification", "--model", tiny_bert, "--data", data,
                            "--set", "data.eval_fraction=0")
    assert code == 2
    assert errors(err) == [f"error: data.train: 1 rows without a label (rows 5 of '{data}'); fill them in or remove them"]
    assert "missing or unknown 1 (5%)" in out

    code, out, err = invoke("full", "--task", "classification", "--model", tiny_bert, "--data", data,
                            "-o", tmp_path / "run", "--set", "data.eval_fraction=0")
    assert code == 2
    assert errors(err) == ["error: data.train: 1 rows have no label; fill them in or remove them "
                           "(`finetune validate` lists the rows)"]


def test_label_names_ids_and_order(tmp_path):
    """Integers keep their numeric order, strings sort, ClassLabel names and classification.labels win,
    and NaN / None count as missing."""
    import datasets

    from finetune.data.labels import label_id, label_names
    from finetune.recipe.task_sections import ClassificationSpec

    ints = datasets.Dataset.from_dict({"label": [10, 2, 2, 1]})
    assert label_names(ints, ClassificationSpec()) == (["1", "2", "10"], False)
    names, by_index = label_names(ints, ClassificationSpec())
    lookup = {n: i for i, n in enumerate(names)}
    values = [10, 2, 1, 2.0, 3, None, float("nan")]
    assert [label_id(v, lookup, by_index) for v in values] == [2, 1, 0, 1, None, None, None]

    strings = datasets.Dataset.from_dict({"label": ["pos", "neg", "pos"]})
    assert label_names(strings, ClassificationSpec()) == (["neg", "pos"], False)

    features = datasets.Features({"label": datasets.ClassLabel(names=["neg", "pos"])})
    hub_style = datasets.Dataset.from_dict({"label": [1, 0]}, features=features)
    assert label_names(hub_style, ClassificationSpec()) == (["neg", "pos"], True)

    named = label_names(ints, ClassificationSpec(labels=["a", "b", "c"]))
    assert named == (["a", "b", "c"], True)
    lookup = {"a": 0, "b": 1, "c": 2}
    assert [label_id(v, lookup, True) for v in [0, 2, 3, "b", "z"]] == [0, 2, None, 1, None]


def test_classification_metrics_by_hand():
    from finetune.tasks.metrics import classification_metrics

    m = classification_metrics([0, 1, 1, 2, 2], [0, 1, 0, 2, 1], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per class: a p=1 r=1/2 f1=2/3; b p=1/2 r=1/2 f1=1/2; c p=1/2 r=1 f1=2/3
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["c"]["support"] == 1


def test_pretrain_and_bad_label_spec_are_rejected(tmp_path, sentiment, tiny_bert):
    code, out, err = invoke("pretrain", "--task", "classification", "--data", sentiment / "train.jsonl",
                            "-o", tmp_path / "r")
    assert code == 2
    assert errors(err) == ["error: finetune pretrain: the classification task fine-tunes a checkpoint; use "
                           "`finetune lora` or `finetune full` with --model (pre-train an encoder with "
                           "`finetune pretrain --task mlm`)"]
    code, out, err = invoke("full", "--task", "classification", "--model", tiny_bert, "--data",
                            sentiment / "train.jsonl", "--set", "quant.bits=4", "-o", tmp_path / "r")
    assert code == 2
    assert errors(err) == ["error: quant.bits: quantized bases train only with LoRA (QLoRA), not `finetune full`"]
    code, out, err = invoke("lora", "--task", "classification", "--model", tiny_bert, "--data",
                            sentiment / "train.jsonl", "--set", "quant.bits=4", "-o", tmp_path / "r")
    assert code == 2
    assert errors(err) == ["error: quant.bits: the classification task trains unquantized models; drop quant.bits"]
    code, out, err = invoke("validate", "--task", "classification", "--model", "x", "--data", "y",
                            "--set", "classification.labels=[pos]", "--set", "classification.lables=[pos]")
    assert code == 2
    assert set(errors(err)) == {"error: classification.labels: needs at least two distinct label names, got ['pos']",
                                "error: classification.lables: unknown key (did you mean 'labels'?)"}
