"""The real stages on the tiny preset: one round of the whole recipe on CPU in seconds.

A module fixture runs data -> pretrained -> sft -> collect_preferences -> both reward models ->
rejection_sampling -> ppo -> ghost_attention -> evaluate once; the tests check what each stage
registered. Resume, determinism and the training-changes-every-parameter checks run stages again.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.io import read_jsonl
from pipeline.registry import Registry
from pipeline.runner import Runner


def tiny(run_dir, *extra):
    return load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=disabled", *extra])


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # tests/conftest.py: one tiny round shared by the whole session


def test_every_stage_of_a_round_registers(run):
    cfg, arts = run
    expected = {("data", 0), ("pretrained", 0), ("sft", 0), ("collect_preferences", 1), ("reward_model_helpful", 1),
                ("reward_model_safety", 1), ("rejection_sampling", 1), ("ppo", 1), ("ghost_attention", 1), ("evaluate", 1)}
    assert set(arts) == expected
    for a in arts.values():
        assert Registry(cfg.run_dir).verify(a) == []


def test_pretrained_checkpoint_loads_with_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, arts = run
    path = arts[("pretrained", 0)].path
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads < model.config.num_attention_heads
    assert "[INST]" in tok.chat_template and tok.pad_token_id is not None
    assert (path / "model.safetensors").exists() and (path / "MODEL_CARD.md").exists()


def _params(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_sft_changes_every_parameter_and_reports_metrics(run):
    _, arts = run
    before, after = _params(arts[("pretrained", 0)].path), _params(arts[("sft", 0)].path)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    m = arts[("sft", 0)].metrics
    for k in ("train_loss", "eval_loss", "perplexity", "tokens_per_s", "gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate"):
        assert k in m, k
    assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in ("train_loss", "eval_loss"))
    hist = read_jsonl(arts[("sft", 0)].file("metrics.jsonl"))
    assert len(hist) == m["steps"] and all("loss" in h for h in hist)


def test_collect_preferences_writes_valid_comparisons(run):
    from data_specs.loaders import load_records

    _, arts = run
    a = arts[("collect_preferences", 1)]
    comps = load_records(a.file("comparisons.jsonl"), "preference", format="own")
    assert len(comps) == a.metrics["n_comparisons"] > 0
    assert all(c.round == 1 and c.chosen != c.rejected for c in comps)
    assert (a.path / "unlabeled.jsonl").exists()


@pytest.mark.parametrize("stage", ["reward_model_helpful", "reward_model_safety"])
def test_reward_models_register_scalar_head_and_accuracy(run, stage):
    from transformers import AutoModelForSequenceClassification

    _, arts = run
    a = arts[(stage, 1)]
    rm = AutoModelForSequenceClassification.from_pretrained(a.path)
    assert rm.config.num_labels == 1 and rm.score.out_features == 1
    n = a.metrics["n_eval"]
    assert n > 0 and abs(a.metrics["accuracy"] * n - round(a.metrics["accuracy"] * n)) < 1e-6  # a share of the n_eval pairs
    assert "mean_margin" in a.metrics
    assert a.inputs["policy"]["stage"] == "sft"
    # issue 12 item 4: `accuracy` on held-out on-policy comparisons (split by prompt), template pairs apart
    assert a.metrics["accuracy_source"].startswith("held_out_on_policy") and a.metrics["n_held_out_prompts"] > 0
    assert 0.0 <= a.metrics["template_accuracy"] <= 1.0
    held = read_jsonl(a.file("held_out_comparisons.jsonl"))
    own = a.metrics["accuracy_source"] == "held_out_on_policy"
    assert len(held) == a.metrics["n_eval"] and all((c["is_safety_prompt"] == (stage == "reward_model_safety")) == own for c in held)


def test_rejection_sampling_keeps_the_argmax(run):
    _, arts = run
    a = arts[("rejection_sampling", 1)]
    rows = read_jsonl(a.file("samples.jsonl"))
    cfg = load_config("tiny")
    assert rows and all(len(r["candidates"]) == cfg.rejection_sampling.k for r in rows)
    for r in rows:
        rewards = [c["reward"] for c in r["candidates"]]
        assert r["kept"] == max(range(len(rewards)), key=lambda i: rewards[i])
    curve = a.metrics["reward_vs_k"]
    assert curve["k"][0] == 1 and all(m >= d - 1e-6 for m, d in zip(curve["max"], curve["median"]))


def test_ppo_reports_per_step_metrics_and_keeps_kl_bounded(run):
    _, arts = run
    a = arts[("ppo", 1)]
    hist = [h for h in read_jsonl(a.file("metrics.jsonl")) if "reward" in h]
    assert len(hist) == load_config("tiny").ppo.steps
    for k in ("reward", "reward_whitened", "kl", "entropy", "policy_loss", "value_loss", "clip_frac", "response_length", "tokens_per_s"):
        assert all(k in h for h in hist), k
    assert a.metrics["stop_reason"] == "completed"
    bound = load_config("tiny").ppo.kl_bound
    assert all(abs(h["kl"]) <= bound for h in hist), [h["kl"] for h in hist]  # completed means every step stayed within the guard


def test_ghost_attention_and_evaluate_metrics(run):
    _, arts = run
    g = arts[("ghost_attention", 1)].metrics
    assert len(g["adherence_by_turn_before"]) == len(g["adherence_by_turn_after"]) > 1
    # issue 12 item 6: nothing is filtered by default (the gold oracle only grades), the paper's synthesis
    assert g["filter"] == "none" and g["synthesis"] == "attach_to_user" and g["n_trained"] == g["n_dialogues"]
    e = arts[("evaluate", 1)]
    for k in ("gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate", "win_rate_vs_sft", "win_rate_vs_previous",
              "rm_accuracy_helpful", "rm_accuracy_safety", "gatt_adherence_late_turns", "kl_to_sft", "mean_response_length",
              "rm_template_accuracy_helpful", "rm_template_accuracy_safety"):
        assert k in e.metrics, k
    assert e.metrics["rm_accuracy_helpful_source"] == e.metrics["rm_accuracy_safety_source"] == "held_out_on_policy"
    assert e.metrics["rm_accuracy_helpful_n"] == arts[("reward_model_helpful", 1)].metrics["n_eval"]
    for f in ("report.json", "report.md", "samples.jsonl", "plots/win_rates.png"):
        assert e.file(f).exists(), f


def test_second_run_is_all_cache_hits(run):
    cfg, arts = run
    again = Runner(cfg, echo=None, show_progress=False).run_all()
    assert all(r.cached for r in again)
    assert {(r.artifact.stage, r.artifact.round): r.artifact.version for r in again} == {k: a.version for k, a in arts.items()}


RESUME_SCRIPT = r'''
import sys
from pipeline.config import load_config
from pipeline.runner import Runner
cfg = load_config("tiny", ["run_dir=" + sys.argv[1], "tracking.mode=disabled", "sft.max_steps=400", "sft.checkpoint_every=3",
                           "sft.batch_size=2", "sft.micro_batch_size=2"])
Runner(cfg, echo=None, show_progress=False).run_stage(sys.argv[2], 0)
'''


def test_sft_resumes_after_kill(run, tmp_path):
    import shutil

    cfg, arts = run
    run_dir = tmp_path / "run"
    for stage in ("data", "pretrained"):  # reuse the round-0 inputs
        shutil.copytree(arts[(stage, 0)].path, run_dir / "artifacts" / stage / arts[(stage, 0)].path.name)
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(run_dir), "sft"])
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and ckpt is None:
        found = list((run_dir / "work" / "sft").glob("*/train_state.pt")) if (run_dir / "work" / "sft").exists() else []
        if found:
            state = torch.load(found[0], weights_only=True)
            if state["step"] >= 6:
                ckpt = state["step"]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, "no checkpoint was written"
    assert Registry(run_dir).find("sft", 0) is None
    cfg2 = tiny(run_dir, "sft.max_steps=400", "sft.checkpoint_every=3", "sft.batch_size=2", "sft.micro_batch_size=2")
    res = Runner(cfg2, echo=None, show_progress=False).run_stage("sft", 0)
    assert res.artifact.metrics["resumed_from_step"] >= ckpt
    steps = [h["step"] for h in read_jsonl(res.artifact.file("metrics.jsonl"))]
    assert steps[-1] == 399 and min(steps) == 0  # history from before the kill is kept


def test_stages_are_deterministic_under_a_seed(run, tmp_path):
    import shutil

    cfg, arts = run
    digests = []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        for stage in ("data", "pretrained"):
            shutil.copytree(arts[(stage, 0)].path, run_dir / "artifacts" / stage / arts[(stage, 0)].path.name)
        a = Runner(tiny(run_dir), echo=None, show_progress=False).run_stage("sft", 0).artifact
        digests.append(a.manifest["files"]["model.safetensors"]["sha256"])
    assert digests[0] == digests[1] == arts[("sft", 0)].manifest["files"]["model.safetensors"]["sha256"]


def _copy_artifacts(run, dest):
    import shutil

    cfg, _ = run
    shutil.copytree(Path(cfg.run_dir) / "artifacts", Path(dest) / "artifacts")
    return dest


def test_ppo_non_finite_loss_fails_the_stage(run, tmp_path, monkeypatch):
    """Issue 12.7: a non-finite PPO loss fails the stage (it used to break only the mini-batch loop)."""
    import policies.ppo as ppo
    from pipeline.errors import StageFailed

    real = ppo.ppo_clip_loss

    def nan_loss(*a, **k):
        pl, cf, ak = real(*a, **k)
        return pl * float("nan"), cf, ak

    monkeypatch.setattr(ppo, "ppo_clip_loss", nan_loss)
    run_dir = _copy_artifacts(run, tmp_path / "run")
    with pytest.raises(StageFailed, match="non-finite loss"):
        Runner(tiny(run_dir), echo=None, show_progress=False).run_stage("ppo", 1, force=True)


def test_ppo_guard_rolls_back_to_the_last_checkpoint(run, tmp_path, monkeypatch):
    """A guard that fires (here: KL above a tiny kl_bound at the second step) stops PPO and keeps the last good
    checkpoint: the artifact holds the checkpoint's weights, not the rejected update's."""
    import policies.ppo as ppo
    from safetensors.torch import load_file

    seen: dict[int, dict] = {}
    real = ppo.load_train_state

    def spy(path, sharded, sched):
        step = real(path, sharded, sched)
        seen[step] = {k: v.detach().clone() for k, v in sharded.module.policy.state_dict().items()}
        return step

    monkeypatch.setattr(ppo, "load_train_state", spy)
    run_dir = _copy_artifacts(run, tmp_path / "run")
    a = Runner(tiny(run_dir, "ppo.steps=4", "ppo.checkpoint_every=1", "ppo.kl_bound=1e-9"), echo=None,
               show_progress=False).run_stage("ppo", 1).artifact
    m = a.metrics
    assert m["stop_reason"].startswith("KL to pi_0") and m["kept_step"] == max(seen) == 1 and m["steps_done"] == 2
    saved, kept = load_file(str(a.path / "model.safetensors")), seen[1]
    assert set(saved) & set(kept) and all(torch.equal(saved[k], kept[k]) for k in set(saved) & set(kept))
    assert not all(torch.equal(seen[0][k], kept[k]) for k in kept)  # the kept step did move the policy


def test_ppo_early_stop_on_held_out_reward(run, tmp_path):
    """Issue 12.7 (sec. 3.2.3): the held-out reward is measured every N iterations on prompts held out of
    PPO training; the stage keeps the best and says why it stopped."""
    run_dir = _copy_artifacts(run, tmp_path / "run")
    a = Runner(tiny(run_dir, "ppo.steps=4", "ppo.early_stop_patience=1", "ppo.early_stop_every=1", "ppo.early_stop_prompts=4"),
               echo=None, show_progress=False).run_stage("ppo", 1).artifact
    held = [h["held_out_reward"] for h in read_jsonl(a.file("metrics.jsonl")) if "held_out_reward" in h]
    m = a.metrics
    assert held and m["best_held_out_reward"] == pytest.approx(max(held))
    if m["stop_reason"].startswith("early stop"):
        assert len(held) >= 2 and held[-1] <= max(held[:-1]) and m["steps_done"] == len(held)
    else:
        assert len(held) == 4
    assert m["kept_step"] == 1 + held.index(max(held))
