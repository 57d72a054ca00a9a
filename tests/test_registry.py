"""Registry and runner, exercised with small stage functions defined here (no real stages)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app, status_rows
from pipeline.config import load_config
from pipeline.registry import Registry
from pipeline.runner import MissingInputError, Runner, code_fingerprint
from pipeline.stages import StageSpec

CALLS = []


def make_source(ctx):
    CALLS.append(("source", ctx.round))
    (ctx.out_dir / "numbers.json").write_text(json.dumps(list(range(ctx.section.prompts_per_round))))
    ctx.log({"n": ctx.section.prompts_per_round}, step=0)
    return {"n": ctx.section.prompts_per_round}


def double(ctx):
    CALLS.append(("double", ctx.round))
    nums = json.loads(ctx.input("src").file("numbers.json").read_text())
    (ctx.out_dir / "doubled.json").write_text(json.dumps([2 * n for n in nums]))
    return {"total": sum(2 * n for n in nums)}


def explode(ctx):
    (ctx.out_dir / "half.txt").write_text("partial")
    raise RuntimeError("boom in the middle")


def specs(second=double):
    # collect_preferences's section is borrowed for a config knob the version depends on
    return {
        "collect_preferences": StageSpec("collect_preferences", make_source, lambda c, r: {}, rounds="zero"),
        "sft": StageSpec("sft", second, lambda c, r: {"src": ("collect_preferences", 0)}, rounds="zero"),
    }


@pytest.fixture
def cfg(tmp_path):
    CALLS.clear()
    return load_config("tiny", [f"run_dir={tmp_path / 'run'}", "collect_preferences.prompts_per_round=4", "tracking.mode=disabled"])


def runner(cfg, s=None):
    return Runner(cfg, specs=s or specs(), echo=None, show_progress=False)


def test_run_registers_artifacts_with_manifest(cfg):
    results = runner(cfg).run_all()
    assert [r.cached for r in results] == [False, False]
    art = results[1].artifact
    m = art.manifest
    assert m["stage"] == "sft" and m["round"] == 0 and m["status"] == "complete"
    assert m["inputs"]["src"]["version"] == results[0].artifact.version
    assert m["metrics"]["total"] == 2 * sum(range(4))
    assert m["config"]["stage"]["learning_rate"] == cfg.sft.learning_rate
    assert "fingerprint" in m["code"] and "torch" in m["code"]["libraries"]
    assert m["files"]["doubled.json"]["sha256"] and m["finished_at"] >= m["started_at"]
    assert Registry(cfg.run_dir).verify(art) == []
    hist = [json.loads(l) for l in (results[0].artifact.path / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["n"] == 4


def test_version_is_stable_and_rerun_is_cache_hit(cfg):
    first = runner(cfg).run_all()
    CALLS.clear()
    t = time.time()
    second = runner(cfg).run_all()
    assert all(r.cached for r in second) and CALLS == []
    assert [r.artifact.version for r in first] == [r.artifact.version for r in second]


def test_config_change_gives_new_versions_downstream(cfg, tmp_path):
    first = runner(cfg).run_all()
    cfg2 = load_config("tiny", [f"run_dir={cfg.run_dir}", "collect_preferences.prompts_per_round=5", "tracking.mode=disabled"])
    second = runner(cfg2).run_all()
    assert not any(r.cached for r in second)
    assert first[0].artifact.version != second[0].artifact.version
    assert first[1].artifact.version != second[1].artifact.version  # its input changed


def test_config_of_other_stage_does_not_change_version(cfg):
    first = runner(cfg).run_all()
    cfg2 = load_config("tiny", [f"run_dir={cfg.run_dir}", "collect_preferences.prompts_per_round=4", "ppo.beta=0.5", "tracking.mode=disabled"])
    assert all(r.cached for r in runner(cfg2).run_all())
    assert first[0].artifact.version == runner(cfg2).run_all()[0].artifact.version


def test_code_fingerprint_changes_with_code():
    def a(ctx):
        return {"x": 1}

    def b(ctx):
        return {"x": 2}

    fa = code_fingerprint(StageSpec("s", a, lambda c, r: {}))
    assert fa == code_fingerprint(StageSpec("s", a, lambda c, r: {}))
    assert fa != code_fingerprint(StageSpec("s", b, lambda c, r: {}))


def test_module_fingerprint_only_covers_own_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "fpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sft_mod.py").write_text("def run(ctx): return {}\n")
    (pkg / "ppo_mod.py").write_text("def run(ctx): return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from pipeline import runner as runner_mod

    sft = StageSpec("sft", "fpkg.sft_mod:run", lambda c, r: {})
    ppo = StageSpec("ppo", "fpkg.ppo_mod:run", lambda c, r: {})
    before = (code_fingerprint(sft), code_fingerprint(ppo))
    (pkg / "ppo_mod.py").write_text("def run(ctx): return {'edited': True}\n")
    runner_mod._module_files.cache_clear()
    after = (code_fingerprint(sft), code_fingerprint(ppo))
    assert before[0] == after[0] and before[1] != after[1]


def test_force_recomputes_same_version(cfg):
    first = runner(cfg).run_all()
    CALLS.clear()
    res = runner(cfg).run_stage("sft", 0, force=True)
    assert not res.cached and CALLS == [("double", 0)]
    assert res.artifact.version == first[1].artifact.version
    assert len([p for p in (Path(cfg.run_dir) / "artifacts" / "sft").iterdir()]) == 1


def test_failure_leaves_no_complete_artifact_and_rerun_redoes(cfg):
    r = runner(cfg, specs(second=explode))
    r.run_stage("collect_preferences", 0)
    with pytest.raises(RuntimeError, match="boom"):
        r.run_stage("sft", 0)
    reg = Registry(cfg.run_dir)
    assert reg.find("sft", 0) is None
    assert not list((Path(cfg.run_dir) / "artifacts" / "sft").glob(".tmp-*"))
    rows = {(x["stage"], x["status"]) for x in status_rows(cfg.run_dir)}
    assert ("sft", "failed") in rows
    failed = [x for x in status_rows(cfg.run_dir) if x["status"] == "failed"][0]
    assert "boom in the middle" in failed["error"]
    res = runner(cfg).run_stage("sft", 0)
    assert not res.cached and reg.find("sft", 0) is not None
    assert ("sft", "failed") not in {(x["stage"], x["status"]) for x in status_rows(cfg.run_dir)}


KILL_SCRIPT = r'''
import sys, time, json
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.stages import StageSpec

def slow(ctx):
    (ctx.out_dir / "big.bin").write_bytes(b"x" * 1000)
    print("STARTED", flush=True)
    time.sleep(60)
    return {}

cfg = load_config("tiny", ["run_dir=" + sys.argv[1], "tracking.mode=disabled"])
Runner(cfg, specs={"sft": StageSpec("sft", slow, lambda c, r: {}, rounds="zero")}, echo=None).run_stage("sft", 0)
'''


def test_killed_stage_leaves_nothing_complete(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "STARTED"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reg = Registry(run_dir)
    assert reg.find("sft", 0) is None
    assert list((run_dir / "artifacts" / "sft").glob(".tmp-*"))  # the half build is there but hidden
    rows = status_rows(str(run_dir))
    assert rows and rows[0]["status"] == "interrupted"  # the builder died: shown as interrupted, not running
    reg.clean_stale_builds()
    assert not list((run_dir / "artifacts" / "sft").glob(".tmp-*"))


def test_missing_input_names_stage_round_and_command(cfg):
    with pytest.raises(MissingInputError) as e:
        runner(cfg).run_stage("sft", 0)
    msg = str(e.value)
    assert "collect_preferences round 0" in msg and "rlhf stage collect_preferences --round 0" in msg


def test_lineage_and_lookup(cfg):
    res = runner(cfg).run_all()
    reg = Registry(cfg.run_dir)
    sft = res[1].artifact
    assert reg.by_version(sft.version[:6]).path == sft.path
    assert reg.find("sft", 0).version == sft.version
    tree = reg.lineage(sft)
    assert tree["stage"] == "sft" and tree["inputs"][0]["stage"] == "collect_preferences"
    assert tree["inputs"][0]["version"] == res[0].artifact.version


def test_status_and_lineage_cli(cfg):
    res = runner(cfg).run_all()
    cli = CliRunner()
    out = cli.invoke(app, ["status", "--run-dir", cfg.run_dir, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["run_dir"] == cfg.run_dir
    assert {(a["stage"], a["round"], a["status"]) for a in data["artifacts"]} == {("collect_preferences", 0, "complete"), ("sft", 0, "complete")}
    assert all({"stage", "round", "version", "status", "inputs", "metrics", "path"} <= set(a) for a in data["artifacts"])
    table = cli.invoke(app, ["status", "--run-dir", cfg.run_dir])
    assert "complete" in table.output
    lin = cli.invoke(app, ["lineage", res[1].artifact.version, "--run-dir", cfg.run_dir, "--json"])
    assert json.loads(lin.output)["inputs"][0]["stage"] == "collect_preferences"
    missing = cli.invoke(app, ["lineage", "ffffffff", "--run-dir", cfg.run_dir])
    assert missing.exit_code == 1
