"""PPO maths as small pure functions (Llama 2 sec. 3.2.3). B = batch of rollouts, A = response tokens,
V = vocabulary. Every tensor of shape (B, A) comes with a mask (B, A): 1 on real response tokens,
0 on padding after a row's end (a row's real tokens come first)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1. x, mask (B, A) -> () scalar, or (B,) / (A,) with dim.
    An all-zero mask gives 0 (not NaN)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, population variance (divide by N).
    shift_mean=False adds the mean back. Masked-out entries become 0. x, mask (B, A) -> (B, A)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, in float32. logits (B, A, V), labels (B, A) -> (B, A).
    Row by row, so the float32 (A, V) log-softmax of one row is the only large temporary."""
    return torch.stack([torch.gather(F.log_softmax(lg.float(), dim=-1), -1, lb.unsqueeze(-1)).squeeze(-1)
                        for lg, lb in zip(logits, labels)])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy -sum_v p log p of the next-token distribution, in float32. (B, A, V) -> (B, A)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_0) on tokens sampled from pi. logp, ref_logp (B, A) -> (B, A).
    k1: log pi - log pi_0 (unbiased, can be negative); k3: (r - 1) - log r with r = pi_0 / pi
    (unbiased, never negative, lower variance; Schulman's "Approximating KL divergence")."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl kind must be 'k1' or 'k3', got {kind!r}")


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """R(g|p) = R~_c - beta * KL spread over tokens: -beta * kl on every response token, plus the sequence
    score on its last real token; 0 on padding. score (B,), kl (B, A), mask (B, A) -> (B, A).
    A row without any real token gets no score."""
    rewards = -beta * kl * mask.to(kl.dtype)
    A = mask.size(1)
    positions = torch.arange(A, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # (B,) last real index, -1 if none
    rows = (last >= 0).nonzero().squeeze(-1)
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).
        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   returns = A + V
    with V and A after a row's last real token counted as 0 (the episode has ended).
    rewards, values, mask (B, A) -> (advantages, returns), each (B, A), 0 on padding."""
    m = mask.to(rewards.dtype)
    values = values * m
    B, A = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(A)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * m


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Llama 2: clip 0.2): masked mean of max(-A r, -A clip(r, 1 - clip, 1 + clip)),
    r = exp(logp - old_logp). All inputs (B, A) -> (loss (), share of tokens where the clipped term is
    the larger (), approximate KL 0.5 * mean (logp - old_logp)^2 ()); the last two are detached."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (v_clip - R)^2), with
    v_clip = old_v + clamp(v - old_v, -clip, clip). All inputs (B, A) -> (loss (), share of tokens
    where the clipped error is the larger (), detached)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).to(values.dtype), mask).detach()
