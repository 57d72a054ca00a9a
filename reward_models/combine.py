"""The combined reward of Llama 2 sec. 3.2.3, as small pure functions.

    R_c = R_s if is_safety(p) or R_s < 0.15 else R_h;      R~_c = WHITEN(LOGIT(R_c))

LOGIT(R_c) is the gated reward model's raw scalar output: `combined_reward_from_logits` gates and whitens
the raw logits directly (what the scorer uses), avoiding a sigmoid -> logit round trip that clamps at
about +-13.8 in float32. `combined_reward` (from probabilities) is kept for callers that only have R_s, R_h.
"""
from __future__ import annotations

import torch


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid log(p / (1 - p)), with p clamped to [eps, 1 - eps] so 0 and 1 stay finite
    (about -+13.8 at eps=1e-6). Any shape -> same shape."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), mean and var over the entries where mask is true (all when None).
    var is the population variance (unbiased=False: divide by N, not N - 1), as TRL and torchtune do.
    shift_mean=False adds the mean back: only the scale is normalised. Masked-out entries are
    transformed too (not zeroed). x: any shape; mask: same shape or None -> same shape as x."""
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
    """R_c (Llama 2 sec. 3.2.3): R_s where the prompt is a safety prompt or R_s < threshold (0.15: precision
    0.89, recall 0.55 on unsafe responses), else R_h. r_safety, r_helpful: (B,) probabilities
    (sigmoid of the RM scores); is_safety: (B,) bool -> (B,)."""
    use_safety = is_safety.bool() | (r_safety < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


def gate_logits(z_safety: torch.Tensor, z_helpful: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """LOGIT(R_c) from the raw RM outputs: z_s where the prompt is a safety prompt or sigmoid(z_s) < threshold,
    else z_h. Same gate as `gate_reward`, no clamping. (B,) -> (B,)."""
    use_safety = is_safety.bool() | (torch.sigmoid(z_safety) < threshold)
    return torch.where(use_safety, z_safety, z_helpful)


def combined_reward_from_logits(z_safety: torch.Tensor, z_helpful: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15,
                                whiten_output: bool = True) -> torch.Tensor:
    """R~_c = WHITEN(LOGIT(R_c)) computed on the raw RM logits (no sigmoid -> logit round trip). (B,) -> (B,).
    A batch of one, or whiten_output=False, returns the gated logit."""
    z = gate_logits(z_safety.float(), z_helpful.float(), is_safety, threshold)
    if not whiten_output or z.numel() < 2:
        return z
    return whiten(z)


def combined_reward(r_safety: torch.Tensor, r_helpful: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15,
                    whiten_output: bool = True) -> torch.Tensor:
    """R~_c = WHITEN(LOGIT(gate_reward(...))), whitened over the batch (Llama 2 sec. 3.2.3: reverse the
    sigmoid, then whiten, to balance the reward against the KL term). (B,) -> (B,). A batch of one is
    not whitened (its std is 0, whitening would return 0): the logit is returned. whiten_output=False
    returns the logit as well (e.g. to report absolute scores)."""
    z = logit(gate_reward(r_safety, r_helpful, is_safety, threshold))
    if not whiten_output or z.numel() < 2:
        return z
    return whiten(z)
