"""Stage invariants on the tiny run the suite already builds (tests/conftest.py `tiny_run`): what each stage
wrote must agree with the rule that produced it, so a stage that wires a correct function wrongly fails here.

Two stages (rejection_sampling, ghost_attention) are rebuilt once, in a copy of the registry, with a spy on
what they hand to the trainer: the training set itself is checked, not only the files beside it."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.chat import IGNORE
from pipeline.io import read_json, read_jsonl
from pipeline.runner import Runner


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def _tok(arts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(arts[("sft", 0)].path)


# ---------------------------------------------------------------------------------------------- rejection sampling


def test_rs_gated_reward_of_every_candidate_is_the_gate_of_its_two_scores(run):
    from reward_models.combine import gate_reward, logit, whiten

    cfg, arts = run
    rows = read_jsonl(arts[("rejection_sampling", 1)].file("samples.jsonl"))
    cands = [(r, c) for r in rows for c in r["candidates"]]
    rs = torch.tensor([c["r_safety"] for _, c in cands])
    rh = torch.tensor([c["r_helpful"] for _, c in cands])
    flags = torch.tensor([r["is_safety"] for r, _ in cands])
    gated = torch.tensor([c["gated"] for _, c in cands])
    thr = cfg.rejection_sampling.safety_threshold
    assert torch.allclose(gated, gate_reward(rs, rh, flags, thr), atol=1e-6)
    for (r, c) in cands:  # the rule spelled out: safety prompt or unsafe-looking reply -> R_s, else R_h
        expect = c["r_safety"] if r["is_safety"] or c["r_safety"] < thr else c["r_helpful"]
        assert c["gated"] == pytest.approx(expect, abs=1e-6)
    # the reward RS ranks by is the whitened logit of the gated score, whitened over all candidates together
    reward = torch.tensor([c["reward"] for _, c in cands])
    assert torch.allclose(reward, whiten(logit(gated)), atol=1e-4)
    assert abs(float(reward.mean())) < 1e-4 and abs(float(reward.std(unbiased=False)) - 1) < 1e-3


def test_rs_selected_set_is_the_kept_candidates_past_the_gap(run):
    cfg, arts = run
    a = arts[("rejection_sampling", 1)]
    rows = read_jsonl(a.file("samples.jsonl"))
    selected = read_jsonl(a.file("selected.jsonl"))
    gap = cfg.rejection_sampling.min_reward_gap
    expect = []
    for r in rows:
        rewards = [c["reward"] for c in r["candidates"]]
        assert r["kept"] == max(range(len(rewards)), key=rewards.__getitem__)
        median = float(torch.tensor(rewards).median())
        if max(rewards) - median >= gap:
            expect.append((r["prompt_id"], r["candidates"][r["kept"]]["text"], rewards[r["kept"]]))
    assert [(s["prompt_id"], s["response"], s["reward"]) for s in selected] == expect
    assert all(s["round"] == 1 for s in selected)
    assert a.metrics["n_kept_prompts"] == len(selected) and a.metrics["n_prompts"] == len(rows)
    assert a.metrics["best_reward"] == pytest.approx(sum(max(c["reward"] for c in r["candidates"]) for r in rows) / len(rows), abs=1e-5)


def test_rs_gold_metrics_describe_the_kept_candidates(run):
    _, arts = run
    a = arts[("rejection_sampling", 1)]
    rows = read_jsonl(a.file("samples.jsonl"))
    kept = [r["candidates"][r["kept"]] for r in rows]
    assert a.metrics["gold_helpfulness_selected"] == pytest.approx(sum(c["gold_helpfulness"] for c in kept) / len(kept), abs=1e-5)
    assert a.metrics["gold_helpfulness_all"] == pytest.approx(
        sum(c["gold_helpfulness"] for r in rows for c in r["candidates"]) / sum(len(r["candidates"]) for r in rows), abs=1e-5)


@pytest.fixture(scope="module")
def spied(run, tmp_path_factory):
    """rejection_sampling and ghost_attention rebuilt (same versions) in a copy of the tiny registry without them,
    recording the examples each hands to pack_examples."""
    import policies.ghost_attention as gatt
    import policies.rejection_sampling as rs

    cfg, arts = run
    root = tmp_path_factory.mktemp("spy") / "run"
    shutil.copytree(Path(cfg.run_dir) / "artifacts", root / "artifacts",
                    ignore=lambda d, names: [n for n in names if n in ("rejection_sampling", "ghost_attention", "evaluate")])
    cfg2 = cfg.model_copy(update={"run_dir": str(root)})
    seen: dict[str, list] = {}
    mp = pytest.MonkeyPatch()
    for mod, name in ((rs, "rejection_sampling"), (gatt, "ghost_attention")):
        real = mod.pack_examples

        def spy(examples, *a, _real=real, _name=name, **kw):
            seen[_name] = list(examples)
            return _real(examples, *a, **kw)

        mp.setattr(mod, "pack_examples", spy)
    try:
        runner = Runner(cfg2, echo=None, show_progress=False)
        out = {s: runner.run_stage(s, 1).artifact for s in ("rejection_sampling", "ghost_attention")}
    finally:
        mp.undo()
    return out, seen


def _trained_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=True).strip()


def test_rs_trains_on_exactly_the_kept_texts(run, spied):
    _, arts = run
    out, seen = spied
    assert out["rejection_sampling"].version == arts[("rejection_sampling", 1)].version  # rebuilt, not read from a cache
    assert (out["rejection_sampling"].file("samples.jsonl").read_bytes()
            == arts[("rejection_sampling", 1)].file("samples.jsonl").read_bytes())  # and deterministic
    tok = _tok(arts)
    selected = read_jsonl(out["rejection_sampling"].file("selected.jsonl"))
    unique = list(dict.fromkeys((s["prompt_id"], s["response"]) for s in selected if s["response"].strip()))
    trained = [_trained_text(tok, i, l) for i, l in seen["rejection_sampling"]]
    assert trained == [tok.decode(tok(r, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip() for _, r in unique]
    assert out["rejection_sampling"].metrics["n_train_examples"] == len(unique)


def test_gatt_trains_only_the_last_turn_of_each_kept_dialogue(run, spied):
    _, arts = run
    out, seen = spied
    tok = _tok(arts)
    records = read_jsonl(out["ghost_attention"].file("gatt_dialogues.jsonl"))
    kept = [r for r in records if r["last_reply_obeys"] is not False] or records
    assert len(seen["ghost_attention"]) == len(kept) == out["ghost_attention"].metrics["n_trained"]
    for (ids, labels), rec in zip(seen["ghost_attention"], kept):
        msgs = rec["messages"]
        assert msgs[0]["role"] == "system" and all(m["role"] != "system" for m in msgs[1:])
        last = msgs[-1]["content"]
        assert _trained_text(tok, ids, labels) == tok.decode(tok(last, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip()
        # the labelled tokens are one contiguous span at the end (the last reply and its end-of-turn token)
        idx = [j for j, l in enumerate(labels) if l != IGNORE]
        assert idx == list(range(idx[0], idx[-1] + 1)) and idx[-1] == len(labels) - 1
        # the instruction lives only in the system message, never in a user turn
        system = msgs[0]["content"]
        assert all(system not in m["content"] for m in msgs[1:] if m["role"] == "user")


# ---------------------------------------------------------------------------------------------- PPO, evaluate


def test_ppo_history_respects_its_guards(run):
    cfg, arts = run
    a = arts[("ppo", 1)]
    hist = [h for h in read_jsonl(a.file("metrics.jsonl")) if "reward" in h]
    c = cfg.ppo
    assert a.metrics["stop_reason"] == "completed" and a.metrics["steps_done"] == len(hist) == c.steps
    for h in hist:
        assert all(math.isfinite(h[k]) for k in ("reward", "kl", "policy_loss", "value_loss"))
        assert h["kl"] <= c.kl_bound and h["response_length"] >= c.min_response_tokens
        assert h["hit_max_frac"] <= c.max_response_frac
        assert 0 < h["response_length"] <= c.max_new_tokens and 0 <= h["clip_frac"] <= 1 and h["entropy"] > 0
        assert 0 <= h["reward"] <= 1  # the gated probability
    assert abs(hist[0]["kl"]) < 1e-4  # the first rollouts come from pi_0 itself
    assert a.metrics["kl"] == hist[-1]["kl"] and a.metrics["reward"] == hist[-1]["reward"]


def _hacking_rule(m: dict, tolerance: float) -> set[tuple[str, str]]:
    """evaluate's reward-hacking rule, restated: the mean reward rose against a baseline while a gold metric's
    paired difference against that baseline lies wholly on the worse side of 0 and worsened by more than the
    tolerance."""
    directions = {"gold_helpfulness": 1, "gold_helpfulness_greedy": 1, "gold_safety_violation_rate": -1}
    fired = set()
    for comp, base in (("vs_sft", "mean_reward_sft"), ("vs_previous", "mean_reward_previous")):
        if not m["mean_reward"] - m[base] > 0:
            continue
        for k, d in directions.items():
            if f"{k}_diff_{comp}" not in m:
                continue
            lo, hi = m[f"{k}_diff_{comp}_ci95"]
            worse = hi < 0 if d > 0 else lo > 0
            if worse and -d * m[f"{k}_diff_{comp}"] > tolerance:
                fired.add((k, comp))
    return fired


def test_evaluate_flags_follow_their_rules(run):
    cfg, arts = run
    m = arts[("evaluate", 1)].metrics
    tol = cfg.evaluate.hacking_tolerance
    fired = {(t["metric"], t["comparison"]) for t in m["reward_hacking_tests"]}
    assert fired == _hacking_rule(m, tol)
    assert m["reward_hacking"] is bool(fired)
    for t in m["reward_hacking_tests"]:
        assert t["drop"] > tol and t["reward_rise"] > 0
    # the paired differences are the policy's gold scores minus the baseline's
    for k in ("gold_helpfulness", "gold_safety_violation_rate", "gold_helpfulness_greedy"):
        assert m[f"{k}_diff_vs_sft"] == pytest.approx(m[k] - m[f"sft_{k}"], abs=1e-6)
        assert m[f"{k}_diff_vs_previous"] == pytest.approx(m[k] - m[f"previous_{k}"], abs=1e-6)
        lo, hi = m[f"{k}_diff_vs_sft_ci95"]
        assert lo <= m[f"{k}_diff_vs_sft"] + 1e-9 and m[f"{k}_diff_vs_sft"] <= hi + 1e-9
    # round 1's previous policy is the SFT model: both comparisons see the same baseline
    assert m["mean_reward_previous"] == m["mean_reward_sft"] and m["previous_gold_helpfulness"] == m["sft_gold_helpfulness"]
    # `better_than_*` is claimed only when the headline judge's interval lies above a coin flip
    for base in ("sft", "previous"):
        by = m[f"better_than_{base}_by"]
        assert m[f"better_than_{base}"] == (m[f"{by}_ci95"][0] > 0.5)
        assert m[f"{by}_ci95"][0] <= m[by] <= m[f"{by}_ci95"][1]


def test_evaluate_tolerance_decides_a_borderline_flag(run):
    """The same evaluate numbers with a gold drop placed just under and just over the tolerance."""
    from policies.eval_stats import reward_hacking_tests

    cfg, _ = run
    tol = cfg.evaluate.hacking_tolerance
    for drop, fires in ((tol * 0.5, False), (tol, False), (tol * 1.5, True)):
        gold = {"vs_previous": {"gold_helpfulness": (-drop, -drop - 0.01, -drop + 0.005)}}
        assert bool(reward_hacking_tests({"vs_previous": 0.1}, gold, min_drop=tol)) is fires, drop
        assert reward_hacking_tests({"vs_previous": -0.1}, gold, min_drop=tol) == []


def test_evaluate_samples_and_report_agree_with_the_metrics(run):
    _, arts = run
    e = arts[("evaluate", 1)]
    rows = read_jsonl(e.file("samples.jsonl"))
    m = e.metrics
    assert len(rows) == m["n_prompts"]
    assert m["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows), abs=1e-5)
    assert m["mean_r_helpful"] == pytest.approx(sum(r["r_helpful"] for r in rows) / len(rows), abs=1e-5)
    assert m["gold_helpfulness"] == pytest.approx(sum(r["gold_helpfulness"] for r in rows) / len(rows), abs=1e-6)
    rep = read_json(e.file("report.json"))
    assert rep["round"] == 1 and rep["history"][-1]["round"] == 1
    assert rep["history"][-1]["reward_hacking"] == m["reward_hacking"]


# ---------------------------------------------------------------------------------------------- the dashboard, on this registry


def test_dashboard_data_layer_reads_the_real_registry(run):
    """A contract test: the dashboard's data layer on a registry the real stages wrote (not a fixture)."""
    from dashboard import data as D

    cfg, arts = run
    rd = cfg.run_dir
    assert D.run_dir_state(rd)[0] == "ok"
    table = D.stage_table(rd)
    assert set(zip(table["stage"], table["round"])) == set(arts)
    assert (table["status"] == "complete").all() and set(table["version"]) == {a.version for a in arts.values()}
    ov = D.overview(rd).set_index("round")
    assert ov.index.tolist() == [0, 1] and (ov["status"] == "complete").all()
    ev = arts[("evaluate", 1)].metrics
    tr = D.trends(rd).set_index("round")
    assert tr.index.tolist() == [0, 1]
    for k in ("gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate", "mean_reward", "kl_to_sft",
              "rm_accuracy_helpful", "rm_accuracy_safety"):
        assert tr.loc[1, k] == pytest.approx(ev[k]), k
    assert tr.loc[0, "gold_helpfulness"] == pytest.approx(arts[("sft", 0)].metrics["gold_helpfulness"])
    assert bool(tr.loc[1, "hacking_flag"]) == ev["reward_hacking"]
    assert D.flagged_rounds(rd) == ([1] if ev["reward_hacking"] else [])
    assert tr.loc[1, "gold_helpfulness_lo"] == pytest.approx(ev["gold_helpfulness_ci95"][0])
    assert tr.loc[1, "ppo_kl"] == pytest.approx(arts[("ppo", 1)].metrics["kl"])
    assert tr.loc[1, "rs_best_reward"] == pytest.approx(arts[("rejection_sampling", 1)].metrics["best_reward"])
    by = D.rm_accuracy_by_strength(rd)
    assert set(by["model"]) == {"helpful", "safety"} and by["accuracy"].between(0, 1).all()
    ga = D.gatt_adherence(rd)
    assert {"evaluate", "GAtt before", "GAtt after"} <= set(ga["source"])
    assert ga[ga["source"] == "evaluate"]["adherence"].tolist() == pytest.approx(ev["gatt_adherence_by_turn"])
    rs_rows = read_jsonl(arts[("rejection_sampling", 1)].file("samples.jsonl"))
    assert len(D.rs_samples(rd, 1)) == len(rs_rows)
    assert len(D.reward_vs_k(rd, 1)) == 2 * len(arts[("rejection_sampling", 1)].metrics["reward_vs_k"]["k"])
    assert len(D.history(rd, "ppo", 1)) >= cfg.ppo.steps
    assert len(D.eval_samples(rd)) == ev["n_prompts"]
    assert D.lineage(rd, arts[("evaluate", 1)].version) is not None
    assert D.rounds_of(rd) == [0, 1] and D.active(rd) == []
