"""The recipe schema: every knob of a run, typed, with its default and why.

A recipe is YAML. It is read with `yaml.safe_load`, merged with command-line flags and
`--set key=value` overrides (in that order), and validated once, after merging, so a typo on
the command line fails exactly like a typo in the file:

    train.lerning_rate: unknown key (did you mean 'learning_rate'?)

Unknown keys are errors. Every problem is reported at once. The validated `Recipe` object
travels all the way down to the task; it is never turned back into a dict.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from finetune.errors import UserError, did_you_mean
from finetune.recipe.tasks import REGISTRY, section_owner, stage_commands, unknown_task

Method = Literal["lora", "full", "pretrain"]
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")


class Spec(BaseModel):
    # allow_inf_nan=False: `learning_rate: .inf` or `nan` is an error, not a run that diverges at once
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


S = TypeVar("S", bound=Spec)


class ModelSpec(Spec):
    name: str | None = None  # Hub id (gpt2) or a local directory written by save_pretrained
    config: str | None = None  # pretrain only: a size preset (tiny, small, gpt2) or a config.json path
    tokenizer: str | None = None  # defaults to `name`; pretrain trains one on the corpus when unset
    vocab_size: int = Field(8000, gt=255)  # size of a tokenizer trained on the corpus
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights as loaded
    gguf_file: str | None = None  # a .gguf file in model.name (a folder or Hub repo); or model.name is the .gguf
    revision: str | None = None  # Hub branch, tag or commit
    trust_remote_code: bool = False  # runs code from the model repo: only for repos you trust
    attn_implementation: str | None = None  # eager, sdpa, flash_attention_2/3, flex_attention or a Hub kernel
    # (org/repo, `kernels` package); unset: transformers' choice (sdpa where it can)


Format = Literal["auto", "text", "prompt_completion", "messages", "conversations"]
TrainOn = Literal["assistant", "completion", "last_assistant", "all"]


class SourceSpec(Spec):
    """One source of a mixture (an entry of data.train or data.eval as a list); unset fields take data.*."""
    path: str  # a file, a folder or a Hub dataset name
    split: str | None = None  # Hub split; unset: data.train_split
    config: str | None = None  # Hub configuration; unset: data.config
    weight: float | None = Field(None, gt=0)  # share of the training mixture (normalised over the sources)
    fraction: float | None = Field(None, gt=0, le=1)  # a random share of this source's rows (not streaming)
    max_samples: int | None = Field(None, gt=0)  # at most this many rows of this source
    format: Format | None = None  # unset: data.format
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str | None = None
    train_on: TrainOn | None = None


class DataSpec(Spec):
    train: str | list[SourceSpec] | None = None  # .jsonl/.json/.csv/.parquet/.txt file, a folder, a Hub dataset
    # name, or a list of sources (a mixture: each a path or {path, weight, format, columns, ...})
    eval: str | list[SourceSpec] | None = None  # same forms; unset: hold out `eval_fraction` of train
    config: str | None = None  # Hub dataset configuration name (wmt16: de-en)
    train_split: str = "train"  # split names for Hub datasets
    eval_split: str | None = None
    text_column: str = "text"
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # held out when `eval` is unset
    max_eval_samples: int | None = Field(500, gt=0)  # keeps evaluation quick; null: all
    max_samples: int | None = Field(None, gt=0)  # cap on training examples (debugging)
    max_length: int | None = Field(None, gt=1)  # tokens per example (unset: the model's context, at most 1024);
    # longer examples are cut, or split when packing (validate counts them)
    packing: bool | None = None  # unset: clm packs (exact: packed documents never see each other), mlm does not
    format: Format = "auto"  # auto: by columns
    prompt_column: str = "prompt"  # prompt_completion: strings, or lists of {role, content} messages
    completion_column: str = "completion"
    messages_column: str = "messages"  # lists of {role, content} turns (ShareGPT `conversations` also detected)
    chat_template: str | None = None  # unset: the tokenizer's; chatml, llama-3, mistral, gemma, phi, or a .jinja file
    train_on: TrainOn = "assistant"  # tokens that carry the loss
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"  # a weighted mixture ends
    # when one source runs out (all_exhausted: when every source was seen, repeating the smaller ones)
    streaming: bool = False  # read data.train as a stream (nothing materialised); needs train.max_steps
    shuffle_buffer: int = Field(1_000, ge=0)  # streaming: training rows (blocks, when packed) shuffled within
    # chunks this long; 0: file order. Held in memory as Python lists: 1,000 blocks of 512 tokens are ~55 MB
    num_proc: int | None = Field(None, gt=0)  # processes that tokenize and pack (unset: one)
    cache: bool = True  # keep tokenized, packed data in the datasets cache (a rerun starts in seconds)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        """A list entry may be a plain path."""
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class LoraSpec(Spec):
    r: int = Field(16, gt=0)  # rank: higher adapts more, costs more memory
    alpha: int = Field(32, gt=0)  # scale is alpha / r
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # peft's default; 0.05 made CPU steps 15-30% slower
    target_modules: list[str] | Literal["all-linear"] | None = None  # null: finetune's choice per architecture
    modules_to_save: list[str] | None = None  # extra modules trained in full and saved with the adapter
    use_dora: bool = False  # DoRA: also learns each output's magnitude; closer to full fine-tuning, slower steps
    use_rslora: bool = False  # rank-stabilised scale alpha/sqrt(r): high ranks keep learning
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"  # pissa/olora start from the base's
    # principal directions (faster convergence); loftq fits a 4-bit base's quantisation error (CUDA)
    layers_to_transform: list[int] | None = Field(None, min_length=1)  # adapt only these layers (0-based); null: all
    trainable_tokens: list[str | int] | None = Field(None, min_length=1)  # embedding rows trained in full, by
    # token or id: new special tokens (chat markers) start untrained otherwise


class QuantSpec(Spec):
    bits: Literal[4, 8] | None = None  # QLoRA: load the base in 4 or 8 bits (bitsandbytes)
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only: nf4 suits normally distributed weights (QLoRA paper)
    double_quant: bool = True  # 4-bit only: quantise the scales too (~0.4 bit/param saved)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # 4-bit matmuls run in this dtype
    storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"  # 4-bit packing dtype; FSDP and
    # ZeRO-3 shard only floating tensors, so set it to compute_dtype there


class TrainSpec(Spec):
    output_dir: str | None = None  # unset: runs/<model>-<task>-<method>
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs; -1: train.epochs decides
    epochs: float = Field(1.0, gt=0)  # unset: 1, or up to 3 when one pass makes under 100 optimizer steps (clm)
    learning_rate: float | None = Field(None, gt=0)  # unset: full 5e-5, pretrain 1e-3, LoRA 5e-4 (clm, RL: 2e-4)
    batch_size: int = Field(8, gt=0)  # per device
    eval_batch_size: int | None = Field(None, gt=0)  # unset: batch_size
    grad_accum: int = Field(1, gt=0)  # effective batch = batch_size * grad_accum * processes
    warmup: float = Field(0.03, ge=0)  # < 1: fraction of the steps; >= 1: a number of steps
    scheduler: str = "linear"  # any transformers scheduler name (cosine, constant, ...)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = Field(42, ge=0, lt=2**32)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # unset: evaluate once, at the end
    save_steps: int = Field(500, gt=0)  # checkpoint every N steps (what --resume continues from)
    save_total_limit: int | None = Field(2, gt=0)
    bf16: bool | None = None  # bfloat16 mixed precision; unset: on where the device runs it natively (CUDA
    # Ampere+, CPUs with AMX: 1.75x the float32 step of SmolLM2-135M here), else off
    fp16: bool = False
    group_by_length: bool | None = None  # batch texts of similar length (less padding); unset: mlm, translation,
    # unpacked clm yes; classification no (where length follows the label, batches would hold one class)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    auto_batch_size: bool = False  # on out-of-memory: halve batch_size, double grad_accum, start again
    fit_memory: bool = True  # before training: the largest batch_size (then gradient checkpointing) that fits,
    # grad_accum keeping the effective batch; false: train as set, and fail if it does not fit
    max_memory_gib: float | None = Field(None, gt=0)  # memory the run may use in all; unset: free RAM (within a
    # container's limit) or free GPU memory
    num_processes: int = Field(1, gt=0)  # data-parallel processes through accelerate, on all machines together
    distributed: str | None = None  # accelerate preset (ddp, fsdp, deepspeed-zero2, deepspeed-zero3) or a
    # config file; unset: ddp when num_processes > 1 (`finetune launch-config` prints what a run uses)
    num_machines: int = Field(1, gt=0)  # multi-node: machines taking part (num_processes counts all of them)
    machine_rank: int = Field(0, ge=0)  # multi-node: this machine, 0 .. num_machines-1 (machine 0 writes the run)
    main_process_ip: str | None = None  # multi-node: address of machine 0, reachable from every machine
    main_process_port: int | None = Field(None, gt=0, lt=65536)  # unset: 29500 multi-node, a free port otherwise
    report_to: str | list[str] = "none"  # tensorboard, wandb, mlflow, trackio or a list; logs in the run dir
    early_stopping_patience: int | None = Field(None, gt=0)  # stop after N evaluations without improvement
    # (needs train.eval_steps); implies keep_best
    keep_best: bool = False  # save the weights of the best evaluation, not the last (needs train.eval_steps)
    metric_for_best: str | None = None  # eval metric that decides "best"; unset: the task's (loss, accuracy, bleu...)
    liger_kernel: bool = False  # Liger's Triton kernels (CUDA, `pip install liger-kernel`): less memory, faster
    torch_compile: bool = False  # compile the model with torch.compile: faster steps after a slow first one
    neftune_noise_alpha: float | None = Field(None, gt=0)  # NEFTune: noise on input embeddings (5 in the paper)
    push_to_hub: str | None = None  # Hub repo id (user/name) a finished run is uploaded to (needs HF_TOKEN)
    nan_patience: int = Field(0, ge=0)  # non-finite gradient steps skipped in a row before the run stops
    trainer_args: dict[str, Any] = {}  # passed to transformers.TrainingArguments unchanged

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, v):
        if v == 0:
            raise PydanticCustomError("max_steps", "0 trains nothing; give a positive number of steps, or -1 to "
                                      "let train.epochs decide")
        return v

    @field_validator("trainer_args")
    @classmethod
    def _no_secrets(cls, v):
        problems = []
        for key, value in v.items():
            if re.search(r"(^|_)token$", key) and value:
                problems.append(f"'{key}' holds a secret, which would be written to recipe.yaml and every "
                                "checkpoint; drop it and set the HF_TOKEN environment variable instead")
            if key == "enable_jit_checkpoint" and value:
                problems.append("'enable_jit_checkpoint': finetune itself saves a checkpoint on SIGTERM and "
                                "stops with exit code 143; drop it")
        if problems:
            raise PydanticCustomError("trainer_args", "; ".join(problems))
        return v

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v):
        names = [v] if isinstance(v, str) else list(v)
        for name in names:
            if name not in TRACKERS:
                raise PydanticCustomError("tracker", f"unknown tracker '{name}'{did_you_mean(name, TRACKERS)}; "
                                          f"choose from {', '.join(TRACKERS)}")
        if "none" in names and len(names) > 1:
            raise PydanticCustomError("tracker", "'none' cannot be listed with trackers")
        return v

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, v):
        if v is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", v):
            raise PydanticCustomError("repo_id", f"'{v}' is not a Hub repo id; write it as user/name or org/name")
        return v


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


def data_problems(spec: DataSpec, task: str, max_steps: int) -> list[str]:
    """Contradictions of the data section: lists and streams for a task that reads one source whole, weights on
    some sources but not all or on evaluation data, a stream without a number of steps."""
    out = []
    info = REGISTRY.get(task)
    if info is not None and not info.mixtures:
        readers = " and ".join(t.name for t in REGISTRY.values() if t.mixtures)
        for which in ("train", "eval"):
            if isinstance(getattr(spec, which), list):
                out.append(f"data.{which}: a list of sources (a mixture) is read by the {readers} task; give the "
                           f"{task} task one file, folder or Hub dataset")
        if spec.streaming:
            out.append(f"data.streaming: the {readers} task streams; the {task} task reads its data whole")
    if spec.streaming and max_steps <= 0:
        out.append("train.max_steps: required with data.streaming (a stream has no length to count epochs by); "
                   "pass --max-steps N")
    if isinstance(spec.train, list):
        weighted = [s.weight is not None for s in spec.train]
        if any(weighted) and not all(weighted):
            verb = "has" if sum(weighted) == 1 else "have"
            out.append(f"data.train: {sum(weighted)} of {len(weighted)} sources {verb} a weight; give every source a "
                       "weight (their shares of the mixture) or none (every row of every source, once)")
        if spec.streaming:
            out += [f"data.train.{i}.fraction: a stream has no length to take a fraction of; use max_samples"
                    for i, s in enumerate(spec.train) if s.fraction is not None]
    if isinstance(spec.eval, list):
        out += [f"data.eval.{i}.weight: evaluation uses every row of each source; drop the weight"
                for i, s in enumerate(spec.eval) if s.weight is not None]
    return out


class Recipe(Spec):
    task: str = "clm"
    method: Method = "lora"  # set by the command: finetune lora | full | pretrain
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    lora: LoraSpec = LoraSpec()
    quant: QuantSpec = QuantSpec()
    train: TrainSpec = TrainSpec()
    # --- task section fields (optional, None when unused): encoder, encoder-decoder and vision ---
    mlm: MlmSpec | None = None
    classification: ClassificationSpec | None = None
    translation: TranslationSpec | None = None
    image_classification: ImageClassificationSpec | None = None
    captioning: CaptioningSpec | None = None

    # --- task section fields: RLHF ---
    reward: RewardSpec | None = None
    dpo: DpoSpec | None = None
    grpo: GrpoSpec | None = None
    stages: list[StageSpec] | None = None  # a chained recipe: these stages run in order, the fields above
    # are the defaults every stage starts from (`finetune chain RECIPE`)

    ppo: PpoSpec | None = None

    def problems(self) -> list[str]:
        """Contradictions between fields, phrased as the keys the user wrote."""
        if self.stages is not None:  # a chain: its fields are defaults, checked in each stage's recipe
            return []  # by chain.resolve_chain
        out = []
        info = REGISTRY.get(self.task)
        if info is None:
            out.append(unknown_task(self.task))
        out += self.section_problems()
        if self.method == "pretrain":
            if self.model.name and self.model.config:
                out.append("model.name and model.config: pretraining builds the model from model.config; "
                           "drop model.name (or use `finetune full` to continue training a checkpoint)")
        elif not self.model.name:
            out.append(f"model.name: required for `finetune {self.method}`; pass --model <Hub id or directory>")
        if not self.data.train:
            out.append("data.train: required; pass --data <file, folder or Hub dataset>")
        out += data_problems(self.data, self.task, self.train.max_steps)
        if self.data.streaming and self.method == "pretrain" and not self.model.tokenizer:
            out.append("model.tokenizer: required to pre-train on a stream (without one, a tokenizer is trained on "
                       "the whole corpus first); set model.tokenizer, or data.streaming: false")
        if self.train.bf16 and self.train.fp16:
            out.append("train.bf16 and train.fp16: choose one precision")
        if self.quant.bits and self.method != "lora":
            out.append(f"quant.bits: quantized bases train only with LoRA (QLoRA), not `finetune {self.method}`")
        if info is not None and self.method not in info.methods:
            if info.verb:  # `finetune reward --method ...`
                out.append(f"method: the {self.task} task starts from a trained model; use --method "
                           f"{' or '.join(info.methods)}")
            else:  # `finetune pretrain --task ...`
                instead = f" ({info.pretrain_instead})" if info.pretrain_instead else ""
                out.append(f"finetune {self.method}: the {self.task} task fine-tunes a checkpoint; use "
                           f"{' or '.join(f'`finetune {m}`' for m in info.methods)} with --model{instead}")
        if self.task == "grpo":
            grpo = self.section(GrpoSpec)
            if not grpo.reward:
                out.append("grpo.reward: required for `finetune grpo`; set it to a `finetune reward` run "
                           "(a reward-model directory) or to module:function")
            if (self.train.batch_size * self.train.grad_accum) % grpo.num_generations:
                out.append(f"train.batch_size ({self.train.batch_size}) x train.grad_accum ({self.train.grad_accum}) "
                           f"must be a multiple of grpo.num_generations ({grpo.num_generations}): every step scores "
                           "whole groups of completions of a prompt")
            if (self.train.eval_batch_size or self.train.batch_size) % grpo.num_generations:
                out.append(f"train.eval_batch_size ({self.train.eval_batch_size or self.train.batch_size}) must be "
                           f"a multiple of grpo.num_generations ({grpo.num_generations})")
        out += self.scale_out_problems()
        return out

    def section_problems(self) -> list[str]:
        """A section that belongs to another task is a mistake (it would be ignored): name its task."""
        out = []
        for name in type(self).model_fields:
            owner = section_owner(name)
            if owner is not None and owner.name != self.task and getattr(self, name) is not None:
                out.append(f"{name}: a section of the {owner.name} task; this recipe's task is {self.task} "
                           f"(set task: {owner.name}, or drop the section)")
        return out

    def section(self, cls: type[S]) -> S:
        """This recipe's section of type `cls` (recipe.dpo for DpoSpec), or its defaults when unset."""
        for name, field in type(self).model_fields.items():
            if cls in (field.annotation, *getattr(field.annotation, "__args__", ())):
                value = getattr(self, name)
                return value if value is not None else cls()
        raise TypeError(f"Recipe has no section of type {cls.__name__}")

    def scale_out_problems(self) -> list[str]:
        """Processes, machines, presets and quantisation that cannot work together."""
        from finetune.launch.presets import preset_kind, preset_problem

        t, out = self.train, []
        if t.distributed and (problem := preset_problem(t.distributed)):
            out.append(problem)
        if t.num_machines > 1 and not t.main_process_ip:
            out.append(f"train.main_process_ip: required with train.num_machines={t.num_machines}; pass "
                       "--main-process-ip <address of machine 0>")
        if t.machine_rank >= t.num_machines:
            out.append(f"train.machine_rank: {t.machine_rank} is not below train.num_machines={t.num_machines}; "
                       f"machine ranks go from 0 to {t.num_machines - 1}")
        if t.num_processes % t.num_machines:
            out.append(f"train.num_processes: {t.num_processes} processes do not split evenly over {t.num_machines} "
                       "machines; it counts the processes on all machines together, so use a multiple of "
                       "train.num_machines")
        if t.auto_batch_size and (t.num_processes > 1 or t.num_machines > 1):
            out.append("train.auto_batch_size: works in single-process runs only (an out-of-memory on one rank "
                       "stops them all); find the batch size with one process, then set train.batch_size")
        kind = preset_kind(t.distributed) if t.distributed and not preset_problem(t.distributed) else "ddp"
        if self.quant.bits == 8 and kind in ("fsdp", "deepspeed-zero3"):
            out.append(f"quant.bits: 8-bit weights cannot be sharded by train.distributed={t.distributed}; use "
                       "quant.bits=4 with quant.storage=bfloat16, or the ddp / deepspeed-zero2 presets")
        if self.quant.bits == 4 and kind in ("fsdp", "deepspeed-zero3") and self.quant.storage == "uint8":
            out.append(f"quant.storage: train.distributed={t.distributed} shards only floating-point tensors; set "
                       f"quant.storage={self.quant.compute_dtype} (the compute dtype)")
        return out

    @property
    def learning_rate(self) -> float:
        if self.train.learning_rate is not None:
            return self.train.learning_rate
        # LoRA wants about 10x the full fine-tuning rate ("LoRA Without Regret", 2025): 10x 5e-5 for
        # encoder tasks (benchmarks/defaults.py); 2e-4 for generative decoders (the QLoRA paper's rate).
        if self.method == "lora":
            return 5e-4 if self.task in ("classification", "mlm", "translation", "image-classification") else 2e-4
        return {"full": 5e-5, "pretrain": 1e-3}[self.method]

    @property
    def output_dir(self) -> Path:
        if self.train.output_dir:
            return Path(self.train.output_dir)
        base = self.model.name or self.model.config or "model"
        return Path("runs") / f"{Path(base.rstrip('/')).name}-{self.task}-{self.method}"

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data = {k: v for k, v in data.items() if v is not None}
        return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------
# Loading: file or built-in name -> dict -> overrides -> validated Recipe


def recipes_dir() -> Path:
    """Built-in recipes: inside the wheel (finetune/recipes) or the source tree (recipes/)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "recipes", package.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return package / "recipes"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        raise UserError(f"recipe: no such file '{name_or_path}'")
    raise UserError(f"recipe: '{name_or_path}' is neither a file nor a built-in recipe"
                    f"{did_you_mean(name_or_path, builtin)}; `finetune recipes list` shows the built-in ones")


def read_recipe_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"recipe {path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: expected a mapping of keys to values at the top level")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 0.0001). Values are YAML scalars."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected key=value, for example --set train.learning_rate=1e-4")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"--set {item}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot set '{key}'")
        node = child
    node[parts[-1]] = value


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names of the fields of the schema class found by walking `loc` from `model`."""
    cls: Any = model
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        candidates += [a for c in candidates for a in getattr(c, "__args__", ())]  # list[SourceSpec]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def is_union_tag(part: Any) -> bool:
    """pydantic names the branch of a union in an error's location ('str', 'list[SourceSpec]')."""
    return isinstance(part, str) and (part == "str" or "[" in part)


def format_validation_error(err: ValidationError, model: type[BaseModel] = Recipe) -> list[str]:
    problems = []
    errors = err.errors()
    listed = {e["loc"][:e["loc"].index(t)] for e in errors for t in e["loc"] if is_union_tag(t) and t != "str"}
    for e in errors:
        # `str | list[SourceSpec]`: a list fails the str branch too; report the branch the input took
        if "str" in e["loc"] and e["loc"][:e["loc"].index("str")] in listed:
            continue
        e["loc"] = tuple(p for p in e["loc"] if not is_union_tag(p))
        loc = tuple(p for p in e["loc"] if isinstance(p, str))
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _field_names(model, loc[:-1]))
            problems.append(f"{key}: unknown key{hint}")
        elif e["type"] == "literal_error":
            problems.append(f"{key}: {e['msg'][0].lower()}{e['msg'][1:]}, got {e['input']!r}")
        else:
            msg = e["msg"]
            msg = msg[0].lower() + msg[1:]
            got = e.get("input")
            suffix = f", got {got!r}" if not isinstance(got, dict) and e["type"] != "missing" else ""
            problems.append(f"{key}: {msg}{suffix}")
    return problems


def build_recipe(data: dict[str, Any], overrides: dict[str, Any] | None = None,
                 sets: list[str] | None = None, ignore: tuple[str, ...] = ()) -> Recipe:
    """Merge flags (`overrides`, dotted keys) then `--set` items into `data` and validate once.
    `ignore`: keys whose cross-field problems do not matter to the caller (`finetune plan` needs no data)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain values
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    for item in sets or []:
        set_dotted(data, *parse_override(item))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from e
    problems = [p for p in recipe.problems() if not p.startswith(tuple(f"{k}:" for k in ignore))]
    if problems:
        raise UserError(problems)
    return recipe


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None, ignore: tuple[str, ...] = ()) -> Recipe:
    data = read_recipe_file(find_recipe(name_or_path)) if name_or_path else {}
    return build_recipe(data, overrides, sets, ignore)
