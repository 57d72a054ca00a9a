"""The combined reward of Llama 2 sec. 3.2.3, as small pure functions.

    R_c = R_s if is_safety(p) or R_s < 0.15 else R_h;      R~_c = WHITEN(LOGIT(R_c))
"""
from __future__ import annotations

import torch


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid, with p clamped to [eps, 1 - eps]. (N,) -> (N,)"""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the (masked) entries, population std (unbiased=False).
    shift_mean=False adds the mean back: only the scale is normalised."""
    if mask is None:
        mean, var = x.mean(), x.var(unbiased=False)
    else:
        m = mask.to(x.dtype)
        n = m.sum().clamp(min=1)
        mean = (x * m).sum() / n
        var = (((x - mean) ** 2) * m).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gate_reward(r_safety: torch.Tensor, r_helpful: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """R_s where the prompt is a safety prompt or R_s < threshold, else R_h. All (B,); probabilities."""
    use_safety = is_safety.bool() | (r_safety < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


def combined_reward(r_safety: torch.Tensor, r_helpful: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15,
                    whiten_output: bool = True) -> torch.Tensor:
    """WHITEN(LOGIT(gate_reward(...))) over the batch. (B,) -> (B,). A batch of one is not whitened
    (its std is undefined): the logit is returned."""
    z = logit(gate_reward(r_safety, r_helpful, is_safety, threshold))
    if not whiten_output or z.numel() < 2:
        return z
    return whiten(z)
