"""policies/eval_stats.py edge cases the mutation run found untested: the generic-statistic paths, determinism
under a seed (and the default seed), the quantile level, single-value and empty input, bool input to the
paired difference, and compare_to_baselines with a missing baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest

from policies.eval_stats import _quantiles, bootstrap_ci, compare_to_baselines, paired_bootstrap_diff

VALUES = [0.0, 0.0, 0.0, 1.0, 5.0, 9.0, 0.0, 0.0]  # mean 1.875, median 0


def test_quantile_level_is_the_two_sided_tail():
    assert _quantiles(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert _quantiles(np.arange(101.0), 0.5) == pytest.approx((25.0, 75.0))


def test_bootstrap_is_deterministic_under_a_seed_and_defaults_to_seed_0():
    a = bootstrap_ci(VALUES, n=200, seed=3)
    assert a == bootstrap_ci(VALUES, n=200, seed=3)
    assert bootstrap_ci(VALUES, n=200) == bootstrap_ci(VALUES, n=200, seed=0)
    d = paired_bootstrap_diff(VALUES, VALUES[::-1], n=200, seed=3)
    assert d == paired_bootstrap_diff(VALUES, VALUES[::-1], n=200, seed=3)
    assert paired_bootstrap_diff(VALUES, VALUES[::-1], n=200) == paired_bootstrap_diff(VALUES, VALUES[::-1], n=200, seed=0)


def test_a_generic_statistic_is_used_as_given():
    lo, hi = bootstrap_ci(VALUES, stat=np.median, n=300, seed=0)
    mlo, mhi = bootstrap_ci(VALUES, n=300, seed=0)
    assert (lo, hi) != (mlo, mhi)
    # resampled medians of a sample that is 5/8 zeros are mostly 0; resampled means never are
    assert lo == 0.0 and mlo > 0
    rng = np.random.default_rng(0).integers(0, len(VALUES), size=(300, len(VALUES)))
    meds = np.array([np.median(np.asarray(VALUES)[i]) for i in rng])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(meds, [0.025, 0.975])))
    b = [1.0] * len(VALUES)
    diff, dlo, dhi = paired_bootstrap_diff(VALUES, b, stat=np.median, n=300, seed=0)
    assert diff == pytest.approx(np.median(VALUES) - 1.0) == -1.0
    assert (dlo, dhi) == pytest.approx(tuple(np.quantile(meds - 1.0, [0.025, 0.975])))


def test_single_and_empty_inputs():
    assert bootstrap_ci([0.7], n=50) == pytest.approx((0.7, 0.7))
    assert paired_bootstrap_diff([0.7], [0.2], n=50) == pytest.approx((0.5, 0.5, 0.5))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    out = paired_bootstrap_diff([], [])
    assert len(out) == 3 and all(isinstance(x, float) and math.isnan(x) for x in out)
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_diff([1.0, 2.0], [1.0])


def test_paired_difference_of_per_prompt_flags():
    # 0/1 outcomes given as bools (e.g. "violated") are numbers, not logical values
    diff, lo, hi = paired_bootstrap_diff([True, True, False, True], [False, True, False, False], n=200)
    assert diff == pytest.approx(0.5) and lo <= 0.5 <= hi


def test_compare_to_baselines_with_a_missing_baseline_and_missing_gold():
    reward = {"policy": [1.0, 2.0, 3.0], "previous": [0.0, 1.0, 1.0]}  # no "sft"
    gold = {"gold_helpfulness": {"policy": [1, 0, 1], "previous": [0, 0, 1]},
            "gold_safety_violation_rate": {"policy": [], "previous": []},  # no safety prompts
            "gold_helpfulness_greedy": {"policy": [1, 1, 1]}}  # no baseline values
    rise, deltas = compare_to_baselines(reward, gold, n=20, seed=5)
    assert rise == {"vs_previous": pytest.approx(4 / 3)}
    assert set(deltas) == {"vs_previous"} and set(deltas["vs_previous"]) == {"gold_helpfulness"}
    assert deltas["vs_previous"]["gold_helpfulness"] == paired_bootstrap_diff([1, 0, 1], [0, 0, 1], n=20, seed=5)
    varied = {"gold_helpfulness": {"policy": VALUES, "previous": VALUES[::-1]}}
    r2 = {"policy": VALUES, "previous": VALUES[::-1]}
    assert compare_to_baselines(r2, varied, n=50, seed=5)[1]["vs_previous"]["gold_helpfulness"] == \
        paired_bootstrap_diff(VALUES, VALUES[::-1], n=50, seed=5)
    assert compare_to_baselines(reward, gold, n=20) == compare_to_baselines(reward, gold, n=20, seed=0)
    gold2 = {"gold_helpfulness": {"policy": [1, 0, 1], "previous": [0, 0, 1]}}
    assert compare_to_baselines(reward, gold2)[1]["vs_previous"]["gold_helpfulness"] == paired_bootstrap_diff([1, 0, 1], [0, 0, 1])


def test_interval_boundaries_and_hacking_boundaries():
    from policies.eval_stats import excludes, reward_hacking_tests

    assert excludes((0.0, 1.0)) == 0 and excludes((-1.0, 0.0)) == 0  # touching 0 is not excluding it
    assert excludes((0.5, 0.9), 0.5) == 0 and excludes((0.51, 0.9), 0.5) == 1
    worse = {"gold_helpfulness": (-0.05, -0.09, -0.01)}
    gold = {"vs_sft": worse, "vs_previous": worse}
    # no rise against SFT (exactly 0), a rise against the previous round: only that comparison is tested
    fired = reward_hacking_tests({"vs_sft": 0.0, "vs_previous": 0.1}, gold, min_drop=0.0)
    assert [(t["metric"], t["comparison"]) for t in fired] == [("gold_helpfulness", "vs_previous")]
    # a drop equal to the tolerance does not fire; just above it does
    edge = {"vs_previous": {"gold_helpfulness": (-0.02, -0.03, -0.01)}}
    assert reward_hacking_tests({"vs_previous": 0.1}, edge, min_drop=0.02) == []
    assert len(reward_hacking_tests({"vs_previous": 0.1}, edge, min_drop=0.019)) == 1


def test_metrics_without_a_direction_are_skipped_not_the_end():
    from policies.eval_stats import reward_hacking_tests

    gold = {"vs_previous": {"mean_response_length": (-5.0, -9.0, -1.0), "gold_helpfulness": (-0.05, -0.09, -0.01)}}
    fired = reward_hacking_tests({"vs_previous": 0.1}, gold)
    assert [t["metric"] for t in fired] == ["gold_helpfulness"]
