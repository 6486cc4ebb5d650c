"""Chat fine-tuning end to end on a tiny GPT-2: the loss counts answers only, packing keeps the masks,
training tokenizes as generation does, and chat / generate use the template."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import ANIMALS, COLORS, PLACES, invoke, write_jsonl
from test_tasks_clm import losses, train

ANSWERS = ["on the mat.", "on the tree.", "the dog."]
WORDS = COLORS + ANIMALS + PLACES


def random_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(6))


def conversations(n: int, seed: int) -> list[dict]:
    """Prompts of random words (nothing to learn there) and answers drawn from a fixed set."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": random_prompt(rng)},
                          {"role": "assistant", "content": rng.choice(ANSWERS)}]} for _ in range(n)]


def chat_data(tmp) -> str:
    return write_jsonl(tmp / "chat.jsonl", conversations(400, seed=0))


CHAT_SETS = {"data.chat_template": "chatml", "data.max_length": 48}


@pytest.fixture(scope="module")
def chat_run(tiny_gpt, tmp_path_factory):
    """A full fine-tuning of the random tiny GPT on the conversations."""
    tmp = tmp_path_factory.mktemp("chat")
    out = tmp / "run"
    metrics = train(tiny_gpt, chat_data(tmp), out, method="full", steps=150, **CHAT_SETS)
    return out, metrics


@pytest.fixture(scope="module")
def lora_chat_run(tiny_gpt_lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-lora")
    out = tmp / "run"
    train(tiny_gpt_lm, chat_data(tmp), out, steps=150, **CHAT_SETS)
    return out


def test_loss_counts_answers_only_and_is_learned(chat_run):
    """Answers carry ~1.1 nats of choice over ~5 tokens (~0.2 a token); random prompts would cost several
    nats per token, so a low loss shows that only the answers are trained."""
    out, metrics = chat_run
    curve = losses(out)
    assert curve[-1] < 0.45 and metrics["eval_loss"] < 0.45, (curve, metrics)
    assert json.loads((out / "chat.json").read_text()) == {"format": "messages",
                                                           "end_of_turn": ["<|endoftext|>", "<|im_end|>"]}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 301]


def test_lora_trains_the_new_template_tokens_and_reloads(lora_chat_run, tiny_gpt_lm):
    from safetensors.torch import load_file

    saved = load_file(lora_chat_run / "adapter_model.safetensors")
    new_rows = [k for k in saved if "trainable_tokens" in k]
    assert new_rows and all(saved[k].shape[0] == 2 for k in new_rows), {k: v.shape for k, v in saved.items()}
    assert not any("wte.weight" in k or "lm_head.weight" in k for k in saved)  # not whole matrices
    rng = random.Random(5)
    code, stdout, stderr = invoke("generate", lora_chat_run, random_prompt(rng), "--temperature", "0",
                                  "--max-new-tokens", "12")
    assert code == 0 and stdout.strip() in ANSWERS, (stdout, stderr)


def test_generate_applies_the_template_and_answers_in_the_trained_set(chat_run):
    out, _ = chat_run
    rng = random.Random(123)  # prompts never seen in training
    for _ in range(3):
        code, stdout, stderr = invoke("generate", out, random_prompt(rng), "--temperature", "0",
                                      "--max-new-tokens", "12")
        assert code == 0, stderr
        assert stdout.strip() in ANSWERS, stdout
    code, raw, _ = invoke("generate", out, "the red", "--raw", "--temperature", "0", "--max-new-tokens", "3")
    assert code == 0 and raw.startswith("the red")


def test_batch_generate_writes_one_line_per_row(chat_run, tmp_path):
    out, _ = chat_run
    rng = random.Random(7)
    rows = [{"prompt": random_prompt(rng)}, {"messages": [{"role": "user", "content": random_prompt(rng)}]},
            {"prompt": "the"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    code, stdout, stderr = invoke("generate", out, "--data", prompts, "-o", tmp_path / "o.jsonl",
                                  "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "2")
    assert code == 0, stderr
    written = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(written) == 3 and all(r["generated"].strip() in ANSWERS for r in written), written
    assert "tokens/s" in stdout


def test_chat_command_streams_keeps_history_and_resets(chat_run):
    from typer.testing import CliRunner

    from finetune.cli.app import app

    out, _ = chat_run
    turns = "red cat dog mat box tree\n/system be brief.\nblue fish bed roof\n/reset\n/quit\n"
    result = CliRunner().invoke(app, ["chat", str(out), "--temperature", "0", "--max-new-tokens", "12"], input=turns)
    assert result.exit_code == 0, result.output
    answers = [part.splitlines()[0].strip() for part in result.output.split("assistant: ")[1:]]
    assert len(answers) == 2 and all(a in ANSWERS for a in answers), result.output
    assert "system prompt set" in result.output and "history cleared" in result.output


def test_chat_on_merged_run(lora_chat_run, tmp_path):
    out = lora_chat_run
    code, _, stderr = invoke("merge", out, "-o", tmp_path / "merged")
    assert code == 0, stderr
    assert (tmp_path / "merged" / "chat.json").is_file()
    config = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [0, 301]  # <|endoftext|> and <|im_end|>: transformers stops at a turn's end
    code, stdout, stderr = invoke("generate", tmp_path / "merged", "red cat dog", "--temperature", "0",
                                  "--max-new-tokens", "12")
    assert code == 0 and stdout.strip() in ANSWERS, (stdout, stderr)


def test_packed_blocks_keep_the_masks(tiny_gpt):
    import datasets
    from transformers import AutoTokenizer

    from finetune.data import templates
    from finetune.data import text as D
    from finetune.data.packing import packed_dataset
    from finetune.recipe.sections import DataSpec

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    templates.set_template(tok, "chatml")
    rows = conversations(6, seed=3)
    ds = D.tokenize_examples(datasets.Dataset.from_list(rows), tok, DataSpec(), "messages", 64)
    packed = packed_dataset(ds, 128)
    assert len(packed) < len(ds)
    singles = {tuple(r["input_ids"]): r["labels"] for r in ds}
    for block in packed:
        starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [len(block["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            ids = tuple(block["input_ids"][a:b])
            assert block["labels"][a:b] == singles[ids]  # the same mask (first tokens are prompt: -100 anyway)


def test_training_tokenizes_text_as_generation_does_with_bos(tiny_gpt):
    import datasets
    from test_data_chat import with_bos
    from transformers import AutoTokenizer

    from finetune.data import text as D

    tok = with_bos(AutoTokenizer.from_pretrained(tiny_gpt))
    text = "the red cat sat on the mat."
    trained = D.tokenize_documents(datasets.Dataset.from_dict({"text": [text]}), tok, "text", 64, False)[0]["input_ids"]
    prompted = tok(text)["input_ids"]  # what `generate` feeds the model
    assert prompted[0] == tok.bos_token_id
    assert trained == prompted + [tok.eos_token_id]


def test_bad_rows_stop_training_with_every_problem(tiny_gpt, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, stdout, stderr = invoke("lora", "--model", tiny_gpt, "--data", data, "-o", tmp_path / "run",
                                  "--set", "data.chat_template=chatml")
    assert code == 2
    assert "data.train row 2: the conversation ends with a 'user' turn" in stderr
    assert "data.train row 3: messages turn 1 has unknown role 'robot'" in stderr
    assert "Traceback" not in stderr


def test_validate_shows_the_mask_and_lists_bad_rows(tiny_gpt, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", conversations(20, seed=1))
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt, "--data", good, "--set", "data.chat_template=chatml")
    assert code == 0, stderr
    assert "data.train: 20 examples (messages)" in stdout
    assert "<|im_start|>assistant\n    [[" in stdout and "<|im_end|>]]" in stdout
    share = float(stdout.split("loss on ")[1].split("%")[0])
    assert 10 < share < 40, stdout
    lines = [json.dumps(r) for r in conversations(2, seed=1)]
    lines.append('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}')
    lines.append('{"text": "plain text"}')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    code, stdout, stderr = invoke("validate", "--model", tiny_gpt, "--data", tmp_path / "bad.jsonl")
    assert code == 2
    assert "data.train row 3: messages turn 1 has content of type int; content must be a string" in stderr
    assert "data.train row 4: a text row in a messages file (mixed formats); keep one format per file" in stderr


def test_pad_is_eos_without_a_new_embedding_row(tiny_gpt_nopad, toy_text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok0 = AutoTokenizer.from_pretrained(tiny_gpt_nopad)
    tok0.pad_token = None
    tok0.save_pretrained(tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(tiny_gpt_nopad).save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    train(str(tmp_path / "base"), toy_text, out, method="full", steps=2)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == len(tok0)
    assert model.get_input_embeddings().weight.shape[0] == len(tok0)
    assert torch.isfinite(torch.tensor(losses(out))).all()


@pytest.mark.slow
def test_chain_sft_on_conversations_then_dpo_on_conversational_pairs(tiny_gpt_lm, tmp_path):
    """The SFT stage's template travels with its merged model: the DPO stage renders its pairs with it."""
    import yaml

    from finetune.data.templates import TEMPLATES

    rng = random.Random(0)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": [{"role": "user", "content": random_prompt(rng)}],
         "chosen": [{"role": "assistant", "content": "on the mat."}],
         "rejected": [{"role": "assistant", "content": "the dog."}]} for _ in range(64)])
    recipe = {"model": {"name": tiny_gpt_lm}, "data": {"train": prefs, "max_length": 48},
              "train": {"output_dir": str(tmp_path / "chain"), "batch_size": 8, "save_steps": 100},
              "stages": [{"name": "sft", "command": "lora",
                          "set": {"data.train": chat_data(tmp_path), "data.chat_template": "chatml",
                                  "train.max_steps": 30, "train.learning_rate": 3e-3}},
                         {"name": "dpo", "command": "dpo",
                          "set": {"model.name": "{stages.sft.output}", "train.max_steps": 5}}]}
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = invoke("chain", tmp_path / "chain.yaml")
    assert code == 0, err + out
    from transformers import AutoTokenizer

    dpo_tok = AutoTokenizer.from_pretrained(str(tmp_path / "chain" / "dpo"))
    assert dpo_tok.chat_template == TEMPLATES["chatml"][0]
    assert (tmp_path / "chain" / "sft" / "merged" / "chat.json").is_file()
