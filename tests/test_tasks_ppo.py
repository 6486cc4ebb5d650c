"""`finetune ppo`: the reward rises with LoRA and full training while the KL to the reference stays
bounded; resume continues exactly; two CPU processes; bad input ends in one clear line and exit 2.

The policy is a 2-layer GPT (hidden 64) fine-tuned for a few seconds on sentences like
"the red cat sat on the mat.". Prompts are "the <colour>"; the reward (toy_rewards.cat) is 1 for a
well-formed sentence about a cat, so it starts near 1/6 and PPO has to shift the choice of animal.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import COLORS, REPO, cli, invoke, new_tiny_gpt, toy_sentences, write_jsonl

RECIPE = str(Path(REPO) / "recipes" / "tiny-gpt-lora-ppo-toy.yaml")
REWARDS = '''import re


def cat(prompts, completions):
    """1 for a well-formed sentence about a cat, else 0."""
    return [1.0 if re.fullmatch(r" cat sat on the \\w+\\.", c) else 0.0 for c in completions]
'''
LOG_KEYS = {"step", "reward", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl",
            "response_length", "no_eos_fraction", "learning_rate"}


def sft_policy(path: Path) -> None:
    """A tiny GPT-2 that writes the toy sentences (so that generations are not noise)."""
    import torch

    model, tok = new_tiny_gpt(64)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in toy_sentences(400)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(150):
        batch = rng.sample(docs, 32)
        longest = max(map(len, batch))
        ids = torch.tensor([d + [tok.pad_token_id] * (longest - len(d)) for d in batch])
        mask = torch.tensor([[1] * len(d) + [0] * (longest - len(d)) for d in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.7
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and 2 cores are often shared
    root = tmp_path_factory.mktemp("ppo")
    sft_policy(root / "policy")
    prompts = [f"the {c}" for c in COLORS]
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts * 16])
    write_jsonl(root / "eval.jsonl", [{"prompt": p} for p in prompts * 4])
    (root / "toy_rewards.py").write_text(REWARDS)
    sys.modules.pop("toy_rewards", None)
    sys.path.insert(0, str(root))
    yield SimpleNamespace(root=root, policy=str(root / "policy"), train=str(root / "prompts.jsonl"),
                          eval=str(root / "eval.jsonl"))
    sys.path.remove(str(root))
    sys.modules.pop("toy_rewards", None)
    torch.set_num_threads(threads)


def ppo(env, out, *args):
    return invoke("ppo", RECIPE, "--model", env.policy, "--data", env.train, "--eval-data", env.eval,
                  "-o", str(out), *args)


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def read_log(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def cat_rate(model, tokenizer, n: int = 48) -> float:
    """Share of sampled responses that the toy reward scores 1."""
    import torch

    from toy_rewards import cat

    prompts = [f"the {COLORS[i % len(COLORS)]}" for i in range(n)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(cat(prompts, texts)) / n


def assert_learned(run_dir, gain: float, least: float) -> dict:
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    log = read_log(run_dir)
    assert len(log) == metrics["iterations"] == 30
    assert all(LOG_KEYS <= set(r) for r in log)
    assert log[0]["reward"] < 0.4  # before any update about 1/6 of the sentences are about a cat
    assert metrics["reward_end"] >= metrics["reward_start"] + gain, metrics
    assert metrics["reward_end"] >= least, metrics
    # Held-out prompts: the trained policy beats the reference it started from.
    assert metrics["eval_reward"] >= metrics["eval_reward_reference"] + 0.15, metrics
    # The KL penalty keeps the policy near the reference: a few nats per response, never a blow-up.
    assert metrics["kl_end"] < 4.0, metrics
    assert max(r["kl"] for r in log) < 10.0
    assert all(r["no_eos_fraction"] <= 0.25 for r in log[-5:])
    return metrics


def test_ppo_lora_raises_reward_keeps_kl_bounded_and_leaves_base_frozen(env, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tasks.ppo import load_trained

    out = tmp_path / "lora"
    code, stdout, stderr = ppo(env, out)
    assert code == 0, stderr
    assert "reward 0." in stdout and "held-out reward" in stdout
    metrics = assert_learned(out, gain=0.25, least=0.4)
    assert metrics["trainable_params"] < metrics["total_params"] / 4
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()

    # The saved adapter is the trained policy; with it disabled, the base is exactly the original.
    policy = load_trained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(env.policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    probe = tokenizer(["the red cat sat on the mat."], return_tensors="pt")
    with torch.no_grad(), policy.disable_adapter():
        assert torch.equal(policy(**probe).logits, original(**probe).logits)
    assert cat_rate(policy, tokenizer) >= cat_rate(original, tokenizer) + 0.2


def test_ppo_full_raises_reward_with_reference_copy(env, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    code, _, stderr = ppo(env, out, "--method", "full", "--set", "train.learning_rate=3e-4")
    assert code == 0, stderr
    assert_learned(out, gain=0.4, least=0.7)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained, original = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(env.policy)
    assert cat_rate(trained.eval(), tokenizer) >= cat_rate(original.eval(), tokenizer) + 0.4


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_resume_continues_exactly(env, tmp_path, method):
    """Interrupted after iteration 2 and resumed = the same run without the interruption."""
    from finetune.recipe.load import load_recipe
    from finetune.tasks import ppo as task

    def recipe(out):
        return load_recipe(RECIPE, {"method": method, "model.name": env.policy, "data.train": env.train,
                                    "data.eval": env.eval, "train.output_dir": str(out)},
                           ["train.max_steps=4", "train.save_steps=1", "ppo.rollout_batch_size=16",
                            "train.batch_size=8", f"train.learning_rate={2e-3 if method == 'lora' else 3e-4}"])

    task.run(recipe(tmp_path / "straight"))

    class Stop(Exception):
        pass

    def stop_after_two(record):
        if record["step"] == 2:
            raise Stop

    with pytest.raises(Stop):
        task.run(recipe(tmp_path / "resumed"), callbacks=[stop_after_two])
    assert len(read_log(tmp_path / "resumed")) == 2
    task.run(recipe(tmp_path / "resumed"), resume=True)

    def numbers(run):
        return [{k: v for k, v in r.items() if k != "iteration_s"} for r in read_log(tmp_path / run)]

    assert len(numbers("resumed")) == 4
    assert numbers("resumed") == numbers("straight")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints" / "checkpoint-4").iterdir()) == \
        ["critic", "manifest.json", "optimizer.pt", "policy", "rng_state_0.pt", "scheduler.pt", "trainer_state.json"]


def test_ppo_two_processes(env, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ddp"
    result = cli("ppo", RECIPE, "--model", env.policy, "--data", env.train, "--eval-data", env.eval, "-o", out,
                 "--num-processes", "2", "--max-steps", "3", "--set", "ppo.rollout_batch_size=16",
                 "--set", "train.batch_size=8", cwd=env.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 3
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]  # one line per iteration, from the main process
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert (out / "adapter_model.safetensors").is_file()


def test_ppo_reward_model_directory_and_critic_from_it(env, tmp_path):
    """A reward-model directory scores the texts and starts the critic."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(env.policy, num_labels=1)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(env.policy).save_pretrained(rm_dir)
    out = tmp_path / "rm-run"
    code, _, stderr = ppo(env, out, "--max-steps", "2", "--set", f"ppo.reward={rm_dir}",
                          "--set", f"ppo.critic={rm_dir}", "--set", "ppo.rollout_batch_size=16",
                          "--set", "train.batch_size=8", "--set", "train.learning_rate=1e-5")
    assert code == 0, stderr
    log = read_log(out)
    assert len(log) == 2 and all(r["reward"] != 0 and r["reward_std"] > 0 for r in log)
    # The critic started from the reward model's head (a trainable copy under LoRA) and moved a little.
    critic = load_file(out / "checkpoints" / "checkpoint-2" / "critic" / "adapter_model.safetensors")
    head = next(v for k, v in critic.items() if k.endswith("score.weight") or "score.modules_to_save" in k)
    assert head.shape == rm.score.weight.shape
    assert not torch.equal(head, rm.score.weight.detach())
    assert torch.nn.functional.cosine_similarity(head.flatten(), rm.score.weight.detach().flatten(), 0) > 0.95


# ---------------------------------------------------------------------------------------
# Bad input: one line each, exit code 2


def test_reward_model_with_two_outputs(env, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "two"
    AutoModelForSequenceClassification.from_pretrained(env.policy, num_labels=2).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(env.policy).save_pretrained(rm_dir)
    code, _, stderr = ppo(env, tmp_path / "out", "--set", f"ppo.reward={rm_dir}")
    assert code == 2
    assert f"error: ppo.reward: the model in '{rm_dir}' has 2 outputs; a reward model has exactly one" in stderr
    assert "Traceback" not in stderr


def test_reward_function_that_cannot_be_imported(env, tmp_path):
    code, _, stderr = ppo(env, tmp_path / "out", "--set", "ppo.reward=no_such_rewards:score")
    assert code == 2
    assert "error: ppo.reward: cannot import module 'no_such_rewards'" in stderr
    assert not (tmp_path / "out").exists()  # checked before the run directory is made


def test_missing_reward(env, tmp_path):
    code, _, stderr = ppo(env, tmp_path / "out", "--set", "ppo.reward=")
    assert code == 2
    assert errors(stderr) == ["error: ppo.reward: required; a reward-model directory (a `finetune reward` run) or "
                             "module:function, for example --set ppo.reward=my_rewards:length"]


def test_empty_prompt(env, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the red"}, {"prompt": "the blue"}, {"prompt": "  "}])
    code, _, stderr = invoke("ppo", RECIPE, "--model", env.policy, "--data", data, "--eval-data", env.eval,
                             "-o", tmp_path / "out")
    assert code == 2
    assert errors(stderr) == ["error: data.train: 1 empty prompt(s) in column 'prompt' (rows 2); every prompt "
                             "needs text: remove them"]


def test_prompt_longer_than_the_context(env, tmp_path):
    long_prompt = " ".join(["the red cat sat on the mat."] * 20)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the red"}, {"prompt": long_prompt}])
    code, _, stderr = invoke("ppo", RECIPE, "--model", env.policy, "--data", data, "--eval-data", env.eval,
                             "-o", tmp_path / "out")
    assert code == 2
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(env.policy)(long_prompt)["input_ids"])
    assert n > 116
    assert errors(stderr) == [f"error: data.train: 1 prompt(s) longer than 116 tokens (rows 1; the longest has {n}): "
                             "the context of 128 tokens minus ppo.max_new_tokens=12 leaves 116 for the prompt; "
                             "shorten or remove them, or lower ppo.max_new_tokens"]


def test_rollout_batch_not_a_multiple_of_the_minibatch(env, tmp_path):
    code, _, stderr = ppo(env, tmp_path / "out", "--set", "ppo.rollout_batch_size=20")
    assert code == 2
    assert errors(stderr) == ["error: ppo.rollout_batch_size: 20 is not a multiple of the minibatch "
                             "train.batch_size x train.grad_accum = 16; make it one, or lower train.batch_size"]


def test_validate_checks_prompts_and_reward(env, tmp_path):
    code, stdout, _ = invoke("validate", RECIPE, "--model", env.policy, "--data", env.train, "--eval-data", env.eval)
    assert code == 0
    assert "data.train: 96 prompts" in stdout and "data: ok" in stdout
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "the red"}])
    code, _, stderr = invoke("validate", RECIPE, "--model", env.policy, "--data", data,
                             "--set", "ppo.reward=no_such_rewards:score")
    assert code == 2
    assert "error: data.train: 1 empty prompt(s) in column 'prompt' (rows 0)" in stderr
    assert "error: ppo.reward: cannot import module 'no_such_rewards'" in stderr


def test_ppo_starts_from_a_lora_run_merged_into_its_base(tiny_gpt, tmp_path):
    """model.name may be a LoRA run, as for dpo and grpo: its adapter is merged into the base, so the
    policy (and the full run's reference, and the critic's body) start from the trained weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.recipe.load import build_recipe
    from finetune.tasks.ppo import load_critic, policy_and_reference

    run = tmp_path / "sft-lora"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt),
                                LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    peft_model.save_pretrained(run)
    AutoTokenizer.from_pretrained(tiny_gpt).save_pretrained(run)
    merged = peft_model.merge_and_unload().transformer.h[0].attn.c_attn.weight
    assert not torch.equal(merged, AutoModelForCausalLM.from_pretrained(tiny_gpt).transformer.h[0].attn.c_attn.weight)

    recipe = build_recipe({"task": "ppo", "method": "full", "model": {"name": str(run)}, "data": {"train": "p.jsonl"},
                           "ppo": {"reward": "toy_rewards:cat"}})
    tokenizer = AutoTokenizer.from_pretrained(run)
    policy, reference = policy_and_reference(recipe, tokenizer, None)
    assert torch.equal(policy.transformer.h[0].attn.c_attn.weight, merged)
    assert torch.equal(reference.transformer.h[0].attn.c_attn.weight, merged)
    critic = load_critic(recipe, recipe.ppo, tokenizer, None)
    assert torch.equal(critic.transformer.h[0].attn.c_attn.weight, merged)


def test_trl_style_reward_function_gets_the_data_columns(env, tmp_path):
    """`def f(completions, **kwargs)` as trl's docs write it; the data's other columns arrive by keyword."""
    (tmp_path / "kw_rewards.py").write_text(
        "def animal(completions, wanted, **kwargs):\n"
        "    return [float(c.strip().startswith(w)) for c, w in zip(completions, wanted)]\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"the {c}", "wanted": "cat"} for c in COLORS * 4])
    sys.path.insert(0, str(tmp_path))
    try:
        code, _, stderr = invoke("ppo", RECIPE, "--model", env.policy, "--data", data, "-o", str(tmp_path / "out"),
                                 "--max-steps", "1", "--set", "ppo.reward=kw_rewards:animal",
                                 "--set", "ppo.rollout_batch_size=16", "--set", "train.batch_size=16",
                                 "--set", "data.eval_fraction=0.25")
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0, stderr
    log = read_log(tmp_path / "out")
    assert len(log) == 1 and 0 < log[0]["reward"] < 1  # some cats, some not: the column was used