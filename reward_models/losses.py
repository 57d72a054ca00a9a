"""Reward-model losses (Llama 2 sec. 3.2.2, Table 27)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# m(r): a discrete function of the preference rating (Table 27)
MARGINS: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better_or_unsure": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better_or_unsure": 0.0},
}
VARIANTS = ("small", "large", "off")
STRENGTHS = tuple(MARGINS["small"])  # the four ratings of sec. 3.2.1


def margin_for(strength: str | None, variant: str) -> float:
    """m(r) of one comparison. strength: a key of MARGINS[variant] or None; variant: small | large | off.
    A comparison without a rating (None, e.g. HH-RLHF) gets 0, like 'negligibly better / unsure';
    variant 'off' gives 0 everywhere (the 'no margin' row of Table 28)."""
    if variant not in VARIANTS:
        raise ValueError(f"margin variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if strength is not None and strength not in STRENGTHS:
        raise ValueError(f"preference strength must be one of {', '.join(STRENGTHS)} or None; got {strength!r}")
    if variant == "off" or strength is None:
        return 0.0
    return MARGINS[variant][strength]


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Binary ranking loss with margin (Llama 2 sec. 3.2.2): mean over the batch of
    -log sigmoid(r_c - r_r - m). chosen, rejected: (B,) rewards; margin: (B,) or None (= 0) -> () scalar.
    F.logsigmoid keeps it finite for large gaps of either sign."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs with r_c > r_r; ties count half. chosen, rejected: (B,) -> () float scalar."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()
