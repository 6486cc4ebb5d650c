"""Group relative policy optimization: online RL without a critic (trl's GRPOTrainer). For each
prompt the policy samples `grpo.num_generations` completions; each is scored by the reward, and its
advantage is its reward relative to the others of its group.

    finetune grpo --model runs/sft/merged --data prompts.jsonl --set grpo.reward=runs/reward -o runs/grpo
    finetune grpo --model gpt2 --data prompts.jsonl --set grpo.reward=my_rewards:brevity -o runs/grpo
    finetune grpo recipes/qwen2.5-0.5b-grpo-gsm8k.yaml

The reward (grpo.reward) is a `finetune reward` run or any one-output reward-model directory (scored
as it was trained: prompt + completion + eos, right padding), or a Python function named as
module:function, called as trl calls reward functions: `prompts=`, `completions=` and the dataset's
other columns by keyword (`def reward_len(completions, **kwargs)` works; so does a positional
fn(prompts, completions)). Data: a `prompt` column, plain text or chat messages. Recipe fields:
model.*, data.*, lora.*, quant.*, train.* (train.batch_size counts completions), grpo.*.
"""

from __future__ import annotations

from pathlib import Path

from finetune.models import pretrained
from finetune.models.adapters import apply_lora
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import GrpoSpec
from finetune.rl import rlhf
from finetune.rl.rewards import load_reward
from finetune.training import runlog
from finetune.training import session

DEFAULT_LR = {"lora": 1e-5, "full": 1e-6}  # trl's default (full) and a common LoRA choice


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    import tempfile

    from accelerate import PartialState
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    set_seed(recipe.train.seed)
    spec = recipe.section(GrpoSpec)

    # 1. Data: prompts (other columns are passed to reward functions that take **kwargs).
    train_raw, eval_raw, fmt = rlhf.load_prompts(recipe)

    # 2. Reward, before the policy so that a bad source fails at once.
    reward_fn = load_reward(spec.reward, "grpo.reward", device=str(PartialState().device))

    # 3. Tokenizer (trl pads prompts on the left for generation itself).
    tokenizer = pretrained.load_tokenizer(recipe.model)
    rlhf.check_chat_template(tokenizer, fmt, recipe)

    # 4. Policy: a model directory, a Hub id, or a LoRA run merged into its base in memory.
    model, merged = rlhf.load_policy(recipe)
    context = pretrained.context_length(model.config)

    # 5. Prompts that leave no room for max_completion_length tokens are reported and skipped.
    train_raw = skip_long(train_raw, "data.train", tokenizer, spec.max_completion_length, context)
    if eval_raw is not None:
        eval_raw = skip_long(eval_raw, "data.eval", tokenizer, spec.max_completion_length, context)

    # 6. LoRA; or full, where trl reloads the KL reference from config._name_or_path: when the policy
    #    was merged in memory, point that at a saved copy of the starting weights.
    reference_dir = None
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.models.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        model = apply_lora(model, recipe.lora, "CAUSAL_LM")
    elif spec.beta > 0 and merged:
        reference_dir = tempfile.TemporaryDirectory(prefix="finetune-grpo-reference-")
        model.save_pretrained(reference_dir.name)
        model.config._name_or_path = reference_dir.name

    # 7. Train, evaluate, save.
    run_dir = session.start_run(recipe)
    args = session.training_arguments(
        recipe, run_dir, args_cls=GRPOConfig, num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length, temperature=spec.temperature, beta=spec.beta,
        learning_rate=recipe.train.learning_rate or DEFAULT_LR[recipe.method],
        disable_dropout=True,  # as trl's DPO and reward trainers do: dropout would make the policy's log-probs
        # (and the KL to the reference) noisy; trl's GRPO default keeps it
        include_num_input_tokens_seen="no")  # batches hold prompt/completion ids, not input_ids
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=train_raw,
                          eval_dataset=eval_raw, processing_class=tokenizer,
                          callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    if reference_dir is not None:  # trl has loaded the reference; the copy is no longer needed
        reference_dir.cleanup()
        model.config._name_or_path = recipe.model.name
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_raw is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))

    metrics = session.run_metrics(trainer, train_output, eval_metrics, trainer.model)
    metrics.pop("perplexity", None)
    metrics["reward_start"], metrics["reward_end"] = runlog.curve(run_dir, "reward")
    rlhf.print_curve("mean reward of the sampled completions", metrics["reward_start"], metrics["reward_end"])
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


def skip_long(ds, key: str, tokenizer, max_completion_length: int, context: int | None):
    if not context:
        return ds
    lengths = rlhf.token_counts(tokenizer, ds["prompt"], generation_prompt=True)
    rows = [i for i, n in enumerate(lengths) if n + max_completion_length > context]
    return rlhf.drop_rows(ds, rows, key, f"the prompt leaves no room for grpo.max_completion_length="
                          f"{max_completion_length} tokens in the model's context of {context}",
                          "shorten those prompts or lower grpo.max_completion_length")


def usage(run_dir: Path, recipe: Recipe) -> str:
    from finetune.tasks import clm

    return clm.usage(run_dir, recipe)


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune generate {run_dir} "<a prompt from your data>"']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained policy (a PeftModel for LoRA runs)."""
    from finetune.tasks import clm

    return clm.load_trained(run_dir, **kwargs)


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """`finetune validate`: the prompts, the reward source (without loading a model) and the lengths."""
    from finetune.errors import UserError
    from finetune.rl.rewards import check_reward_dir

    spec = recipe.section(GrpoSpec)
    problems, notes = [], []
    source = Path(spec.reward or "").expanduser()
    try:
        if source.is_dir():
            check_reward_dir(source, "grpo.reward")
        else:
            load_reward(spec.reward, "grpo.reward")  # module:function: imports it
        notes.append(f"grpo.reward: {spec.reward}")
    except UserError as e:
        problems += e.problems
    try:
        train, eval_ds, fmt = rlhf.load_prompts(recipe)
        tokenizer = pretrained.load_tokenizer(recipe.model)
        rlhf.check_chat_template(tokenizer, fmt, recipe)
        context = pretrained.context_length(rlhf.policy_config(recipe))
    except UserError as e:
        return problems + e.problems, notes
    for ds, key in ((train, "data.train"), (eval_ds, "data.eval")):
        if ds is None:
            continue
        lengths = rlhf.token_counts(tokenizer, ds["prompt"], generation_prompt=True)
        notes.append(f"{key}: {len(ds)} prompts, {max(lengths)} tokens at most, + up to "
                     f"{spec.max_completion_length} generated (context {context})")
        long = [i for i, n in enumerate(lengths) if context and n + spec.max_completion_length > context]
        if long and len(long) == len(ds):
            problems.append(f"{key}: no prompt leaves room for grpo.max_completion_length="
                            f"{spec.max_completion_length} tokens in the model's context of {context}")
        elif long:
            notes.append(f"{key}: {len(long)} of {len(ds)} prompts leave no room for the completion and will be "
                         "skipped")
    return problems, notes
