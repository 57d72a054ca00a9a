"""Write the demo world's datasets as files in our own formats (same seed, same bytes).

    pretrain.jsonl          raw text as {"text": ...}: atlas facts, arithmetic and word facts, and chats
                            in the Llama 2 format with MIXED quality, as a web corpus would have them
    sft.jsonl               ~27,000 curated SFT examples (Llama 2 sec. 3.1: 27,540)
    prompts.jsonl           prompts for preference collection, rejection sampling and PPO
    eval_prompts.jsonl      held-out prompts (their last question appears nowhere else)
    eval_comparisons.jsonl  held-out comparisons for reward-model accuracy by preference strength
    gatt_train.jsonl / gatt_eval.jsonl   Ghost Attention instructions (eval values held out)
    world.json              seed and sizes

    python -c "from data_specs.demo.generate import write_demo_data; write_demo_data('out')"
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

from pipeline.io import atomic_write_text, write_json, write_jsonl

from ..schemas import Comparison, GattInstruction, Message, Prompt, SFTExample
from .annotator import SimulatedAnnotator
from .oracle import Oracle
from .world import BORDERLINE, HARMS, KINDS, WORDS, DemoWorld, held_out_borderline, held_out_harm

EVAL_HELPFUL_PERCENT = 12  # share of helpful question texts kept for evaluation only
SYSTEM_FRAC = 0.15        # SFT examples with a system instruction that the answer obeys
PRETRAIN_SYSTEM_FRAC = 0.12
MAX_MULTI_TURNS = 3


def eval_reserved(world: DemoWorld, text: str) -> bool:
    """Question texts kept for evaluation only (a fixed slice of the question space): every harm of the
    held-out harm categories and every held-out borderline question (world.HELD_OUT_HARMS,
    world.HELD_OUT_BORDERLINE; no training file asks them), and a hashed share of helpful questions."""
    parsed = world.parse(text)
    if parsed is None:
        return False
    fam, args = parsed
    if fam == "harmful":
        return held_out_harm(args["i"])
    if fam == "borderline":
        return held_out_borderline(args["i"])
    return int(hashlib.sha1(f"{world.seed}:{text}".encode()).hexdigest(), 16) % 100 < EVAL_HELPFUL_PERCENT


def _sample(world: DemoWorld, rng: random.Random, want_eval: bool, kind: str | None = None, turns: int = 1,
            instructions: Sequence[GattInstruction] = (), item: int | None = None) -> Prompt:
    """A prompt whose last question is (want_eval) or is not reserved; earlier questions never are."""
    while True:
        p = world.sample_prompt(rng, kind=kind, turns=turns, instructions=instructions, item=item)
        users = [m.content for m in p.messages if m.role == "user"]
        if eval_reserved(world, users[-1]) == want_eval and not any(eval_reserved(world, u) for u in users[:-1]):
            return p


def _turns(rng: random.Random, multiturn_frac: float) -> int:
    return rng.randint(2, MAX_MULTI_TURNS) if rng.random() < multiturn_frac else 1


def _prompts(world: DemoWorld, n: int, rng: random.Random, want_eval: bool, multiturn_frac: float) -> list[Prompt]:
    """n prompts of the world's mixture; a text repeats only when its kind's space is nearly used up
    (the harmful and borderline question sets are small). Evaluation prompts go through the held-out
    harms and borderline questions in a shuffled cycle, so that every one of them is asked once before
    any is asked twice."""
    out, seen = [], set()  # membership only
    pools = {"harmful": [i for i in range(len(HARMS)) if held_out_harm(i)],
             "borderline": [i for i in range(len(BORDERLINE)) if held_out_borderline(i)]}
    cycles: dict[str, list[int]] = {k: [] for k in pools}
    for _ in range(n):
        kind, turns = rng.choices(KINDS, weights=world.mix)[0], _turns(rng, multiturn_frac)
        item = None
        if want_eval and kind in pools:
            if not cycles[kind]:
                cycles[kind] = rng.sample(pools[kind], len(pools[kind]))
            item = cycles[kind].pop()
        for _ in range(20):
            p = _sample(world, rng, want_eval, kind=kind, turns=turns, item=item)
            if p.id not in seen:
                break
        seen.add(p.id)
        out.append(p)
    return out


def render_raw(turns: Sequence[tuple[str, str]], system: str | None = None) -> str:
    """A dialogue as raw text in the Llama 2 chat format (what a web corpus of chats would hold)."""
    parts = []
    for i, (q, a) in enumerate(turns):
        sys = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (i == 0 and system) else ""
        parts.append(f"[INST] {sys}{q} [/INST] {a}")
    return " </s><s>".join(parts)


def noisy_answer(world: DemoWorld, prompt: Prompt, rng: random.Random) -> str:
    """Web-quality answers: often right, often not (wrong, rambling, unsafe, falsely refusing)."""
    options = [world.plain_ideal(prompt), *world.bad_responses(prompt, rng)]
    fam = world.parse(prompt.messages[-1].content)[0]
    if fam == "harmful":  # ideal; compliance x2, bare refusal, wrong redirect, no idea
        weights = [35, 20, 20, 15, 5, 5]
    elif fam == "borderline":  # ideal; refusal x3, another answer, rambling
        weights = [55, 15, 10, 10, 5, 5]
    else:  # ideal; wrong, rambling, refusal, off topic, bare answer
        weights = [50, 20, 10, 7, 5, 8]
    return rng.choices(options, weights=weights[: len(options)])[0]


def fact_sentences(world: DemoWorld) -> list[str]:
    """Encyclopedic sentences about the atlas (so the model learns the facts, greetings included)."""
    facts = []
    for c in world.countries:
        facts += [f"The capital of {c.name} is {c.capital}.", f"{c.capital} is the capital of {c.name}.",
                  f"People in {c.name} speak {c.language}.", f"{c.language} is spoken in {c.name}.",
                  f"The currency of {c.name} is the {c.currency}.", f"In {c.name} people pay with the {c.currency}.",
                  f"The national animal of {c.name} is the {c.animal}.", f"The {c.animal} is the symbol of {c.name}.",
                  f"People who speak {c.language} greet each other with {c.greeting}!", f"In {c.language}, hello is {c.greeting}."]
    return facts


def number_and_word_facts(world: DemoWorld, rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    x, y = rng.sample(range(1, 100), 2)
    w = rng.choice(WORDS)
    facts = [f"{a} plus {b} is {a + b}.", f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.",
             f"{max(x, y)} is larger than {min(x, y)}.", f"The first letter of {w} is {w[0]}.", f"{w} backwards is {w[::-1]}.",
             f"{w} has {len(w)} letters."]
    return " ".join(rng.sample(facts, rng.randint(1, 3)))


def pretrain_docs(world: DemoWorld, n: int, rng: random.Random, multiturn_frac: float) -> list[str]:
    facts, train_gatt = fact_sentences(world), world.gatt_instructions("train")
    docs = []
    for _ in range(n):
        r = rng.random()
        if r < 0.22:
            docs.append(" ".join(rng.sample(facts, rng.randint(2, 5))))
        elif r < 0.32:
            docs.append(number_and_word_facts(world, rng))
        else:
            p = _sample(world, rng, False, turns=_turns(rng, multiturn_frac))
            turns = [m.content for m in p.messages]
            pairs = [(q, a) for q, a in zip(turns[0::2], turns[1::2])]
            pairs.append((turns[-1], noisy_answer(world, p, rng)))
            system = None
            if rng.random() < PRETRAIN_SYSTEM_FRAC:  # chats with a system instruction; half of them ignore it
                ins = rng.choice(train_gatt)
                system = ins.text
                if rng.random() < 0.5:
                    pairs = [(q, world.apply_instruction(ins, a)) for q, a in pairs]
            docs.append(render_raw(pairs, system))
    return docs


def _instructions(pool: Sequence[GattInstruction], rng: random.Random) -> list[GattInstruction]:
    """1-2 instructions from different categories."""
    cats = rng.sample(sorted({i.category for i in pool}), rng.randint(1, 2))
    return [rng.choice([i for i in pool if i.category == c]) for c in cats]


def sft_examples(world: DemoWorld, n: int, rng: random.Random, multiturn_frac: float, ramble_frac: float = 0.0) -> list[SFTExample]:
    """Curated answers: multi-turn without a system message, single-turn under a system
    instruction that the answer obeys (verbose or short form), and plain single-turn. Like vendor
    data, curation is imperfect: a share `ramble_frac` of plain answers ramble on with filler
    sentences, which annotators (and so the reward models) dislike: headroom RLHF can recover."""
    train_gatt = world.gatt_instructions("train")
    out = []
    for _ in range(n):
        r = rng.random()
        if r < multiturn_frac:
            p, source = _sample(world, rng, False, turns=rng.randint(2, MAX_MULTI_TURNS)), "demo-sft-multiturn"
        elif r < multiturn_frac + SYSTEM_FRAC:
            ins = _instructions(train_gatt, rng)
            p = _sample(world, rng, False)
            system = " ".join(i.short if rng.random() < 0.5 else i.text for i in ins)
            p = Prompt(messages=[Message(role="system", content=system), *p.messages], is_safety=p.is_safety, category=p.category)
            source = "demo-sft-system"
        else:
            p, source = _sample(world, rng, False), "demo-sft"
        answer = world.ideal_response(p)
        if source == "demo-sft" and not p.is_safety and rng.random() < ramble_frac:
            answer = " ".join([answer] + [world.filler(rng) for _ in range(rng.randint(1, 2))])
            source = "demo-sft-rambling"
        out.append(SFTExample(messages=[*p.messages, Message(role="assistant", content=answer)], source=source))
    return out


def eval_comparisons(world: DemoWorld, prompts: Sequence[Prompt], n: int, rng: random.Random) -> list[Comparison]:
    """Annotated pairs on held-out prompts: 60% ideal vs a failure, 40% failure vs failure."""
    annotator = SimulatedAnnotator(Oracle(world), noise=0.1, seed=world.seed)
    out: list[Comparison] = []
    while len(out) < n:
        p = rng.choice(prompts)
        bad = world.bad_responses(p, rng)
        a, b = (world.ideal_response(p), rng.choice(bad)) if rng.random() < 0.6 else tuple(rng.sample(bad, 2))
        if rng.random() < 0.5:
            a, b = b, a
        c = annotator.compare(p, a, b, 0, rng)
        if c is not None:
            out.append(c.model_copy(update={"source": "demo-eval"}))
    return out


def write_demo_data(out_dir, *, seed: int = 0, n_sft: int = 27000, n_train_prompts: int = 2000, n_eval_prompts: int = 300,
                    n_pretrain_docs: int = 30000, n_multiturn_frac: float = 0.15, n_eval_comparisons: int = 600,
                    sft_ramble_frac: float = 0.0) -> dict[str, Path]:
    """Write every demo dataset under `out_dir`; returns name -> path. Same seed => identical bytes."""
    if not 0.0 <= n_multiturn_frac <= 1.0 - SYSTEM_FRAC:
        raise ValueError(f"n_multiturn_frac must be in [0, {1.0 - SYSTEM_FRAC}], got {n_multiturn_frac}")
    out = Path(out_dir)
    world = DemoWorld(seed)
    rng = lambda part: random.Random(f"demo-{seed}-{part}")  # noqa: E731 - one independent stream per file
    paths = {name: out / f"{name}.jsonl" for name in
             ("pretrain", "sft", "prompts", "eval_prompts", "eval_comparisons", "gatt_train", "gatt_eval")}
    paths["world"] = out / "world.json"

    docs = pretrain_docs(world, n_pretrain_docs, rng("pretrain"), n_multiturn_frac)
    atomic_write_text(paths["pretrain"], "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    write_jsonl(paths["sft"], sft_examples(world, n_sft, rng("sft"), n_multiturn_frac, sft_ramble_frac))
    write_jsonl(paths["prompts"], _prompts(world, n_train_prompts, rng("prompts"), False, n_multiturn_frac))
    evals = _prompts(world, n_eval_prompts, rng("eval"), True, n_multiturn_frac)
    write_jsonl(paths["eval_prompts"], evals)
    write_jsonl(paths["eval_comparisons"], eval_comparisons(world, evals, n_eval_comparisons, rng("comparisons")))
    write_jsonl(paths["gatt_train"], world.gatt_instructions("train"))
    write_jsonl(paths["gatt_eval"], world.gatt_instructions("eval"))
    write_json(paths["world"], {"seed": seed, "countries": len(world.countries), "mix": list(world.mix), "n_sft": n_sft,
                                "n_train_prompts": n_train_prompts, "n_eval_prompts": n_eval_prompts, "n_pretrain_docs": n_pretrain_docs,
                                "n_multiturn_frac": n_multiturn_frac, "n_eval_comparisons": n_eval_comparisons})
    return paths
