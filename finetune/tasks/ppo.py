"""PPO: a policy learns to write responses that a reward scores highly, while a per-token KL
penalty keeps it close to where it started.

    finetune ppo --model gpt2 --data prompts.jsonl --set ppo.reward=runs/gpt2-reward -o runs/gpt2-ppo
    finetune ppo --model gpt2 --data prompts.jsonl --set ppo.reward=my_rewards:length --method full
    finetune ppo recipes/gpt2-lora-ppo-tldr.yaml --num-processes 2

Recipe fields used: model.*, data.train/eval (a text column of prompts, ppo.prompt_column),
data.max_length (prompt + response budget; unset: the model's context), lora.*, ppo.*, and train.*:
max_steps = PPO iterations (unset: train.epochs passes over the prompts), batch_size x grad_accum =
rollouts per optimizer step, learning_rate (unset: 3e-5 LoRA, 3e-6 full), save_steps in iterations.

The reward is a reward-model directory (scored on prompt + response + eos, right-padded) or a
Python function `module:function`, called as trl calls reward functions: `prompts=`, `completions=`
and the data's other columns by keyword (a positional fn(prompts, completions) works too). The reference is a frozen
copy of the starting policy, or under LoRA the policy with its adapter disabled (no second copy).
The critic is a sequence-classification model with one output read at every token: by default
the policy's weights with a new head (same tokenizer, and it starts from what the policy knows);
`ppo.critic: DIR` starts it from another model with the same tokenizer, typically the reward model.
"""

from __future__ import annotations

import math
from pathlib import Path

from finetune.data import text as D
from finetune.errors import UserError, raise_if
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import PpoSpec
from finetune.rl import rlhf
from finetune.training import session
from finetune.training.runlog import read_log

# Lower than SFT rates: each iteration re-fits the policy to its own samples several times.
PPO_LEARNING_RATE = {"lora": 3e-5, "full": 3e-6}


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    """`callbacks`: functions called with each iteration's log record (main process)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from finetune.rl.ppo_trainer import Critic, PpoTrainer
    from finetune.rl.rewards import load_reward

    spec = recipe.section(PpoSpec)
    raise_if(problems(recipe))
    t = recipe.train
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=t.grad_accum,
                              mixed_precision="bf16" if t.bf16 else "fp16" if t.fp16 else "no")
    set_seed(t.seed)

    # 1. Prompts: plain text, none empty, none too long for the context (reported, never cut).
    train_raw, eval_raw = D.load_splits(recipe.data, t.seed)
    tokenizer = pretrained.load_tokenizer(recipe.model)
    pretrained.ensure_pad_token(tokenizer)
    context = pretrained.max_length(recipe.data.max_length, rlhf.policy_config(recipe))
    train_ids = tokenize_prompts(train_raw, tokenizer, spec, context, "data.train", recipe.data.train)
    eval_ids = None
    if eval_raw is not None:
        source = recipe.data.eval or recipe.data.train
        eval_ids = tokenize_prompts(eval_raw, tokenizer, spec, context, "data.eval", source)

    # 2. Reward: a function of texts, so the reward model may use its own tokenizer.
    reward_fn = load_reward(spec.reward, key="ppo.reward", device=str(accelerator.device))

    # 3. Policy, reference and critic; on resume the trained ones come from the checkpoint.
    checkpoint = Path(session.resume_checkpoint(recipe.output_dir)) if resume else None
    policy, reference = policy_and_reference(recipe, tokenizer, checkpoint)
    critic = Critic(load_critic(recipe, spec, tokenizer, checkpoint))
    if t.gradient_checkpointing:  # trade compute for memory in the policy and critic updates
        for model in (policy, critic.model):
            (model.get_base_model() if hasattr(model, "get_base_model") else model).activation_checkpointing_enable()

    # 4. Train.
    run_dir = session.start_run(recipe)
    world = accelerator.num_processes
    iterations = t.max_steps if t.max_steps > 0 else \
        max(1, math.ceil(t.epochs * len(train_ids) / (spec.rollout_batch_size * world)))
    learning_rate = t.learning_rate or PPO_LEARNING_RATE[recipe.method]
    trainer = PpoTrainer(policy=policy, critic=critic, reference=reference, tokenizer=tokenizer, reward_fn=reward_fn,
                         spec=spec, train=t, learning_rate=learning_rate, accelerator=accelerator, iterations=iterations)
    set_seed(t.seed, device_specific=True)  # each process samples differently
    start = trainer.load_state(checkpoint) if checkpoint else 0  # restores each process's RNG too
    trainer.train(prompt_ids=train_ids, prompt_texts=list(train_raw[spec.prompt_column]), start=start, run_dir=run_dir,
                  seed=t.seed, callbacks=callbacks, columns=other_columns(train_raw, spec))
    runtime = trainer_runtime(run_dir)

    # 5. Evaluate on held-out prompts, save the policy, write the card.
    eval_metrics = trainer.evaluate(eval_ids, list(eval_raw[spec.prompt_column]),
                                    other_columns(eval_raw, spec)) if eval_ids else {}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(trainer.policy).save_pretrained(str(run_dir))
        tokenizer.save_pretrained(str(run_dir))
    metrics = ppo_metrics(run_dir, iterations, runtime, eval_metrics, accelerator.unwrap_model(trainer.policy),
                          world, learning_rate)
    if accelerator.is_main_process:
        held_out = (f"; held-out reward {metrics['eval_reward']:.4f} (reference policy "
                    f"{metrics['eval_reward_reference']:.4f})") if eval_metrics else ""
        print(f"reward {metrics['reward_start']:.4f} -> {metrics['reward_end']:.4f} over {iterations} iterations; "
              f"kl {metrics['kl_end']:.4f}{held_out}", flush=True)
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    # Every process leaves together (end_training then tears the process group down on all of them): a process
    # whose peer had already exited hung for good in gloo's teardown (~ProcessGroupGloo, freeing the DDP reducer).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


# ---------------------------------------------------------------------------------------
# Inputs


def problems(recipe: Recipe) -> list[str]:
    """Contradictions in a PPO recipe, phrased as the keys the user wrote."""
    spec, t = recipe.section(PpoSpec), recipe.train
    out = []
    if recipe.method == "pretrain":
        out.append("method: `finetune ppo` trains an existing policy; use --method lora (the default) or full")
    if not spec.reward:
        out.append("ppo.reward: required; a reward-model directory (a `finetune reward` run) or module:function, "
                   "for example --set ppo.reward=my_rewards:length")
    minibatch = t.batch_size * t.grad_accum
    if spec.rollout_batch_size % minibatch:
        out.append(f"ppo.rollout_batch_size: {spec.rollout_batch_size} is not a multiple of the minibatch "
                   f"train.batch_size x train.grad_accum = {minibatch}; make it one, or lower train.batch_size")
    if recipe.quant.bits:
        out.append("quant.bits: `finetune ppo` does not train quantized policies; drop quant.bits")
    return out


def other_columns(ds, spec: PpoSpec) -> dict[str, list]:
    """The data's columns besides the prompts: a reward function gets them by keyword, as in trl."""
    return {c: list(ds[c]) for c in ds.column_names if c != spec.prompt_column}


def tokenize_prompts(ds, tokenizer, spec: PpoSpec, context: int, key: str, source: str) -> list[list[int]]:
    """Token ids of every prompt. Empty prompts and prompts that leave no room for
    ppo.max_new_tokens in the context are errors: cutting them would change what is asked."""
    column = spec.prompt_column
    D.require_columns(ds, {"ppo.prompt_column": column}, f"{key} '{source}'")
    texts = ds[column]
    not_text = [i for i, x in enumerate(texts) if x is not None and not isinstance(x, str)]
    if not_text:
        raise UserError(f"{key}: column '{column}' holds {type(texts[not_text[0]]).__name__} values (row "
                        f"{not_text[0]}); PPO prompts are plain text: set ppo.prompt_column to a text column")
    empty = D.empty_rows(ds, column)
    if empty:
        raise UserError(f"{key}: {len(empty)} empty prompt(s) in column '{column}' (rows {rows(empty)}); "
                        "every prompt needs text: remove them")
    room = context - spec.max_new_tokens
    if room < 1:
        raise UserError(f"ppo.max_new_tokens: {spec.max_new_tokens} leaves no room for a prompt in the context of "
                        f"{context} tokens; lower it")
    ids = tokenizer(list(texts))["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > room]
    if too_long:
        longest = max(len(ids[i]) for i in too_long)
        raise UserError(f"{key}: {len(too_long)} prompt(s) longer than {room} tokens (rows {rows(too_long)}; the "
                        f"longest has {longest}): the context of {context} tokens minus ppo.max_new_tokens="
                        f"{spec.max_new_tokens} leaves {room} for the prompt; shorten or remove them, or lower "
                        "ppo.max_new_tokens")
    return ids


def rows(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")


# ---------------------------------------------------------------------------------------
# Models


def policy_and_reference(recipe: Recipe, tokenizer, checkpoint: Path | None):
    """(policy, reference). The policy starts from model.name (a LoRA run merged into its base, as DPO
    and GRPO do). The reference is a frozen copy of the starting policy for full training, None under
    LoRA (the trainer disables the adapter instead)."""
    from transformers import AutoModelForCausalLM

    base, _ = rlhf.load_policy(recipe)
    pretrained.ensure_pad_token(tokenizer, base)
    if recipe.method == "lora":
        if checkpoint:
            from peft import PeftModel

            return PeftModel.from_pretrained(base, str(checkpoint / "policy"), is_trainable=True), None
        return apply_lora(base, recipe.lora, "CAUSAL_LM"), None
    reference = rlhf.frozen_copy(base)
    if checkpoint:
        base = AutoModelForCausalLM.from_pretrained(str(checkpoint / "policy"))
    return base, reference


def load_critic(recipe: Recipe, spec: PpoSpec, tokenizer, checkpoint: Path | None):
    """A one-output sequence-classification model over the policy's token ids."""
    from transformers import AutoModelForSequenceClassification

    if checkpoint and recipe.method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint / "critic"))
    elif spec.critic:
        from finetune.rl.rewards import load_reward_model

        path = Path(spec.critic).expanduser()
        if not path.is_dir():
            raise UserError(f"ppo.critic: no such directory '{spec.critic}'; give a model directory with the "
                            "policy's tokenizer (e.g. the reward model), or leave it unset")
        model, critic_tokenizer = load_reward_model(path, key="ppo.critic")
        if not same_vocabulary(critic_tokenizer, tokenizer):
            raise UserError(f"ppo.critic: '{spec.critic}' has another vocabulary than the policy; the critic reads "
                            "the policy's token ids, so it needs the same tokenizer (or leave ppo.critic unset)")
    else:  # the policy's weights (a LoRA run merged) under a new one-output head
        model, _ = rlhf.load_policy(recipe, AutoModelForSequenceClassification, num_labels=1)
    if not hasattr(model, "score"):
        raise UserError(f"ppo.critic: {type(model).__name__} has no `score` head to read values from; use a "
                        "decoder model (GPT-2, Llama, Qwen, ...)")
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.method == "lora":
        if checkpoint:
            from peft import PeftModel

            return PeftModel.from_pretrained(model, str(checkpoint / "critic"), is_trainable=True)
        return apply_lora(model, recipe.lora, "SEQ_CLS")  # peft keeps the `score` head trainable
    return model


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map tokens to the same ids, apart from an added pad token."""
    def vocab(tok):
        return {t: i for t, i in tok.get_vocab().items() if t != tok.pad_token or t == tok.eos_token}

    va, vb = vocab(a), vocab(b)
    shared = va.keys() & vb.keys()
    return all(va[t] == vb[t] for t in shared) and len(shared) >= max(len(va), len(vb)) - 1


# ---------------------------------------------------------------------------------------
# Metrics, card, reload


def trainer_runtime(run_dir: Path) -> float:
    return round(sum(r.get("iteration_s", 0.0) for r in read_log(run_dir)), 2)


def ppo_metrics(run_dir: Path, iterations: int, runtime: float, eval_metrics: dict, policy, world: int,
                learning_rate: float) -> dict:
    """Reward and KL at the start and the end (each the mean of a few iterations, to smooth
    the noise of a single rollout batch), held-out rewards, sizes."""
    log = read_log(run_dir)
    k = max(1, min(3, len(log) // 10))

    def mean(records, key):
        return round(sum(r[key] for r in records) / len(records), 6) if records else None

    trainable, total = pretrained.count_parameters(policy)
    return {
        "reward_start": mean(log[:k], "reward"),
        "reward_end": mean(log[-k:], "reward"),
        "kl_end": mean(log[-k:], "kl"),
        "entropy_end": mean(log[-k:], "entropy"),
        "response_length_end": mean(log[-k:], "response_length"),
        **eval_metrics,
        "iterations": iterations,
        "runtime_s": runtime,
        "learning_rate": learning_rate,
        "trainable_params": trainable,
        "total_params": total,
        "world_size": world,
    }


def usage(run_dir: Path, recipe: Recipe) -> str:
    lib, name = ("peft", "AutoPeftModelForCausalLM") if recipe.method == "lora" \
        else ("transformers", "AutoModelForCausalLM")
    return (f"```python\nfrom {lib} import {name}\nfrom transformers import AutoTokenizer\n\n"
            f'model = {name}.from_pretrained("{run_dir}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{run_dir}")\n```\n\n'
            f'Or: `finetune generate {run_dir} "<a prompt>"`. The per-iteration reward, KL and losses are in '
            "`log.jsonl`; the critic is in the last checkpoint.")


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune generate {run_dir} "<a prompt>"']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained policy of a run (a PeftModel for LoRA runs)."""
    if is_adapter_dir(run_dir):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(run_dir), **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(run_dir), **kwargs)


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Checks for `finetune validate`: the recipe, the prompts, the reward source. (problems, notes)"""
    spec = recipe.section(PpoSpec)
    problems_, notes = problems(recipe), []
    try:
        train_raw, eval_raw = D.load_splits(recipe.data, recipe.train.seed)
        tokenizer = pretrained.load_tokenizer(recipe.model)
        context = pretrained.max_length(recipe.data.max_length, rlhf.policy_config(recipe))
    except UserError as e:
        return problems_ + e.problems, notes
    for ds, key in ((train_raw, "data.train"), (eval_raw, "data.eval")):
        if ds is None:
            continue
        try:
            source = getattr(recipe.data, key[5:]) or recipe.data.train
            ids = tokenize_prompts(ds, tokenizer, spec, context, key, source)
        except UserError as e:
            problems_ += e.problems
            continue
        stats = D.length_stats([len(x) for x in ids])
        notes.append(f"{key}: {len(ids)} prompts, tokens mean {stats['mean']:.0f}, max {stats['max']} "
                     f"(+ ppo.max_new_tokens={spec.max_new_tokens} within a context of {context})")
    if spec.reward:
        problems_ += reward_problems(spec.reward)
    return problems_, notes


def reward_problems(source: str) -> list[str]:
    """The reward source resolves: a function imports; a model directory has one output (read
    from its config, without loading the weights)."""
    from finetune.rl.rewards import load_reward

    path = Path(source).expanduser()
    try:
        if not path.is_dir():
            load_reward(source, key="ppo.reward")
        elif (path / "config.json").exists():  # an adapter directory is checked when the run loads it
            from transformers import AutoConfig

            labels = AutoConfig.from_pretrained(str(path)).num_labels
            if labels != 1:
                return [f"ppo.reward: the model in '{path}' has {labels} outputs; a reward model has exactly one "
                        "(train one with `finetune reward`)"]
    except UserError as e:
        return e.problems
    return []
