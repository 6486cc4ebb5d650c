"""Direct preference optimization: learn from preference pairs directly, without a reward model or
sampling (trl's DPOTrainer). The policy is pushed to raise the log-probability of the chosen response
over the rejected one, relative to a frozen reference, with strength `dpo.beta`.

    finetune dpo --model runs/sft/merged --data prefs.jsonl -o runs/dpo                  # LoRA (default)
    finetune dpo --method full --model runs/sft/merged --data prefs.jsonl -o runs/dpo-full
    finetune dpo recipes/qwen2.5-0.5b-dpo-ultrafeedback.yaml --set dpo.beta=0.05

The reference: with LoRA, the policy with its adapter disabled (no second model in memory); in full
fine-tuning, a frozen copy of the policy made in memory before training (trl would otherwise reload
it from `config._name_or_path`, which is wrong when the policy was changed in memory, e.g. a LoRA run
given as model.name and merged on load). Recipe fields: model.*, data.*, lora.*, quant.*, train.*,
dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.sft_weight. Reports the reward accuracy (the
implicit reward of the chosen response above the rejected one) and the mean reward margin on
held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError, first_line
from finetune.models import pretrained
from finetune.models.adapters import is_adapter_dir, lora_config
from finetune.recipe.schema import Recipe
from finetune.recipe.task_sections import DpoSpec
from finetune.rl import rlhf
from finetune.training import runlog
from finetune.training import session

# DPO moves far on small rates: these are trl's defaults (full) and a common LoRA choice.
DEFAULT_LR = {"lora": 1e-5, "full": 1e-6}


def run(recipe: Recipe, resume: bool = False, callbacks: list | None = None) -> dict:
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(recipe.train.seed)
    spec = recipe.section(DpoSpec)

    # 1. Data: prompt/chosen/rejected, checked (missing columns, empty rows, mixed formats).
    train_raw, eval_raw, fmt = rlhf.load_preferences(recipe)

    # 2. Tokenizer. pad == eos is harmless here: trl masks the loss by position, not by token id.
    tokenizer = pretrained.load_tokenizer(recipe.model)
    rlhf.check_chat_template(tokenizer, fmt, recipe)

    # 3. Policy: a model directory, a Hub id, or a LoRA run merged into its base in memory.
    model, _ = rlhf.load_policy(recipe)
    model.config.use_cache = False
    max_length = pretrained.max_length(recipe.data.max_length, model.config)

    # 4. Lengths: pairs whose prompt fills max_length are skipped, longer responses cut; both reported.
    context = pretrained.context_length(model.config)
    train_raw = check_lengths(train_raw, "data.train", tokenizer, max_length, context)
    if eval_raw is not None:
        eval_raw = check_lengths(eval_raw, "data.eval", tokenizer, max_length, context)

    # 5. Reference: LoRA -> the policy with the adapter disabled (trl does this when it applies the
    #    adapter itself); full -> a frozen copy of the policy as it is now.
    ref_model, peft_config = None, None
    if recipe.method == "lora":
        if recipe.quant.bits:
            from finetune.models.quantization import prepare_quantized

            model = prepare_quantized(model, recipe)
        peft_config = lora_config(model, recipe.lora, "CAUSAL_LM")
    else:
        ref_model = rlhf.frozen_copy(model)

    # 6. Train, evaluate, save.
    run_dir = session.start_run(recipe)
    losses = {spec.loss_type: 1.0, **({"sft": spec.sft_weight} if spec.sft_weight else {})}
    args = session.training_arguments(
        recipe, run_dir, args_cls=DPOConfig, max_length=max_length, beta=spec.beta, loss_type=list(losses),
        loss_weights=list(losses.values()), label_smoothing=spec.label_smoothing,
        learning_rate=recipe.train.learning_rate or DEFAULT_LR[recipe.method])
    checkpoint = session.resume_checkpoint(run_dir) if resume else None
    resume_step = session.checkpoint_step(checkpoint) or 0
    try:
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_raw,
                             eval_dataset=eval_raw, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[*session.callbacks(recipe, run_dir, resume_step), *(callbacks or [])])
    except ValueError as e:
        if "Target modules" in str(e):  # peft: lora.target_modules names no module of this model
            raise UserError(f"lora.target_modules: {first_line(e)}; set lora.target_modules to module names "
                            "of this model (or 'all-linear')") from e
        raise
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_raw is not None else None
    trainer.save_model(str(run_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))

    metrics = session.run_metrics(trainer, train_output, eval_metrics, trainer.model)
    metrics.pop("perplexity", None)  # eval_loss is the DPO loss, not a language-model loss
    if eval_metrics:
        metrics["eval_accuracy"] = round(eval_metrics["eval_rewards/accuracies"], 6)
        metrics["eval_margin"] = round(eval_metrics["eval_rewards/margins"], 6)
    metrics["margin_start"], metrics["margin_end"] = runlog.curve(run_dir, "rewards/margins")
    rlhf.print_curve("training reward margin (chosen - rejected)", metrics["margin_start"], metrics["margin_end"])
    session.finish_run(recipe, run_dir, metrics, usage(run_dir, recipe), next_steps(run_dir, recipe))
    return metrics


def check_lengths(ds, key: str, tokenizer, max_length: int, context: int | None):
    lengths = rlhf.pair_lengths(ds, tokenizer)
    long_prompts = [i for i, (p, _) in enumerate(lengths) if p >= max_length]
    ds_out = rlhf.drop_rows(ds, long_prompts, key, f"the prompt alone fills data.max_length={max_length} tokens",
                            rlhf.length_fix(max_length, context))
    cut = [i for i, (p, n) in enumerate(lengths) if n > max_length and p < max_length]
    if cut:
        print(f"warning: {len(cut)} of {len(ds)} pairs in {key} exceed data.max_length={max_length} tokens (the first: "
              f"{rlhf.excerpt(ds[cut[0]].get('prompt') or ds[cut[0]]['chosen'])}); their responses are cut to fit "
              f"({rlhf.length_fix(max_length, context)} to keep them whole)", flush=True)
    return ds_out


def usage(run_dir: Path, recipe: Recipe) -> str:
    from finetune.tasks import clm

    return clm.usage(run_dir, recipe)


def next_steps(run_dir: Path, recipe: Recipe) -> list[str]:
    steps = [f'finetune generate {run_dir} "<a prompt from your data>"']
    if recipe.method == "lora":
        steps.append(f"finetune merge {run_dir} -o {run_dir}-merged")
    return steps


def load_trained(run_dir: Path, **kwargs):
    """The trained policy (a PeftModel for LoRA runs): a causal LM like any SFT run."""
    from finetune.tasks import clm

    return clm.load_trained(run_dir, **kwargs)


def check(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Data checks for `finetune validate`: (problems, notes)."""
    return rlhf.check_preference_recipe(recipe, "dpo")
