"""Registry behaviour in milliseconds (no stage runs), for the mutation selection of pipeline/registry.py:
commit and find, verify finding every kind of change (fast path and full), check, lineage, prefixes."""
from __future__ import annotations

import os

import pytest

from pipeline.errors import CorruptArtifact
from pipeline.registry import Registry


def _commit(reg, stage, round, version, files, inputs=None, **manifest):
    build = reg.new_build_dir(stage, round, version)
    for name, text in files.items():
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).write_text(text)
    return reg.commit(build, {"stage": stage, "round": round, "version": version, "inputs": inputs or {}, "metrics": {"x": 1},
                              **manifest})


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


# ---------------------------------------------------------------- what users and other tools read: layout, exact messages,
# orderings; concurrent cleaners (the mutation run showed these untested)
import hashlib  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pipeline.registry as registry_module  # noqa: E402
from pipeline.registry import Artifact, _read_manifest  # noqa: E402


def test_run_directory_layout(tmp_path):
    """The layout in the module docstring, which the dashboard, `rlhf status` and people read directly."""
    run = tmp_path / "run"
    reg = Registry(run)
    assert (reg.artifacts_dir, reg.attempts_dir, reg.work_root, reg.locks_dir, reg.quarantine_dir) == (
        run / "artifacts", run / "attempts", run / "work", run / "locks", run / "quarantine")
    reg.record_attempt("ppo", 1, status="running")
    assert json.loads((run / "attempts" / "ppo" / "r1.json").read_text()) == {"stage": "ppo", "round": 1, "status": "running"}
    assert reg.lease_path("ppo", 1, "v1") == run / "locks" / "ppo" / "r1-v1.lease"
    assert reg.work_dir("ppo", 1, "v1") == run / "work" / "ppo" / "r1-v1"


def test_manifest_errors_name_the_file_the_cause_and_the_command_to_fix_it(reg):
    sft = reg.find("sft", 0)
    path = sft.path / "manifest.json"
    fix = f"run `rlhf repair --run-dir {reg.run_dir}` or rebuild the stage with --force"
    path.write_text("{broken")
    with pytest.raises(CorruptArtifact) as e:
        reg.find("sft", 0, "bbbb11112222")
    assert str(e.value).startswith(f"{path}: unreadable manifest (JSONDecodeError: ") and str(e.value).endswith(f"); {fix}")
    path.write_text(json.dumps({"stage": "sft", "round": 0}))
    with pytest.raises(CorruptArtifact) as e:
        reg.find("sft", 0, "bbbb11112222")
    assert str(e.value) == f"{path}: not a manifest (stage, round or version missing); {fix}"
    path.write_text(json.dumps({"stage": "sft", "round": 0, "version": "bbbb11112222"}))  # the three keys suffice
    assert _read_manifest(sft.path) == {"stage": "sft", "round": 0, "version": "bbbb11112222"}


def test_check_names_five_files_and_counts_the_rest(tmp_path):
    reg = Registry(tmp_path / "run")
    names = [f"f{i}.txt" for i in range(7)]
    a = _commit(reg, "sft", 0, "bbbb11112222", {n: "x" for n in names})
    for n in names[:6]:
        a.file(n).write_text("changed")
    tail = (f" no longer match the checksums in its manifest. Rebuild it with "
            f"`rlhf stage sft --round 0 --force --run-dir {reg.run_dir}`, or move it aside with `rlhf repair --run-dir {reg.run_dir}`")
    listed = ", ".join(str(a.path / n) for n in names[:5])
    with pytest.raises(CorruptArtifact) as e:
        reg.check(a)
    assert str(e.value) == f"artifact sft round 0 (bbbb11112222) was modified after it was built: {listed} and 1 more{tail}"
    a.file(names[5]).write_text("x")  # five changed files: all named, nothing counted
    with pytest.raises(CorruptArtifact) as e:
        reg.check(a)
    assert str(e.value) == f"artifact sft round 0 (bbbb11112222) was modified after it was built: {listed}{tail}"


def test_commit_records_each_files_checksum_size_and_mtime(reg):
    a = reg.find("sft", 0)
    st = a.file("model.bin").stat()
    assert a.manifest["files"]["model.bin"] == {"sha256": hashlib.sha256(b"weights").hexdigest(), "bytes": 7,
                                                "mtime_ns": st.st_mtime_ns}


def test_verify_hashes_only_when_size_and_mtime_do_not_settle_it(reg, monkeypatch):
    a = reg.find("sft", 0)
    hashed = []
    real = registry_module.sha256_file
    monkeypatch.setattr(registry_module, "sha256_file", lambda f: hashed.append(Path(f).name) or real(f))
    assert reg.verify(a) == [] and hashed == []  # fast path: size and mtime as recorded
    assert reg.verify(a, full=True) == [] and sorted(hashed) == ["model.bin", "x.txt"]
    hashed.clear()
    a.file("model.bin").write_text("weights, longer")
    assert reg.verify(a) == ["model.bin"] and hashed == []  # a new size is a change without reading the file


def test_verify_reports_every_file_after_a_missing_one(reg):
    a = reg.find("sft", 0)
    a.file("model.bin").unlink()
    a.file("sub/x.txt").write_text("y")
    assert reg.verify(a) == ["model.bin", "sub/x.txt"]


def test_verify_reads_older_manifests_without_sizes_or_files(reg):
    a = reg.find("sft", 0)
    no_sizes = {n: {k: v for k, v in info.items() if k != "bytes"} for n, info in a.manifest["files"].items()}
    assert reg.verify(Artifact(a.path, {**a.manifest, "files": no_sizes})) == []
    assert reg.verify(Artifact(a.path, {k: v for k, v in a.manifest.items() if k != "files"})) == []


def test_scan_and_repair_hash_every_file_by_default(reg):
    a = reg.find("sft", 0)
    f = a.file("model.bin")
    st = f.stat()
    f.write_text("WEIGHTS")  # same size, and the mtime put back: only a checksum sees it
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reg.verify(a) == [] and reg.scan(full=False) == []
    assert [(p["kind"], p["path"]) for p in reg.scan()] == [("tampered", str(f))]
    assert reg.repair()[0].startswith(f"quarantined {a.path} -> ")


def test_find_and_versions_order_by_finish_time(tmp_path):
    reg = Registry(tmp_path / "run")
    _commit(reg, "sft", 0, "aaaa11112222", {"m": "1"}, finished_at=100.0)
    _commit(reg, "sft", 0, "bbbb11112222", {"m": "2"}, finished_at=200.0)
    _commit(reg, "sft", 0, "cccc11112222", {"m": "3"})  # a manifest without finished_at ranks oldest
    assert reg.find("sft", 0).version == "bbbb11112222"
    assert [a.version for a in reg.versions("sft", 0)] == ["bbbb11112222", "aaaa11112222", "cccc11112222"]


def test_lineage_follows_the_pinned_version_and_names_missing_parents(tmp_path):
    reg = Registry(tmp_path / "run")
    _commit(reg, "data", 0, "aaaa11112222", {"a": "1"}, finished_at=1.0)
    _commit(reg, "data", 0, "ffff11112222", {"a": "2"}, finished_at=2.0)  # newer, but not what sft was built from
    sft = _commit(reg, "sft", 0, "bbbb11112222", {"m": "w"}, inputs={
        "data": {"stage": "data", "round": 0, "version": "aaaa11112222"},
        "prefs": {"stage": "collect_preferences", "round": 1, "version": "9999aaaabbbb"}})
    assert reg.lineage(sft) == {"stage": "sft", "round": 0, "version": "bbbb11112222", "inputs": [
        {"role": "data", "stage": "data", "round": 0, "version": "aaaa11112222", "inputs": []},
        {"role": "prefs", "stage": "collect_preferences", "round": 1, "version": "9999aaaabbbb", "missing": True, "inputs": []}]}


def test_listings_and_scan_step_over_stray_entries(reg):
    data, sft = reg.find("data", 0), reg.find("sft", 0)
    (reg.artifacts_dir / "README").write_text("x")  # a stray file among the stage directories (sorts first)
    (reg.artifacts_dir / "data" / "NOTES").write_text("x")  # and among data's artifacts (sorts first)
    shutil.copytree(sft.path, sft.path.with_name(".old-r0-bbbb11112222-5"))  # a replaced copy, complete manifest and all
    broken = sft.path.with_name("r0-0000aaaabbbb")  # sorts before sft's artifact
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    sft.path.with_name("r0-0001aaaabbbb").mkdir()  # no manifest at all
    assert sorted((a.stage, a.version) for a in reg.iter_artifacts()) == [("data", "aaaa11112222"), ("sft", "bbbb11112222")]
    data.file("a.jsonl").write_text("{} \n")
    sft.file("model.bin").write_text("WEIGHTS")
    assert sorted((p["kind"], Path(p["path"]).relative_to(reg.artifacts_dir).parts[1]) for p in reg.scan()) == [
        ("corrupt_manifest", "r0-0000aaaabbbb"), ("corrupt_manifest", "r0-0001aaaabbbb"),
        ("leftover_build", ".old-r0-bbbb11112222-5"), ("tampered", "r0-aaaa11112222"), ("tampered", "r0-bbbb11112222")]


def test_scan_details_and_fixes_name_what_and_how(reg):
    data, sft = reg.find("data", 0), reg.find("sft", 0)
    data.file("a.jsonl").write_text("{} \n")
    (sft.path / "manifest.json").write_text("{")
    leftover = reg.new_build_dir("ppo", 1, "cccc11112222")
    stale = _lease(reg, "rejection_sampling", 1, "9999aaaabbbb", heartbeat_at=0, pid=4242)
    reg.record_attempt("rejection_sampling", 1, status="running", version="9999aaaabbbb", pid=_dead_pid(),
                       host=socket.gethostname(), error="killed by the OOM killer")
    by = {p["kind"]: p for p in reg.scan()}
    assert by["leftover_build"] == {"kind": "leftover_build", "path": str(leftover), "detail": "an interrupted build's files",
                                    "fix": "removed by `rlhf repair` (or the next build of that version)"}
    corrupt = by.pop("corrupt_manifest")
    assert corrupt["path"] == str(sft.path / "manifest.json")
    assert corrupt["fix"] == "`rlhf repair` moves it to quarantine/, then rerun the stage"
    # the detail is the error up to the advice (scan's fix replaces it)
    assert corrupt["detail"].startswith(f"{sft.path / 'manifest.json'}: unreadable manifest (JSONDecodeError: ")
    assert corrupt["detail"].endswith(")") and ";" not in corrupt["detail"]
    assert by["tampered"] == {"kind": "tampered", "path": str(data.path / "a.jsonl"),
                              "detail": "data r0 aaaa11112222: checksum differs from the manifest",
                              "fix": "`rlhf stage data --round 0 --force` or `rlhf repair`"}
    assert by["stale_lease"]["path"] == str(stale) and by["stale_lease"]["detail"].startswith("pid 4242 on other-host (heartbeat ")
    assert by["stale_lease"]["fix"] == "taken over by the next builder, or removed by `rlhf repair`"
    assert by["interrupted"] == {"kind": "interrupted", "path": str(reg.attempts_dir / "rejection_sampling" / "r1.json"),
                                 "detail": "rejection_sampling r1 9999aaaabbbb: killed by the OOM killer",
                                 "fix": "`rlhf stage rejection_sampling --round 1` resumes it"}


def test_an_interrupted_attempt_keeps_its_error_or_names_the_builder(reg):
    host, pid = socket.gethostname(), _dead_pid()
    reg.record_attempt("ppo", 1, status="running", version="cccc11112222", pid=pid, host=host)
    (att,) = reg.attempts()
    assert att["status"] == "interrupted"
    assert att["error"] == f"the builder (pid {pid} on {host}) stopped without finishing; rerun to resume"
    reg.record_attempt("ppo", 1, status="running", version="cccc11112222", pid=pid, host=host, error="CUDA out of memory")
    (att,) = reg.attempts()
    assert att["status"] == "interrupted" and att["error"] == "CUDA out of memory"


def test_an_unreadable_attempt_file_is_skipped_not_the_rest(reg):
    (reg.attempts_dir / "collect").mkdir(parents=True)
    (reg.attempts_dir / "collect" / "r1.json").write_text("{")  # sorts first
    reg.record_attempt("sft", 0, status="failed", version="bbbb11112222", error="boom")
    assert [(a["stage"], a["status"]) for a in reg.attempts()] == [("sft", "failed")]


def test_repair_records_a_dead_builders_attempt_as_interrupted(reg):
    pid, host = _dead_pid(), socket.gethostname()
    reg.record_attempt("ppo", 1, status="running", version="cccc11112222", pid=pid, host=host, started_at=5.0)
    assert reg.repair() == ["recorded ppo r1 as interrupted"]
    assert json.loads((reg.attempts_dir / "ppo" / "r1.json").read_text()) == {
        "stage": "ppo", "round": 1, "status": "interrupted", "version": "cccc11112222", "pid": pid, "host": host,
        "started_at": 5.0, "error": "the builder stopped without finishing; rerun to resume"}


def test_repair_quarantines_whole_artifacts_two_of_one_stage(reg):
    first = reg.find("sft", 0)
    second = _commit(reg, "sft", 1, "cccc11112222", {"model.bin": "w2"})
    first.file("sub/x.txt").write_text("X")  # a nested file: the whole artifact moves, not its sub/ directory
    second.file("model.bin").write_text("W2")
    reg.repair()
    moved = sorted(p.name.rsplit("-", 1)[0] for p in (reg.quarantine_dir / "sft").iterdir())
    assert moved == ["r0-bbbb11112222", "r1-cccc11112222"] and not first.path.exists() and not second.path.exists()


def test_repair_keeps_a_live_builders_temporary_checkpoint(reg):
    live = reg.work_dir("ppo", 1, "cccc11112222") / "state.pt.tmp"
    dead = reg.work_dir("ppo", 2, "cccc11112222") / "state.pt.tmp"  # same version, another round: nobody holds it
    for f in (live, dead):
        f.parent.mkdir(parents=True)
        f.write_text("half")
    _lease(reg, "ppo", 1, "cccc11112222")
    assert reg.repair() == [f"removed {dead}"]
    assert live.exists() and not dead.exists()


def _racing_rmtree(monkeypatch):
    """shutil.rmtree as it goes when another process (a second `rlhf repair`, another builder's cleanup)
    removes the same directory first."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        real(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


def test_cleanup_and_repair_survive_a_concurrent_cleaner(reg, monkeypatch):
    builds = [reg.new_build_dir("ppo", 1, "dddd11112222"), reg.new_build_dir("ppo", 2, "dddd11112222")]
    _racing_rmtree(monkeypatch)
    reg.clean_builds("ppo", 1, "dddd11112222")
    reg.clean_stale_builds()
    assert not any(b.exists() for b in builds)
    leftover = reg.new_build_dir("ppo", 3, "dddd11112222")
    assert reg.repair() == [f"removed leftover build {leftover}"]
    again = _commit(reg, "sft", 0, "bbbb11112222", {"model.bin": "again"})  # a forced rebuild removes the old copy
    assert again.file("model.bin").read_text() == "again" and not list((reg.artifacts_dir / "sft").glob(".old-*"))


def test_repair_survives_files_removed_between_its_scan_and_its_fix(reg):
    stale = _lease(reg, "ppo", 1, "cccc11112222", heartbeat_at=0)
    tmp = reg.work_dir("ppo", 2, "dddd11112222") / "state.pt.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_text("half")
    scan, held = reg.scan, reg._lease_held

    def scan_then_race(full=True):
        problems = scan(full)
        stale.unlink()  # the next builder took the stale lease over meanwhile
        return problems

    def held_then_race(stage, round, version):
        tmp.unlink(missing_ok=True)  # another repair removed it meanwhile
        return held(stage, round, version)

    reg.scan, reg._lease_held = scan_then_race, held_then_race
    assert reg.repair() == [f"removed stale lease {stale}", f"removed {tmp}"]


def test_clean_builds_removes_replaced_copies_of_its_version(reg):
    old = reg.artifacts_dir / "ppo" / ".old-r1-cccc11112222-5"
    old.mkdir(parents=True)
    reg.clean_builds("ppo", 1, "cccc11112222")
    assert not old.exists()


def test_commit_fsyncs_files_then_directories_children_first_then_the_manifest(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "run")
    synced = []
    real = registry_module.fsync_path
    monkeypatch.setattr(registry_module, "fsync_path", lambda p: (synced.append(Path(p)), real(p))[1])
    build = reg.new_build_dir("sft", 0, "bbbb11112222")
    (build / "a" / "b").mkdir(parents=True)
    for name in ("top.txt", "a/mid.txt", "a/b/deep.txt"):
        (build / name).write_text(name)
    art = reg.commit(build, {"stage": "sft", "round": 0, "version": "bbbb11112222"})
    assert synced == [build / "a/b/deep.txt", build / "a/mid.txt", build / "top.txt",  # the files
                      build / "a/b", build / "a", build,  # every directory, children before their parent
                      build,  # again, holding the manifest
                      art.path.parent]  # the renamed entry


def test_lease_waits_for_a_live_holder_says_so_once_and_keeps_the_registry_ttl(tmp_path):
    reg = Registry(tmp_path / "run", lease_ttl_s=7.5)
    path = _lease(reg, "sft", 0, "bbbb11112222")  # another host's, heartbeat fresh
    seen = []

    def on_wait(info):
        seen.append(info)
        path.unlink()  # the holder finishes

    timer = threading.Timer(5.0, lambda: path.unlink(missing_ok=True))  # bounds the wait should on_wait never come
    timer.start()
    lease = reg.lease("sft", 0, "bbbb11112222", on_wait=on_wait)
    timer.cancel()
    try:
        assert lease is not None and [s["host"] for s in seen] == ["other-host"]
        assert lease.ttl_s == 7.5 and json.loads(path.read_text())["ttl_s"] == 7.5
    finally:
        if lease is not None:
            lease.release()
