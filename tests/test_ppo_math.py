"""PPO maths (policies/ppo_math.py) against numbers worked out by hand; the comments show the arithmetic."""
from __future__ import annotations

import math

import pytest
import torch

from policies.ppo_math import (entropy_from_logits, gae, kl_penalty, logprobs_from_logits, masked_mean, masked_whiten,
                               per_token_rewards, ppo_clip_loss, value_loss)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def test_masked_mean():
    x, mask = t([1, 2, 3], [4, 5, 6]), t([1, 1, 0], [1, 0, 0])
    assert close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    assert close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    assert close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN


def test_masked_whiten():
    # real entries 1, 2, 3: mean 2, population variance 2/3, std 0.8164966; padding -> 0
    x, mask = t([1, 2, 9], [3, 9, 9]), t([1, 1, 0], [1, 0, 0])
    assert close(masked_whiten(x, mask), t([-1.2247449, 0, 0], [1.2247449, 0, 0]))
    assert close(masked_whiten(x, mask, shift_mean=False), t([0.7752551, 2, 0], [3.2247449, 0, 0]))


def test_logprobs_and_entropy_from_logits():
    # logits log([1, 2, 3, 4]) -> probabilities [0.1, 0.2, 0.3, 0.4]; second position uniform over 4
    logits = torch.log(t([1, 2, 3, 4], [1, 1, 1, 1])).unsqueeze(0).float()  # (1, 2, 4)
    labels = torch.tensor([[3, 0]])
    assert close(logprobs_from_logits(logits, labels), [[math.log(0.4), math.log(0.25)]])
    # entropy: -(0.1 ln 0.1 + 0.2 ln 0.2 + 0.3 ln 0.3 + 0.4 ln 0.4) = 1.2798542; uniform: ln 4 = 1.3862944
    ent = entropy_from_logits(logits)
    assert ent.shape == (1, 2)
    assert close(ent, [[1.2798542, 1.3862944]])


def test_logprobs_from_logits_bfloat16_in_float32():
    logits = torch.log(t([1, 2, 3, 4])).unsqueeze(0).to(torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert out.dtype == torch.float32 and abs(float(out) - math.log(0.2)) < 1e-2


def test_kl_penalty_k1_and_k3():
    # pi = 0.5, pi_0 = 0.25: k1 = ln 2 = 0.6931472; k3 with r = pi_0 / pi = 0.5: (0.5 - 1) - ln 0.5 = 0.1931472
    logp, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    assert close(kl_penalty(logp, ref, "k1"), [0.6931472])
    assert close(kl_penalty(logp, ref, "k3"), [0.1931472])
    assert close(kl_penalty(ref, logp, "k1"), [-0.6931472])  # k1 can be negative on one sample; k3 cannot
    assert close(kl_penalty(ref, logp, "k3"), [1 - 0.6931472])  # r = 2: (2 - 1) - ln 2
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k2")


def test_per_token_rewards():
    # beta 0.1: -0.1 * kl everywhere real; score 1 on token 2 of row 0, score 2 on token 1 of row 1; row 2 empty
    score = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9])
    mask = t([1, 1, 1], [1, 1, 0], [0, 0, 0])
    expected = t([-0.01, -0.02, -0.03 + 1], [-0.04, -0.05 + 2, 0], [0, 0, 0])
    assert close(per_token_rewards(score, kl, mask, beta=0.1), expected)


def test_gae_one_row_gamma_1_lambda_half():
    # rewards [0, 0, 1], values [0.5, 0.4, 0.3], gamma 1, lambda 0.5:
    # t=2: delta = 1 + 0 - 0.3 = 0.7;      A2 = 0.7
    # t=1: delta = 0 + 0.3 - 0.4 = -0.1;   A1 = -0.1 + 0.5 * 0.7 = 0.25
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1;   A0 = -0.1 + 0.5 * 0.25 = 0.025
    # returns = A + V = [0.525, 0.65, 1.0]
    adv, ret = gae(t([0, 0, 1]), t([0.5, 0.4, 0.3]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert close(adv, t([0.025, 0.25, 0.7]))
    assert close(ret, t([0.525, 0.65, 1.0]))


def test_gae_respects_the_mask():
    # row ends after 2 tokens: the value 9 and reward 5 on padding are ignored, V after the end is 0
    # t=1: delta = 1 + 0 - 0.4 = 0.6;     A1 = 0.6
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1;  A0 = -0.1 + 0.5 * 0.6 = 0.2;   returns [0.7, 1.0, 0]
    adv, ret = gae(t([0, 1, 5]), t([0.5, 0.4, 9]), t([1, 1, 0]), gamma=1.0, lam=0.5)
    assert close(adv, t([0.2, 0.6, 0]))
    assert close(ret, t([0.7, 1.0, 0]))


def test_gae_discount():
    # gamma 0.5, lambda 1 (Monte Carlo): A_t = discounted return - V_t
    # t=1: delta = 1 - 0.4 = 0.6;  t=0: delta = 0 + 0.5 * 0.4 - 0.2 = 0, A0 = 0 + 0.5 * 0.6 = 0.3 = 0.5 * 1 - 0.2
    adv, ret = gae(t([0, 1]), t([0.2, 0.4]), t([1, 1]), gamma=0.5, lam=1.0)
    assert close(adv, t([0.3, 0.6]))
    assert close(ret, t([0.5, 1.0]))


def test_ppo_clip_loss():
    # ratios [1.5, 0.5, 1.1, 7] with advantages [1, 1, -1, 3]; the 4th token is padding
    # tok 0: -1 * 1.5 = -1.5 vs clipped -1 * 1.2 = -1.2 -> -1.2 (clipped)
    # tok 1: -1 * 0.5 = -0.5 vs clipped -1 * 0.8 = -0.8 -> -0.5
    # tok 2: +1 * 1.1 = 1.1 vs clipped 1.1 -> 1.1
    # loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2; clip fraction 1/3
    old = torch.log(t([0.2, 0.2, 0.2, 0.01]))
    logp = (old + torch.log(t([1.5, 0.5, 1.1, 7.0]))).requires_grad_()
    adv, mask = t([1, 1, -1, 3]), t([1, 1, 1, 0])
    loss, clip_frac, approx_kl = ppo_clip_loss(logp, old, adv, mask, clip=0.2)
    assert close(loss, -0.2)
    assert close(clip_frac, 1 / 3)
    # approx KL = 0.5 * mean(ln(1.5)^2, ln(0.5)^2, ln(1.1)^2) = 0.5 * (0.1644019 + 0.4804530 + 0.0090840) / 3
    assert close(approx_kl, 0.5 * (0.1644019 + 0.4804530 + 0.0090840) / 3)
    loss.backward()
    # d/dlogp of -A r = -A r / 3 where unclipped; 0 where clipped or masked
    assert close(logp.grad, t([0, -0.5 / 3, 1.1 / 3, 0]))


def test_value_loss():
    # tok 0: v 1.0, old 0.5 -> v_clip 0.7; (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69 -> 1.69 (clipped is larger)
    # tok 1: v 0 = old -> 1 vs 1 -> 1;  tok 2 is padding.  loss = 0.5 * (1.69 + 1) / 2 = 0.6725; clip fraction 1/2
    loss, clip_frac = value_loss(t([1.0, 0.0, 50.0]), t([0.5, 0.0, 0.0]), t([2.0, 1.0, 0.0]), t([1, 1, 0]), clip=0.2)
    assert close(loss, 0.6725)
    assert close(clip_frac, 0.5)


def test_ppo_clip_loss_lower_bound_default_clip_and_dtypes():
    # ratio 0.5 with a negative advantage: -(-1) * 0.5 = 0.5 vs clipped -(-1) * 0.8 = 0.8 -> 0.8 (the lower bound binds)
    old = torch.log(t([0.4]))
    logp = old + math.log(0.5)
    loss, clip_frac, _ = ppo_clip_loss(logp, old, t([-1.0]), t([1.0]))  # default clip 0.2 (Llama 2)
    assert close(loss, 0.8) and close(clip_frac, 1.0)
    assert clip_frac.dtype == logp.dtype and loss.dtype == logp.dtype
    # ratio 1.15 within the default clip: no clipping (a wider default would give the same; 1.3 tells them apart)
    logp = old + math.log(1.3)
    loss, clip_frac, _ = ppo_clip_loss(logp, old, t([1.0]), t([1.0]))
    assert close(loss, -1.2) and close(clip_frac, 1.0)


def test_value_loss_both_bounds_default_clip_and_dtypes():
    # v 0.0, old 1.0 -> v_clip 0.8 (lower bound); return 2: (0 - 2)^2 = 4 vs (0.8 - 2)^2 = 1.44 -> 4, not clipped
    # v 1.1, old 1.0 -> v_clip 1.1 (inside); return 0: 1.21 both
    # v 3.0, old 1.0 -> v_clip 1.2 (upper bound, default clip 0.2); return 0: 9 vs 1.44 -> 9
    # v -1.0, old 1.0 -> v_clip 0.8; return 0: 1 vs 0.64 -> 1
    values, old, ret, mask = t([0.0, 1.1, 3.0, -1.0]), t([1.0, 1.0, 1.0, 1.0]), t([2.0, 0.0, 0.0, 0.0]), t([1, 1, 1, 1])
    loss, frac = value_loss(values, old, ret, mask)
    assert close(loss, 0.5 * (4 + 1.21 + 9 + 1) / 4)
    assert close(frac, 0.0) and frac.dtype == values.dtype
    # v -1.0, old 1.0, return 1.0: (−1 − 1)^2 = 4 vs (0.8 − 1)^2 = 0.04 -> 4; v 0.5 old 1.0 return -1: 2.25 vs (0.8+1)^2 = 3.24 -> clipped
    loss, frac = value_loss(t([-1.0, 0.5]), t([1.0, 1.0]), t([1.0, -1.0]), t([1, 1]))
    assert close(loss, 0.5 * (4 + 3.24) / 2) and close(frac, 0.5)
