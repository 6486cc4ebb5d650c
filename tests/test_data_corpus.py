"""Data at scale (data/corpus.py, data/sources.py, data/cache.py): mixtures, streaming, the prepared-data cache."""

from __future__ import annotations

import json
import os

import pytest

from conftest import invoke, toy_sentences, write_jsonl


def recipe_for(model: str, data, out=None, **sets):
    from finetune.recipe.load import load_recipe

    overrides = {"method": "full", "model.name": model, "data.train": data, "train.max_steps": 8,
                 "train.batch_size": 4, "train.save_steps": 4, "train.logging_steps": 4}
    if out is not None:
        overrides["train.output_dir"] = str(out)
    overrides.update(sets)
    return load_recipe(None, overrides)


def prepare(recipe):
    from finetune.data import corpus
    from finetune.models import pretrained

    tokenizer = pretrained.load_tokenizer(recipe.model)
    return corpus.prepare(recipe, tokenizer, 64, bool(recipe.data.packing)), tokenizer


def numbered(path, prefix: str, n: int, column: str = "text") -> str:
    """Documents that say which source and row they are: '<prefix> <i> the red cat sat on the mat.'"""
    return write_jsonl(path, [{column: f"{prefix} {i} {t}"} for i, t in enumerate(toy_sentences(n, seed=len(prefix)))])


def sources_of(rows, tokenizer) -> list[str]:
    return [tokenizer.decode(ids).split()[0] for ids in rows["input_ids"]]


def test_weighted_mixture_draws_the_weights(tiny_gpt, tmp_path):
    a = numbered(tmp_path / "a.jsonl", "red", 3000)
    b = numbered(tmp_path / "b.jsonl", "blue", 3000)
    recipe = recipe_for(tiny_gpt, [{"path": a, "weight": 4}, {"path": b, "weight": 1}], **{
        "data.packing": False, "data.eval_fraction": 0})
    data, tokenizer = prepare(recipe)
    names = sources_of(data.train, tokenizer)
    share = names.count("red") / len(names)
    assert len(names) > 3000 and set(names) == {"red", "blue"}
    assert share == pytest.approx(0.8, abs=0.02)
    # the same draws for the same seed, other draws for another
    again, _ = prepare(recipe_for(tiny_gpt, recipe.data.model_dump()["train"], **{
        "data.packing": False, "data.eval_fraction": 0, "data.cache": False}))
    assert sources_of(again.train, tokenizer) == names
    other, _ = prepare(recipe_for(tiny_gpt, recipe.data.model_dump()["train"], **{
        "data.packing": False, "data.eval_fraction": 0, "train.seed": 7}))
    assert sources_of(other.train, tokenizer) != names


def test_unweighted_mixture_keeps_every_row_once(tiny_gpt, tmp_path):
    a = numbered(tmp_path / "a.jsonl", "red", 30)
    b = numbered(tmp_path / "b.jsonl", "blue", 20)
    data, tokenizer = prepare(recipe_for(tiny_gpt, [a, {"path": b, "max_samples": 5}], **{
        "data.packing": False, "data.eval_fraction": 0}))
    texts = [tokenizer.decode(ids) for ids in data.train["input_ids"]]
    assert [t.split()[:2] for t in texts] == [["red", str(i)] for i in range(30)] + [["blue", str(i)] for i in range(5)]


def test_sources_keep_their_own_columns_and_formats(tiny_gpt, tmp_path):
    """Plain text in a column called `body` mixed with conversations: text trains on every token, the
    conversations on the assistant's turns only."""
    text = numbered(tmp_path / "text.jsonl", "red", 10, column="body")
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"the {i} cat"}, {"role": "assistant", "content": "sat on the mat"}]}
        for i in range(10)])
    recipe = recipe_for(tiny_gpt, [{"path": text, "text_column": "body"}, chats], **{
        "data.packing": False, "data.eval_fraction": 0, "data.chat_template": "chatml"})
    data, tokenizer = prepare(recipe)
    assert data.templated and data.fmt == "messages" and data.new_tokens == ["<|im_start|>", "<|im_end|>"]
    rows = list(data.train)
    assert len(rows) == 20
    plain, chat_rows = rows[:10], rows[10:]
    assert all(r["labels"] == r["input_ids"] for r in plain)
    for r in chat_rows:
        trained = tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"]) if label != -100])
        assert trained.strip() == "sat on the mat<|im_end|>"


def test_a_stream_packs_the_same_blocks_as_the_prepared_data(tiny_gpt, tmp_path):
    """In file order (data.shuffle_buffer: 0), the stream's blocks are the prepared dataset's blocks,
    in the same order. Shuffled, they differ in order (BENCHMARKS.md, data at scale): the prepared data
    is shuffled whole by the Trainer's sampler, a stream within chunks of rows."""
    path = numbered(tmp_path / "a.jsonl", "red", 300)
    sets = {"data.packing": True, "data.eval_fraction": 0, "data.shuffle_buffer": 0}
    whole, _ = prepare(recipe_for(tiny_gpt, path, **sets))
    streamed, _ = prepare(recipe_for(tiny_gpt, path, **sets, **{"data.streaming": True}))
    assert list(streamed.train) == list(whole.train)
    assert len(whole.train) < 300  # several documents per block
    shuffled, _ = prepare(recipe_for(tiny_gpt, path, **{**sets, "data.streaming": True, "data.shuffle_buffer": 100}))
    shuffled = list(shuffled.train)
    assert shuffled != list(whole.train)
    assert sorted(t for row in shuffled for t in row["input_ids"]) == sorted(t for row in whole.train
                                                                             for t in row["input_ids"])


def test_processes_read_disjoint_parts_of_a_stream(tiny_gpt, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    folder.mkdir()
    numbered(folder / "a.jsonl", "red", 40)
    numbered(folder / "b.jsonl", "blue", 40)
    single = numbered(tmp_path / "one.jsonl", "green", 41)
    for data, files in ((str(folder), 2), (single, 1)):
        seen = []
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            streamed, tokenizer = prepare(recipe_for(tiny_gpt, data, **{
                "data.streaming": True, "data.packing": False, "data.eval_fraction": 0}))
            seen.append([" ".join(tokenizer.decode(row["input_ids"]).split()[:2]) for row in streamed.train])
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) + len(seen[1]) == (80 if files == 2 else 41)
        if files == 2:  # as many files as processes: each process reads one file of its own
            assert sorted(len({s.split()[0] for s in part}) for part in seen) == [1, 1]
        else:  # one file: each process keeps every second row of it, before tokenizing
            assert [{int(s.split()[1]) % 2 for s in part} for part in seen] == [{0}, {1}]


def trained_batches(monkeypatch) -> list:
    """The input_ids of every batch a training step runs on, in order."""
    from transformers import Trainer

    seen, step = [], Trainer.training_step

    def recording(self, model, inputs, *args, **kwargs):
        seen.append(inputs["input_ids"].tolist())
        return step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording)
    return seen


def rows_read_in_training(monkeypatch):
    """(the list that gets the number of every row a stream reads from its file while training runs, not
    while it is checked; the callback that starts the list afresh when training begins)."""
    from transformers import TrainerCallback

    from finetune.data import sources

    read, load_stream = [], sources.load_stream

    def recording(*args, **kwargs):
        return load_stream(*args, **kwargs).map(lambda row: read.append(int(row["text"].split()[1])) or row)

    class Clear(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            read.clear()

    monkeypatch.setattr(sources, "load_stream", recording)
    return read, Clear()


def test_a_stream_resumes_at_the_next_unseen_rows(tiny_gpt, tmp_path, monkeypatch, capsys):
    """Stopped at step 6 and resumed: the resumed run trains on exactly the batches the uninterrupted run
    trained on after step 6 (no repeats, no gaps), ends with the same weights, and continues the stream
    from its saved state: it re-reads only the rows of its current chunk, not those before it."""
    from test_run_lifecycle import assert_same_weights, at_step, sigterm

    from finetune.data import packing
    from finetune.data import text as D
    from finetune.errors import Stopped
    from finetune.run.lifecycle import execute, resolve

    monkeypatch.setattr(D, "MAP_BATCH", 10)  # small batches, windows and chunks: 8 steps span several
    monkeypatch.setattr(packing, "PACK_WINDOW", 10)
    path = numbered(tmp_path / "a.jsonl", "red", 200)
    sets = {"data.streaming": True, "data.shuffle_buffer": 8, "data.max_eval_samples": 8}
    batches = trained_batches(monkeypatch)
    read, clear = rows_read_in_training(monkeypatch)
    execute(recipe_for(tiny_gpt, path, tmp_path / "whole", **sets), callbacks=[clear])
    assert len(batches) == 8 and min(read) == 0  # rows 0-7 are held out for evaluation, then skipped
    whole, whole_reads = list(batches), len(read)

    batches.clear()
    with pytest.raises(Stopped):
        execute(recipe_for(tiny_gpt, path, tmp_path / "cut", **sets), callbacks=[clear, at_step(6, sigterm)])
    assert len(batches) == 6  # the stop comes as step 6 begins: the step finishes and is saved
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-6" / "stream-state-0.json").is_file()
    first = list(batches)
    batches.clear()
    capsys.readouterr()
    execute(resolve(None, None, {"train.output_dir": str(tmp_path / "cut")}, None, resume=True), resume=True,
            callbacks=[clear])
    assert "data: the stream continues where checkpoint-6 left it" in capsys.readouterr().out.splitlines()
    assert first + batches == whole
    assert_same_weights(tmp_path / "cut", tmp_path / "whole")
    assert min(read) > 8 and len(read) < whole_reads  # not from the start (rows 0-7 are held out)


def test_a_stream_that_runs_out_starts_again_and_resumes_in_its_repetition(tiny_gpt, tmp_path, monkeypatch):
    """40 rows last about two steps: the stream starts again (the same blocks in the same order), and a
    run stopped in its third pass resumes there, not at the first pass's saved position."""
    from test_run_lifecycle import assert_same_weights, at_step, sigterm

    from finetune.errors import Stopped
    from finetune.run.lifecycle import execute, resolve

    path = numbered(tmp_path / "a.jsonl", "red", 40)
    sets = {"data.streaming": True, "data.shuffle_buffer": 10, "data.max_eval_samples": 4}
    batches = trained_batches(monkeypatch)
    execute(recipe_for(tiny_gpt, path, tmp_path / "whole", **sets))
    whole = [row for batch in batches for row in batch]
    period = next(n for n in range(1, len(whole)) if whole[n:] == whole[:len(whole) - n])
    assert len(whole) == 32 and 2 * period < 28 and 28 % period  # the stop below falls inside the third pass

    batches.clear()
    with pytest.raises(Stopped):
        execute(recipe_for(tiny_gpt, path, tmp_path / "cut", **sets), callbacks=[at_step(7, sigterm)])
    first = [row for batch in batches for row in batch]
    assert len(first) == 28
    batches.clear()
    execute(resolve(None, None, {"train.output_dir": str(tmp_path / "cut")}, None, resume=True), resume=True)
    assert first + [row for batch in batches for row in batch] == whole
    assert_same_weights(tmp_path / "cut", tmp_path / "whole")


def test_second_run_reads_the_cache_and_a_new_tokenizer_or_template_misses(tiny_gpt, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from finetune.data import corpus

    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"the {i} cat"}, {"role": "assistant", "content": "sat"}]}
        for i in range(40)])
    sets = {"data.chat_template": "chatml"}
    first, _ = prepare(recipe_for(tiny_gpt, chats, **sets))
    assert first.cache is not None and (first.cache / "meta.json").is_file()

    calls = []
    tokenize = corpus.tokenize
    monkeypatch.setattr(corpus, "tokenize", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    second, tokenizer = prepare(recipe_for(tiny_gpt, chats, **sets))
    assert calls == [] and second.cache == first.cache
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    assert tokenizer.chat_template is not None and second.new_tokens == first.new_tokens  # the template is set

    other_template = tmp_path / "template.jinja"
    other_template.write_text("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>\n{% endif %}")
    third, _ = prepare(recipe_for(tiny_gpt, chats, **{"data.chat_template": str(other_template)}))
    assert calls and third.cache != first.cache

    calls.clear()
    changed = tmp_path / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    tok.add_tokens(["sat"])  # one more token: the same texts tokenize differently
    tok.save_pretrained(changed)
    fourth, _ = prepare(recipe_for(tiny_gpt, chats, **sets, **{"model.tokenizer": str(changed)}))
    assert calls and fourth.cache not in (first.cache, third.cache)

    calls.clear()
    os.utime(chats, ns=(0, 0))  # the file changed (its time): prepared again
    prepare(recipe_for(tiny_gpt, chats, **sets))
    assert calls


def test_a_build_leaves_only_its_entry_on_disk(tiny_gpt, tmp_path, monkeypatch):
    """Tokenized and packed intermediate steps are not left in the datasets cache beside the source."""
    from pathlib import Path

    import datasets
    import pyarrow as pa

    from finetune.data import cache

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # this test's files only
    data = numbered(tmp_path / "leftovers.jsonl", "doc", 3000)
    prepared, _ = prepare(recipe_for(tiny_gpt, data, **{"data.packing": True, "data.num_proc": 2}))
    assert prepared.cache is not None and len(prepared.train) > 0

    def token_files(root: Path) -> list[Path]:
        return [f for f in root.rglob("*.arrow") if "input_ids" in pa.ipc.open_stream(f.open("rb")).schema.names]

    root = tmp_path / "cache"
    entry = token_files(prepared.cache)
    assert root in prepared.cache.parents and list(root.rglob("*.arrow")) != entry
    assert entry and [f for f in token_files(root) if prepared.cache not in f.parents] == []
    assert list(cache.cache_root().glob(".build-*")) == []
    assert sorted(prepared.train[0]) == ["input_ids", "labels", "position_ids"]  # the entry is what is read


def test_prepare_command_then_the_run_starts_from_the_cache(tiny_gpt, toy_text, tmp_path):
    code, out, err = invoke("prepare", "--model", tiny_gpt, "--data", toy_text, "--method", "full")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-3].startswith("prepared: ") and " training rows, " in lines[-3]
    cache = lines[-2].removeprefix("cache: ")
    assert json.loads(open(os.path.join(cache, "meta.json")).read())["format"] == "text"
    assert lines[-1] == f"next: finetune full --model {tiny_gpt} --data {toy_text}   # the same recipe and files " \
                        "start from the prepared data"
    code, out, err = invoke("full", "--model", tiny_gpt, "--data", toy_text, "--max-steps", "2",
                            "-o", str(tmp_path / "run"))
    assert code == 0, err
    assert f"prepared rows from the cache ({cache})" in out


@pytest.mark.parametrize("sets, message", [
    (["data.train=[{path: A, weight: 0}, {path: B, weight: 1}]"],
     "error: data.train.0.weight: input should be greater than 0, got 0"),
    (["data.train=[{path: A, weight: -1}, {path: B, weight: 1}]"],
     "error: data.train.0.weight: input should be greater than 0, got -1"),
    (["data.train=[{path: A, weight: 1}, B]"],
     "error: data.train: 1 of 2 sources has a weight; give every source a weight (their shares of the mixture) or "
     "none (every row of every source, once)"),
    (["data.train=[A, {path: B, text_column: body}]"],
     "error: data.train.1 'B': no column for any format; its columns are: text. Provide 'body' (plain text), "
     "'prompt' and 'completion', or 'messages' (role/content turns); or set data.train.1.text_column, "
     "data.train.1.prompt_column, data.train.1.completion_column or data.train.1.messages_column to yours"),
    (["data.train=[A, {path: B, format: text, text_column: body}]"],
     "error: data.train.1.format: text data needs the column(s) body; the data has: text. Rename them or set the "
     "data.train.1.*_column names"),
    (["data.streaming=true"],
     "error: train.max_steps: required with data.streaming (a stream has no length to count epochs by); pass "
     "--max-steps N"),
    (["task=classification", "data.train=[A, B]"],
     "error: data.train: a list of sources (a mixture) is read by the clm task; give the classification task one "
     "file, folder or Hub dataset"),
])
def test_bad_mixtures_are_named_with_their_fix(tiny_gpt, tmp_path, sets, message):
    a = numbered(tmp_path / "a.jsonl", "red", 20)
    b = numbered(tmp_path / "b.jsonl", "blue", 20)
    sets = [s.replace("A", a).replace("B", b) for s in sets]
    args = ["full", "--model", tiny_gpt, "-o", str(tmp_path / "run"), "--data", a]
    if "streaming" not in sets[0]:
        args += ["--max-steps", "2"]
    for s in sets:
        args += ["--set", s]
    code, out, err = invoke(*args)
    assert code == 2
    assert message.replace("'B'", f"'{b}'") in err.splitlines()
    assert not (tmp_path / "run").exists()


def test_validate_lists_every_source_with_its_share(tiny_gpt, tmp_path):
    a = numbered(tmp_path / "a.jsonl", "red", 300)
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"messages": [{"role": "user", "content": f"the {i} cat"}, {"role": "assistant", "content": "sat"}]}
        for i in range(100)])
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt}}}\ndata:\n  train:\n    - {{path: {a}, weight: 0.8}}\n"
                      f"    - {{path: {b}, weight: 0.2}}\n  chat_template: chatml\n")
    code, out, err = invoke("validate", str(recipe))
    assert code == 0, err
    lines = [line.strip() for line in out.splitlines()]
    assert f"data.train.0: 300 examples (text) in '{a}', 5% held out for evaluation" in lines
    assert f"data.train.1: 100 examples (messages) in '{b}', 5% held out for evaluation" in lines
    assert "data.train: a mixture of 2 sources" in lines
    shares = [line for line in lines if line.startswith(("data.train.0: 300 rows", "data.train.1: 100 rows"))]
    # the token shares follow from the weights and each source's tokens per row
    from finetune.data import templates
    from finetune.models import pretrained
    from finetune.recipe.sections import ModelSpec

    tokenizer = pretrained.load_tokenizer(ModelSpec(name=tiny_gpt))
    templates.set_template(tokenizer, "chatml")
    text_tokens = sum(len(tokenizer(json.loads(r)["text"])["input_ids"]) + 1 for r in open(a)) / 300
    chat_tokens = sum(len(tokenizer.apply_chat_template(json.loads(r)["messages"], tokenize=True)["input_ids"])
                      for r in open(b)) / 100
    text_share = 0.8 * text_tokens / (0.8 * text_tokens + 0.2 * chat_tokens)
    assert [line.split("; ")[1] for line in shares] == [
        f"drawn for 80% of the rows and about {text_share:.0%} of the tokens (weight 0.8)",
        f"drawn for 20% of the rows and about {1 - text_share:.0%} of the tokens (weight 0.2)"]
    assert "the mixture ends after about 375 rows (first_exhausted: data.train.0 runs out first)" in lines


@pytest.mark.slow
def test_a_two_process_stream_stops_and_resumes_bit_exact(tiny_gpt, tmp_path):
    """Two processes, each reading its own part of the stream through its own DataLoader: SIGTERM, then
    --resume, ends with the weights of an uninterrupted two-process run (the stream runs out and starts
    again on the way: 3,000 short rows, 120 steps)."""
    from conftest import finish, start
    from test_run_lifecycle import assert_same_weights, stop_with_sigterm

    data = numbered(tmp_path / "a.jsonl", "red", 3000)
    common = ["full", "--model", tiny_gpt, "--data", data, "--max-steps", "120", "-n", "2",
              "--set", "data.streaming=true", "--set", "data.shuffle_buffer=200", "--set", "train.logging_steps=1",
              "--set", "train.save_steps=1000", "--set", "data.max_eval_samples=8"]
    whole = finish(start(*common, "-o", tmp_path / "whole"))
    assert "data: streaming 1 source, process 0 of 2 reads its own part" in whole
    out = tmp_path / "run"
    step = stop_with_sigterm(common, out, after_lines=10)
    assert (out / "checkpoints" / f"checkpoint-{step}" / "stream-state-1.json").is_file()
    resumed = finish(start("full", "--resume", "-o", out))
    assert f"resuming from checkpoint-{step} (step {step})" in resumed
    assert "data: the stream continues where" in resumed
    assert_same_weights(out, tmp_path / "whole")
