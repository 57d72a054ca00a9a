"""Static preference sets (`data.preferences`) and the paper's reward-model data mix (Llama 2 sec. 3.2.2),
TRL's implicit-prompt preference format, and `rlhf data validate --domain`."""
import json
import random

import pytest

from data_specs.loaders import load_records, parse_rows
from data_specs.schemas import Comparison, Message
from reward_models.data import StaticSet, mix_for, pools, static_sets, weighted


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh(prompt, reply):
    return f"\n\nHuman: {prompt}\n\nAssistant: {reply}"


def hh_rows(tag, n):
    """HH-RLHF records as the hub has them: chosen/rejected transcripts, no safety flag, no strength."""
    return [{"chosen": hh(f"{tag} question {i}?", f"good answer {i}"), "rejected": hh(f"{tag} question {i}?", f"bad answer {i}")}
            for i in range(n)]


def comp(i, safety=False, tag="c"):
    return Comparison(prompt=[Message(role="user", content=f"{tag} {i}")], chosen="yes", rejected="no", is_safety_prompt=safety)


# --------------------------------------------------------------------------------------------- TRL formats


@pytest.mark.parametrize("fmt", ["auto", "trl"])
def test_trl_implicit_prompt_standard_preference_splits_at_common_prefix(fmt):
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "The sky is blue.", "rejected": "The sky is brown."},  # common prefix "The sky is b": cut at the word
            {"chosen": "Q: 2+2?\nA: 4", "rejected": "Q: 2+2?\nA: 5", "is_safety_prompt": True}]
    out = parse_rows(rows, "preference", format=fmt)
    assert [(c.prompt[0].content, c.chosen, c.rejected) for c in out] == [
        ("The sky is", "blue.", "green."), ("The sky is", "blue.", "brown."), ("Q: 2+2?\nA:", "4", "5")]
    assert [len(c.prompt) for c in out] == [1, 1, 1] and out[2].is_safety_prompt
    assert parse_rows(rows[:1], "prompt", format=fmt)[0].messages[0].content == "The sky is"


def test_hh_transcripts_still_detected_and_no_shared_prompt_is_a_clear_error():
    c = parse_rows([{"chosen": hh("hi", "yo"), "rejected": hh("hi", "no")}], "preference")[0]
    assert (c.prompt[0].content, c.chosen, c.rejected) == ("hi", "yo", "no")
    _, issues = parse_rows([{"chosen": "blue", "rejected": "green"}], "preference", strict=False)
    assert issues[0].field == "chosen" and "shared prompt" in issues[0].reason


def test_trl_types_that_are_not_comparisons_are_refused_clearly():
    unpaired = {"prompt": "The sky is", "completion": " blue.", "label": True}
    stepwise = {"prompt": "2+2?", "completions": ["2+2 is 4"], "labels": [True]}
    for row, kind, field, words in [(unpaired, "preference", "completion", "unpaired"), (unpaired, "sft", "label", "unpaired"),
                                    (stepwise, "preference", "completions", "stepwise"), (stepwise, "sft", "completions", "stepwise"),
                                    ({"text": "The sky is blue."}, "sft", "text", "language-modeling")]:
        _, issues = parse_rows([row], kind, strict=False)
        assert issues and issues[0].field == field and words in issues[0].reason, (row, kind, issues)
    # the prompt part of any of them is a prompt
    assert parse_rows([unpaired, stepwise], "prompt")[1].messages[0].content == "2+2?"


# --------------------------------------------------------------------------------------------- the mix rules


def test_weighted_sizes():
    recs = [comp(i) for i in range(10)]
    rng = random.Random(0)
    assert len(weighted(recs, 1.0, rng)) == 10 and len(weighted(recs, 0.5, rng)) == 5 and len(weighted(recs, 2.5, rng)) == 25
    half = weighted(recs, 0.5, rng)
    assert len(set(map(id, half))) == 5  # a sample without replacement
    assert sorted(map(id, weighted(recs, 2.0, rng))) == sorted(map(id, recs * 2))


def test_mix_ratios_with_static_sets_by_domain_and_weight():
    collected = [comp(i) for i in range(100)] + [comp(i, safety=True) for i in range(20)]
    harmless = StaticSet("data.preferences.0", "safety", 0.5, tuple(comp(i, tag="harmless") for i in range(200)))
    helpful_base = StaticSet("data.preferences.1", "helpfulness", 2.0, tuple(comp(i, tag="helpful") for i in range(30)))
    h_pool, s_pool = pools(collected, [harmless, helpful_base], seed=0)
    assert (len(h_pool), len(s_pool)) == (100 + 60, 20 + 100)

    def tags(mix):
        return {t: sum(c.prompt[0].content.startswith(t) for c in mix) for t in ("harmless", "helpful", "c")}

    safety = mix_for("safety", collected, 1.0, 0.1, seed=3, static=[harmless, helpful_base])
    # the whole safety pool (20 collected + 100 harmless) and 10% helpfulness: round(120 * 0.1 / 0.9) = 13
    assert len(safety) == 133
    assert sum(c.is_safety_prompt for c in safety) == 20  # static records keep their flag here; domain comes from the set
    assert tags(safety)["harmless"] == 100
    assert tags(safety)["helpful"] + sum(not c.is_safety_prompt and c.prompt[0].content.startswith("c") for c in safety) == 13

    helpful = mix_for("helpful", collected, 1.0, 0.1, seed=3, static=[harmless, helpful_base])
    # the whole helpfulness pool (100 + 2 x 30) plus an equal part of the safety pool (capped at its 120)
    assert len(helpful) == 160 + 120
    assert tags(helpful)["helpful"] == 60
    half = mix_for("helpful", collected, 0.5, 0.1, seed=3, static=[harmless, helpful_base])
    assert len(half) == 160 + 80 and tags(half)["helpful"] == 60
    # without static sets the old rules hold
    assert len(mix_for("safety", collected, 1.0, 0.1, seed=3)) == 20 + 2


def test_static_sets_group_rows_by_set_and_domain():
    rows = [(comp(0), "safety", 1.0, 0), (comp(1), "helpfulness", 1.0, 1), (comp(2, True), "safety", 1.0, 1), (comp(3), "helpfulness", 1.0, 1)]
    sets = static_sets(rows)
    assert [(s.name, s.domain, len(s.records)) for s in sets] == [
        ("data.preferences.0", "safety", 1), ("data.preferences.1", "helpfulness", 2), ("data.preferences.1", "safety", 1)]
    with pytest.raises(ValueError, match="domain"):
        static_sets([(comp(0), "harmless", 1.0, 0)])


# --------------------------------------------------------------------------------------------- the data stage


@pytest.fixture
def pref_files(tmp_path):
    d = tmp_path / "prefs"
    d.mkdir()
    return {
        "harmless": jsonl(d / "harmless-base.jsonl", hh_rows("harmful", 12)),
        "helpful": jsonl(d / "helpful-base.jsonl", hh_rows("helpful", 8)),
        "trl": jsonl(d / "trl.jsonl", [{"prompt": [{"role": "user", "content": f"trl q{i}"}], "chosen": [{"role": "assistant", "content": "a"}],
                                         "rejected": [{"role": "assistant", "content": "b"}], "is_safety": i % 3 == 0} for i in range(6)]
                     + [{"chosen": "Say 0: yes", "rejected": "Say 0: no"}]),
    }


def _prefs_override(files, harmless_domain="safety", harmless_weight=1.0):
    sets = [{"path": str(files["harmless"]), "format": "hh_rlhf", "domain": harmless_domain, "weight": harmless_weight},
            {"path": str(files["helpful"]), "domain": "helpfulness"},
            {"path": str(files["trl"]), "format": "trl", "domain": "auto"}]
    return "data.preferences=" + json.dumps(sets)


def test_data_stage_stores_static_sets_with_domains_and_the_rm_mix_uses_them(tmp_path, pref_files):
    from data_specs.prepare import STATIC_PREFERENCES, read_static_preferences
    from pipeline.config import load_config
    from pipeline.runner import Runner

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "tracking.mode=disabled", _prefs_override(pref_files)])
    runner = Runner(cfg, echo=None, show_progress=False)
    art = runner.run_stage("data", 0).artifact
    rows = read_static_preferences(art.file(STATIC_PREFERENCES))
    by_set = {}
    for c, domain, weight, idx in rows:
        by_set.setdefault(idx, []).append((c, domain))
    # the harmless HH file has no safety flag: the config's domain makes it safety data, flag included
    assert len(by_set[0]) == 12 and all(d == "safety" and c.is_safety_prompt for c, d in by_set[0])
    assert len(by_set[1]) == 8 and all(d == "helpfulness" and not c.is_safety_prompt for c, d in by_set[1])
    # auto: each record's own flag (is_safety on rows 0 and 3; the implicit-prompt row has none)
    assert [d for _, d in by_set[2]] == ["safety", "helpfulness", "helpfulness", "safety", "helpfulness", "helpfulness", "helpfulness"]
    assert by_set[2][-1][0].prompt[0].content == "Say 0:"
    mix = art.metrics["preferences_static_domains"]
    assert mix["records"] == {"helpfulness": 8 + 5, "safety": 12 + 2}
    assert mix["by_set"]["0"] == {"helpfulness": 0, "safety": 12}

    sets = static_sets(rows)
    safety_mix = mix_for("safety", [], 1.0, 0.1, seed=0, static=sets)
    helpful_mix = mix_for("helpful", [], 0.0, 0.1, seed=0, static=sets)
    harmless_prompts = {c.prompt[0].content for c, _ in by_set[0]}
    assert sum(c.prompt[0].content in harmless_prompts for c in safety_mix) == 12
    assert not any(c.prompt[0].content in harmless_prompts for c in helpful_mix)  # the old bug: harmless in the helpful RM
    assert len(safety_mix) == 14 + round(14 * 0.1 / 0.9)

    # the files are part of the data version: editing one means new data; the weight (config) too
    v0 = art.version
    jsonl(pref_files["helpful"], hh_rows("helpful", 9))
    cfg2 = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "tracking.mode=disabled", _prefs_override(pref_files)])
    assert Runner(cfg2, echo=None, show_progress=False).expected_version("data", 0) != v0


def test_bad_static_set_stops_the_data_stage_before_anything_is_written(tmp_path, pref_files):
    from pipeline.config import load_config
    from pipeline.errors import StageFailed
    from pipeline.runner import Runner

    jsonl(pref_files["helpful"], hh_rows("helpful", 2) + [{"chosen": hh("x", "same"), "rejected": hh("x", "same")}])
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=disabled", _prefs_override(pref_files)])
    with pytest.raises(StageFailed, match=r"(?s)data\.preferences\.1 .*helpful-base\.jsonl:3: rejected: chosen and rejected"):
        Runner(cfg, echo=None, show_progress=False).run_stage("data", 0)
    assert not (run_dir / "artifacts" / "data").exists() or not any((run_dir / "artifacts" / "data").iterdir())


def test_validate_shows_the_domain_mix(pref_files, capsys):
    from data_specs.validate import main

    assert main(str(pref_files["harmless"]), "preference", domain="safety") == 0
    out = capsys.readouterr().out
    assert "domain mix" in out and "safety" in out
    line = next(l for l in out.splitlines() if "safety" in l and "12" in l)
    assert "100" in line  # 12 records, 100%
    assert main(str(pref_files["trl"]), "preference") == 0  # auto: by each record's flag
    out = capsys.readouterr().out
    assert any("helpfulness" in l and "5" in l for l in out.splitlines()) and any("safety" in l and "2" in l for l in out.splitlines())
    assert main(str(pref_files["harmless"]), "preference") == 0
    assert "--domain safety" in capsys.readouterr().out  # auto on a file with no flags: every record counts as helpfulness


def test_reward_model_stages_train_on_the_static_sets_by_domain(tmp_path, pref_files):
    """The stages read the `data` artifact's sets: the harmless file is all in the safety RM's mix, and in the
    helpful RM only as part of the sampled safety share (none at mix_other_ratio 0)."""
    from pipeline.config import load_config
    from pipeline.runner import Runner

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "tracking.mode=disabled", "reward_model_helpful.mix_other_ratio=0",
                               "data.preferences=" + json.dumps([{"path": str(pref_files["harmless"]), "domain": "safety"}])])
    runner = Runner(cfg, echo=None, show_progress=False)
    for stage, r in [("data", 0), ("pretrained", 0), ("sft", 0), ("collect_preferences", 1)]:
        runner.run_stage(stage, r)
    safety = runner.run_stage("reward_model_safety", 1).artifact.metrics
    helpful = runner.run_stage("reward_model_helpful", 1).artifact.metrics
    assert safety["n_train_static"] == 12 and safety["n_train_safety"] >= 12
    assert helpful["n_train_static"] == 0 and helpful["n_train_safety"] == 0
