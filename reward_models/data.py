"""The paper's data mix for the two reward models (Llama 2 sec. 3.2.2).

* Helpfulness RM: all helpfulness comparisons, plus an equal part (`mix_other_ratio`) sampled
  uniformly from the rest (safety comparisons and other sources).
* Safety RM: all safety comparisons, mixed 90/10 with helpfulness comparisons (`helpful_share`).

Here a collected comparison is "safety" data when its prompt is a safety prompt; everything else is
helpfulness data. Static preference sets (`data.preferences`: Anthropic Helpful / Harmless, TRL data, ...,
the paper's open-source data of Table 6) join the pool of the domain the config gives them (an `auto` set
was split by each record's flag in the `data` stage), each set sized by its weight (`weighted`: 0.5 keeps a
seeded half, 2 repeats every record twice). The rules above then apply to the pools:

* helpful RM = the whole helpfulness pool + round(mix_other_ratio * |helpfulness pool|) sampled from the
  safety pool;
* safety RM = the whole safety pool + helpful_share / (1 - helpful_share) * |safety pool| sampled from the
  helpfulness pool (90/10 by default: Meta Safety + Anthropic Harmless with 10% helpfulness data).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from data_specs.schemas import Comparison

DOMAINS = ("helpfulness", "safety")


@dataclass(frozen=True)
class StaticSet:
    """The records of one static preference set that belong to one domain."""

    name: str
    domain: str  # helpfulness | safety
    weight: float
    records: tuple[Comparison, ...]


def weighted(records: Sequence, weight: float, rng: random.Random) -> list:
    """round(weight * n) records: whole copies for the integer part, a seeded sample without replacement for the rest."""
    records = list(records)
    if not records:
        return []
    n = round(weight * len(records))
    whole, part = divmod(n, len(records))
    return records * whole + rng.sample(records, part)


def static_sets(rows: Sequence[tuple]) -> list[StaticSet]:
    """Group (Comparison, domain, weight, set) rows (data_specs.prepare.read_static_preferences) into StaticSets."""
    groups: dict[tuple, list] = {}
    for c, domain, weight, idx in rows:
        if domain not in DOMAINS:
            raise ValueError(f"static preference domain must be one of {DOMAINS}, got {domain!r}")
        groups.setdefault((idx, domain, weight), []).append(c)
    return [StaticSet(f"data.preferences.{idx}", d, w, tuple(recs)) for (idx, d, w), recs in sorted(groups.items())]


def pools(comparisons: Sequence[Comparison], static: Sequence[StaticSet] = (), seed: int = 0) -> tuple[list, list]:
    """(helpfulness pool, safety pool): collected comparisons by their prompt flag, static sets by domain and weight."""
    rng = random.Random(seed + 7919)
    helpful, safety = split_domains(comparisons)
    for s in static:
        (safety if s.domain == "safety" else helpful).extend(weighted(s.records, s.weight, rng))
    return helpful, safety


def split_domains(comparisons: Sequence[Comparison]) -> tuple[list[Comparison], list[Comparison]]:
    helpful = [c for c in comparisons if not c.is_safety_prompt]
    safety = [c for c in comparisons if c.is_safety_prompt]
    return helpful, safety


def mix_for(kind: str, comparisons: Sequence[Comparison], mix_other_ratio: float, helpful_share: float, seed: int,
            static: Sequence[StaticSet] = ()) -> list[Comparison]:
    """The training mix of reward model `kind` ('helpful' or 'safety'), shuffled: collected `comparisons` plus
    the `static` sets, by domain and weight."""
    rng = random.Random(seed)
    helpful, safety = pools(comparisons, static, seed)
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
    """(train, held out), split by PROMPT: a seeded `fraction` of the prompts is held out with every
    comparison on them, so no prompt has responses on both sides. The draw depends only on the seed and
    the prompt's text, so a prompt held out in one round stays held out in every later round."""
    train, held = [], []
    for c in comparisons:
        (held if prompt_held_out(c, fraction, seed) else train).append(c)
    return train, held


def prompt_key(c: Comparison) -> str:
    """The prompt of a comparison as text (role and content of every message)."""
    return "\x1f".join(f"{m.role}:{m.content}" for m in c.prompt)


def prompt_held_out(c: Comparison, fraction: float, seed: int) -> bool:
    digest = hashlib.sha1(f"{seed}:{prompt_key(c)}".encode()).hexdigest()
    return int(digest[:12], 16) / float(16 ** 12) < fraction
