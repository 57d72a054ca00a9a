"""Reward-model loss and combined reward (reward_models/losses.py, reward_models/combine.py) against
numbers worked out by hand; the comments show the arithmetic."""
from __future__ import annotations

import math

import pytest
import torch

from reward_models.combine import combined_reward, gate_reward, logit, whiten
from reward_models.losses import MARGINS, margin_for, pairwise_accuracy, ranking_loss


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ---- margins (Llama 2 Table 27) ---------------------------------------------------------------------

def test_margin_table_and_lookup():
    assert MARGINS["small"] == {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3,
                                "negligibly_better_or_unsure": 0.0}
    assert MARGINS["large"] == {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0,
                                "negligibly_better_or_unsure": 0.0}
    assert margin_for("better", "small") == 2 / 3
    assert margin_for("significantly_better", "large") == 3.0
    assert margin_for(None, "large") == 0.0  # no rating (e.g. HH-RLHF) -> like "unsure"
    assert margin_for("significantly_better", "off") == 0.0


def test_margin_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="small, large, off"):
        margin_for("better", "medium")
    with pytest.raises(ValueError, match="significantly_better"):
        margin_for("much_better", "small")


# ---- ranking loss ------------------------------------------------------------------------------------

def test_ranking_loss_without_margin():
    # diffs 0.5 and 0: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770, -log sigmoid(0) = log 2 = 0.6931472
    loss = ranking_loss(t(1.0, 0.0), t(0.5, 0.0), None)
    assert loss.shape == ()
    assert close(loss, (0.4740770 + 0.6931472) / 2)
    assert close(loss, (math.log1p(math.exp(-0.5)) + math.log(2)) / 2)


def test_ranking_loss_with_margin():
    # diffs 0.5 - 1/3 = 1/6 and 2 - 3 = -1: log(1 + e^(-1/6)) = 0.6132821, log(1 + e^1) = 1.3132617
    loss = ranking_loss(t(1.0, 2.0), t(0.5, 0.0), t(1 / 3, 3.0))
    assert close(loss, (0.6132821 + 1.3132617) / 2)


def test_ranking_loss_is_stable_for_large_gaps():
    assert close(ranking_loss(t(-1000.0), t(1000.0), None), 2000.0)  # -log sigmoid(-2000) = 2000 + log(1 + e^-2000)
    assert close(ranking_loss(t(1000.0), t(-1000.0), None), 0.0)
    big = ranking_loss(torch.tensor([-60.0]), torch.tensor([60.0]), None)  # float32 too
    assert torch.isfinite(big) and abs(float(big) - 120.0) < 1e-4


def test_ranking_loss_gradient():
    # d/dr_c [-log sigmoid(d)] = -(1 - sigmoid(d)) = -sigmoid(-d); at d = 0 -> -0.5, halved by the mean over B=2
    c = t(0.0, 0.0).requires_grad_()
    ranking_loss(c, t(0.0, 0.0), None).backward()
    assert close(c.grad, t(-0.25, -0.25))


def test_pairwise_accuracy_counts_ties_half():
    # right, tie, wrong, right -> (1 + 0.5 + 0 + 1) / 4
    assert close(pairwise_accuracy(t(2.0, 1.0, 0.0, 3.0), t(1.0, 1.0, 1.0, 0.0)), 0.625)


# ---- combined reward (Llama 2 sec. 3.2.3) -----------------------------------------------------------

def test_logit_inverts_sigmoid_and_clamps():
    # logit(0.5) = 0, logit(0.8) = log 4 = 1.3862944, logit(0.1) = -log 9 = -2.1972246
    assert close(logit(t(0.5, 0.8, 0.1)), t(0.0, 1.3862944, -2.1972246))
    # p = 0 and 1 are clamped to 1e-6 and 1 - 1e-6: log(1e-6 / (1 - 1e-6)) = -13.8155116
    assert close(logit(t(0.0, 1.0)), t(-13.8155116, 13.8155116), tol=1e-5)


def test_whiten_population_std():
    # [1, 2, 3, 4]: mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std 1.1180340
    assert close(whiten(t(1.0, 2.0, 3.0, 4.0)), t(-1.3416408, -0.4472136, 0.4472136, 1.3416408))
    # shift_mean=False keeps the mean: each value + 2.5
    assert close(whiten(t(1.0, 2.0, 3.0, 4.0), shift_mean=False), t(1.1583592, 2.0527864, 2.9472136, 3.8416408))


def test_whiten_with_mask_ignores_masked_entries():
    # statistics over [1, 2, 3]: mean 2, variance 2/3, std 0.8164966; the masked 100 is transformed, not used
    out = whiten(t(1.0, 2.0, 3.0, 100.0), mask=torch.tensor([True, True, True, False]))
    assert close(out, t(-1.2247449, 0.0, 1.2247449, 98 / 0.8164966), tol=1e-5)


def test_gate_reward_picks_safety_or_helpfulness():
    # row 0: safety prompt -> R_s 0.9; row 1: R_s 0.1 < 0.15 -> R_s; row 2: helpful prompt, safe -> R_h 0.6;
    # row 3: R_s exactly 0.15 is not below the threshold -> R_h 0.7
    r_s, r_h = t(0.9, 0.1, 0.8, 0.15), t(0.3, 0.7, 0.6, 0.7)
    is_safety = torch.tensor([True, False, False, False])
    assert close(gate_reward(r_s, r_h, is_safety), t(0.9, 0.1, 0.6, 0.7))
    assert close(gate_reward(r_s, r_h, is_safety, threshold=0.05), t(0.9, 0.7, 0.6, 0.7))


def test_combined_reward_is_whitened_logit_of_the_gate():
    r_s, r_h = t(0.9, 0.1, 0.8), t(0.3, 0.7, 0.6)
    is_safety = torch.tensor([True, False, False])
    # gate -> [0.9, 0.1, 0.6]; logit -> [log 9, -log 9, log 1.5] = [2.1972246, -2.1972246, 0.4054651]
    z = t(2.1972246, -2.1972246, 0.4054651)
    assert close(combined_reward(r_s, r_h, is_safety, whiten_output=False), z)
    # mean 0.1351550; deviations 2.0620696, -2.3323796, 0.2703101; population variance 3.2550643, std 1.8041797
    assert close(combined_reward(r_s, r_h, is_safety), t(1.1429402, -1.2927646, 0.1498244), tol=1e-5)


def test_combined_reward_of_one_row_is_its_logit():
    # a batch of one has no spread to whiten by: log(0.8 / 0.2) = log 4
    assert close(combined_reward(t(0.9), t(0.8), torch.tensor([False])), t(1.3862944))


def test_combined_reward_uses_raw_logits_without_clamping():
    """Issue 12.7: LOGIT(R_c) is the RM's raw output; the sigmoid -> logit round trip clamped at +-13.8
    (float32) and made large rewards equal."""
    from reward_models.combine import combined_reward, combined_reward_from_logits, gate_logits

    zs = torch.tensor([5.0, 5.0, -3.0, 5.0])
    zh = torch.tensor([20.0, 30.0, 40.0, -25.0])
    flags = torch.tensor([False, False, False, True])
    g = gate_logits(zs, zh, flags, 0.15)
    assert g.tolist() == [20.0, 30.0, -3.0, 5.0]  # safe enough -> R_h; sigmoid(-3) < 0.15 -> R_s; safety prompt -> R_s
    raw = combined_reward_from_logits(zs, zh, flags, 0.15, whiten_output=False)
    assert raw[1] > raw[0]  # 30 beats 20: the round trip clamped both to ~13.8
    old = combined_reward(torch.sigmoid(zs), torch.sigmoid(zh), flags, 0.15, whiten_output=False)
    assert old[0] == old[1]
    w = combined_reward_from_logits(zs, zh, flags, 0.15)
    assert abs(float(w.mean())) < 1e-5 and abs(float(w.std(unbiased=False)) - 1) < 1e-3
    small = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.5]), torch.tensor([False, False])
    assert torch.allclose(combined_reward_from_logits(*small), combined_reward(torch.sigmoid(small[0]), torch.sigmoid(small[1]), small[2]), atol=1e-4)
