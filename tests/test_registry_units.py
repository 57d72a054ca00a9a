"""Registry behaviour in milliseconds (no stage runs), for the mutation selection of pipeline/registry.py:
commit and find, verify finding every kind of change (fast path and full), check, lineage, prefixes."""
from __future__ import annotations

import os

import pytest

from pipeline.errors import CorruptArtifact
from pipeline.registry import Registry


def _commit(reg, stage, round, version, files, inputs=None):
    build = reg.new_build_dir(stage, round, version)
    for name, text in files.items():
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).write_text(text)
    return reg.commit(build, {"stage": stage, "round": round, "version": version, "inputs": inputs or {}, "metrics": {"x": 1}})


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "run")
    _commit(r, "data", 0, "aaaa11112222", {"a.jsonl": "{}\n"})
    _commit(r, "sft", 0, "bbbb11112222", {"model.bin": "weights", "sub/x.txt": "x"},
            inputs={"data": {"stage": "data", "round": 0, "version": "aaaa11112222"}})
    return r


def test_commit_and_find(reg):
    a = reg.find("sft", 0)
    assert a is not None and a.version == "bbbb11112222" and a.stage == "sft" and a.round == 0 and a.metrics == {"x": 1}
    assert reg.find("sft", 0, "bbbb11112222").path == a.path and reg.find("sft", 0, "ffff00000000") is None
    assert reg.find("sft", 1) is None and reg.find("ppo", 0) is None
    assert set(a.manifest["files"]) == {"model.bin", "sub/x.txt"} and a.manifest["status"] == "complete"
    assert a.file("model.bin").read_text() == "weights"
    assert [x.version for x in reg.versions("sft", 0)] == ["bbbb11112222"]
    assert reg.by_version("bbbb").version == "bbbb11112222" and reg.by_version("cccc") is None
    assert {x.stage for x in reg.iter_artifacts()} == {"data", "sft"}
    assert not list(reg.artifacts_dir.glob("*/.tmp-*"))  # the build directory was renamed into place


def test_verify_is_empty_for_an_intact_artifact(reg):
    a = reg.find("sft", 0)
    assert reg.verify(a) == [] and reg.verify(a, full=True) == []
    assert reg.check(a) is a


def test_verify_finds_a_changed_size_a_changed_content_and_a_missing_file(reg):
    a = reg.find("sft", 0)
    a.file("model.bin").write_text("weights, longer")
    assert reg.verify(a) == ["model.bin"]
    a.file("model.bin").write_text("WEIGHTS")  # same size, new mtime: hashed
    assert reg.verify(a) == ["model.bin"]
    a.file("sub/x.txt").unlink()
    assert reg.verify(a) == ["model.bin", "sub/x.txt"]
    with pytest.raises(CorruptArtifact, match="model.bin"):
        reg.check(a)


def test_a_change_that_keeps_size_and_mtime_is_found_by_the_full_check(reg):
    a = reg.find("sft", 0)
    f = a.file("model.bin")
    st = f.stat()
    f.write_text("WEIGHTS")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reg.verify(a, full=True) == ["model.bin"]


def test_a_forced_rebuild_replaces_the_complete_copy(reg):
    a = _commit(reg, "sft", 0, "bbbb11112222", {"model.bin": "new weights"})
    assert a.file("model.bin").read_text() == "new weights" and reg.verify(a) == []
    assert [x.version for x in reg.versions("sft", 0)] == ["bbbb11112222"]
    assert not list((reg.artifacts_dir / "sft").glob(".old-*"))


def test_lineage_follows_inputs(reg):
    tree = reg.lineage(reg.find("sft", 0))
    assert tree["stage"] == "sft" and tree["version"] == "bbbb11112222"
    (child,) = tree["inputs"]
    assert child["role"] == "data" and child["stage"] == "data" and child["version"] == "aaaa11112222" and not child.get("missing")


# ---------------------------------------------------------------- leftovers, leases, attempts, scan and repair
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from pipeline import locks  # noqa: E402
from pipeline.registry import _build_key  # noqa: E402


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lease(reg, stage, round, version, **info):
    path = reg.lease_path(stage, round, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "token": "t", "ttl_s": 60, "heartbeat_at": time.time(), **info}))
    return path


def test_build_key_parses_hidden_build_names():
    assert _build_key(".tmp-r3-abcdef012345-77-123") == (3, "abcdef012345")
    assert _build_key(".old-r0-abcdef012345-123") == (0, "abcdef012345")
    assert _build_key(".tmp-rx-abc-1-2") is None and _build_key("r0-abc") is None and _build_key(".tmp-r1-a") is None


def test_corrupt_and_incomplete_manifests(reg):
    sft = reg.find("sft", 0)
    (sft.path / "manifest.json").write_text("{broken")
    with pytest.raises(CorruptArtifact, match="unreadable manifest"):
        reg.find("sft", 0, "bbbb11112222")
    assert {a.stage for a in reg.iter_artifacts()} == {"data"}  # listings skip it
    (sft.path / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(CorruptArtifact, match="not a manifest"):
        reg.find("sft", 0, "bbbb11112222")
    (sft.path / "manifest.json").write_text(json.dumps({"stage": "sft", "round": 0, "version": "bbbb11112222", "status": "running"}))
    assert reg.find("sft", 0, "bbbb11112222") is None and reg.find("sft", 0) is None


def test_lineage_marks_a_missing_parent(reg):
    import shutil

    shutil.rmtree(reg.find("data", 0).path)
    (child,) = reg.lineage(reg.find("sft", 0))["inputs"]
    assert child["missing"] and child["version"] == "aaaa11112222" and child["inputs"] == []


def test_attempt_status_follows_the_builder(reg):
    base = {"status": "running", "version": "cccc11112222", "started_at": 1.0}
    reg.record_attempt("ppo", 1, **base, pid=os.getpid(), host=socket.gethostname())
    assert [a["status"] for a in reg.attempts()] == ["running"]  # alive here, no lease file (older versions)
    reg.record_attempt("ppo", 1, **base, pid=_dead_pid(), host=socket.gethostname())
    (att,) = reg.attempts()
    assert att["status"] == "interrupted" and "stopped without finishing" in att["error"]
    _lease(reg, "ppo", 1, "cccc11112222")  # another host holds it, heartbeat fresh
    (att,) = reg.attempts()
    assert att["status"] == "running" and "other-host" in att["lease"]
    _lease(reg, "ppo", 1, "cccc11112222", heartbeat_at=time.time() - 120)  # silent for longer than its ttl
    assert [a["status"] for a in reg.attempts()] == ["interrupted"]
    reg.record_attempt("ppo", 1, status="failed", version="cccc11112222", error="boom")
    assert reg.attempts()[0]["status"] == "failed" and reg.attempts()[0]["error"] == "boom"


def test_cleanup_removes_only_builds_nobody_holds(reg):
    live = reg.new_build_dir("ppo", 1, "cccc11112222")
    dead = reg.new_build_dir("ppo", 1, "dddd11112222")
    old = reg.artifacts_dir / "ppo" / ".old-r1-eeee11112222-5"
    old.mkdir()
    _lease(reg, "ppo", 1, "cccc11112222")
    reg.clean_stale_builds()
    assert live.is_dir() and not dead.exists() and not old.exists()
    other_round = reg.new_build_dir("ppo", 2, "cccc11112222")
    reg.clean_builds("ppo", 1, "cccc11112222")
    assert not live.exists() and other_round.is_dir()  # only this round and version


def test_scan_reports_each_kind_and_repair_fixes_it(reg):
    assert reg.scan() == [] and reg.repair() == []
    data, sft = reg.find("data", 0), reg.find("sft", 0)
    data.file("a.jsonl").write_text("{} \n")  # tampered
    (sft.path / "manifest.json").write_text("{")  # corrupt
    leftover = reg.new_build_dir("ppo", 1, "cccc11112222")
    held = reg.new_build_dir("ppo", 1, "ffff11112222")
    _lease(reg, "ppo", 1, "ffff11112222")
    stale = _lease(reg, "rejection_sampling", 1, "9999aaaabbbb", heartbeat_at=0)
    reg.record_attempt("rejection_sampling", 1, status="running", version="9999aaaabbbb", pid=_dead_pid(), host=socket.gethostname())
    tmp = reg.work_dir("rejection_sampling", 1, "9999aaaabbbb") / "train_state.pt.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_text("half")
    kinds = sorted(p["kind"] for p in reg.scan())
    assert kinds == ["corrupt_manifest", "interrupted", "leftover_build", "stale_lease", "tampered"]
    assert all(p["path"] and p["fix"] for p in reg.scan())
    assert reg.scan(full=False) and reg.scan(full=False)[0]["kind"]
    done = "\n".join(reg.repair())
    assert "quarantined" in done and "removed leftover build" in done and "removed stale lease" in done
    assert "recorded rejection_sampling r1 as interrupted" in done and "train_state.pt.tmp" in done
    assert not data.path.exists() and not sft.path.exists() and not leftover.exists() and not stale.exists() and not tmp.exists()
    assert held.is_dir()  # a live build stays
    assert len(list((reg.run_dir / "quarantine").glob("*/*"))) == 2
    assert reg.scan() == [] or {p["kind"] for p in reg.scan()} <= {"interrupted"}


def test_lease_through_the_registry(reg):
    lease = reg.lease("sft", 0, "bbbb11112222", wait=False)
    assert lease is not None and reg.lease_path("sft", 0, "bbbb11112222").is_file()
    assert reg.lease("sft", 0, "bbbb11112222", wait=False) is None  # held by us
    lease.release()
    assert not reg.lease_path("sft", 0, "bbbb11112222").exists()
    assert locks.lease_state(reg.lease_path("sft", 0, "bbbb11112222")) == "free"
