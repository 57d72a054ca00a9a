"""Bootstrap intervals, paired differences and the reward-hacking tests of `evaluate` (policies/eval_stats.py)."""
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
