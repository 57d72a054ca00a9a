"""The paper's data mix for the two reward models (Llama 2 sec. 3.2.2).

* Helpfulness RM: all helpfulness comparisons, plus an equal part (`mix_other_ratio`) sampled
  uniformly from the rest (safety comparisons and other sources).
* Safety RM: all safety comparisons, mixed 90/10 with helpfulness comparisons (`helpful_share`).

Here a comparison is "safety" data when its prompt is a safety prompt; everything else is
helpfulness data.
"""
from __future__ import annotations

import random
from typing import Sequence

from data_specs.schemas import Comparison


def split_domains(comparisons: Sequence[Comparison]) -> tuple[list[Comparison], list[Comparison]]:
    helpful = [c for c in comparisons if not c.is_safety_prompt]
    safety = [c for c in comparisons if c.is_safety_prompt]
    return helpful, safety


def mix_for(kind: str, comparisons: Sequence[Comparison], mix_other_ratio: float, helpful_share: float, seed: int) -> list[Comparison]:
    """The training mix of reward model `kind` ('helpful' or 'safety'), shuffled."""
    rng = random.Random(seed)
    helpful, safety = split_domains(comparisons)
    if kind == "helpful":
        own, other = helpful, safety
        n_other = round(len(own) * mix_other_ratio)
    elif kind == "safety":
        own, other = safety, helpful
        n_other = round(len(own) * helpful_share / (1 - helpful_share))
    else:
        raise ValueError(f"kind must be 'helpful' or 'safety', got {kind!r}")
    mix = list(own) + rng.sample(list(other), min(n_other, len(other)))
    rng.shuffle(mix)
    return mix


def holdout(comparisons: Sequence[Comparison], fraction: float, seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held out): a seeded `fraction` of each round's batch is held out."""
    rng = random.Random(seed)
    train, held = [], []
    for c in comparisons:
        (held if rng.random() < fraction else train).append(c)
    return train, held
