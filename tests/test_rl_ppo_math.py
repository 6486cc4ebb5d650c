"""PPO's arithmetic, each function against numbers worked out by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.rl.ppo_math import (gae, kl_k1, kl_k2, kl_k3, masked_whiten, policy_loss, positions, prompt_indices,
                               response_mask, token_rewards, value_loss)


def close(t: torch.Tensor, expected) -> None:
    assert torch.allclose(t.float(), torch.tensor(expected, dtype=torch.float), atol=1e-5), t.tolist()


def test_gae_worked_example():
    # gamma 0.9, lam 0.5, so gamma * lam = 0.45. delta_t = r_t + 0.9 V_{t+1} - V_t, A_t = delta_t + 0.45 A_{t+1}
    # row 0 (three tokens, score 1 at the last): V = 0.5, 0.6, 0.7
    #   t=2: delta = 1 + 0 - 0.7 = 0.3                A = 0.3
    #   t=1: delta = 0 + 0.63 - 0.6 = 0.03            A = 0.03 + 0.45 * 0.3 = 0.165
    #   t=0: delta = 0 + 0.54 - 0.5 = 0.04            A = 0.04 + 0.45 * 0.165 = 0.11425
    #   returns = A + V = 0.61425, 0.765, 1.0
    # row 1 (two tokens, then padding whose value 9 must not count): V = 1.0, 0.5
    #   t=2: masked                                   A = 0
    #   t=1: delta = 2 + 0 - 0.5 = 1.5                A = 1.5
    #   t=0: delta = 0 + 0.45 - 1.0 = -0.55           A = -0.55 + 0.45 * 1.5 = 0.125
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.11425, 0.165, 0.3], [0.125, 1.5, 0.0]])
    close(returns, [[0.61425, 0.765, 1.0], [1.125, 2.0, 0.0]])
    # lam = 1, gamma = 1: the advantage is the sum of the rewards to go minus the value
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[1 - 0.5, 1 - 0.6, 1 - 0.7], [2 - 1.0, 2 - 0.5, 0.0]])


def test_masked_whiten_ignores_padding():
    # over 1, 2, 3: mean 2, population variance 2/3, std 0.8165; the 100 is padding
    whitened = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]]))
    s = math.sqrt(2 / 3)
    close(whitened, [[-1 / s, 0.0, 1 / s, 0.0]])


def test_kl_estimators():
    p, q = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    # policy 0.5, reference 0.25: k1 = log 2; k2 = (log 2)^2 / 2; k3 = 0.25/0.5 - 1 - log(0.25/0.5) = log 2 - 0.5
    # policy 0.25, reference 0.5: k1 = -log 2 (k1 may be negative); k3 = 2 - 1 - log 2 (k3 never is)
    log2 = math.log(2)
    close(kl_k1(p, q), [log2, -log2])
    close(kl_k2(p, q), [log2 ** 2 / 2, log2 ** 2 / 2])
    close(kl_k3(p, q), [log2 - 0.5, 1 - log2])


def test_value_loss_is_clipped_near_the_rollout_values():
    # clip 0.2, old values 0, returns 1:
    #   new 0.5 -> clipped to 0.2: errors (0.5-1)^2 = 0.25 and (0.2-1)^2 = 0.64, the larger (the clipped) counts
    #   new -0.1 -> within the clip: both errors (-1.1)^2 = 1.21
    #   loss = 0.5 * mean(0.64, 1.21) = 0.4625; the clip decided on one token of two
    loss, clipped = value_loss(torch.tensor([[0.5, -0.1]]), torch.zeros(1, 2), torch.ones(1, 2),
                               torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(0.4625) and clipped.item() == 0.5


def test_policy_loss_clips_the_ratio():
    # ratio 1.5 on both tokens, clip 0.2 (so 1.2 at most):
    #   advantage +1: -1.5 unclipped, -1.2 clipped; the larger loss, -1.2, counts (the clip decided)
    #   advantage -1: 1.5 unclipped, 1.2 clipped; 1.5 counts
    #   loss = mean(-1.2, 1.5) = 0.15; approximate KL = (log 1.5)^2 / 2
    new = torch.full((1, 2), math.log(1.5))
    loss, clipped, approx_kl = policy_loss(new, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                                           clip_range=0.2)
    assert loss.item() == pytest.approx(0.15) and clipped.item() == 0.5
    assert approx_kl.item() == pytest.approx(math.log(1.5) ** 2 / 2)


def test_response_mask_ends_after_the_first_eos():
    responses = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 7, 0, 1], [5, 6, 7, 8, 9]])  # eos = 0
    assert response_mask(responses, eos_id=0).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_token_rewards_penalise_kl_and_score_the_last_token():
    # kl_coef 0.5: -0.5 * kl everywhere in the response, the score added at its last token
    rewards = token_rewards(torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]]), torch.tensor([1.0, -1.0]),
                            torch.tensor([[1, 1, 1], [1, 0, 0]]), kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, 1.0], [-1.15, 0.0, 0.0]])


def test_positions_skip_left_padding():
    assert positions(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_prompt_indices_cover_each_pass_once_and_repeat_on_resume():
    # 4 prompts, 2 processes, 2 prompts each: iteration 0 is one pass, iteration 1 the next (reshuffled)
    first = prompt_indices(4, 0, 2, 0, 2, seed=0) + prompt_indices(4, 0, 2, 1, 2, seed=0)
    second = prompt_indices(4, 1, 2, 0, 2, seed=0) + prompt_indices(4, 1, 2, 1, 2, seed=0)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3]
    assert prompt_indices(4, 1, 2, 1, 2, seed=0) == second[2:]  # an iteration number alone says which prompts
