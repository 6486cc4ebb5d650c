"""The arithmetic of PPO on response tokens, as plain functions of tensors (tests/test_rl_ppo_math.py checks
each against numbers worked out by hand). `ppo_trainer.PpoTrainer` calls them in this order:

    response_mask    which sampled tokens belong to the response (up to and including the first eos)
    token_rewards    -kl_coef * KL per token, the reward model's score added at the last token
    gae              advantages and returns, backwards over the response
    masked_whiten    advantages normalised over the batch's response tokens
    policy_loss      the clipped surrogate objective
    value_loss       the critic's clipped squared error

trl removed these together with its PPOTrainer (1.13); they follow its last version and the
"N implementation details of RLHF with PPO" write-up.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the entries where mask is 1, with the population variance; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first eos, 0 for what `generate` padded after it."""
    is_eos = (responses == eos_id).long()
    eos_before = is_eos.cumsum(1) - is_eos
    return (eos_before == 0).long()


# ---------------------------------------------------------------------------------------
# KL between the policy and the reference, per token, from the log-probs of the sampled tokens.
# With r = ref_logp - logp, all three have the KL as their expectation under the policy's samples.


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log p_ref: unbiased, but negative on some tokens (the per-token reward penalty)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(log p - log p_ref)^2 / 2: biased, never negative, low variance (the logged approximate KL)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(r) - 1 - r with r = log p_ref - log p: unbiased and never negative (GRPO's estimator)."""
    r = ref_logprobs - logprobs
    return torch.exp(r) - 1 - r


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * kl on every response token, plus each response's score on its last token."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1) - 1
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation, backwards over the response tokens: (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Past the last token rewards and values are 0, so each response ends its own episode."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float):
    """The clipped surrogate objective: (loss, fraction of tokens where the clip decided, approximate KL)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_k2(logprobs, old_logprobs), mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float):
    """Half the squared error to the returns, with the new values kept within clip_range of the rollout's
    (the larger of the clipped and unclipped errors): (loss, fraction of tokens where the clip decided)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((unclipped_error < clipped_error).float(), mask)
    return loss, clip_fraction


# ---------------------------------------------------------------------------------------
# Positions and prompts


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` computes them."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@lru_cache(maxsize=4)
def _order(n: int, epoch: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def prompt_indices(n: int, iteration: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """This process's prompts for an iteration: consecutive slices of a stream of shuffled passes
    over the prompts, so an iteration number alone says which prompts it used (resume)."""
    start = (iteration * world + rank) * batch
    return [_order(n, p // n, seed)[p % n] for p in range(start, start + batch)]
