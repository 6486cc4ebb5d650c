"""Each task's own recipe section (`mlm:`, `classification:`, ..., `ppo:`), and a chain's `stages:`. The
registry (finetune/recipe/tasks.py) says which task owns which section; a section of another task is an error."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from finetune.recipe.sections import Spec
from finetune.recipe.tasks import stage_commands

# --- task sections: encoder, encoder-decoder and vision tasks ---


class MlmSpec(Spec):
    """Masked language modelling (task mlm): BERT's masking recipe."""

    mask_probability: float = Field(0.15, gt=0.0, lt=1.0)  # share of tokens selected for prediction (BERT: 15%)
    mask_replace: float = Field(0.8, ge=0.0, le=1.0)  # of the selected, the share shown as [MASK]
    random_replace: float = Field(0.1, ge=0.0, le=1.0)  # ... shown as a random token; the rest stay unchanged
    top_k: int = Field(5, gt=0)  # `finetune fill-mask`: candidates shown per [MASK]

    @model_validator(mode="after")
    def _shares(self):
        if self.mask_replace + self.random_replace > 1:
            total = self.mask_replace + self.random_replace
            raise PydanticCustomError("mlm_shares", f"mask_replace + random_replace is {total:.2f}; they split "
                                      "the selected tokens, so their sum must be at most 1")
        return self


class ClassificationSpec(Spec):
    """Sequence classification (task classification): one label per text or text pair."""

    label_column: str = "label"  # integers or strings
    text_pair_column: str | None = None  # second text of a pair (NLI, paraphrase): [CLS] text [SEP] pair [SEP]
    labels: list[str] | None = None  # label names in id order; unset: ClassLabel names or the sorted values
    metrics: list[str] = []  # extra `evaluate` metrics (fetched from the Hub once), e.g. [matthews_correlation]

    @field_validator("labels")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise PydanticCustomError("labels", "needs at least two distinct label names")
        return v

class TranslationSpec(Spec):
    source_column: str = "source"  # plain text columns; ignored when the languages pick from `translation`
    target_column: str = "target"
    source_lang: str | None = None  # language codes (en, de): pick the texts out of a `translation` column of
    target_lang: str | None = None  # {code: text} dicts (wmt16, opus_books), and name the default prefix
    prefix: str | None = None  # prepended to every source; null: "translate English to German: " from the
    # languages (what T5 was pre-trained with), or nothing without them
    max_target_length: int = Field(128, gt=1)  # target tokens, also the longest generated translation
    # (source tokens: data.max_length, default 128)
    num_beams: int = Field(4, gt=0)  # beam search when evaluating and translating; 1 = greedy, faster


class ImageClassificationSpec(Spec):
    image_column: str = "image"  # an image folder gives `image` and `label` (one sub-folder per class)
    label_column: str = "label"  # class names or ids
    augment: bool = False  # random flips, crops and brightness of the training images (never evaluation)


class CaptioningSpec(Spec):
    # Captions come from data.text_column; data.max_length caps their tokens (default 64), which is also
    # the longest generated caption.
    decoder: str | None = None  # a GPT-2-style text decoder joined to the image encoder in model.name
    # (cross-attention is added and trained in full); null when model.name is a VisionEncoderDecoder already
    image_column: str = "image"  # an image folder with metadata.jsonl gives `image` plus its columns
    num_beams: int = Field(4, gt=0)  # beam search when evaluating and captioning; 1 = greedy, faster
    augment: bool = False  # random crops and brightness of the training images (no flips: a caption may
    # say left or right)


# --- task sections: RLHF ---


class RewardSpec(Spec):
    """`finetune reward`: a sequence classifier with one output, trained on prompt/chosen/rejected pairs."""

    center_rewards: float | None = Field(None, ge=0)  # pulls scores toward 0 (trl suggests 0.01); null: off


class DpoSpec(Spec):
    """`finetune dpo`: learn from preferences directly, against a frozen reference (trl's DPOTrainer)."""

    beta: float = Field(0.1, gt=0)  # higher keeps the policy closer to the reference
    loss_type: Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"] = "sigmoid"
    # sigmoid: the DPO paper; ipo: bounded, for near-deterministic preferences; robust: noisy labels
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust/exo: assumed share of flipped labels
    sft_weight: float = Field(0.0, ge=0)  # > 0 adds the chosen responses' language-model loss (RPO; 1.0 in
    # the paper): DPO alone also lowers the chosen likelihood and can unlearn to stop (eos)


class GrpoSpec(Spec):
    """`finetune grpo`: online RL without a critic (trl's GRPOTrainer); rewards relative within each group."""

    reward: str | None = None  # a `finetune reward` run / reward-model directory, or module:function
    num_generations: int = Field(8, ge=2)  # completions per prompt; train.batch_size counts completions
    max_completion_length: int = Field(64, gt=0)  # tokens generated per completion
    temperature: float = Field(1.0, gt=0)  # sampling temperature of the rollouts
    beta: float = Field(0.0, ge=0)  # KL penalty toward the starting policy; 0 skips the reference model


class StageSpec(Spec):
    """One stage of a chained recipe: `finetune <command>` on the chain's fields plus `set`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # its run is <chain output>/<name>
    command: str  # the verb this stage runs: lora, full, pretrain, or a task with its own verb (reward, dpo, ...)
    recipe: str | None = None  # a recipe file or built-in name as the base; unset: the chain's own fields
    set: dict[str, Any] = {}  # overrides (dotted or nested keys); "{stages.NAME.output}" is an earlier
    # stage's trained model (a LoRA run merged into its base), "{stages.NAME.run}" its run directory

    @field_validator("command")
    @classmethod
    def _command(cls, v):
        if v not in stage_commands():
            *rest, last = map(repr, stage_commands())
            raise PydanticCustomError("literal_error", f"Input should be {', '.join(rest)} or {last}")
        return v


class PpoSpec(Spec):
    """`finetune ppo`: each iteration samples `rollout_batch_size` responses per process, scores them,
    then makes `ppo_epochs` passes over them in minibatches of train.batch_size x train.grad_accum.
    Iterations: train.max_steps, or train.epochs passes over the prompts."""

    reward: str | None = None  # a reward-model directory (a `finetune reward` run) or module:function
    prompt_column: str = "prompt"  # the column of data.train holding the prompts (plain text)
    critic: str | None = None  # value model: a directory with the policy's tokenizer (e.g. the reward
    # model); unset: the policy's own weights with a new value head
    rollout_batch_size: int = Field(32, gt=0)  # prompts sampled per iteration and process
    ppo_epochs: int = Field(4, gt=0)  # optimisation passes over each rollout batch
    max_new_tokens: int = Field(48, gt=0)  # response budget; responses cut here get missing_eos_penalty
    temperature: float = Field(1.0, gt=0)  # sampling temperature; the log-probs use the same scaling
    top_k: int = Field(0, ge=0)  # 0: off. Truncated sampling makes PPO's ratios slightly off-policy
    top_p: float = Field(1.0, gt=0, le=1)  # 1.0: off (same caveat as top_k)
    kl_coef: float = Field(0.05, ge=0)  # per-token KL penalty against the reference: higher stays closer
    gamma: float = Field(1.0, ge=0, le=1)  # discount over response tokens
    lam: float = Field(0.95, ge=0, le=1)  # GAE lambda: lower = less variance, more bias
    clip_range: float = Field(0.2, gt=0)  # policy ratio clipped to [1 - c, 1 + c]
    clip_range_value: float = Field(0.2, gt=0)  # values move at most this far from the rollout's per update
    vf_coef: float = Field(0.1, ge=0)  # weight of the value loss in the total loss
    missing_eos_penalty: float = Field(1.0, ge=0)  # subtracted from the score of responses with no eos
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over each rollout batch
