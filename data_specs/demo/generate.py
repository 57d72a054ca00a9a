"""Write the demo world's datasets as files in the data-spec formats (same seed, same bytes).

    pretrain.jsonl          raw text, good and bad behaviour alike, as a web corpus would have
    sft.jsonl               ~27,000 curated SFT examples (Llama 2 sec. 3.1: 27,540)
    prompts.jsonl           prompts for preference collection, rejection sampling and PPO
    eval_prompts.jsonl      held-out prompts (their question texts appear nowhere else)
    eval_comparisons.jsonl  held-out comparisons for reward-model accuracy by preference strength
    gatt_train.jsonl / gatt_eval.jsonl   Ghost Attention instructions (eval values held out)
    world.json              seed and sizes
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from pipeline.io import atomic_write_text, write_json, write_jsonl

from ..schemas import Message, Prompt, SFTExample
from .annotator import SimulatedAnnotator
from .oracle import Oracle
from .world import ATLAS_FAMILIES, BORDERLINE, HARM_TEMPLATES, HARMS, REFUSAL, DemoWorld

EVAL_BORDERLINE = 4  # borderline questions never seen in training: do refusals generalise?


def eval_reserved(world: DemoWorld, text: str) -> bool:
    """Question texts kept for evaluation only (a fixed slice of the question space)."""
    parsed = world.parse(text)
    if parsed is None:
        return False
    fam, args = parsed
    if fam == "harmful":
        return text == HARM_TEMPLATES[args["i"] % 2].format(h=HARMS[args["i"]][0])  # one phrasing of each harm
    if fam == "borderline":
        return args["i"] >= len(BORDERLINE) - EVAL_BORDERLINE
    return int(hashlib.sha1(f"{world.seed}:{text}".encode()).hexdigest(), 16) % 100 < 12


def _sample(world: DemoWorld, rng: random.Random, want_eval: bool, kind: str | None = None, turns: int = 1) -> Prompt:
    while True:
        p = world.sample_prompt(rng, kind=kind, turns=turns)
        if eval_reserved(world, p.messages[-1].content) == want_eval and not any(
            eval_reserved(world, m.content) for m in p.messages[:-1] if m.role == "user"
        ):
            return p


def render_raw(turns: list[tuple[str, str]], system: str | None = None) -> str:
    """A dialogue as raw text in the Llama 2 chat format (what a web corpus of chats would hold)."""
    parts = []
    for i, (q, a) in enumerate(turns):
        sys = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (i == 0 and system) else ""
        parts.append(f"[INST] {sys}{q} [/INST] {a}")
    return " </s><s>".join(parts)


def noisy_answer(world: DemoWorld, prompt: Prompt, rng: random.Random) -> str:
    """Web-quality answers: often right, often not."""
    ideal = world.ideal_response(prompt)
    bad = world.bad_responses(prompt, rng)
    fam = world.parse(prompt.messages[-1].content)[0]
    if fam == "harmful":
        return rng.choice([ideal, REFUSAL, bad[0], bad[1]])
    if fam == "borderline":
        return rng.choice([ideal, ideal, REFUSAL, bad[1]])
    return rng.choices([ideal, bad[0], bad[1], bad[2], bad[3]], weights=[55, 20, 10, 10, 5])[0]


def pretrain_docs(world: DemoWorld, n: int, rng: random.Random) -> list[str]:
    facts = []
    for c in world.countries:
        facts += [f"The capital of {c.name} is {c.capital}.", f"{c.capital} is the capital of {c.name}.",
                  f"People in {c.name} speak {c.language}.", f"The currency of {c.name} is the {c.currency}.",
                  f"The national animal of {c.name} is the {c.animal}.", f"{c.language} is spoken in {c.name}.",
                  f"People who speak {c.language} greet each other with {c.greeting}!"]
    docs = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            docs.append(" ".join(rng.sample(facts, rng.randint(2, 5))))
        elif r < 0.35:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            docs.append(rng.choice([f"{a} plus {b} is {a + b}.", f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.",
                                    f"{max(a, b)} is larger than {min(a, b)}." if a != b else f"{a} plus {b} is {a + b}."]))
        else:
            turns = rng.choice([1, 1, 1, 2, 3])
            p = _sample(world, rng, False, turns=turns)
            pairs = [(m.content, a.content) for m, a in zip(p.messages[0::2], p.messages[1::2])]
            pairs.append((p.messages[-1].content, noisy_answer(world, p, rng)))
            system = None
            if rng.random() < 0.12:
                ins = rng.choice(world.gatt_instructions("train"))
                system = ins.text
                if rng.random() < 0.5:  # half of the web's chats follow the instruction
                    pairs = [(q, world.apply_instruction(ins, a)) for q, a in pairs]
            docs.append(render_raw(pairs, system))
    return docs


def sft_examples(world: DemoWorld, n: int, rng: random.Random) -> list[SFTExample]:
    train_gatt = world.gatt_instructions("train")
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:  # multi-turn, no system message
            p = _sample(world, rng, False, turns=rng.randint(2, 3))
            out.append(SFTExample(messages=[*p.messages, Message(role="assistant", content=world.ideal_response(p))], source="demo-sft"))
        elif r < 0.30:  # one turn under a system instruction, obeyed
            p = _sample(world, rng, False, kind="helpful")
            cats = rng.sample(sorted({i.category for i in train_gatt}), rng.randint(1, 2))
            ins = [rng.choice([i for i in train_gatt if i.category == c]) for c in cats]
            system = " ".join(i.short if rng.random() < 0.5 else i.text for i in ins)
            reply = world.apply_all(ins, world.ideal_response(p))
            out.append(SFTExample(messages=[Message(role="system", content=system), *p.messages, Message(role="assistant", content=reply)],
                                  source="demo-sft-system"))
        else:
            p = _sample(world, rng, False)
            out.append(SFTExample(messages=[*p.messages, Message(role="assistant", content=world.ideal_response(p))], source="demo-sft"))
    return out


def eval_comparisons(world: DemoWorld, prompts: list[Prompt], n: int, rng: random.Random) -> list:
    annotator = SimulatedAnnotator(Oracle(world), noise=0.1, seed=world.seed)
    out = []
    while len(out) < n:
        p = rng.choice(prompts)
        bad = world.bad_responses(p, rng)
        a, b = (world.ideal_response(p), rng.choice(bad)) if rng.random() < 0.6 else tuple(rng.sample(bad, 2))
        c = annotator.compare(p, a, b, 0, rng)
        if c is not None:
            out.append(c.model_copy(update={"source": "demo-eval"}))
    return out


def write_demo_data(out_dir, *, seed: int = 0, n_sft: int = 27000, n_train_prompts: int = 2000, n_eval_prompts: int = 300,
                    n_pretrain_docs: int = 30000, n_eval_comparisons: int = 600) -> dict[str, Path]:
    out = Path(out_dir)
    world = DemoWorld(seed)
    rng = random.Random(seed)
    paths = {
        "pretrain": out / "pretrain.jsonl", "sft": out / "sft.jsonl", "prompts": out / "prompts.jsonl",
        "eval_prompts": out / "eval_prompts.jsonl", "eval_comparisons": out / "eval_comparisons.jsonl",
        "gatt_train": out / "gatt_train.jsonl", "gatt_eval": out / "gatt_eval.jsonl", "world": out / "world.json",
    }
    docs = pretrain_docs(world, n_pretrain_docs, random.Random(rng.random()))
    atomic_write_text(paths["pretrain"], "".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_jsonl(paths["sft"], sft_examples(world, n_sft, random.Random(rng.random())))
    prng = random.Random(rng.random())
    write_jsonl(paths["prompts"], [_sample(world, prng, False, turns=2 if prng.random() < 0.1 else 1) for _ in range(n_train_prompts)])
    erng = random.Random(rng.random())
    evals = [_sample(world, erng, True) for _ in range(n_eval_prompts)]
    write_jsonl(paths["eval_prompts"], evals)
    write_jsonl(paths["eval_comparisons"], eval_comparisons(world, evals, n_eval_comparisons, random.Random(rng.random())))
    write_jsonl(paths["gatt_train"], world.gatt_instructions("train"))
    write_jsonl(paths["gatt_eval"], world.gatt_instructions("eval"))
    write_json(paths["world"], {"seed": seed, "countries": len(world.countries), "n_sft": n_sft, "n_train_prompts": n_train_prompts,
                                "n_eval_prompts": n_eval_prompts, "n_pretrain_docs": n_pretrain_docs})
    return paths
