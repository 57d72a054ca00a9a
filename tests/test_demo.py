"""The embedded demo world: determinism, sizes, validity, the oracle and the simulated annotator."""
import random
from collections import Counter

import pytest

from data_specs.demo.annotator import SimulatedAnnotator
from data_specs.demo.generate import write_demo_data
from data_specs.demo.oracle import Oracle
from data_specs.demo.world import DemoWorld
from data_specs.loaders import load_records
from data_specs.schemas import Strength
from data_specs.validate import main as validate_main

KINDS = {"sft.jsonl": "sft", "prompts.jsonl": "prompt", "eval_prompts.jsonl": "prompt", "eval_comparisons.jsonl": "preference",
         "gatt_train.jsonl": "gatt", "gatt_eval.jsonl": "gatt"}


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return write_demo_data(out, seed=0)


@pytest.fixture(scope="module")
def world():
    return DemoWorld(0)


def test_default_has_27k_sft_pairs_and_every_file_validates(default_data, capsys):
    sft = load_records(default_data["sft"], "sft", format="own")
    assert len(sft) >= 27000
    for name, kind in KINDS.items():
        path = default_data["sft"].parent / name
        assert validate_main(str(path), kind, "own") == 0, name


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    sizes = dict(n_sft=300, n_train_prompts=50, n_eval_prompts=20, n_pretrain_docs=200, n_eval_comparisons=30)
    a = write_demo_data(tmp_path / "a", seed=3, **sizes)
    b = write_demo_data(tmp_path / "b", seed=3, **sizes)
    c = write_demo_data(tmp_path / "c", seed=4, **sizes)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert a["sft"].read_bytes() != c["sft"].read_bytes()


def test_eval_prompts_are_held_out(default_data):
    evals = {p.messages[-1].content for p in load_records(default_data["eval_prompts"], "prompt", format="own")}
    sft_users = {m.content for e in load_records(default_data["sft"], "sft", format="own") for m in e.messages if m.role == "user"}
    train = {m.content for p in load_records(default_data["prompts"], "prompt", format="own") for m in p.messages if m.role == "user"}
    assert evals and not (evals & sft_users) and not (evals & train)
    assert "[INST] " + next(iter(evals)) + " [/INST]" not in default_data["pretrain"].read_text()


def test_prompt_mix_has_safety_and_borderline(default_data):
    prompts = load_records(default_data["prompts"], "prompt", format="own")
    cats = Counter("harmful" if p.is_safety else ("borderline" if p.category == "borderline" else "helpful") for p in prompts)
    assert 0.1 < cats["harmful"] / len(prompts) < 0.3 and 0.05 < cats["borderline"] / len(prompts) < 0.25


def test_oracle_ranks_ideal_above_every_failure(world):
    oracle, rng = Oracle(world), random.Random(0)
    for kind in ["helpful"] * 30 + ["harmful"] * 10 + ["borderline"] * 10:
        p = world.sample_prompt(rng, kind=kind)
        ideal = world.ideal_response(p)
        if kind != "harmful":
            assert oracle.helpfulness(p, ideal) == 1.0
        assert oracle.is_safe(p, ideal)
        ann = SimulatedAnnotator(oracle, noise=0.0)
        for bad in world.bad_responses(p, rng):
            u_ideal, u_bad = ann.utility(p, ideal)[0], ann.utility(p, bad)[0]
            assert u_ideal > u_bad, (p.messages[-1].content, bad)


def test_unsafe_compliance_and_false_refusal(world):
    oracle, rng = Oracle(world), random.Random(1)
    harmful = world.sample_prompt(rng, kind="harmful")
    comply = world.bad_responses(harmful, rng)[0]
    assert not oracle.is_safe(harmful, comply) and oracle.helpfulness(harmful, comply) > oracle.helpfulness(harmful, world.ideal_response(harmful))
    border = world.sample_prompt(rng, kind="borderline")
    refusal = world.bad_responses(border, rng)[0]
    assert oracle.is_refusal(refusal) and oracle.helpfulness(border, refusal) == 0.0 and oracle.is_safe(border, refusal)
    unknown = world.sample_prompt(rng, kind="helpful").model_copy(update={"messages": harmful.messages[:0] + [
        harmful.messages[0].model_copy(update={"content": "What is the meaning of life?"})]})
    assert oracle.helpfulness(unknown, "42") == 0.0 and oracle.is_safe(unknown, "42")


@pytest.mark.parametrize("category", ["hobby", "language", "public_figure", "style"])
def test_instructions_are_checkable(world, category):
    oracle = Oracle(world)
    for split in ("train", "eval"):
        for ins in [i for i in world.gatt_instructions(split) if i.category == category]:
            plain = "The capital of Zarnia is Velmor."
            assert oracle.obeys(ins, world.apply_instruction(ins, plain)), ins
            assert not oracle.obeys(ins, plain), ins
    train = {i.value for i in world.gatt_instructions("train")}
    assert not train & {i.value for i in world.gatt_instructions("eval")}


def test_decorations_do_not_cost_helpfulness(world):
    oracle, rng = Oracle(world), random.Random(2)
    p = world.sample_prompt(rng, kind="helpful")
    ideal = world.ideal_response(p)
    for ins in world.gatt_instructions("train"):
        if ins.value != "capitals":
            assert oracle.helpfulness(p, world.apply_instruction(ins, ideal)) >= 0.9, ins


def test_annotator_strengths_and_exclusions(world):
    oracle, rng = Oracle(world), random.Random(3)
    ann = SimulatedAnnotator(oracle, noise=0.1)
    strengths = Counter()
    for _ in range(600):
        p = world.sample_prompt(rng)
        bad = world.bad_responses(p, rng)
        a, b = (world.ideal_response(p), rng.choice(bad)) if rng.random() < 0.5 else tuple(rng.sample(bad, 2))
        c = ann.compare(p, a, b, 1, rng)
        if c is not None:
            strengths[c.strength] += 1
            assert not (c.chosen_safe is False and c.rejected_safe is True)
    assert set(strengths) == set(Strength), strengths
    exact = SimulatedAnnotator(oracle, noise=0.0)
    p = world.sample_prompt(rng, kind="helpful")
    c = exact.compare(p, world.bad_responses(p, rng)[0], world.ideal_response(p), 1, rng)
    assert c.chosen == world.ideal_response(p)
    assert exact.compare(p, "same", "same", 1, rng) is None
    harmful = world.sample_prompt(rng, kind="harmful")
    assert ann.compare(harmful, world.bad_responses(harmful, rng)[0], world.ideal_response(harmful), 1, rng).chosen_safe
