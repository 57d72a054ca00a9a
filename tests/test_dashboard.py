"""The dashboard: page logic (dashboard.data) on a fixture run directory, the Streamlit app through
AppTest, and one browser test (headless Debian chromium through Playwright) of `rlhf dashboard`."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dashboard import data as D
from dashboard import launch
from pipeline.io import write_json
from tests.dashboard_fixture import build_run_dir

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
CHROMIUM = "/usr/bin/chromium"
SAMPLE_PROMPT = "How do I bake sourdough bread at home?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("dash") / "run")


def _partial(tmp_path: Path, pid: int) -> Path:
    """SFT done, round 1's preference collection running (process `pid`), with a live metrics.jsonl."""
    run = tmp_path / "partial"
    full = build_run_dir(tmp_path / "full")
    for stage in ("data", "pretrained", "sft"):
        src = next((full / "artifacts" / stage).iterdir())
        dst = run / "artifacts" / stage / src.name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    write_json(run / "attempts" / "collect_preferences" / "r1.json", {
        "stage": "collect_preferences", "round": 1, "status": "running", "version": "aaaabbbbcccc",
        "started_at": time.time() - 75, "pid": pid, "host": __import__("socket").gethostname()})
    write_json(run / "attempts" / "ppo" / "r1.json", {
        "stage": "ppo", "round": 1, "status": "running", "version": "ddddeeeeffff", "started_at": time.time() - 5, "pid": pid,
        "host": __import__("socket").gethostname()})
    work = run / "work" / "ppo" / "r1-ddddeeeeffff"
    work.mkdir(parents=True)
    (work / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward": 0.1 * i, "kl": 0.01 * i}) + "\n" for i in range(3))
                                        + '{"step": 3, "rew')  # a line being written
    return run


# ---------------------------------------------------------------------------------------------- page logic


def test_overview_one_row_per_round_with_status_and_metrics(run_dir):
    ov = D.overview(run_dir)
    assert list(ov["round"]) == [0, 1, 2, 3]
    r = ov.set_index("round")
    assert list(r["status"]) == ["complete", "complete", "complete", "failed"]
    assert r.loc[3, "current stage"] == "collect_preferences"
    assert r.loc[3, "prefs"].startswith("failed: RuntimeError: CUDA out of memory")
    assert r.loc[3, "RM helpful"] == "not started" and r.loc[3, "PPO"] == "not started"  # PPO ran in round 2, so round 3 has it
    assert r.loc[1, "PPO"] == "n/a" and r.loc[1, "GAtt"] == "n/a"  # round 1's evaluate was built without them
    assert r.loc[2, "PPO"] == "done 2m20s" and r.loc[0, "SFT"] == "done 1m02s"
    assert r.loc[2, "win_rate_vs_sft"] == pytest.approx(0.713) and r.loc[1, "gold_helpfulness"] == pytest.approx(0.537)
    assert r.loc[0, "gold_helpfulness"] == pytest.approx(0.412)  # the SFT baseline
    assert r.loc[2, "reward_hacking"] == "yes" and r.loc[1, "reward_hacking"] == "no"
    assert r.loc[2, "duration"] == "7m22s"
    assert "CUDA out of memory" in r.loc[3, "errors"]
    active = D.active(run_dir)
    assert [(a["stage"], a["round"], a["status"]) for a in active] == [("collect_preferences", 3, "failed")]


def test_partial_run_shows_running_stage_and_live_curve(tmp_path):
    run = _partial(tmp_path, os.getpid())
    ov = D.overview(run).set_index("round")
    assert ov.loc[0, "status"] == "complete"
    assert ov.loc[1, "status"] == "running" and ov.loc[1, "current stage"] == "collect_preferences"
    assert ov.loc[1, "prefs"].startswith("running 1m1") and "process gone" not in ov.loc[1, "prefs"]
    assert ov.loc[1, "evaluate"] == "not started"
    h = D.history(run, "ppo", 1)  # not committed yet: the work dir's history, the half-written line skipped
    assert list(h["step"]) == [0, 1, 2]
    assert D.trends(run)["round"].tolist() == [0]
    assert D.rs_samples(run, 1) == [] and D.eval_samples(run).empty and D.reward_vs_k(run, 1).empty


def test_running_attempt_of_a_dead_process_is_marked(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = _partial(tmp_path, dead.pid)
    table = D.stage_table(run)
    row = table[(table["stage"] == "collect_preferences") & (table["round"] == 1)].iloc[0]
    assert row["status"] == "interrupted"  # the registry reads a dead builder's "running" attempt as interrupted
    assert D.stage_label(row).startswith("interrupted: the builder (pid") and "rerun to resume" in D.stage_label(row)
    assert ("collect_preferences", 1, "interrupted") in [(a["stage"], a["round"], a["status"]) for a in D.active(run)]  # the banner


def test_empty_missing_and_broken_run_dirs(tmp_path):
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    (broken / "artifacts" / "sft" / "r0-abc").mkdir(parents=True)
    (broken / "artifacts" / "sft" / "r0-abc" / "manifest.json").write_text("{not json")
    (broken / "artifacts" / "sft" / ".tmp-r0-def-1-2").mkdir()  # an in-progress build is never read
    (broken / "attempts" / "sft").mkdir(parents=True)
    (broken / "attempts" / "sft" / "r0.json").write_text("")
    assert D.run_dir_state(missing)[0] == "missing" and "does not exist" in D.run_dir_state(missing)[1]
    assert D.run_dir_state(empty)[0] == "empty" and D.run_dir_state(broken)[0] == "empty"
    for d in (missing, empty, broken):
        assert D.overview(d).empty and D.stage_table(d).empty and D.trends(d).empty
        assert D.rm_accuracy_by_strength(d).empty and D.gatt_adherence(d).empty and D.eval_samples(d).empty
        assert D.eval_prompts(d).empty and D.artifacts(d).empty and D.rounds_of(d) == [] and D.active(d) == []
        assert D.history(d, "sft", 0).empty and D.rs_samples(d, 1) == [] and D.links(d, "abc") == {} and D.lineage(d, "abc") is None


def test_trends_flag_reward_rise_with_gold_fall(run_dir):
    tr = D.trends(run_dir).set_index("round")
    assert tr.index.tolist() == [0, 1, 2]
    assert tr.loc[2, "win_rate_vs_previous"] == pytest.approx(0.553) and tr.loc[1, "win_rate_vs_sft"] == pytest.approx(0.642)
    assert tr.loc[0, "gold_safety_violation_rate"] == pytest.approx(0.21)
    assert tr.loc[2, "rm_accuracy_safety"] == pytest.approx(0.751)
    assert tr.loc[2, "reward_model_helpful_accuracy"] == pytest.approx(0.70)  # the RM's own accuracy beside evaluate's
    assert tr.loc[2, "ppo_reward"] == pytest.approx(0.74) and pd.isna(tr.loc[1, "ppo_reward"])
    assert tr["hacking_flag"].tolist() == [False, False, True]
    assert D.flagged_rounds(run_dir) == [2]


def test_trend_flag_computed_without_the_evaluate_verdict(tmp_path):
    run = build_run_dir(tmp_path / "run")
    for m in run.glob("artifacts/evaluate/*/manifest.json"):
        man = json.loads(m.read_text())
        del man["metrics"]["reward_hacking"], man["metrics"]["reward_hacking_tests"]  # an artifact from before the tests
        write_json(m, man)
    assert D.flagged_rounds(run) == [2]  # mean reward 0.57 -> 0.69 while gold 0.537 -> 0.49


def test_fixture_verdicts_follow_evaluates_rule(run_dir):
    """The fixture's reward-hacking verdicts are evaluate's rule on its own numbers, tolerance included:
    round 2's gold drop (0.047, interval below 0) exceeds the tolerance; at a larger tolerance it would not fire."""
    from tests.dashboard_fixture import hacking_verdict

    ev = {}
    for man in run_dir.glob("artifacts/evaluate/*/manifest.json"):
        m = json.loads(man.read_text())
        ev[m["round"]] = m["metrics"]
    assert [ev[r]["reward_hacking"] for r in (1, 2)] == [False, True]
    for m in ev.values():
        assert {k: m[k] for k in ("reward_hacking", "reward_hacking_tests")} == hacking_verdict(m)
    assert hacking_verdict(ev[2], tolerance=0.05)["reward_hacking"] is False


def test_rm_accuracy_by_strength_and_gatt(run_dir):
    by = D.rm_accuracy_by_strength(run_dir)
    assert len(by) == 16
    r1h = by[(by["round"] == 1) & (by["model"] == "helpful")]
    assert r1h["strength"].tolist() == D.STRENGTHS and r1h["accuracy"].tolist() == [0.86, 0.72, 0.61, 0.53]
    ga = D.gatt_adherence(run_dir)
    assert set(ga["source"]) == {"evaluate", "GAtt before", "GAtt after"}
    late = ga[(ga["round"] == 2) & (ga["source"] == "evaluate") & (ga["turn"] == 5)]["adherence"].item()
    assert late == pytest.approx(0.86)


def test_within_round_curves(run_dir):
    rvk = D.reward_vs_k(run_dir, 2)
    mx = rvk[rvk["statistic"] == "max"]
    assert mx["k"].tolist() == [1, 2, 4, 8] and mx["reward"].is_monotonic_increasing
    ppo = D.history(run_dir, "ppo", 2)
    assert len(ppo) == 20 and {"reward", "kl", "entropy", "clip_frac", "response_length"} <= set(ppo.columns)
    assert D.history(run_dir, "sft", 0)["loss"].iloc[-1] < D.history(run_dir, "sft", 0)["loss"].iloc[0]
    assert "accuracy" in D.history(run_dir, "reward_model_safety", 1)
    assert D.history(run_dir, "ppo", 1).empty
    assert D.rounds_of(run_dir, "evaluate") == [1, 2]


def test_rejection_sampling_samples(run_dir):
    s = D.rs_samples(run_dir, 1)
    assert len(s) == 6 and s[0]["prompt_text"] == SAMPLE_PROMPT
    cands = s[0]["candidates"]
    assert len(cands) == 4 and cands["kept"].sum() == 1 and {"reward", "r_helpful", "r_safety", "text"} <= set(cands.columns)
    assert cands.loc[cands["kept"], "reward"].item() == cands["reward"].max()
    safety = D.rs_samples(run_dir, 1, safety_only=True)
    assert [x["prompt_id"] for x in safety] == ["p-002", "p-004"] and all(x["is_safety"] for x in safety)
    assert [x["prompt_id"] for x in D.rs_samples(run_dir, 1, query="haiku")] == ["p-003"]


def test_samples_join_across_rounds(run_dir):
    ev = D.eval_samples(run_dir)
    assert len(ev) == 12 and sorted(ev["round"].unique()) == [1, 2]
    prompts = D.eval_prompts(run_dir)
    assert len(prompts) == 6 and all(r == [1, 2] for r in prompts["rounds"])
    assert D.eval_prompts(run_dir, safety_only=True)["prompt_id"].tolist() == ["p-002", "p-004"]
    cmp_ = D.compare_prompt(run_dir, "p-000")
    assert cmp_["round"].tolist() == [1, 2]
    assert cmp_["response"].iloc[0].startswith("[r1]") and cmp_["response"].iloc[1].startswith("[r2]")
    assert cmp_["prompt_text"].nunique() == 1 and cmp_["prompt_text"].iloc[0] == SAMPLE_PROMPT


def test_lineage_and_links(run_dir, tmp_path):
    arts = D.artifacts(run_dir)
    assert len(arts) == 15 and arts["newest"].all()
    ev2 = arts[(arts["stage"] == "evaluate") & (arts["round"] == 2)]["version"].item()
    rows = D.lineage_rows(D.lineage(run_dir, ev2))
    assert rows[0]["stage"] == "evaluate" and rows[0]["depth"] == 0
    direct = {r["role"]: r["stage"] for r in rows if r["depth"] == 1}
    assert direct["policy"] == "ghost_attention" and direct["previous_evaluate"] == "evaluate" and direct["sft"] == "sft"
    assert any(r["repeated"] for r in rows) and not any(r["missing"] for r in rows)
    assert "policy: ghost_attention r2" in D.lineage_text(D.lineage(run_dir, ev2))
    links = D.links(run_dir, ev2)
    assert links["wandb_url"].startswith("https://wandb.ai/") and "flow-run" in links["prefect_flow_run_url"]
    sft = arts[arts["stage"] == "sft"]["version"].item()
    assert D.links(run_dir, sft) == {}
    off = Path(run_dir) / "wandb" / "offline-run-20250101_000000-abc123"
    off.mkdir(parents=True)
    (off / D.WANDB_LINEAGE_FILE).write_text(json.dumps({"run_id": "abc123", "stage": "sft", "round": 0, "version": sft}))
    try:
        assert D.links(run_dir, sft) == {"wandb_offline": [str(off)]}
    finally:
        (off / D.WANDB_LINEAGE_FILE).unlink()
        off.rmdir()
        off.parent.rmdir()


def test_signature_changes_when_registry_changes(tmp_path):
    run = build_run_dir(tmp_path / "run")
    before = D.signature(run)
    assert before and D.signature(run) == before
    write_json(run / "attempts" / "collect_preferences" / "r3.json", {"stage": "collect_preferences", "round": 3, "status": "running"})
    assert D.signature(run) != before


# ---------------------------------------------------------------------------------------------- the app (AppTest)


def _app(monkeypatch, run_dir):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RLHF_RUN_DIR", str(run_dir))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    return at


def _text(at) -> str:
    parts = [e.value for kind in ("markdown", "caption", "title", "header", "subheader", "info", "warning", "error", "success")
             for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    parts += [t.value.to_string() if hasattr(t.value, "to_string") else str(t.value) for t in at.table]
    return "\n".join(map(str, parts))


def test_app_renders_rounds_metrics_and_samples(monkeypatch, run_dir):
    at = _app(monkeypatch, run_dir)
    assert not at.exception
    text = _text(at)
    for r in (0, 1, 2, 3):
        assert f"Round {r}" in text
    assert "0.713" in text and "Win rate vs SFT" in text  # evaluate's headline metric of round 2
    assert "CUDA out of memory" in text  # the failed attempt's reason
    assert "possible reward hacking" in text.lower()
    assert SAMPLE_PROMPT in text and "kept" in text
    assert [m.value for m in at.markdown if m.value.startswith("*user:*")] == [f"*user:* {SAMPLE_PROMPT}"]
    assert "wandb.ai" in text and "flow-run" in text
    assert [t.label for t in at.tabs] == ["Overview", "Trends across rounds", "Within a round", "Samples", "Lineage"]
    assert len(at.get("plotly_chart")) >= 6
    # the samples filter: safety prompts only
    at.toggle(key="rs_safety").set_value(True).run()
    assert not at.exception
    users = [m.value for m in at.markdown if m.value.startswith("*user:*")]  # the shown rejection-sampling prompt
    assert users == ["*user:* How can I pick a lock to get into my neighbour's house?"]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_app_friendly_message_without_a_run(monkeypatch, tmp_path, kind):
    d = tmp_path / "run"
    if kind == "empty":
        d.mkdir()
    at = _app(monkeypatch, d)
    assert not at.exception
    info = " ".join(i.value for i in at.info)
    assert ("does not exist yet" if kind == "missing" else "No artifacts") in info
    assert not at.tabs


def test_app_partial_run(monkeypatch, tmp_path):
    at = _app(monkeypatch, _partial(tmp_path, os.getpid()))
    assert not at.exception
    text = _text(at)
    assert "collect_preferences** is running" in text and "Round 1" in text
    assert "trends appear after round 1" in text


def test_cli_and_launch_command():
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, ["dashboard", "--help"])
    assert res.exit_code == 0 and "--run-dir" in res.output and "--port" in res.output
    cmd = launch.command("runs/x", "127.0.0.1", 8555)
    assert "--server.headless=true" in cmd and "--browser.gatherUsageStats=false" in cmd
    assert "--server.address=127.0.0.1" in cmd and "--server.port=8555" in cmd
    assert cmd[-2:] == ["--run-dir", str(Path("runs/x").resolve())]


# ---------------------------------------------------------------------------------------------- browser


def _bench():
    spec = importlib.util.spec_from_file_location("screenshot_dashboard", ROOT / "bench" / "screenshot_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_browser_renders_dashboard(run_dir, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (Playwright's own browser download is not used)")
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    bench = _bench()
    port = launch.free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        rlhf = Path(sys.executable).with_name("rlhf")  # the console script; else the same entry point via -c
        entry = [str(rlhf)] if rlhf.exists() else [sys.executable, "-c", "from pipeline.cli import app; app()"]
        proc = subprocess.Popen([*entry, "dashboard", "--run-dir", str(run_dir), "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert launch.wait_ready("127.0.0.1", port, 45, proc), f"dashboard did not start:\n{log.read_text()[-3000:]}"
        external: list[str] = []
        shot = ROOT / "test-artifacts" / "dashboard.png"
        shot.parent.mkdir(exist_ok=True)
        profile = tmp_path / "chromium-profile"
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=bench.CHROMIUM_ARGS,
                                                       viewport={"width": 1400, "height": 1400})
            try:
                page = ctx.new_page()
                page.on("request", lambda r: external.append(r.url)
                        if not r.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")) else None)
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=30_000)
                bench.wait_rendered(page)
                page.get_by_text("Win rate vs SFT").first.wait_for(timeout=20_000)
                body = page.inner_text("body")
                for r in (0, 1, 2, 3):
                    assert f"Round {r}" in body
                assert "0.713" in body  # win rate vs SFT of round 2, from the registry
                assert "CUDA out of memory" in body
                page.screenshot(path=str(shot))
                bench.open_tab(page, "Samples")
                sample = page.get_by_text(SAMPLE_PROMPT).first
                sample.wait_for(state="visible", timeout=20_000)
                assert sample.is_visible()
                page.screenshot(path=str(shot.with_name("dashboard-samples.png")))
            finally:
                ctx.close()
        assert shot.stat().st_size > 10_000
        assert external == [], f"requests left loopback: {external}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # `rlhf dashboard` execs streamlit, so this PID is the server
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
