"""The embedded demo world: deterministic files in our formats, a gold oracle that knows the truth,
GAtt rules that can be checked, and a simulated annotator with the paper's strengths and exclusions."""
from __future__ import annotations

import json
import re
import random
from collections import Counter

import pytest

from data_specs.demo.annotator import SimulatedAnnotator
from data_specs.demo.generate import write_demo_data
from data_specs.demo.oracle import Oracle
from data_specs.demo.world import GATT_CATEGORIES, DemoWorld
from data_specs.schemas import Comparison, GattInstruction, Message, Prompt, SFTExample, Strength

SMALL = dict(n_sft=300, n_train_prompts=100, n_eval_prompts=40, n_pretrain_docs=300, n_eval_comparisons=40)
FILES = {"sft": SFTExample, "prompts": Prompt, "eval_prompts": Prompt, "eval_comparisons": Comparison,
         "gatt_train": GattInstruction, "gatt_eval": GattInstruction}


@pytest.fixture(scope="module")
def world():
    return DemoWorld(0)


@pytest.fixture(scope="module")
def oracle(world):
    return Oracle(world)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The default-size demo data, written once."""
    return write_demo_data(tmp_path_factory.mktemp("demo"))


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompts(world, kind, n=40, seed=0):
    rng = random.Random(seed)
    return [world.sample_prompt(rng, kind=kind, turns=1 + (i % 3 == 0)) for i in range(n)], rng


# ---------------------------------------------------------------------------------------- files


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (write_demo_data(tmp_path / name, seed=s, **SMALL) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    for name in ("pretrain", "sft", "prompts", "eval_prompts", "eval_comparisons"):
        assert a[name].read_bytes() != c[name].read_bytes(), name


def test_default_sizes_and_every_file_parses(default_data):
    for name, model in FILES.items():
        rows = _rows(default_data[name])
        assert rows, name
        for row in rows:
            model.model_validate(row)
    sft = [SFTExample.model_validate(r) for r in _rows(default_data["sft"])]
    assert len(sft) >= 27000
    assert len(_rows(default_data["prompts"])) == 2000 and len(_rows(default_data["eval_prompts"])) == 300
    assert len(_rows(default_data["eval_comparisons"])) == 600
    docs = [r["text"] for r in _rows(default_data["pretrain"])]
    assert len(docs) == 30000 and all(d.strip() for d in docs)
    assert json.loads(default_data["world"].read_text())["seed"] == 0


def test_every_default_file_passes_rlhf_data_validate(default_data):
    from data_specs.validate import main as validate_main

    kinds = {"sft": "sft", "prompts": "prompt", "eval_prompts": "prompt", "eval_comparisons": "preference",
             "gatt_train": "gatt", "gatt_eval": "gatt"}
    for name, kind in kinds.items():
        assert validate_main(str(default_data[name]), kind, "own") == 0, name


def test_sft_mixture_system_instructions_are_obeyed(default_data, world, oracle):
    sft = [SFTExample.model_validate(r) for r in _rows(default_data["sft"])]
    with_system = [e for e in sft if e.messages[0].role == "system"]
    multi = [e for e in sft if sum(m.role == "user" for m in e.messages) > 1]
    assert 0.12 < len(with_system) / len(sft) < 0.18 and 0.12 < len(multi) / len(sft) < 0.18
    assert not any(e.messages[0].role == "system" for e in multi)
    train_values = {i.value for i in world.gatt_instructions("train")}
    for e in with_system[:500]:
        ins = world.parse_instructions(e.messages[0].content)
        assert ins and {i.value for i in ins} <= train_values
        assert oracle.obeys(ins, e.answer)
    for e in sft[:2000]:  # curated = ideal
        p = Prompt(messages=e.prompt)
        assert oracle.is_safe(p, e.answer) and oracle.helpfulness(p, e.answer) >= 0.5


def test_eval_prompts_are_held_out(default_data):
    evals = [Prompt.model_validate(r) for r in _rows(default_data["eval_prompts"])]
    held = {p.messages[-1].content for p in evals}
    seen = set()
    for r in _rows(default_data["sft"]) + _rows(default_data["prompts"]):
        seen |= {m["content"] for m in r["messages"] if m["role"] == "user"}
    assert not held & seen
    corpus = default_data["pretrain"].read_text(encoding="utf-8")
    assert not [t for t in held if f"] {t} [/INST]" in corpus or f"[INST] {t}" in corpus]
    kinds = Counter("harmful" if p.is_safety else "borderline" if p.category == "borderline" else "helpful" for p in evals)
    assert kinds["helpful"] > kinds["harmful"] > 0 and kinds["borderline"] > 0


def test_mixture_is_configurable(world):
    rng = random.Random(0)
    only_helpful = DemoWorld(0, mix=(1, 0, 0))
    assert all(not p.is_safety and p.category != "borderline" for p in (only_helpful.sample_prompt(rng) for _ in range(200)))
    kinds = Counter(world.sample_prompt(rng).category for _ in range(2000))
    assert 0.15 < kinds["harmful"] / 2000 < 0.25 and 0.10 < kinds["borderline"] / 2000 < 0.20


# ---------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("kind", ["helpful", "borderline"])
def test_ideal_scores_one_and_beats_every_failure(world, oracle, kind):
    prompts, rng = _prompts(world, kind)
    for p in prompts:
        ideal = world.ideal_response(p)
        assert oracle.helpfulness(p, ideal) == 1.0 and oracle.is_safe(p, ideal) and not oracle.is_refusal(ideal)
        for bad in world.bad_responses(p, rng):
            assert oracle.helpfulness(p, bad) < 1.0, (p.messages[-1].content, bad)


def test_failure_modes_score_as_documented(world, oracle):
    rng = random.Random(1)
    p = Prompt(messages=[Message(role="user", content="What is 12 plus 5?")])
    assert oracle.helpfulness(p, "12 plus 5 is 17.") == 1.0
    assert oracle.helpfulness(p, "12 plus 5 is 18.") == pytest.approx(0.2)  # right form, wrong answer
    assert 0.6 <= oracle.helpfulness(p, "17") <= 0.8                          # right answer, wrong form
    verbose = "12 plus 5 is 17. " + " ".join(world.filler(rng) for _ in range(3))
    assert 0.5 <= oracle.helpfulness(p, verbose) < 0.9                        # mild verbosity penalty
    assert oracle.helpfulness(p, "The fox likes the lamp.") == 0.0            # off topic
    assert oracle.helpfulness(p, "I can't help with that, it could hurt someone.") == 0.0
    c = Prompt(messages=[Message(role="user", content="Which is larger, 34 or 71?")])
    assert oracle.helpfulness(c, "71 is larger than 34.") == 1.0 and oracle.helpfulness(c, "34 is larger than 71.") == pytest.approx(0.2)


def test_harmful_prompts_safety_first(world, oracle):
    prompts, rng = _prompts(world, "harmful")
    for p in prompts:
        assert p.is_safety
        ideal = world.ideal_response(p)
        assert oracle.is_safe(p, ideal) and oracle.is_refusal(ideal) and oracle.helpfulness(p, ideal) == 0.5
        bad = world.bad_responses(p, rng)
        unsafe = [b for b in bad if not oracle.is_safe(p, b)]
        assert len(unsafe) == 2 and all(b.startswith(("Sure", "Here is how")) for b in unsafe)
        assert all(oracle.helpfulness(p, b) == 0.8 for b in unsafe)  # compliance looks helpful: the tension
        assert all(oracle.helpfulness(p, b) < 0.5 for b in bad if oracle.is_safe(p, b))


def test_refusing_borderline_is_a_false_refusal(world, oracle):
    prompts, rng = _prompts(world, "borderline")
    for p in prompts:
        assert not p.is_safety
        refusals = [b for b in world.bad_responses(p, rng) if oracle.is_refusal(b)]
        assert refusals
        assert all(oracle.helpfulness(p, r) == 0.0 and oracle.is_safe(p, r) for r in refusals)


def test_unknown_prompts_are_unscored_and_safe(oracle):
    p = Prompt(messages=[Message(role="user", content="Write a poem about the sea.")])
    assert oracle.helpfulness(p, "The sea is wide.") == 0.0 and oracle.is_safe(p, "The sea is wide.")


def test_every_instruction_is_checkable(world, oracle):
    all_ins = world.gatt_instructions("all")
    train, held = world.gatt_instructions("train"), world.gatt_instructions("eval")
    assert {i.value for i in train}.isdisjoint({i.value for i in held}) and len(train) + len(held) == len(all_ins)
    for cat in GATT_CATEGORIES:
        assert 6 <= sum(i.category == cat for i in all_ins) <= 10
        assert sum(i.category == cat for i in held) >= 1
    prompts, _ = _prompts(world, None, n=len(all_ins), seed=3)
    for ins, p in zip(all_ins, prompts):
        plain = world.plain_ideal(p)
        assert oracle.obeys(ins, world.apply_instruction(ins, plain)), (ins, plain)
        assert not oracle.obeys(ins, plain), (ins, plain)
    rng = random.Random(4)
    for _ in range(100):  # one instruction per category at once: all obeyed, and helpfulness unchanged
        combo = [rng.choice([i for i in all_ins if i.category == c]) for c in rng.sample(GATT_CATEGORIES, rng.randint(1, 4))]
        p = world.sample_prompt(rng, instructions=combo, turns=rng.randint(1, 2))
        assert sorted(i.value for i in world.prompt_instructions(p)) == sorted(i.value for i in combo)
        ideal = world.ideal_response(p)
        assert oracle.obeys(combo, ideal)
        assert oracle.helpfulness(p, ideal) == oracle.helpfulness(Prompt(messages=p.messages[1:]), world.plain_ideal(p))
        if not p.is_safety:
            assert oracle.helpfulness(p, world.plain_ideal(p)) == 0.5  # ignoring the system instruction


# ---------------------------------------------------------------------------------------- annotator


def test_noiseless_annotator_prefers_the_ideal(world, oracle):
    annotator = SimulatedAnnotator(oracle, noise=0.0)
    rng = random.Random(5)
    for kind in ("helpful", "harmful", "borderline"):
        prompts, _ = _prompts(world, kind, n=25, seed=6)
        for p in prompts:
            ideal = world.ideal_response(p)
            for bad in world.bad_responses(p, rng):
                a, b = (ideal, bad) if rng.random() < 0.5 else (bad, ideal)
                c = annotator.compare(p, a, b, 2, rng)
                assert c is not None and c.chosen == ideal and c.rejected == bad, (p.messages[-1].content, bad)
                assert c.round == 2 and c.source == "demo-annotator" and c.is_safety_prompt == p.is_safety
                assert c.chosen_safe is True and c.rejected_safe == oracle.is_safe(p, bad)


def test_all_four_strengths_occur(world, oracle):
    annotator = SimulatedAnnotator(oracle, noise=0.1, seed=0)
    rng = random.Random(7)
    counts = Counter()
    for _ in range(600):
        p = world.sample_prompt(rng)
        options = [world.ideal_response(p), *world.bad_responses(p, rng)]
        c = annotator.compare(p, *rng.sample(options, 2), 1, rng)
        if c is not None:
            counts[c.strength] += 1
    assert set(counts) == set(Strength)
    assert min(counts.values()) >= 20, counts


def test_excluded_pairs_return_none(world, oracle):
    rng = random.Random(8)
    p = world.sample_prompt(rng, kind="harmful")
    compliance = next(b for b in world.bad_responses(p, rng) if not oracle.is_safe(p, b))
    refusal = world.ideal_response(p)
    assert SimulatedAnnotator(oracle).compare(p, refusal, refusal, 1, rng) is None
    noisy = SimulatedAnnotator(oracle, noise=3.0, seed=1)
    results = [noisy.compare(p, compliance, refusal, 1, rng) for _ in range(200)]
    kept = [c for c in results if c is not None]
    assert 0 < len(kept) < 200  # the noisy annotator sometimes prefers the unsafe reply: those pairs are dropped
    assert all(c.chosen == refusal and c.chosen_safe and not c.rejected_safe and c.safety_bin == "chosen_safe_only" for c in kept)


def test_decorations_do_not_cost_helpfulness(world, oracle):
    rng = random.Random(2)
    p = world.sample_prompt(rng, kind="helpful")
    ideal = world.ideal_response(p)
    for ins in world.gatt_instructions("train"):
        if ins.value != "capitals":
            assert oracle.helpfulness(p, world.apply_instruction(ins, ideal)) >= 0.9, ins


def _norm_text(text):
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def test_held_out_harms_and_borderline_never_in_training(default_data, world):
    """Issue 12 item 3: the safety and false-refusal metrics use harm categories and borderline
    questions that no training file contains (by normalised text and by category), at least 30 each."""
    from data_specs.demo.world import (HARM_CATEGORIES, HARMS, HELD_OUT_BORDERLINE, HELD_OUT_HARMS, N_TRAIN_BORDERLINE,
                                       N_TRAIN_HARMS, TRAIN_HARM_CATEGORIES)
    assert len(HELD_OUT_HARMS) >= 30 and len(HELD_OUT_BORDERLINE) >= 30
    held_cats = {h[0] for h in HELD_OUT_HARMS}
    assert not held_cats & set(TRAIN_HARM_CATEGORIES) and len(held_cats) >= 5
    needles = {_norm_text(t) for h in HELD_OUT_HARMS for t in h[1:]} | {_norm_text(q) for q, a, _ in HELD_OUT_BORDERLINE} \
        | {_norm_text(a) for q, a, _ in HELD_OUT_BORDERLINE}
    assert len({_norm_text(h[1]) for h in HELD_OUT_HARMS}) == len(HELD_OUT_HARMS)
    assert len({_norm_text(q) for q, _, _ in HELD_OUT_BORDERLINE}) == len(HELD_OUT_BORDERLINE)
    for name in ("pretrain", "sft", "prompts", "gatt_train", "gatt_eval"):
        corpus = " " + _norm_text(default_data[name].read_text(encoding="utf-8")) + " "
        leaked = [n for n in needles if f" {n} " in corpus]
        assert not leaked, (name, leaked[:5])
        for row in _rows(default_data[name]) if name in ("sft", "prompts") else []:
            last = [m["content"] for m in row["messages"] if m["role"] == "user"][-1]
            parsed = world.parse(last)
            if parsed and parsed[0] == "harmful":
                assert parsed[1]["i"] < N_TRAIN_HARMS and HARM_CATEGORIES[parsed[1]["i"]] not in held_cats
            if parsed and parsed[0] == "borderline":
                assert parsed[1]["i"] < N_TRAIN_BORDERLINE
    evals = [Prompt.model_validate(r) for r in _rows(default_data["eval_prompts"])]
    harms = {world.parse(p.messages[-1].content)[1]["i"] for p in evals if p.is_safety}
    border = {world.parse(p.messages[-1].content)[1]["i"] for p in evals if p.category == "borderline"}
    assert all(i >= N_TRAIN_HARMS and HARM_CATEGORIES[i] in held_cats for i in harms) and len(harms) >= 30
    assert all(i >= N_TRAIN_BORDERLINE for i in border) and len(border) >= 30
    assert len(HARMS) == N_TRAIN_HARMS + len(HELD_OUT_HARMS)


@pytest.mark.parametrize("kind", ["harmful", "borderline"])
def test_held_out_items_are_judged_like_training_ones(world, oracle, kind):
    from data_specs.demo.world import BORDERLINE, HARMS
    rng = random.Random(3)
    n = len(HARMS) if kind == "harmful" else len(BORDERLINE)
    for i in range(n):
        p = world.sample_prompt(rng, kind=kind, item=i)
        ideal = world.ideal_response(p)
        assert oracle.is_safe(p, ideal) and oracle.is_refusal(ideal) == (kind == "harmful")
        assert oracle.helpfulness(p, ideal) == (0.5 if kind == "harmful" else 1.0)
        bad = world.bad_responses(p, rng)
        assert sum(not oracle.is_safe(p, b) for b in bad) == (2 if kind == "harmful" else 0), (i, bad)
