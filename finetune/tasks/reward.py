"""Reward modelling: a sequence classifier with one output, trained so that the chosen response of
each pair scores above the rejected one (pairwise Bradley-Terry loss, trl's RewardTrainer).

    finetune reward --model gpt2 --data prefs.jsonl -o runs/gpt2-reward               # LoRA (default)
    finetune reward --method full --model gpt2 --data prefs.jsonl -o runs/gpt2-reward
    finetune reward recipes/qwen2.5-0.5b-reward-ultrafeedback.yaml

Data: prompt/chosen/rejected rows, plain text or chat messages (finetune/rl/rlhf.py). Recipe fields:
model.*, data.*, lora.*, quant.*, train.*, reward.center_rewards. At the end the held-out pairs are
scored exactly as `finetune ppo` / `finetune grpo` will score completions (finetune/rl/rewards.py:
prompt + response + eos, right padding), and the run reports the pairwise accuracy (chosen scored
above rejected) and the mean margin. The run directory is then a reward source: `reward: runs/...`.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError
from finetune.models import pretrained
from finetune.models.adapters import apply_lora, is_adapter_dir
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import RewardSpec
from finetune.rl import rlhf
from finetune.rl.rewards import score_pairs
from finetune.training import runlog
from finetune.training import session


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(recipe.train.seed)
    spec = recipe.section(RewardSpec)

    # 1. Data: prompt/chosen/rejected, checked (missing columns, empty rows, mixed formats).
    train_raw, eval_raw, fmt = rlhf.load_preferences(recipe)

    # 2. Tokenizer, with a pad token distinct from eos: the score is read at the last non-pad token,
    #    so with pad == eos it would be read before the eos the model was trained to score at.
    tokenizer = pretrained.load_tokenizer(recipe.model)
    rlhf.check_chat_template(tokenizer, fmt, recipe)

    # 3. Model: a sequence classifier with one output (a causal LM gets a fresh score head).
    check_base(recipe)
    model, _ = rlhf.load_policy(recipe, AutoModelForSequenceClassification, num_labels=1)
    pretrained.ensure_pad_token(tokenizer, model)
    max_length = pretrained.max_length(recipe.data.max_length, model.config)

    # 4. Pairs longer than max_length are reported and skipped (trl would drop them silently).
    context = pretrained.context_length(model.config)
    train_raw = skip_long(train_raw, "data.train", tokenizer, max_length, context)
    if eval_raw is not None:
        eval_raw = skip_long(eval_raw, "data.eval", tokenizer, max_length, context)

    # 5. LoRA: the score head is new, so peft trains and saves it in full (task type SEQ_CLS).
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.models.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        model = apply_lora(model, recipe.lora, "SEQ_CLS")

    # 6. Train, evaluate, save.
    run_dir = session.start_run(recipe)
    args = session.training_arguments(recipe, run_dir, args_cls=RewardConfig, max_length=max_length,
                                       center_rewards_coefficient=spec.center_rewards)
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_raw, eval_dataset=eval_raw,
                            processing_class=tokenizer,
                            callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_raw is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))

    # 7. Held-out pairs, scored the way PPO/GRPO score completions with this run.
    metrics = session.run_metrics(trainer, train_output, eval_metrics, trainer.model)
    metrics.pop("perplexity", None)  # eval_loss is the pairwise loss, not a language-model loss
    if eval_raw is not None:
        metrics.update(pairwise_metrics(trainer.model, tokenizer, eval_raw))
    metrics["margin_start"], metrics["margin_end"] = runlog.curve(run_dir, "margin")
    rlhf.print_curve("training margin (chosen - rejected score)", metrics["margin_start"], metrics["margin_end"])
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


def check_base(recipe: Recipe) -> None:
    """A classifier with several outputs cannot be a reward model; a causal LM or a 1-output model can."""
    path = Path(recipe.model.name).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        return
    config = pretrained.load_config(recipe.model)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise UserError(f"model.name: '{recipe.model.name}' is a classifier with {config.num_labels} outputs; a reward "
                        "model has one: start from its base model, or from a `finetune reward` run")


def skip_long(ds, key: str, tokenizer, max_length: int, context: int | None):
    lengths = rlhf.pair_lengths(ds, tokenizer)
    rows = [i for i, (_, n) in enumerate(lengths) if n > max_length]
    return rlhf.drop_rows(ds, rows, key, f"longer than data.max_length={max_length} tokens (prompt + response + eos)",
                          rlhf.length_fix(max_length, context))


def pairwise_metrics(model, tokenizer, pairs) -> dict[str, float]:
    """Accuracy (chosen scored above rejected) and mean margin over held-out pairs."""
    model.eval()
    prompts = pairs["prompt"] if "prompt" in pairs.column_names else [None] * len(pairs)
    chosen = score_pairs(model, tokenizer, prompts, pairs["chosen"])
    rejected = score_pairs(model, tokenizer, prompts, pairs["rejected"])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"eval_accuracy": round(sum(m > 0 for m in margins) / len(margins), 6),
            "eval_margin": round(sum(margins) / len(margins), 6),
            "eval_pairs": len(margins)}


def usage(run_dir: Path, recipe: Recipe) -> str:
    return ("A reward model: one score per prompt + response (higher is better).\n\n"
            "```python\nfrom finetune.rl.rewards import load_reward\n\n"
            f'score = load_reward("{run_dir}")\n'
            'score(["How do I boil an egg?"], [" Put it in boiling water for 8 minutes."])  # -> [float]\n```\n\n'
            f"As the reward of online RL: `finetune grpo --set grpo.reward={run_dir} ...` or "
            f"`finetune ppo --set ppo.reward={run_dir} ...`.")


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    return [f"finetune grpo --model <policy> --data <prompts> --set grpo.reward={run_dir} -o <new run>",
            f"finetune ppo --model <policy> --data <prompts> --set ppo.reward={run_dir} -o <new run>"]


def load_trained(run_dir: Path, **kwargs):
    """The trained reward model (a PeftModel for LoRA runs)."""
    if is_adapter_dir(run_dir):
        from peft import AutoPeftModelForSequenceClassification

        return AutoPeftModelForSequenceClassification.from_pretrained(str(run_dir), num_labels=1, **kwargs)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(run_dir), **kwargs)


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes)."""
    return rlhf.check_preference_recipe(recipe, "reward")
