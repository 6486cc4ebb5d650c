"""THE task registry: every fact about a task that code outside its module needs, in one table.

A task is one module under finetune/tasks/ (what a newcomer reads: a runnable command, the recipe
fields it uses, then `run(recipe)` in numbered steps) plus one `TaskInfo` entry below. Nothing else
lists tasks: the recipe schema, the chain's stage commands, the quantisation and memory checks and
the command line's help all read this table. Adding a task is a new module and one `register` line.

It sits with the schema, below every wing but launch, because the schema and the wings under the tasks
(the memory estimate, the quantisation check, inference) read it; it names each task's module as a
string, so nothing here imports a task. It imports nothing heavy (no torch, no transformers): the
command line reads it for `finetune --help`. `load_task` imports a task's module when it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from finetune.errors import UserError, did_you_mean

METHODS = ("lora", "full", "pretrain")  # the training commands that take --task


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    name: str  # the recipe's `task:` value
    module: str  # imported only when the task runs (load_task)
    auto_class: str  # the transformers Auto class its model is (memory estimate, quantisation check)
    section: str | None = None  # the recipe section of this task's own fields (a Recipe field), if any
    methods: tuple[str, ...] = ("lora", "full")  # what `method:` it trains with
    quantizable: bool = False  # trains a bitsandbytes base under LoRA (QLoRA); False: the task refuses
    # quant.bits itself, with its own reason (a new head, cross-attention or value model)
    packing: bool = False  # honours data.packing
    chat: bool = False  # reads chat messages ([{role, content}]) as data
    mixtures: bool = False  # reads data.train as a list of sources and as a stream (data.streaming); its module's
    # prepare_data(recipe) is `finetune prepare`
    stage: bool = False  # usable as a chain stage's `command` (its own verb: finetune <name>)
    verb: bool = False  # has its own training command (`finetune reward`); else lora/full/pretrain --task
    lm_head: bool = False  # its head scores the whole vocabulary at every position (memory: logits)
    inference: str | None = None  # the command that uses a trained run: generate, predict, ...
    pretrain_instead: str | None = None  # advice when `finetune pretrain` is asked of a task that cannot


REGISTRY: dict[str, TaskInfo] = {}


def register(info: TaskInfo) -> TaskInfo:
    REGISTRY[info.name] = info
    return info


# ---------------------------------------------------------------------------------------
# The tasks

register(TaskInfo("clm", "finetune.tasks.clm", "AutoModelForCausalLM", methods=METHODS, quantizable=True,
                  packing=True, mixtures=True, lm_head=True, inference="generate"))
# encoder, encoder-decoder and vision
register(TaskInfo("mlm", "finetune.tasks.mlm", "AutoModelForMaskedLM", section="mlm", methods=METHODS,
                  packing=True, lm_head=True, inference="fill-mask"))
register(TaskInfo("classification", "finetune.tasks.classification", "AutoModelForSequenceClassification",
                  section="classification", inference="predict",
                  pretrain_instead="pre-train an encoder with `finetune pretrain --task mlm`"))
register(TaskInfo("translation", "finetune.tasks.translation", "AutoModelForSeq2SeqLM", section="translation",
                  quantizable=True, lm_head=True, inference="translate"))
register(TaskInfo("image-classification", "finetune.tasks.image_classification", "AutoModelForImageClassification",
                  section="image_classification", inference="predict"))
register(TaskInfo("captioning", "finetune.tasks.captioning", "AutoModelForImageTextToText", section="captioning",
                  lm_head=True, inference="caption"))
register(TaskInfo("vlm", "finetune.tasks.vlm", "AutoModelForImageTextToText", quantizable=True, chat=True,
                  lm_head=True))
# RLHF: each has its own command, and starts from a trained model
register(TaskInfo("reward", "finetune.tasks.reward", "AutoModelForSequenceClassification", section="reward",
                  quantizable=True, chat=True, stage=True, verb=True))
register(TaskInfo("dpo", "finetune.tasks.dpo", "AutoModelForCausalLM", section="dpo", quantizable=True, chat=True,
                  stage=True, verb=True, lm_head=True, inference="generate"))
register(TaskInfo("ppo", "finetune.tasks.ppo", "AutoModelForCausalLM", section="ppo", stage=True, verb=True,
                  lm_head=True, inference="generate"))
register(TaskInfo("grpo", "finetune.tasks.grpo", "AutoModelForCausalLM", section="grpo", quantizable=True, chat=True,
                  stage=True, verb=True, lm_head=True, inference="generate"))


# ---------------------------------------------------------------------------------------
# Looking tasks up


def unknown_task(name: str) -> str:
    return f"task: unknown task '{name}'{did_you_mean(name, REGISTRY)}; choose one of: {', '.join(REGISTRY)}"


def task_info(name: str) -> TaskInfo:
    if name not in REGISTRY:
        raise UserError(unknown_task(name))
    return REGISTRY[name]


def load_task(name: str) -> ModuleType:
    """The task's module, imported now (the only place tasks are imported by name)."""
    return importlib.import_module(task_info(name).module)


def section_owner(section: str) -> TaskInfo | None:
    """The task whose recipe section is `section`, if any."""
    return next((t for t in REGISTRY.values() if t.section == section), None)


def stage_commands() -> tuple[str, ...]:
    """What a chain stage's `command` may be: a training method, or a task with its own verb."""
    return (*METHODS, *(t.name for t in REGISTRY.values() if t.stage))


def method_tasks() -> list[str]:
    """Tasks trained through `finetune lora|full|pretrain --task NAME`."""
    return [t.name for t in REGISTRY.values() if not t.verb]
