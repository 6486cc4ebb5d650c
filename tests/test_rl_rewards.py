"""Reward sources (finetune/rl/rewards.py): module:function and reward-model directories, scored with
the convention the reward model is trained with (prompt + response + eos, right padding)."""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.rl.rewards import load_reward, reward_input_ids, score_pairs
from rlhf_helpers import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def heads(tmp_path_factory, tiny_gpt):
    """Untrained sequence classifiers on the tiny GPT: one output (a reward model) and two outputs,
    each saved as a full model and as a LoRA adapter; plus a causal-LM adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    out = {}
    for labels in (1, 2):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt, num_labels=labels)
        full = tmp_path_factory.mktemp(f"full{labels}")
        model.save_pretrained(full)
        tok.save_pretrained(full)
        adapter = tmp_path_factory.mktemp(f"adapter{labels}")
        peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
        peft_model.save_pretrained(adapter)
        tok.save_pretrained(adapter)
        out[f"full{labels}"], out[f"adapter{labels}"] = str(full), str(adapter)
    lm_adapter = tmp_path_factory.mktemp("lm-adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt),
                   LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], fan_in_fan_out=True)
                   ).save_pretrained(lm_adapter)
    out["lm_adapter"] = str(lm_adapter)
    return out


def test_reward_model_scores_do_not_depend_on_padding(heads):
    """Right padding: a text scores the same alone and in a batch of longer texts. Left padding (what
    generation uses) shifts GPT-2's positions and changes the scores: the trap this convention avoids."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(heads["full1"]).eval()
    tok = AutoTokenizer.from_pretrained(heads["full1"])
    prompts = ["the red cat sat on the", "the cat", "the blue dog sat on the green mat and the"]
    completions = [" mat.", " sat.", " roof."]
    batch = score_pairs(model, tok, prompts, completions)
    alone = [score_pairs(model, tok, [p], [c])[0] for p, c in zip(prompts, completions)]
    assert batch == pytest.approx(alone, abs=1e-5)
    assert load_reward(heads["full1"])(prompts, completions) == pytest.approx(alone, abs=1e-5)

    ids = [reward_input_ids(tok, p, c) for p, c in zip(prompts, completions)]
    left = tok.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        shifted = model(**left).logits[:, 0].tolist()
    assert shifted[1] != pytest.approx(alone[1], abs=1e-3)


def test_reward_inputs_end_with_one_eos_like_reward_training(tiny_gpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    ids = reward_input_ids(tok, "the red cat", " sat.")
    assert ids == tok("the red cat sat." + tok.eos_token)["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
    assert reward_input_ids(tok, "the red cat", " sat." + tok.eos_token) == ids  # not doubled


def test_chat_messages_are_scored_through_the_chat_template(tiny_gpt):
    from transformers import AutoTokenizer

    from rlhf_helpers import SIMPLE_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_gpt)
    prompt = [{"role": "user", "content": "the red cat sat on the"}]
    completion = [{"role": "assistant", "content": "mat."}]
    with pytest.raises(UserError, match="chat template"):
        reward_input_ids(tok, prompt, completion)
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    assert tok.decode(reward_input_ids(tok, prompt, completion)) == "user: the red cat sat on the\nassistant: mat.\n"


def test_adapter_reward_model_loads_with_its_saved_head(heads):
    """A LoRA reward run is its base plus the adapter's score head; scores are reproducible."""
    score = load_reward(heads["adapter1"])
    first = score(["the red cat sat on the"] * 2, [" mat.", " roof."])
    again = load_reward(heads["adapter1"])(["the red cat sat on the"] * 2, [" mat.", " roof."])
    assert first == pytest.approx(again, abs=1e-6)
    assert first[0] != pytest.approx(first[1], abs=1e-6)


@pytest.mark.parametrize("kind", ["full2", "adapter2"])
def test_reward_model_with_two_outputs_is_refused(heads, kind):
    with pytest.raises(UserError) as e:
        load_reward(heads[kind], "grpo.reward")
    assert e.value.problems == [f"grpo.reward: the model in '{heads[kind]}' has 2 outputs; a reward model has exactly "
                                "one (train one with `finetune reward`)"]


def test_language_models_are_not_reward_models(heads, tiny_gpt):
    with pytest.raises(UserError, match=r"is a GPT2LMHeadModel, not a reward model \(no score head\); "
                                        r"train one with `finetune reward --model"):
        load_reward(tiny_gpt)
    with pytest.raises(UserError, match="holds a CAUSAL_LM adapter, not a reward model"):
        load_reward(heads["lm_adapter"])


def test_module_function_reward(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards_a.py").write_text(
        "def brevity(prompts, completions):\n    return [-len(c) for c in completions]\n\n"
        "def with_answer(prompts, completions, answer, **kwargs):\n"
        "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n\n"
        "def wrong_count(prompts, completions):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)  # importable from the current directory, like `python -m`
    assert load_reward("toy_rewards_a:brevity")(["p", "p"], ["ab", "abcd"]) == [-2.0, -4.0]
    # a function taking **kwargs also gets the dataset's other columns (as GRPO passes them)
    fn = load_reward("toy_rewards_a:with_answer")
    assert fn(["p", "p"], [" 4", " 5"], answer=["4", "4"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="returned 1 scores for 2 completions"):
        load_reward("toy_rewards_a:wrong_count")(["p", "p"], ["a", "b"])
    with pytest.raises(UserError) as e:
        load_reward("toy_rewards_a:brevty", "grpo.reward")
    assert e.value.problems == ["grpo.reward: module 'toy_rewards_a' has no function 'brevty' (did you mean 'brevity'?)"]


def test_unimportable_reward_function(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_reward("no_such_rewards:score", "grpo.reward")
    assert e.value.problems == ["grpo.reward: cannot import module 'no_such_rewards' (ModuleNotFoundError: No module "
                                "named 'no_such_rewards'); check the name and that it is importable from the "
                                "current directory"]
    with pytest.raises(UserError, match="neither a directory with a reward model nor module:function"):
        load_reward("runs/missing-reward-run", "grpo.reward")


def test_ready_made_answer_reward():
    fn = load_reward("finetune.rl.rewards:matches_answer", "grpo.reward")
    assert fn(["q"] * 3, [" Moo. moo.", " woof.", " "], answer=[" moo.", " moo.", ""]) == [1.0, 0.0, 0.0]
    before = load_reward("finetune.rewards:matches_answer", "grpo.reward")  # its name in recipes written earlier
    assert before(["q"] * 2, [" Moo.", " woof."], answer=[" moo.", " moo."]) == [1.0, 0.0]
    chat = [[{"role": "assistant", "content": "Moo."}]]
    assert fn(["q"], chat, answer=["moo."]) == [1.0]
    with pytest.raises(UserError, match="needs an `answer` column in the data"):
        fn(["q"], [" moo."])


TRL_STYLE = '''
def reward_len(completions, **kwargs):
    """As trl's documentation writes them: keyword arguments, the dataset's columns in kwargs."""
    return [-abs(20 - len(c)) for c in completions]

def needs_answer(completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def named_only(prompts, completions):
    return [float(len(p) > len(c)) for p, c in zip(prompts, completions)]

def other_names(p, c):
    return [float(len(x)) for x in c]

def keyword_column(p, c, answer=None):
    return [float(x == a) for x, a in zip(c, answer)]

def too_few(completions_only):
    return [0.0]

def maybe(completions, **kwargs):
    return [None if c == "?" else 1.0 for c in completions]
'''


def test_reward_functions_are_called_as_trl_calls_them(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards_trl.py").write_text(TRL_STYLE)
    monkeypatch.chdir(tmp_path)
    fn = load_reward("toy_rewards_trl:reward_len")
    # trl's GRPOTrainer calls by keyword with extra arguments (completion_ids, trainer_state, columns)
    assert fn(prompts=["p"], completions=["x" * 18], completion_ids=[[1]], trainer_state=None, answer=["a"]) == [-2.0]
    assert fn(["p"], ["x" * 25]) == [-5.0]  # and PPO positionally
    assert load_reward("toy_rewards_trl:needs_answer")(["p", "p"], [" 4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    with pytest.raises(UserError) as e:
        load_reward("toy_rewards_trl:needs_answer", "ppo.reward")(["p"], ["4"])
    assert e.value.problems == ["ppo.reward: 'toy_rewards_trl:needs_answer' takes answer, which the data has no column "
                                "for; add the column, or give the parameter a default"]
    # positional functions: extra keyword arguments are left out unless named
    assert load_reward("toy_rewards_trl:named_only")(prompts=["long prompt"], completions=["c"], x=[1]) == [1.0]
    assert load_reward("toy_rewards_trl:other_names")(["p"], ["abc"], answer=["a"]) == [3.0]
    assert load_reward("toy_rewards_trl:keyword_column")(["p", "p"], ["a", "b"], answer=["a", "a"]) == [1.0, 0.0]
    assert load_reward("toy_rewards_trl:maybe")(["p", "p"], ["?", "!"])[1] == 1.0  # None: no opinion (NaN)
    with pytest.raises(UserError) as e:
        load_reward("toy_rewards_trl:too_few", "grpo.reward")
    assert e.value.problems == [
        "grpo.reward: 'toy_rewards_trl:too_few' cannot be called as a reward function; expected def fn(prompts, "
        "completions, **kwargs) -> list[float], or def fn(completions, **kwargs) as in trl's documentation; the "
        "dataset's other columns arrive as keyword arguments"]
