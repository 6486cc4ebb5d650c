"""A run fitted to the memory there is: before training, the largest micro-batch that fits what this process
may still use (finetune/launch/headroom.py), then gradient checkpointing, grad_accum keeping the effective batch.

    finetune lora ...                                    # fits itself, and says what it chose and why
    finetune lora ... --set train.max_memory_gib=12      # fit to 12 GiB in all
    finetune lora ... --set train.fit_memory=false       # train as set
"""

from __future__ import annotations

import os

from finetune.errors import UserError
from finetune.models.memory import Estimate, estimate, fmt, is_cuda
from finetune.recipe.schema import Recipe


SPARE = 0.9  # of the free memory a run may plan to use: the allocator's fragmentation and what the estimate misses
SLACK = 1.45  # CPU: glibc's heap keeps freed blocks, up to 1.43x the live tensors here (finetune/launch/headroom.py)


def keep_tight(needed: float, budget: float) -> None:
    """On CPU, a run whose tensors would not fit with the allocator's slack returns freed blocks to the system
    at once (a fixed mmap threshold): resident memory then stays at the estimate, for slower steps."""
    from finetune.launch.headroom import keep_large_blocks_apart

    if not is_cuda() and needed * SLACK > budget and keep_large_blocks_apart():
        print("memory: tight, so freed blocks go back to the system at once (glibc's mmap threshold at 1 MiB): "
              "resident memory stays near the estimate, steps take up to a third longer", flush=True)


def fit_to_memory(recipe: Recipe, seq: int | None = None, loaded: bool = False, image_tokens: int | None = None
                  ) -> Recipe:
    """The recipe with the largest micro-batch that fits the memory this process may still use, then
    gradient checkpointing, grad_accum keeping the effective batch; unchanged when it fits as set. Prints
    what it chose and why; no setting fits: a UserError with the numbers and the options.

    `loaded`: the weights are in memory already (and so out of what `headroom` leaves), as the process itself
    is. `image_tokens`: a vision-language run's image tokens per example. Single-process runs only: with
    several, each device's share is checked by `finetune plan`."""
    from finetune.launch.headroom import headroom

    t = recipe.train
    several = t.num_processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not t.fit_memory or several or not recipe.model.name:  # pre-training: no checkpoint config to estimate from
        return recipe
    room = headroom(t.max_memory_gib)
    budget = SPARE * room.free

    def need(r: Recipe) -> tuple[float, Estimate]:
        import torch

        with torch.random.fork_rng():  # building the skeleton's adapter must not move the run's random stream
            est = estimate(r, seq=seq, capacity=room.free, image_tokens=image_tokens)
        return est.tensors - (est.weights if loaded else 0.0), est

    try:
        first, est = need(recipe)
    except UserError:
        raise
    except Exception as e:  # an architecture the estimate does not understand: train as set
        print(f"memory: no estimate for this model ({type(e).__name__}: {e}); training as set", flush=True)
        return recipe
    if first <= budget:
        keep_tight(first, budget)
        return recipe
    effective = t.batch_size * t.grad_accum
    for checkpointing in dict.fromkeys((t.gradient_checkpointing, True)):
        b = t.batch_size
        while b >= 1:
            accum = -(-effective // b)
            train = t.model_copy(update={"batch_size": b, "grad_accum": accum, "gradient_checkpointing": checkpointing,
                                         "eval_batch_size": min(t.eval_batch_size or t.batch_size, b)})
            candidate = recipe.model_copy(update={"train": train})
            needed, _ = need(candidate)
            if needed <= budget:
                how = [f"train.batch_size={b}", f"train.grad_accum={accum}"]
                if checkpointing and not t.gradient_checkpointing:
                    how.append("train.gradient_checkpointing=true")
                same = "the same" if b * accum == effective else "about the same"
                print(f"memory: batch {t.batch_size} x {est.seq} tokens needs about {fmt(first)} and {fmt(room.free)} "
                      f"is free ({room.where}); training with {', '.join(how)} ({same} {b * accum} rows per "
                      f"optimizer step, about {fmt(needed)}). train.fit_memory=false turns this off", flush=True)
                keep_tight(needed, budget)
                return candidate
            b = b // 2 if b > 1 else 0
    smallest, _ = need(recipe.model_copy(update={"train": t.model_copy(update={
        "batch_size": 1, "gradient_checkpointing": True})}))
    raise UserError(f"memory: even batch 1 x {est.seq} tokens with gradient checkpointing needs about {fmt(smallest)} "
                    f"and {fmt(room.free)} is free ({room.where}); use a shorter data.max_length, --quant 4bit, --bf16 "
                    "where the device has it, LoRA instead of full fine-tuning, a smaller model, or more memory "
                    "(train.max_memory_gib if the number above is wrong)")

