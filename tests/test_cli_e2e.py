"""The CLI end to end: `rlhf stage`, `rlhf report` and `rlhf data validate` through the installed `rlhf`
command on a copy of the tiny registry (tests/conftest.py `tiny_run`), and which versions an edit to one
stage's code changes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.registry import Registry
from pipeline.runner import Runner

RLHF = str(Path(sys.executable).with_name("rlhf"))


@pytest.fixture(scope="module")
def copy(tiny_run, tmp_path_factory):
    cfg, arts = tiny_run
    run = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(Path(cfg.run_dir) / "artifacts", run / "artifacts")
    return run, arts


def rlhf(*args, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _tiny(run):
    return ["--config", "tiny", "--run-dir", str(run), "--set", "tracking.mode=disabled"]


def test_stage_is_a_cache_hit_then_force_rebuilds_the_same_version(copy):
    run, arts = copy
    reg = Registry(run)
    before = reg.find("reward_model_safety", 1)
    p = rlhf("stage", "reward_model_safety", "--round", "1", *_tiny(run))
    assert p.returncode == 0, p.stderr
    assert "[cached]" in p.stdout + p.stderr and "[run]" not in p.stdout + p.stderr
    assert reg.find("reward_model_safety", 1).manifest["finished_at"] == before.manifest["finished_at"]

    p = rlhf("stage", "reward_model_safety", "--round", "1", "--force", *_tiny(run))
    assert p.returncode == 0, p.stderr
    after = reg.find("reward_model_safety", 1)
    assert "[run]" in p.stdout + p.stderr, "--force did not rebuild:\n" + p.stdout + p.stderr
    assert after.version == before.version == arts[("reward_model_safety", 1)].version
    assert after.manifest["finished_at"] > before.manifest["finished_at"]
    assert after.manifest["files"]["model.safetensors"]["sha256"] == before.manifest["files"]["model.safetensors"]["sha256"]
    assert reg.verify(after) == []


def test_stage_with_a_missing_input_names_the_command(copy, tmp_path):
    run, _ = copy
    lone = tmp_path / "lone"
    shutil.copytree(run / "artifacts" / "data", lone / "artifacts" / "data")
    p = rlhf("stage", "sft", "--round", "0", *_tiny(lone))
    assert p.returncode != 0
    assert "rlhf stage pretrained --round 0" in p.stdout + p.stderr
    assert not (lone / "artifacts" / "sft").exists()


def test_report_is_evaluates_metrics(copy):
    run, arts = copy
    p = rlhf("report", "--run-dir", str(run), "--json")
    assert p.returncode == 0, p.stderr
    rows = {str(r["round"]).split()[0]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"0", "1"}
    ev = arts[("evaluate", 1)].metrics
    for k in ("gold_helpfulness", "gold_safety_violation_rate", "kl_to_sft", "rm_accuracy_helpful", "reward_hacking"):
        assert rows["1"][k] == ev[k], k
    assert rows["1"]["gold_helpfulness_ci95"] == ev["gold_helpfulness_ci95"]
    assert rows["0"]["gold_helpfulness"] == arts[("sft", 0)].metrics["gold_helpfulness"]
    md = rlhf("report", "--run-dir", str(run))
    assert md.returncode == 0 and md.stdout.count("\n| ") >= 2 and "gold_helpfulness" in md.stdout


def test_data_validate_on_the_registered_data_and_on_a_bad_file(copy, tmp_path):
    run, arts = copy
    data = arts[("data", 0)].path
    ok = rlhf("data", "validate", str(data / "prompts.jsonl"), "--kind", "prompt")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    n = sum(1 for line in (data / "prompts.jsonl").read_text().splitlines() if line.strip())
    assert str(n) in ok.stdout
    bad = tmp_path / "bad.jsonl"
    lines = (data / "prompts.jsonl").read_text().splitlines()[:2]
    row = json.loads(lines[1])
    row["is_safety"] = "no"
    bad.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    p = rlhf("data", "validate", str(bad), "--kind", "prompt")
    assert p.returncode != 0 and f"{bad}:2: is_safety" in p.stdout + p.stderr


STAGES_R1 = [("data", 0), ("pretrained", 0), ("sft", 0), ("collect_preferences", 1), ("reward_model_helpful", 1),
             ("reward_model_safety", 1), ("rejection_sampling", 1), ("ppo", 1), ("ghost_attention", 1), ("evaluate", 1)]


def _versions(cfg):
    runner = Runner(cfg, echo=None, show_progress=False)
    return {s: runner.expected_version(*s) for s in STAGES_R1}


@pytest.mark.parametrize("module, changed", [
    ("policies.ppo", {("ppo", 1), ("ghost_attention", 1), ("evaluate", 1)}),
    ("policies.rejection_sampling", {("rejection_sampling", 1), ("ppo", 1), ("ghost_attention", 1), ("evaluate", 1)}),
    ("policies.evaluate", {("evaluate", 1)}),
])
def test_editing_a_stage_module_changes_only_its_version_and_downstream(tiny_run, tmp_path, monkeypatch, module, changed):
    import pipeline.runner as R

    cfg, arts = tiny_run
    before = _versions(cfg)
    assert before == {s: arts[s].version for s in STAGES_R1}  # the registry's versions are what the config implies
    real = R._module_files(module)
    edited = tmp_path / real[0].name
    edited.write_text(real[0].read_text() + "\n# an edit\n")
    orig = R._module_files.__wrapped__

    def patched(m):
        return (edited,) if m == module else orig(m)

    monkeypatch.setattr(R, "_module_files", patched)
    after = _versions(cfg)
    assert {s for s in STAGES_R1 if before[s] != after[s]} == changed
