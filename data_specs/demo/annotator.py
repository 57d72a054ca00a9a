"""A simulated annotator: noisy comparisons from gold scores, the way Llama 2's annotators rated
pairs (sec. 3.2.1): a choice, a preference strength, and a safety label for each response.

Utility is safety first (a safe reply always beats an unsafe one), then gold helpfulness; the
annotator perceives it with Gaussian noise of std `noise`, and the perceived gap sets the strength.
Pairs where the chosen reply is unsafe and the other safe are dropped, as the
paper does (sec. 3.2.2), and so are identical replies.
"""
from __future__ import annotations

import random

from ..schemas import Comparison, Prompt, Strength
from .oracle import Oracle

# perceived utility gap -> strength; with the world's failure modes all four levels occur
THRESHOLDS = ((0.5, Strength.significantly_better), (0.25, Strength.better), (0.1, Strength.slightly_better))
SAFETY_BONUS = 1.0  # on safety prompts: a safe reply outranks any unsafe one (helpfulness is at most 1)
SOURCE = "demo-annotator"


def strength_for(gap: float) -> Strength:
    """The preference strength an annotator gives to a perceived utility gap (>= 0)."""
    for t, s in THRESHOLDS:
        if gap > t:
            return s
    return Strength.negligibly_better_or_unsure


class SimulatedAnnotator:
    def __init__(self, oracle: Oracle, noise: float = 0.1, seed: int = 0):
        if noise < 0:
            raise ValueError("noise must be >= 0")
        self.oracle, self.noise, self.seed = oracle, noise, seed
        self._rng = random.Random(f"annotator-{seed}")  # used when compare() gets no rng

    def utility(self, prompt: Prompt, response: str) -> tuple[float, bool]:
        """(gold utility, is safe): safety first, then helpfulness. Only safety prompts have unsafe
        replies in practice; on other prompts the bonus is the same for both replies."""
        safe = self.oracle.is_safe(prompt, response)
        return (SAFETY_BONUS if safe else 0.0) + self.oracle.helpfulness(prompt, response), safe

    def compare(self, prompt: Prompt, response_a: str, response_b: str, round: int = 0,
                rng: random.Random | None = None) -> Comparison | None:
        """One labelled comparison, or None (identical replies; chosen unsafe and rejected safe)."""
        if response_a.strip() == response_b.strip():
            return None
        rng = rng if rng is not None else self._rng
        (ua, sa), (ub, sb) = self.utility(prompt, response_a), self.utility(prompt, response_b)
        pa, pb = ua + rng.gauss(0, self.noise), ub + rng.gauss(0, self.noise)
        if pa >= pb:
            chosen, rejected, cs, rs, gap = response_a, response_b, sa, sb, pa - pb
        else:
            chosen, rejected, cs, rs, gap = response_b, response_a, sb, sa, pb - pa
        if not cs and rs:  # Llama 2 sec. 3.2.2 excludes pairs where the chosen reply is unsafe and the other safe
            return None
        return Comparison(prompt=list(prompt.messages), chosen=chosen, rejected=rejected, strength=strength_for(gap),
                          is_safety_prompt=prompt.is_safety, chosen_safe=cs, rejected_safe=rs, round=round, source=SOURCE)
