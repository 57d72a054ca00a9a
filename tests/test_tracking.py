"""W&B tracking with the real wandb library in offline mode (no mocks): what lands on disk.

wandb 0.31 writes an offline run as one `run-<id>.wandb` transaction log (a LevelDB-style log of
`wandb_internal_pb2.Record` protobufs); it has no Python reader any more, so `read_records` below
decodes it (7-byte file header, 32 KiB blocks, records with a crc/length/type header).
"""
import base64
import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.stages import StageSpec
from pipeline.tracking import tracker_factory


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        if pos + length > len(data):  # still being written
            return
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:  # full
            buf = chunk
        elif kind == 2:  # first
            buf = chunk
            continue
        else:  # middle / last
            buf += chunk
            if kind == 3:
                continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        yield rec


def summarize(run_dir: Path, timeout: float = 30) -> dict:
    """What one offline run recorded: run fields, config, summary, history rows, artifacts."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    # wandb-core may still be writing the log when run.finish() returns: wait for the exit record
    t0 = time.time()
    while not any(r.WhichOneof("record_type") == "exit" for r in read_records(wandb_file)) and time.time() - t0 < timeout:
        time.sleep(0.2)
    out = {"run": None, "config": {}, "summary": {}, "history": [], "artifacts": [], "exit": None}
    for rec in read_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            for u in rec.summary.update:
                key = u.key or "/".join(u.nested_key)
                out["summary"][key] = json.loads(u.value_json)
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def make_data(ctx):
    (ctx.out_dir / "prompts.json").write_text(json.dumps(["a", "b", "c"]))
    (ctx.out_dir / "weights.bin").write_bytes(b"\0" * (6 * 1024 * 1024))  # > 5 MB: a file:// reference
    for step in range(3):
        ctx.log({"loss": 1.0 / (step + 1), "nested": {"lr": 0.1}}, step=step)
    return {"n": 3, "stats": {"mean": 0.5, "hist": [1, 2, 3]}, "rows": [1, 2]}


def make_model(ctx):
    prompts = json.loads(ctx.input("data").file("prompts.json").read_text())
    (ctx.out_dir / "model.txt").write_text("|".join(prompts))
    ctx.log({"reward": 0.7}, step=0)
    return {"accuracy": 0.75, "stop_reason": "done"}


def explode(ctx):
    raise RuntimeError("boom")


SPECS = {
    "collect_preferences": StageSpec("collect_preferences", make_data, lambda c, r: {}, artifact_type="dataset", rounds="rlhf"),
    "reward_model_helpful": StageSpec("reward_model_helpful", make_model,
                                      lambda c, r: {"data": ("collect_preferences", r)}, artifact_type="model", rounds="rlhf"),
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)  # the tracker sets them; monkeypatch restores them
    return home


def test_stage_runs_are_offline_wandb_runs_with_artifacts(tmp_path, home):
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=offline", "name=trk"])
    runner = Runner(cfg, specs=SPECS, tracker_factory=tracker_factory(cfg), echo=None, show_progress=False)
    data = runner.run_stage("collect_preferences", 1).artifact
    model = runner.run_stage("reward_model_helpful", 1).artifact

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    paths = {summarize(p)["run"].job_type: p for p in runs}
    by_job = {job: summarize(p) for job, p in paths.items()}
    assert set(by_job) == {"collect_preferences", "reward_model_helpful"}

    d = by_job["collect_preferences"]
    assert d["run"].run_group == "trk" and d["run"].display_name == "collect_preferences-r1"
    assert list(d["run"].tags) == ["round-1"] and d["run"].project == cfg.tracking.project
    assert d["config"]["stage"]["prompts_per_round"] == cfg.collect_preferences.prompts_per_round
    assert d["config"]["seed"] == cfg.seed and d["config"]["version"] == data.version and d["config"]["inputs"] == {}
    assert [h["loss"] for h in d["history"]] == [1.0, 0.5, 1.0 / 3]
    assert [h["step"] for h in d["history"]] == [0, 1, 2] and d["history"][0]["nested/lr"] == 0.1
    assert d["summary"]["n"] == 3 and d["summary"]["stats/mean"] == 0.5
    assert "stats/hist" not in d["summary"] and "rows" not in d["summary"]
    (art,) = d["artifacts"]
    assert (art.name, art.type) == ("trk-collect_preferences", "dataset")  # the run's name: no `latest` clash across runs
    assert {"round-1", "latest"} <= set(art.aliases)
    meta = json.loads(art.metadata)
    assert meta["version"] == data.version and meta["round"] == 1 and meta["stage"] == "collect_preferences"
    assert meta["run_dir"] == str(run_dir.resolve())
    entries = {c.path: c for c in art.manifest.contents}
    assert set(entries) == {"prompts.json", "weights.bin", "manifest.json", "metrics.jsonl"}
    assert entries["weights.bin"].ref == (data.path / "weights.bin").resolve().as_uri()  # large: referenced
    md5 = base64.b64encode(hashlib.md5((data.path / "weights.bin").read_bytes()).digest()).decode()
    assert entries["weights.bin"].digest == md5  # ... with W&B's checksum of the file, verified on download
    assert not entries["prompts.json"].ref and entries["prompts.json"].local_path  # small: copied
    assert Path(entries["prompts.json"].local_path).resolve().is_relative_to(run_dir.resolve())
    assert d["exit"] == 0

    m = by_job["reward_model_helpful"]
    assert m["config"]["inputs"]["data"]["stage"] == "collect_preferences"
    assert m["config"]["inputs"]["data"]["version"] == data.version and m["config"]["inputs"]["data"]["digest"]
    assert m["summary"]["accuracy"] == 0.75 and m["summary"]["stop_reason"] == "done"
    (art,) = m["artifacts"]
    assert (art.name, art.type) == ("trk-reward_model_helpful", "model") and json.loads(art.metadata)["version"] == model.version
    lineage = json.loads((paths["reward_model_helpful"] / "rlhf-lineage.json").read_text())
    assert lineage["inputs"]["data"]["version"] == data.version
    assert lineage["inputs"]["data"]["artifact"] == f"trk-collect_preferences:version-{data.version}"  # what `rlhf sync` uses

    # nothing under the fake HOME; everything W&B wrote is under the run directory
    assert [p for p in home.rglob("*")] == []

    # a cache hit is not a new W&B run
    runner.run_stage("reward_model_helpful", 1)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2


def test_failed_stage_is_a_failed_run_and_tracking_errors_never_fail_a_stage(tmp_path, home, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=offline"])
    specs = {"collect_preferences": StageSpec("collect_preferences", explode, lambda c, r: {}, rounds="rlhf")}
    with pytest.raises(RuntimeError, match="boom"):
        Runner(cfg, specs=specs, tracker_factory=tracker_factory(cfg), echo=None).run_stage("collect_preferences", 1)
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    s = summarize(run)
    assert s["exit"] == 1 and "boom" in s["summary"]["failed"] and s["artifacts"] == []

    import wandb

    def broken_init(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="disk full"):
        res = Runner(cfg, specs=SPECS, tracker_factory=tracker_factory(cfg), echo=None).run_stage("collect_preferences", 1)
    assert not res.cached and res.artifact.metrics["n"] == 3


def test_artifact_names_carry_the_run_name():
    from pipeline.wandb_tracker import artifact_name

    assert artifact_name("demo", "sft") == "demo-sft"
    assert artifact_name("my run/7b:v2", "ppo") == "my-run-7b-v2-ppo"  # W&B's character set
    assert artifact_name("a", "sft") != artifact_name("b", "sft")


def test_disabled_mode_has_no_tracker_and_sync_needs_a_key(tmp_path, home):
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "tracking.mode=disabled"])
    assert tracker_factory(cfg) is None
    from pipeline.cli import app

    (tmp_path / "run" / "wandb" / "offline-run-20250101_000000-abc").mkdir(parents=True)
    out = CliRunner().invoke(app, ["sync", "--run-dir", str(tmp_path / "run")])
    assert out.exit_code == 2 and "WANDB_API_KEY" in out.output
