"""The recipe schema: every knob of a run, typed, with its default and why.

A recipe is YAML. It is read with `yaml.safe_load`, merged with command-line flags and
`--set key=value` overrides (in that order), and validated once, after merging, so a typo on
the command line fails exactly like a typo in the file:

    train.lerning_rate: unknown key (did you mean 'learning_rate'?)

Unknown keys are errors. Every problem is reported at once. The validated `Recipe` object
travels all the way down to the task; it is never turned back into a dict.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.recipe.sections import S, DataSpec, LoraSpec, Method, ModelSpec, QuantSpec, Spec, TrainSpec
from finetune.recipe.task_sections import (CaptioningSpec, ClassificationSpec, DpoSpec, GrpoSpec,
                                           ImageClassificationSpec, MlmSpec, PpoSpec, RewardSpec, StageSpec,
                                           TranslationSpec)
from finetune.recipe.tasks import REGISTRY, section_owner, unknown_task


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
