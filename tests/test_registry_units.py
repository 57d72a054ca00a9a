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
