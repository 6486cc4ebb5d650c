"""The sections every task shares: model, data (and its sources), lora, quant and train, typed, with
each field's default and why (one line each). Task sections are in finetune/recipe/task_sections.py."""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from finetune.errors import did_you_mean

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
    tools_column: str = "tools"  # per row: function schemas handed to the template (a list, or a JSON string)
    strict_tools: bool = False  # a call to a function not in its row's tools: an error (default: a warning)
    train_on_reasoning: bool = True  # false: an answer's reasoning (reasoning_content) is context, not loss
    chat_template_kwargs: dict[str, Any] | None = None  # passed to every rendering (training, validate, generate,
    # chat), e.g. {enable_thinking: false}: render as the model will be served
    on_overflow: Literal["drop", "error"] = "drop"  # vlm: an example longer than max_length once its images are
    # expanded is dropped and counted, or refused with its row (never cut inside an image's tokens)
    turn_mode: Literal["auto", "whole", "expand"] = "auto"  # whole: one example per conversation, every answer
    # trained; expand: one example per answer, rendered as the last turn (for templates that rewrite earlier
    # turns, such as Qwen3's dropping past reasoning); auto: expand only conversations that need it
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
    vision: bool = False  # vlm: adapters on the vision tower too (default: the language model only)
    projector: bool = False  # vlm: adapters on the projector between the vision tower and the language model
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
    eval_tasks: list[str] | None = None  # scored when the run finishes (finetune eval, lm-eval): lm-eval task
    # names, task YAML files, or .jsonl files of the --data shorthand; results in RUN/eval and metrics.json
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
