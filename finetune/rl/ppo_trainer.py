"""PPO for causal language models, on accelerate (devices, processes, gradient sync) and the
log-prob helpers trl 1.16 still ships. trl removed its PPOTrainer in 1.13; this is our own.

One iteration (`PpoTrainer.iteration`) reads top to bottom:

  1. rollout    sample a response to every prompt from the policy
  2. score      the reward function on the prompt and response texts; responses that never
                produced eos lose `missing_eos_penalty`
  3. log-probs  of each response token under the policy and the reference (a frozen copy of the
                starting policy, or under LoRA the same policy with its adapter disabled), and the
                critic's value before each token
  4. rewards    per token: -kl_coef * (logp - logp_ref); the score is added at the last token
  5. GAE        advantages and returns backwards over the response; advantages whitened
  6. optimise   `ppo_epochs` passes over the batch in minibatches: clipped policy loss plus
                vf_coef * clipped value loss, one optimizer step per minibatch
  7. log        reward, KL, entropy, policy/value loss, clip fraction, approximate KL, length

Every process samples its own prompts; DDP (through `accelerator.prepare`) averages the gradients,
and the logged numbers are averaged over processes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, pad, selective_log_softmax

from finetune.recipe.sections import TrainSpec
from finetune.recipe.task_sections import PpoSpec
from finetune.rl.ppo_math import (gae, kl_k1, masked_mean, masked_whiten, policy_loss, positions, prompt_indices,
                               response_mask, token_rewards, value_loss)
from finetune.training import guards
from finetune.training.checkpoints import checkpoint_step, write_manifest
from finetune.training.runlog import append_log, trim_log


class Critic(nn.Module):
    """A value for every position: the backbone and one-output `score` head of a sequence-
    classification model, applied to all hidden states (its own forward keeps the last only).
    A module of its own so that DDP wraps, and synchronises, exactly this forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # AutoModelForSequenceClassification with num_labels=1, maybe LoRA-wrapped

    def forward(self, input_ids, attention_mask, position_ids):
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        return model.score(hidden).squeeze(-1).float()


def response_logits(model, input_ids, attention_mask, context: int, temperature: float) -> torch.Tensor:
    """Logits predicting each response token (the sequence after the first `context` tokens),
    scaled by the sampling temperature so they describe the distribution that was sampled."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                use_cache=False)
    return out.logits[:, context - 1:-1].float() / temperature


# ---------------------------------------------------------------------------------------


class PpoTrainer:
    def __init__(self, *, policy, critic: Critic, reference, tokenizer, reward_fn: Callable, spec: PpoSpec,
                 train: TrainSpec, learning_rate: float, accelerator, iterations: int):
        """`reference`: a frozen copy of the starting policy, or None under LoRA (the policy with its
        adapter disabled is the reference then). `iterations`: how many `iteration`s `train` runs."""
        from transformers import GenerationConfig, get_scheduler

        self.spec, self.train_spec, self.accelerator = spec, train, accelerator
        self.iterations = iterations
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        # Dropout would make the log-probs of the rollout and of the update disagree.
        for model in (policy, critic, reference):
            if model is not None:
                disable_dropout_in_model(model)

        params = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=train.weight_decay, eps=1e-5)
        minibatch = train.batch_size * train.grad_accum
        self.total_steps = iterations * spec.ppo_epochs * max(1, spec.rollout_batch_size // minibatch)
        warmup = int(train.warmup) if train.warmup >= 1 else math.ceil(train.warmup * self.total_steps)
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler steps once per
        # process, which assumes a dataloader that splits the data across processes.
        self.scheduler = get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)
        self.policy, self.critic, self.optimizer = accelerator.prepare(policy, critic, optimizer)
        self.params = params
        self.ref_policy = reference.to(accelerator.device) if reference is not None else None
        # Every sampling knob set explicitly: unset values would come from the model's
        # generation_config (top_k=50, repetition penalties), and PPO's ratios assume plain sampling.
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id)

    @contextmanager
    def reference(self):
        """The reference policy: the frozen copy, or under LoRA the policy with its adapter disabled."""
        if self.ref_policy is not None:
            yield self.ref_policy
            return
        policy = self.accelerator.unwrap_model(self.policy)
        with policy.disable_adapter():
            yield policy

    # -----------------------------------------------------------------------------------
    # One PPO iteration

    def iteration(self, prompt_ids: list[list[int]], prompt_texts: list[str],
                  columns: dict[str, list] | None = None) -> dict[str, float]:
        s, dev = self.spec, self.accelerator.device

        # 1. Rollout: prompts padded on the left, responses padded after their eos.
        queries, query_mask, responses = self.generate(self.policy, prompt_ids)
        mask = response_mask(responses, self.eos_id)
        context = queries.shape[1]
        input_ids = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, mask], 1)

        # 2. Score the texts (the reward model appends its own eos), penalise responses that never end.
        completions = self.decode(responses)
        scores = torch.tensor(self.reward_fn(prompt_texts, completions, **(columns or {})), dtype=torch.float,
                              device=dev)
        ended = (responses == self.eos_id).any(1)
        penalised = scores - s.missing_eos_penalty * (~ended).float()

        # 3. Log-probs under the policy and the reference, and the critic's values.
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        policy, critic = self.accelerator.unwrap_model(self.policy), self.accelerator.unwrap_model(self.critic)
        policy.eval()
        critic.eval()
        with torch.no_grad():
            for i in range(0, len(input_ids), self.train_spec.batch_size):
                ids, am = input_ids[i:i + self.train_spec.batch_size], attention_mask[i:i + self.train_spec.batch_size]
                logits = response_logits(policy, ids, am, context, s.temperature)
                logprobs.append(selective_log_softmax(logits, ids[:, context:]))
                entropy.append(entropy_from_logits(logits))
                with self.reference() as ref:
                    ref_logits = response_logits(ref, ids, am, context, s.temperature)
                ref_logprobs.append(selective_log_softmax(ref_logits, ids[:, context:]))
                values.append(critic(ids, am, positions(am))[:, context - 1:-1])
        logprobs, ref_logprobs = torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask
        values, entropy = torch.cat(values) * mask, torch.cat(entropy)

        # 4. Per-token rewards: the KL penalty everywhere, the score at the last response token.
        kl = kl_k1(logprobs, ref_logprobs)
        rewards = token_rewards(kl, penalised, mask, s.kl_coef)

        # 5. Advantages and returns.
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 6. Optimise.
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, mask=mask, logprobs=logprobs,
                     values=values, advantages=advantages, returns=returns)
        stats = self.optimise(batch, context)

        # 7. Numbers for the log, averaged over processes.
        local = {
            "reward": scores.mean(),
            "reward_std": scores.std() if len(scores) > 1 else torch.zeros((), device=dev),
            "kl": kl.sum(1).mean(),  # per response: sum over its tokens of logp - logp_ref
            "entropy": masked_mean(entropy, mask),
            **stats,
            "response_length": mask.sum(1).float().mean(),
            "no_eos_fraction": (~ended).float().mean(),
            "value_mean": masked_mean(values, mask),
        }
        names = list(local)
        reduced = self.accelerator.reduce(torch.stack([local[k].float() for k in names]), "mean")
        return {k: round(v, 6) for k, v in zip(names, reduced.tolist())}

    def generate(self, model, prompt_ids: list[list[int]]):
        dev = self.accelerator.device
        queries = pad([torch.tensor(p) for p in prompt_ids], self.pad_id, "left").to(dev)
        query_mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompt_ids], 0, "left").to(dev)
        with torch.no_grad(), unwrap_model_for_generation(model, self.accelerator) as unwrapped:
            out = unwrapped.generate(input_ids=queries, attention_mask=query_mask,
                                     generation_config=self.generation_config)
        return queries, query_mask, out[:, queries.shape[1]:]

    def optimise(self, batch: dict[str, torch.Tensor], context: int) -> dict[str, torch.Tensor]:
        """`ppo_epochs` shuffled passes; the optimizer steps once per train.batch_size x grad_accum rollouts."""
        s, micro = self.spec, self.train_spec.batch_size
        self.policy.train()
        self.critic.train()
        totals: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                                  "value_clip_fraction", "approx_kl")}
        n = len(batch["input_ids"])
        for _ in range(s.ppo_epochs):
            order = torch.randperm(n, device=self.accelerator.device)
            for start in range(0, n, micro):
                b = {k: v[order[start:start + micro]] for k, v in batch.items()}
                m = b["mask"]
                with self.accelerator.accumulate(self.policy, self.critic):
                    logits = response_logits(self.policy, b["input_ids"], b["attention_mask"], context, s.temperature)
                    new_logprobs = selective_log_softmax(logits, b["input_ids"][:, context:])
                    new_values = self.critic(b["input_ids"], b["attention_mask"],
                                             positions(b["attention_mask"]))[:, context - 1:-1]

                    loss_v, value_clip = value_loss(new_values, b["values"], b["returns"], m, s.clip_range_value)
                    loss_p, clip_fraction, approx_kl = policy_loss(new_logprobs, b["logprobs"], b["advantages"], m,
                                                                   s.clip_range)

                    self.accelerator.backward(loss_p + s.vf_coef * loss_v)
                    if self.accelerator.sync_gradients and self.train_spec.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_(self.params, self.train_spec.max_grad_norm)
                    self.optimizer.step()
                    if self.accelerator.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad()

                for key, value in (("policy_loss", loss_p), ("value_loss", loss_v), ("clip_fraction", clip_fraction),
                                   ("value_clip_fraction", value_clip), ("approx_kl", approx_kl)):
                    totals[key].append(value.detach())
        return {k: torch.stack(v).mean() for k, v in totals.items()}

    # -----------------------------------------------------------------------------------
    # The loop, held-out evaluation, checkpoints

    def train(self, *, prompt_ids: list[list[int]], prompt_texts: list[str], start: int, run_dir: Path, seed: int,
              callbacks: list | None = None, columns: dict[str, list] | None = None) -> None:
        """Iterations `start` .. `self.iterations`, logging each, checkpointing every train.save_steps.
        `columns`: the data's other columns, handed to the reward function by keyword (as trl does)."""
        acc, iterations = self.accelerator, self.iterations
        if acc.is_main_process:  # on resume, keep only the lines up to the checkpoint
            trim_log(run_dir, start)
        for it in range(start, iterations):
            began = time.perf_counter()
            idx = prompt_indices(len(prompt_ids), it, self.spec.rollout_batch_size, acc.process_index,
                                 acc.num_processes, seed)
            metrics = self.iteration([prompt_ids[i] for i in idx], [prompt_texts[i] for i in idx],
                                     {k: [v[i] for i in idx] for k, v in (columns or {}).items()})
            record: dict[str, Any] = {"step": it + 1, **metrics, "learning_rate": self.scheduler.get_last_lr()[0],
                                      "iteration_s": round(time.perf_counter() - began, 3)}
            if acc.is_main_process:
                append_log(run_dir, record)
                print(f"iteration {it + 1}/{iterations}  reward {metrics['reward']:.4f}  kl {metrics['kl']:.4f}  "
                      f"entropy {metrics['entropy']:.3f}  length {metrics['response_length']:.1f}  "
                      f"policy_loss {metrics['policy_loss']:.4f}  value_loss {metrics['value_loss']:.4f}  "
                      f"clip {metrics['clip_fraction']:.3f}", flush=True)
            # training/guards.py: a non-finite loss stops the run; SIGTERM/Ctrl-C save a checkpoint here and stop
            losses = [metrics["policy_loss"], metrics["value_loss"]]
            if not all(math.isfinite(v) for v in losses):
                raise guards.Diverged(it + 1, f"the PPO losses are not finite (policy {losses[0]}, value {losses[1]})")
            signum = guards.agreed(guards.stop_requested(), acc.device)
            if (it + 1) % self.train_spec.save_steps == 0 or it + 1 == iterations or signum is not None:
                self.save_checkpoint(run_dir / "checkpoints" / f"checkpoint-{it + 1}", it + 1)
            if acc.is_main_process:
                for cb in callbacks or []:
                    if callable(cb):
                        cb(record)
            if signum is not None and it + 1 < iterations:
                raise guards.Interrupted(signum, it + 1, str(run_dir / "checkpoints" / f"checkpoint-{it + 1}"))
        self.check_in_sync()

    def check_in_sync(self) -> None:
        """Every process must hold the same weights (DDP averaged the gradients); a difference is a bug."""
        total = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        totals = self.accelerator.gather(total)
        if not torch.allclose(totals, totals[0].expand_as(totals), rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"the processes' weights diverged ({totals.tolist()}); gradients were not synchronised")

    def evaluate(self, prompt_ids: list[list[int]], prompt_texts: list[str],
                 columns: dict[str, list] | None = None) -> dict[str, float]:
        """Mean reward of responses sampled on held-out prompts, by the policy and by the reference."""
        acc = self.accelerator
        mine = list(range(acc.process_index, len(prompt_ids), acc.num_processes))
        sums = torch.zeros(4, device=acc.device)  # policy reward, reference reward, policy tokens, prompts
        acc.unwrap_model(self.policy).eval()
        for i in range(0, len(mine), self.spec.rollout_batch_size):
            chunk = mine[i:i + self.spec.rollout_batch_size]
            ids, texts = [prompt_ids[j] for j in chunk], [prompt_texts[j] for j in chunk]
            cols = {k: [v[j] for j in chunk] for k, v in (columns or {}).items()}
            _, _, responses = self.generate(self.policy, ids)
            sums[0] += sum(self.reward_fn(texts, self.decode(responses), **cols))
            sums[2] += response_mask(responses, self.eos_id).sum()
            with self.reference() as ref:
                _, _, responses = self.generate(ref, ids)
            sums[1] += sum(self.reward_fn(texts, self.decode(responses), **cols))
            sums[3] += len(chunk)
        sums = acc.reduce(sums, "sum")
        count = max(sums[3].item(), 1)
        return {"eval_reward": round(sums[0].item() / count, 6),
                "eval_reward_reference": round(sums[1].item() / count, 6),
                "eval_response_length": round(sums[2].item() / count, 3)}

    def decode(self, responses: torch.Tensor) -> list[str]:
        """Response texts without eos or padding (a reward model appends its own eos)."""
        mask = response_mask(responses, self.eos_id)
        return self.tokenizer.batch_decode(responses * mask + self.pad_id * (1 - mask), skip_special_tokens=True)

    def save_checkpoint(self, directory: Path, iteration: int) -> None:
        """policy/ and critic/ (adapters or full models), optimizer, scheduler, each process's RNG,
        and trainer_state.json written last: a checkpoint without it is incomplete and skipped."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            acc.unwrap_model(self.policy).save_pretrained(str(directory / "policy"))
            self.tokenizer.save_pretrained(str(directory / "policy"))
            acc.unwrap_model(self.critic).model.save_pretrained(str(directory / "critic"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        acc.wait_for_everyone()
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   directory / f"rng_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (directory / "trainer_state.json").write_text(json.dumps({"global_step": iteration}) + "\n")
            write_manifest(directory)
            self.prune_checkpoints(directory.parent)

    def prune_checkpoints(self, root: Path) -> None:
        limit = self.train_spec.save_total_limit

        found = sorted((checkpoint_step(d), d) for d in root.glob("checkpoint-*") if checkpoint_step(d) is not None)
        for _, d in (found[:-limit] if limit else []):
            shutil.rmtree(d, ignore_errors=True)

    def load_state(self, directory: Path) -> int:
        """Optimizer, scheduler and RNG from a checkpoint (the task loads the models); the iteration."""
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        rng = directory / f"rng_state_{self.accelerator.process_index}.pt"
        if rng.exists():
            state = torch.load(rng, weights_only=True)
            torch.set_rng_state(state["cpu"])
            if torch.cuda.is_available() and state["cuda"]:
                torch.cuda.set_rng_state_all(state["cuda"])
        return json.loads((directory / "trainer_state.json").read_text())["global_step"]
