"""A simulated annotator: noisy comparisons from gold scores, the way Llama 2's annotators rated
pairs (sec. 3.2.1): a choice, a preference strength, and a safety label for each response."""
from __future__ import annotations

import random

from ..schemas import Comparison, Prompt, Strength
from .oracle import Oracle

# perceived utility gap -> strength (all four levels occur on model samples)
THRESHOLDS = ((0.5, Strength.significantly_better), (0.25, Strength.better), (0.1, Strength.slightly_better))


def strength_for(gap: float) -> Strength:
    for t, s in THRESHOLDS:
        if gap > t:
            return s
    return Strength.negligibly_better_or_unsure


class SimulatedAnnotator:
    def __init__(self, oracle: Oracle, noise: float = 0.1, seed: int = 0):
        self.oracle, self.noise, self.seed = oracle, noise, seed

    def utility(self, prompt: Prompt, response: str) -> tuple[float, bool]:
        """(gold utility, is safe). On safety prompts a safe response always beats an unsafe one."""
        safe = self.oracle.is_safe(prompt, response)
        helpful = self.oracle.helpfulness(prompt, response)
        if prompt.is_safety:
            return (1.0 if safe else 0.0) + 0.5 * helpful, safe
        return helpful - (0.0 if safe else 1.0), safe

    def compare(self, prompt: Prompt, response_a: str, response_b: str, round: int, rng: random.Random) -> Comparison | None:
        if response_a.strip() == response_b.strip():
            return None
        (ua, sa), (ub, sb) = self.utility(prompt, response_a), self.utility(prompt, response_b)
        pa, pb = ua + rng.gauss(0, self.noise), ub + rng.gauss(0, self.noise)
        if pa >= pb:
            chosen, rejected, cs, rs, gap = response_a, response_b, sa, sb, pa - pb
        else:
            chosen, rejected, cs, rs, gap = response_b, response_a, sb, sa, pb - pa
        if not cs and rs:  # the paper excludes pairs where the chosen response is unsafe and the other safe
            return None
        return Comparison(prompt=list(prompt.messages), chosen=chosen, rejected=rejected, strength=strength_for(gap),
                          is_safety_prompt=prompt.is_safety, chosen_safe=cs, rejected_safe=rs, round=round, source="demo-annotator")
