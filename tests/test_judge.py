"""The held-out judge RM (evaluate.judge: heldout_rm): trained only on what the optimised reward models
hold out, and the judge of evaluate's `judge_win_rate_*`. Real stages on the tiny config."""
import json

import pytest

from data_specs.loaders import load_records
from pipeline.config import load_config, round_stages
from pipeline.context import StageFailed
from pipeline.runner import Runner
from reward_models.data import holdout, prompt_key

SETS = ["tracking.mode=disabled", "evaluate.judge=heldout_rm", "threads=1",
        # enough held-out prompts that the judge has comparisons of both domains to train on
        "collect_preferences.prompts_per_round=40", "reward_model_helpful.eval_fraction=0.3",
        "reward_model_safety.eval_fraction=0.3", "judge_reward_model.eval_fraction=0.3"]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    cfg = load_config("tiny", SETS, run_dir=str(tmp_path_factory.mktemp("judge") / "run"))
    runner = Runner(cfg, echo=None, show_progress=False)
    for stage, r in [("data", 0), ("pretrained", 0), ("sft", 0)] + [(s, 1) for s in round_stages(cfg, 1)]:
        runner.run_stage(stage, r)
    return cfg, runner


def test_the_judge_is_a_stage_of_the_round_only_when_asked_for():
    assert "judge_reward_model" not in round_stages(load_config("tiny"), 1)
    stages = round_stages(load_config("tiny", ["evaluate.judge=heldout_rm"]), 1)
    assert stages.index("reward_model_safety") < stages.index("judge_reward_model") < stages.index("evaluate")
    assert stages[-2] == "ghost_attention"  # the round's policy is still the stage before evaluate


def test_the_judge_trains_exactly_on_the_held_out_prompts(judged):
    cfg, runner = judged
    reg = runner.registry
    comps = load_records(reg.find("collect_preferences", 1).file("comparisons.jsonl"), "preference", format="own")
    train, held = holdout(comps, cfg.reward_model_helpful.eval_fraction, cfg.seed)
    assert held and train and {c.is_safety_prompt for c in held} == {True, False}
    judge = reg.find("judge_reward_model", 1)
    assert judge.metrics["n_train"] == len(held) and judge.metrics["n_train_static"] == 0
    assert judge.metrics["accuracy_source"] == "template_pairs"  # it has no held-out split of its own
    # what the optimised RMs held out (and evaluate scores their accuracy on) is the judge's training set
    rm_held = [json.loads(x) for kind in ("helpful", "safety")
               for x in reg.find(f"reward_model_{kind}", 1).file("held_out_comparisons.jsonl").read_text().splitlines()]
    assert len(rm_held) == len(held)
    assert not {prompt_key(c) for c in held} & {prompt_key(c) for c in train}


def test_evaluate_reports_the_held_out_judges_win_rates(judged):
    cfg, runner = judged
    ev = runner.registry.find("evaluate", 1)
    m = ev.metrics
    assert m["judges"]["judge_win_rate"].startswith("held-out judge RM (r1-")
    assert m["judges"]["judge_win_rate"].endswith(runner.registry.find("judge_reward_model", 1).version + ")")
    for base in ("sft", "previous"):
        lo, hi = m[f"judge_win_rate_vs_{base}_ci95"]
        assert 0 <= lo <= m[f"judge_win_rate_vs_{base}"] <= hi <= 1
    assert ev.inputs["judge"]["version"] == runner.registry.find("judge_reward_model", 1).version


def test_held_out_judge_outcomes_follow_its_rewards(judged):
    from policies.evaluate import HeldOutRMJudge
    from reward_models.model import score

    cfg, runner = judged
    path = runner.registry.find("judge_reward_model", 1).path
    judge = HeldOutRMJudge(path, 256, "cpu")
    dialogues = [[{"role": "user", "content": q}] for q in ("What is 2+3?", "Capital of France?", "Spell cat backwards.")]
    a, b = ["5", "Paris is the capital.", "tac"], ["I cannot help with that.", "Paris", "cat"]
    ra = score(judge.model, judge.tok, dialogues, a, 256, "cpu").tolist()
    rb = score(judge.model, judge.tok, dialogues, b, 256, "cpu").tolist()
    expected = [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(ra, rb)]
    assert judge.outcomes(None, dialogues, a, b) == expected
    assert judge.outcomes(None, dialogues, b, a) == [1 - e for e in expected]
    assert ra != rb  # the test means something: the two answer sets score differently


def test_the_judge_refuses_a_split_that_differs_from_the_reward_models(judged, tmp_path):
    cfg, runner = judged
    bad = load_config("tiny", [*SETS, "judge_reward_model.eval_fraction=0.2"], run_dir=cfg.run_dir)
    with pytest.raises(StageFailed, match="judge_reward_model.eval_fraction .0.2. must equal the reward models'"):
        Runner(bad, echo=None, show_progress=False).run_stage("judge_reward_model", 1)
