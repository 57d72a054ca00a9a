"""The artifact registry: every stage output is a directory with a manifest.json.

Layout under the run directory:

    artifacts/<stage>/r<round>-<version>/        complete artifacts (manifest status "complete")
    artifacts/<stage>/.tmp-r<round>-<version>-*/ in-progress builds (never read as complete)
    attempts/<stage>/r<round>.json              the last attempt: running / failed (with reason) / complete
    work/<stage>/r<round>-<version>/            resumable checkpoints of a stage that has not finished

An artifact becomes visible only by an atomic rename of a finished directory, so an interrupted
stage never leaves anything that reads as complete.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .io import read_json, sha256_file, write_json

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A complete artifact in the registry (a read-only view of its manifest)."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def round(self) -> int:
        return int(self.manifest["round"])

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        """role -> {"stage", "round", "version"}"""
        return self.manifest.get("inputs", {})

    def file(self, name: str) -> Path:
        return self.path / name


class Registry:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.artifacts_dir = self.run_dir / "artifacts"
        self.attempts_dir = self.run_dir / "attempts"
        self.work_root = self.run_dir / "work"

    # ---------------------------------------------------------------- reading
    def iter_artifacts(self, stage: str | None = None) -> Iterator[Artifact]:
        if not self.artifacts_dir.is_dir():
            return
        stage_dirs = [self.artifacts_dir / stage] if stage else sorted(self.artifacts_dir.iterdir())
        for sdir in stage_dirs:
            if not sdir.is_dir():
                continue
            for adir in sorted(sdir.iterdir()):
                if adir.name.startswith(".") or not (adir / MANIFEST).is_file():
                    continue
                try:
                    manifest = read_json(adir / MANIFEST)
                except (OSError, ValueError):
                    continue
                if manifest.get("status") == "complete":
                    yield Artifact(adir, manifest)

    def find(self, stage: str, round: int, version: str | None = None) -> Artifact | None:
        """The complete artifact of (stage, round): the given version, else the newest one."""
        if version is not None:
            path = self.artifacts_dir / stage / f"r{round}-{version}"
            if (path / MANIFEST).is_file():
                manifest = read_json(path / MANIFEST)
                if manifest.get("status") == "complete":
                    return Artifact(path, manifest)
            return None
        found = [a for a in self.iter_artifacts(stage) if a.round == round]
        return max(found, key=lambda a: a.manifest.get("finished_at", 0), default=None)

    def by_version(self, version: str) -> Artifact | None:
        for a in self.iter_artifacts():
            if a.version == version or a.version.startswith(version):
                return a
        return None

    def lineage(self, artifact: Artifact) -> dict[str, Any]:
        """Tree of what `artifact` was built from, recursively."""
        children = []
        for role, ref in sorted(artifact.inputs.items()):
            parent = self.find(ref["stage"], ref["round"], ref["version"])
            node = self.lineage(parent) if parent else {"stage": ref["stage"], "round": ref["round"], "version": ref["version"], "missing": True, "inputs": []}
            children.append({"role": role, **node})
        return {"stage": artifact.stage, "round": artifact.round, "version": artifact.version, "inputs": children}

    def attempts(self) -> list[dict[str, Any]]:
        out = []
        if self.attempts_dir.is_dir():
            for f in sorted(self.attempts_dir.glob("*/r*.json")):
                try:
                    out.append(read_json(f))
                except (OSError, ValueError):
                    continue
        return out

    # ---------------------------------------------------------------- writing
    def artifact_dir(self, stage: str, round: int, version: str) -> Path:
        return self.artifacts_dir / stage / f"r{round}-{version}"

    def work_dir(self, stage: str, round: int, version: str) -> Path:
        """Persistent scratch for checkpoints, kept across crashes so a rerun resumes."""
        return self.work_root / stage / f"r{round}-{version}"

    def new_build_dir(self, stage: str, round: int, version: str) -> Path:
        parent = self.artifacts_dir / stage
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / f".tmp-r{round}-{version}-{os.getpid()}-{time.time_ns()}"
        path.mkdir()
        return path

    def record_attempt(self, stage: str, round: int, **fields: Any) -> None:
        write_json(self.attempts_dir / stage / f"r{round}.json", {"stage": stage, "round": round, **fields})

    def commit(self, build_dir: Path, manifest: dict[str, Any]) -> Artifact:
        """Checksum the files, write the manifest, and atomically rename into place."""
        files = {}
        for f in sorted(build_dir.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                files[str(f.relative_to(build_dir))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {**manifest, "files": files, "status": "complete"}
        write_json(build_dir / MANIFEST, manifest)
        final = self.artifact_dir(manifest["stage"], manifest["round"], manifest["version"])
        if final.exists():  # a forced rebuild replaces the old complete copy
            trash = final.with_name(f".old-{final.name}-{time.time_ns()}")
            os.replace(final, trash)
            os.replace(build_dir, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(build_dir, final)
        return Artifact(final, manifest)

    def verify(self, artifact: Artifact) -> list[str]:
        """Names of files whose checksum no longer matches the manifest."""
        bad = []
        for name, info in artifact.manifest.get("files", {}).items():
            f = artifact.path / name
            if not f.is_file() or sha256_file(f) != info["sha256"]:
                bad.append(name)
        return bad

    def clean_stale_builds(self) -> None:
        """Remove leftovers of interrupted builds (they were never visible as artifacts)."""
        if self.artifacts_dir.is_dir():
            for d in self.artifacts_dir.glob("*/.tmp-*"):
                parts = d.name.split("-")  # .tmp, r<round>, <version>, <pid>, <ns>
                pid = parts[3] if len(parts) >= 5 else ""
                if not (pid.isdigit() and _alive(int(pid))):  # a live process (this one too) may still be building it
                    shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
