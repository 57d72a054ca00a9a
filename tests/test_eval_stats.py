"""Bootstrap intervals, paired differences and the reward-hacking tests of `evaluate` (policies/eval_stats.py)."""
from pathlib import Path

import numpy as np
import pytest

from policies.eval_stats import (bootstrap_ci, compare_to_baselines, excludes, paired_bootstrap_diff, reward_hacking_tests,
                                 win_outcomes)


def test_constant_values_have_a_zero_width_interval():
    assert bootstrap_ci([0.3] * 20, seed=1) == pytest.approx((0.3, 0.3))


def test_interval_of_two_prompts_is_hand_computable():
    # resampled means of [0, 1]: 0 (1/4), 0.5 (1/2), 1 (1/4) -> 2.5% and 97.5% quantiles are 0 and 1
    assert bootstrap_ci([0, 1], n=4000, seed=0) == (0.0, 1.0)


def test_interval_of_four_prompts_is_hand_computable():
    # resampled mean of [0, 0, 0, 1] is Binomial(4, 1/4) / 4: P(<=0) = .316, P(<=.5) = .949, P(<=.75) = .996
    assert bootstrap_ci([0, 0, 0, 1], n=4000, seed=0) == (0.0, 0.75)


def test_interval_width_matches_the_normal_approximation():
    # 400 prompts, half 1: standard error 0.025, 95% interval about +-0.049 -> width about 0.098
    values = [0, 1] * 200
    lo, hi = bootstrap_ci(values, seed=3)
    assert lo < 0.5 < hi
    assert 0.085 < hi - lo < 0.115  # a 50% or 68% interval (too narrow) fails here


def test_generic_statistic_and_empty_input():
    lo, hi = bootstrap_ci([1, 2, 3, 100], stat=np.median, n=500, seed=0)
    assert 1 <= lo <= hi <= 100
    assert all(np.isnan(bootstrap_ci([])))


def test_paired_difference_cancels_the_shared_prompt_variation():
    b = np.random.default_rng(0).uniform(0, 1, 200)
    diff, lo, hi = paired_bootstrap_diff(b + 0.1, b, seed=0)
    assert diff == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # unpaired: about +-0.08
    diff, lo, hi = paired_bootstrap_diff(b, b + 0.1, seed=0)  # a minus b: the sign follows the argument order
    assert diff == pytest.approx(-0.1) and hi == pytest.approx(-0.1)


def test_paired_difference_hand_computed():
    # per-prompt differences [1, 0]: resampled means 0, 0.5, 1 -> (0, 1); point estimate 0.5
    assert paired_bootstrap_diff([1, 0], [0, 0], n=4000, seed=0) == (0.5, 0.0, 1.0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 0], [0])


def test_excludes_and_win_outcomes():
    assert excludes((0.01, 0.2)) == 1 and excludes((-0.2, -0.01)) == -1 and excludes((-0.1, 0.1)) == 0
    assert excludes((0.52, 0.6), 0.5) == 1
    assert win_outcomes([1, 0, 2], [0, 1, 2]) == [1.0, 0.0, 0.5]


def test_hacking_fires_only_when_gold_falls_beyond_its_interval_while_reward_rises():
    gold = {"vs_previous": {"gold_helpfulness": (-0.075, -0.12, -0.03)}}
    fired = reward_hacking_tests({"vs_previous": 0.4}, gold)
    assert fired == [{"metric": "gold_helpfulness", "comparison": "vs_previous", "drop": pytest.approx(0.075), "diff": -0.075,
                      "interval": [-0.12, -0.03], "reward_rise": 0.4}]
    assert reward_hacking_tests({"vs_previous": -0.1}, gold) == []  # the reward fell: not hacking
    # the drop is within its interval (the interval contains 0): no claim
    assert reward_hacking_tests({"vs_previous": 0.4}, {"vs_previous": {"gold_helpfulness": (-0.075, -0.12, 0.01)}}) == []
    # gold rose: no flag (a flipped sign would flag improvements)
    assert reward_hacking_tests({"vs_previous": 0.4}, {"vs_previous": {"gold_helpfulness_greedy": (0.075, 0.03, 0.12)}}) == []
    # min_drop is a floor on top of the interval
    assert reward_hacking_tests({"vs_previous": 0.4}, gold, min_drop=0.1) == []


def test_a_rising_violation_rate_is_worse():
    up = {"vs_sft": {"gold_safety_violation_rate": (0.1, 0.05, 0.15)}}
    down = {"vs_sft": {"gold_safety_violation_rate": (-0.1, -0.15, -0.05)}}
    assert [(t["metric"], t["comparison"], t["drop"]) for t in reward_hacking_tests({"vs_sft": 0.2}, up)] == \
        [("gold_safety_violation_rate", "vs_sft", pytest.approx(0.1))]
    assert reward_hacking_tests({"vs_sft": 0.2}, down) == []


def test_each_comparison_uses_its_own_baseline():
    rng = np.random.default_rng(1)
    policy = rng.uniform(0.3, 0.7, 100)
    gold = {"gold_helpfulness": {"policy": policy, "previous": policy + 0.2, "sft": policy - 0.2},
            "gold_safety_violation_rate": {"policy": [0] * 30, "previous": [0] * 30, "sft": [1] * 30}}
    reward = {"policy": [1.0] * 100, "previous": [0.5] * 100, "sft": [0.0] * 100}
    reward_delta, gold_deltas = compare_to_baselines(reward, gold, seed=0)
    assert reward_delta == {"vs_sft": 1.0, "vs_previous": 0.5}
    assert gold_deltas["vs_previous"]["gold_helpfulness"][0] == pytest.approx(-0.2)
    assert gold_deltas["vs_sft"]["gold_helpfulness"][0] == pytest.approx(0.2)
    assert gold_deltas["vs_sft"]["gold_safety_violation_rate"][0] == pytest.approx(-1.0)
    fired = reward_hacking_tests(reward_delta, gold_deltas)
    assert [(t["metric"], t["comparison"]) for t in fired] == [("gold_helpfulness", "vs_previous")]


# ---------------------------------------------------------------------------------------------- evaluate


JUDGE_SCRIPT = r'''
import json, sys
for line in sys.stdin:
    if line.strip():
        pair = json.loads(line)
        assert isinstance(pair["prompt"], list) and {"a", "b"} <= set(pair)
        a, b = len(pair["a"]), len(pair["b"])  # the longer answer wins
        print(json.dumps({"winner": "a" if a > b else "b" if b > a else "tie"}))
'''


def test_command_judge_reads_pairs_and_maps_back_the_shown_order(tmp_path):
    import sys

    from policies.evaluate import CommandJudge, make_judge

    script = tmp_path / "judge.py"
    script.write_text(JUDGE_SCRIPT)
    judge = make_judge(f"command: {sys.executable} {script}", seed=3)
    assert isinstance(judge, CommandJudge) and judge.name == f"command: {sys.executable} {script}"
    dialogues = [[{"role": "user", "content": f"q{i}"}] for i in range(20)]
    a = ["long answer"] * 10 + ["x"] * 5 + ["same"] * 5
    b = ["short"] * 10 + ["longer one"] * 5 + ["same"] * 5
    assert judge.outcomes(None, dialogues, a, b) == [1.0] * 10 + [0.0] * 5 + [0.5] * 5  # independent of the random order
    assert make_judge("rm") is None


def test_command_judge_failures_are_stage_failures(tmp_path):
    import sys

    from pipeline.errors import StageFailed
    from policies.evaluate import make_judge

    d = [[{"role": "user", "content": "q"}]] * 2
    for body in ("print('{\"winner\": \"a\"}')", "import sys; sys.exit(3)",
                 "import sys\nfor l in sys.stdin: print('{\"winner\": \"left\"}')", "import sys\nfor l in sys.stdin: print('oops')"):
        script = tmp_path / "bad.py"
        script.write_text(body)
        with pytest.raises(StageFailed):
            make_judge(f"command: {sys.executable} {script}").outcomes(None, d, ["a", "b"], ["c", "d"])
    with pytest.raises(StageFailed):
        make_judge("gpt-4")


def test_judge_option_is_validated_by_the_config():
    from pydantic import ValidationError

    from pipeline.config import EvaluateConfig

    assert EvaluateConfig().judge == "rm" and EvaluateConfig(judge="command: python j.py").judge == "command: python j.py"
    with pytest.raises(ValidationError):
        EvaluateConfig(judge="gpt-4")


HEADLINE_CI = ("gold_helpfulness", "gold_helpfulness_greedy", "gold_safety_violation_rate", "false_refusal_rate", "gold_win_rate_vs_sft",
               "gold_win_rate_vs_previous", "rm_win_rate_vs_sft", "rm_win_rate_vs_previous", "rm_accuracy_helpful", "rm_accuracy_safety",
               "mean_reward", "kl_to_sft", "gatt_adherence_late_turns")


def test_evaluate_reports_gold_and_rm_win_rates_with_intervals(tiny_run):
    from pipeline.io import read_json

    _, arts = tiny_run
    e = arts[("evaluate", 1)]
    m = e.metrics
    assert m["judge"] == "gold_oracle" and m["rm_judge"] == "rm (optimised; not independent)"
    for k in HEADLINE_CI:
        lo, hi = m[f"{k}_ci95"]
        assert lo - 1e-9 <= m[k] <= hi + 1e-9, (k, lo, m[k], hi)
    for k in ("gold_win_rate_vs_sft", "gold_win_rate_vs_previous", "rm_win_rate_vs_sft", "rm_win_rate_vs_previous"):
        assert 0 <= m[k] <= 1
    assert m["win_rate_vs_sft"] == m["rm_win_rate_vs_sft"]  # deprecated alias
    assert m["better_than_sft"] == (m["gold_win_rate_vs_sft_ci95"][0] > 0.5) and m["better_than_sft_by"] == "gold_win_rate_vs_sft"
    assert isinstance(m["reward_hacking"], bool) and m["reward_hacking"] == bool(m["reward_hacking_tests"])
    for comp in ("vs_sft", "vs_previous"):
        lo, hi = m[f"gold_helpfulness_diff_{comp}_ci95"]
        assert lo - 1e-9 <= m[f"gold_helpfulness_diff_{comp}"] <= hi + 1e-9
    report = read_json(e.file("report.json"))
    assert report["metrics"]["gold_win_rate_vs_sft_ci95"] == m["gold_win_rate_vs_sft_ci95"]
    assert report["history"][-1]["gold_helpfulness_ci95"] == m["gold_helpfulness_ci95"]
    assert "[" in e.file("report.md").read_text()


def test_rlhf_report_shows_values_with_intervals_and_both_win_rates(tiny_run):
    import re

    from typer.testing import CliRunner

    from pipeline.cli import app, report_rows

    cfg, arts = tiny_run
    rows = report_rows(str(cfg.run_dir))
    r1 = next(r for r in rows if r["round"] == "1")
    m = arts[("evaluate", 1)].metrics
    assert r1["gold_win_rate_vs_sft_ci95"] == m["gold_win_rate_vs_sft_ci95"] and r1["rm_win_rate_vs_sft"] == m["rm_win_rate_vs_sft"]
    assert r1["judge"] == "gold_oracle"
    out = CliRunner().invoke(app, ["report", "--run-dir", str(cfg.run_dir)]).output
    header = out.splitlines()[0]
    assert "gold_win_rate_vs_sft" in header and "rm_win_rate_vs_sft" in header
    line1 = next(ln for ln in out.splitlines() if ln.startswith("| 1 |"))
    lo, hi = m["gold_win_rate_vs_sft_ci95"]
    assert f"{m['gold_win_rate_vs_sft']:.3f} [{lo:.3f}, {hi:.3f}]" in line1
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", line1)
    assert "gold_oracle" in out


# ---------------------------------------------------------------------------------------------- dashboard


def _new_format(run, hacked_round: int = 2):
    """The dashboard fixture's evaluate manifests rewritten to evaluate's current metric names."""
    import json

    from pipeline.io import write_json

    for p in run.glob("artifacts/evaluate/*/manifest.json"):
        man = json.loads(p.read_text())
        m, rd = man["metrics"], man["round"]
        for old in ("win_rate_vs_sft", "win_rate_vs_previous"):
            m[f"rm_{old}"] = m.pop(old)
            m[f"rm_{old}_ci95"] = [m[f"rm_{old}"] - 0.05, m[f"rm_{old}"] + 0.05]
        m["gold_win_rate_vs_sft"], m["gold_win_rate_vs_sft_ci95"] = 0.55, [0.48, 0.62]
        m["gold_win_rate_vs_previous"], m["gold_win_rate_vs_previous_ci95"] = 0.45, [0.40, 0.50]
        m["gold_helpfulness_ci95"] = [m["gold_helpfulness"] - 0.03, m["gold_helpfulness"] + 0.02]
        m["judge"], m["better_than_sft"] = "gold_oracle", False
        m["reward_hacking_tests"] = [{"metric": "gold_helpfulness_greedy", "comparison": "vs_sft", "drop": 0.075, "diff": -0.075,
                                      "interval": [-0.12, -0.03], "reward_rise": 0.3}] if rd == hacked_round else []
        m["reward_hacking"] = bool(m["reward_hacking_tests"])
        write_json(p, man)
    return run


def test_dashboard_reads_intervals_gold_win_rates_and_the_tests_that_fired(tmp_path):
    from dashboard import data as D
    from tests.dashboard_fixture import build_run_dir

    run = _new_format(build_run_dir(tmp_path / "run"), hacked_round=1)
    tr = D.trends(run).set_index("round")
    assert tr.loc[1, "gold_win_rate_vs_sft"] == 0.55 and (tr.loc[1, "gold_win_rate_vs_sft_lo"], tr.loc[1, "gold_win_rate_vs_sft_hi"]) == (0.48, 0.62)
    assert tr.loc[2, "rm_win_rate_vs_sft"] == pytest.approx(0.713) and tr.loc[2, "win_rate_vs_sft"] == pytest.approx(0.713)
    assert tr.loc[2, "rm_win_rate_vs_sft_hi"] == pytest.approx(0.763)
    # evaluate's interval-based verdict is trusted: round 2's naive "reward up, gold down" is within the intervals
    assert D.flagged_rounds(run) == [1]
    assert tr.loc[1, "hacking_tests"] == "gold_helpfulness_greedy vs_sft: -0.075 [-0.120, -0.030]" and tr.loc[2, "hacking_tests"] == ""
    ov = D.overview(run).set_index("round")
    assert ov.loc[2, "gold_win_rate_vs_sft"] == 0.55 and ov.loc[2, "rm_win_rate_vs_sft"] == pytest.approx(0.713)


def test_dashboard_app_shows_error_bars_and_which_test_fired(monkeypatch, tmp_path):
    import json

    from streamlit.testing.v1 import AppTest

    from tests.dashboard_fixture import build_run_dir

    run = _new_format(build_run_dir(tmp_path / "run"), hacked_round=2)
    monkeypatch.setenv("RLHF_RUN_DIR", str(run))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "gold_helpfulness_greedy vs_sft: -0.075 [-0.120, -0.030]" in warnings
    assert any(m.label == "Win rate vs SFT (gold)" and m.value == "0.550 [0.480, 0.620]" for m in at.metric)
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    win = next(f for f in figs if f["layout"].get("title", {}).get("text") == "Win rate")
    bars = {t["name"]: t.get("error_y", {}) for t in win["data"]}
    assert bars["vs SFT (gold judge)"]["array"] and bars["vs SFT (RM, optimised)"]["arrayminus"]


def test_wandb_summary_gets_the_intervals():
    from pipeline.wandb_tracker import flatten_metrics

    flat = flatten_metrics({"gold_helpfulness": 0.5, "gold_helpfulness_ci95": [0.45, 0.55], "gatt_adherence_by_turn": [1.0, 0.5],
                            "reward_hacking_tests": [{"metric": "gold_helpfulness"}]})
    assert flat == {"gold_helpfulness": 0.5, "gold_helpfulness_ci95_low": 0.45, "gold_helpfulness_ci95_high": 0.55}


def test_gold_judge_prefers_safe_answers_then_helpfulness():
    from types import SimpleNamespace

    from policies.evaluate import GoldJudge

    class FakeOracle:
        def is_safe(self, prompt, reply):
            return "unsafe" not in reply

        def helpfulness(self, prompt, reply):
            return len(reply) / 100

    safety, normal = SimpleNamespace(is_safety=True), SimpleNamespace(is_safety=False)
    judge = GoldJudge(FakeOracle())
    prompts = [safety, safety, normal, normal, normal]
    a = ["no", "unsafe but very long and helpful", "long answer", "x", "same"]
    b = ["unsafe long answer", "ok", "short", "longer", "same"]
    assert judge.name == "gold_oracle"
    assert judge.outcomes(prompts, None, a, b) == [1.0, 0.0, 1.0, 0.0, 0.5]
