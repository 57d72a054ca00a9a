"""The artifact registry: every stage output is a directory with a manifest.json.

Layout under the run directory:

    artifacts/<stage>/r<round>-<version>/        complete artifacts (manifest status "complete")
    artifacts/<stage>/.tmp-r<round>-<version>-*/ in-progress builds (never read as complete)
    attempts/<stage>/r<round>.json              the last attempt: running / failed / interrupted / complete
    work/<stage>/r<round>-<version>/            resumable checkpoints of a stage that has not finished
    locks/<stage>/r<round>-<version>.lease      the build lease of whoever is building that version
    quarantine/<stage>/...                      artifacts `rlhf repair` moved aside (corrupt or tampered)

Guarantees, all kept here rather than in the stages:

* An artifact becomes visible only by an atomic rename of a finished directory whose files and
  manifest were fsynced first (and the parent directory after), so an interrupted or crashed stage
  never leaves anything that reads as complete.
* Every read is verified: each file's size, and its mtime against the manifest (fast path); a
  mismatch falls back to the sha256, and a file whose checksum differs is refused, naming the file.
  `verify(full=True)` (`rlhf verify`) always hashes.
* One builder per (stage, round, version) at a time, across processes and hosts (`pipeline.locks`).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import locks
from .errors import CorruptArtifact
from .io import fsync_path, read_json, sha256_file, write_json

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


def _read_manifest(adir: Path) -> dict[str, Any]:
    """The manifest of an artifact directory, or CorruptArtifact naming the file."""
    path = adir / MANIFEST
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise CorruptArtifact(f"{path}: unreadable manifest ({type(e).__name__}: {e}); "
                              f"run `rlhf repair --run-dir {adir.parent.parent.parent}` or rebuild the stage with --force") from e
    if not isinstance(manifest, dict) or not {"stage", "round", "version"} <= set(manifest):
        raise CorruptArtifact(f"{path}: not a manifest (stage, round or version missing); "
                              f"run `rlhf repair --run-dir {adir.parent.parent.parent}` or rebuild the stage with --force")
    return manifest


def _build_key(name: str) -> tuple[int, str] | None:
    """(round, version) of a `.tmp-r<round>-<version>-<pid>-<ns>` or `.old-r<round>-<version>-<ns>` dir."""
    parts = name.split("-")
    if len(parts) >= 4 and parts[0] in (".tmp", ".old") and parts[1][1:].isdigit():
        return int(parts[1][1:]), parts[2]
    return None


class Registry:
    def __init__(self, run_dir: str | Path, lease_ttl_s: float | None = None):
        self.run_dir = Path(run_dir)
        self.artifacts_dir = self.run_dir / "artifacts"
        self.attempts_dir = self.run_dir / "attempts"
        self.work_root = self.run_dir / "work"
        self.locks_dir = self.run_dir / "locks"
        self.quarantine_dir = self.run_dir / "quarantine"
        self.lease_ttl_s = lease_ttl_s or locks.DEFAULT_TTL_S

    # ---------------------------------------------------------------- reading
    def iter_artifacts(self, stage: str | None = None) -> Iterator[Artifact]:
        """Complete artifacts (a corrupt manifest is skipped here; `find` and `scan` report it)."""
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
                    manifest = _read_manifest(adir)
                except CorruptArtifact:
                    continue
                if manifest.get("status") == "complete":
                    yield Artifact(adir, manifest)

    def find(self, stage: str, round: int, version: str | None = None) -> Artifact | None:
        """The complete artifact (stage, round, version); without a version, the newest one (for display only:
        stages get their inputs pinned by version, see `Runner.resolve_inputs`). A corrupt manifest raises."""
        if version is not None:
            path = self.artifact_dir(stage, round, version)
            if path.is_dir():
                manifest = _read_manifest(path)
                if manifest.get("status") == "complete":
                    return Artifact(path, manifest)
            return None
        found = [a for a in self.iter_artifacts(stage) if a.round == round]
        return max(found, key=lambda a: a.manifest.get("finished_at", 0), default=None)

    def versions(self, stage: str, round: int) -> list[Artifact]:
        """Every complete artifact of (stage, round), newest first."""
        found = [a for a in self.iter_artifacts(stage) if a.round == round]
        return sorted(found, key=lambda a: -a.manifest.get("finished_at", 0))

    def by_version(self, version: str) -> Artifact | None:
        for a in self.iter_artifacts():
            if a.version == version or a.version.startswith(version):
                return a
        return None

    def lineage(self, artifact: Artifact) -> dict[str, Any]:
        """Tree of what `artifact` was built from, recursively."""
        children = []
        for role, ref in sorted(artifact.inputs.items()):
            try:
                parent = self.find(ref["stage"], ref["round"], ref["version"])
            except CorruptArtifact:
                parent = None
            node = self.lineage(parent) if parent else {"stage": ref["stage"], "round": ref["round"], "version": ref["version"], "missing": True, "inputs": []}
            children.append({"role": role, **node})
        return {"stage": artifact.stage, "round": artifact.round, "version": artifact.version, "inputs": children}

    def attempts(self) -> list[dict[str, Any]]:
        """The last attempt of every (stage, round); a "running" one whose builder is gone reads "interrupted"."""
        out = []
        if self.attempts_dir.is_dir():
            for f in sorted(self.attempts_dir.glob("*/r*.json")):
                try:
                    att = read_json(f)
                except (OSError, ValueError):
                    continue
                if isinstance(att, dict):
                    out.append(self._live_status(att))
        return out

    def attempt(self, stage: str, round: int) -> dict[str, Any] | None:
        """The last attempt of (stage, round) as `attempts()` reads it (a dead builder's "running" reads "interrupted")."""
        try:
            att = read_json(self.attempts_dir / stage / f"r{round}.json")
        except (OSError, ValueError):
            return None
        return self._live_status(att) if isinstance(att, dict) else None

    def _live_status(self, att: dict[str, Any]) -> dict[str, Any]:
        if att.get("status") != "running" or "version" not in att:
            return att
        path = self.lease_path(att["stage"], att["round"], att["version"])
        info = locks.read_lease(path)
        state = locks.lease_state(path, info)
        if state == "held":
            return {**att, "lease": locks.describe(info)}
        if state == "free" and att.get("host") == locks.HOST and isinstance(att.get("pid"), int) and locks.pid_alive(att["pid"]):
            return att  # no lease file (recorded by an older version): judge by the pid on this host
        return {**att, "status": "interrupted", "error": att.get("error") or
                f"the builder (pid {att.get('pid')} on {att.get('host')}) stopped without finishing; rerun to resume"}

    # ---------------------------------------------------------------- verification
    def verify(self, artifact: Artifact, full: bool = False) -> list[str]:
        """Names of files that are missing or no longer match the manifest.

        Fast path: same size and same mtime as recorded means unchanged; anything else (or `full`)
        compares the sha256."""
        bad = []
        for name, info in artifact.manifest.get("files", {}).items():
            f = artifact.path / name
            try:
                st = f.stat()
            except OSError:
                bad.append(name)
                continue
            if st.st_size != info.get("bytes", st.st_size):
                bad.append(name)
            elif full or st.st_mtime_ns != info.get("mtime_ns"):
                if sha256_file(f) != info["sha256"]:
                    bad.append(name)
        return bad

    def check(self, artifact: Artifact) -> Artifact:
        """`artifact` if it verifies, else CorruptArtifact naming the files and the fix."""
        bad = self.verify(artifact)
        if bad:
            files = ", ".join(str(artifact.path / b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CorruptArtifact(
                f"artifact {artifact.stage} round {artifact.round} ({artifact.version}) was modified after it was built: "
                f"{files} no longer match the checksums in its manifest. Rebuild it with "
                f"`rlhf stage {artifact.stage} --round {artifact.round} --force --run-dir {self.run_dir}`, "
                f"or move it aside with `rlhf repair --run-dir {self.run_dir}`")
        return artifact

    def scan(self, full: bool = True) -> list[dict[str, Any]]:
        """Everything wrong in the run directory: corrupt or tampered artifacts, leftover builds, stale
        leases, builders that died. Each problem: {kind, path, detail, fix}."""
        problems: list[dict[str, Any]] = []
        if self.artifacts_dir.is_dir():
            for adir in sorted(self.artifacts_dir.glob("*/*")):
                if not adir.is_dir():
                    continue
                if adir.name.startswith("."):
                    key = _build_key(adir.name)
                    if key is None or not self._lease_held(adir.parent.name, *key):
                        problems.append({"kind": "leftover_build", "path": str(adir), "detail": "an interrupted build's files",
                                         "fix": "removed by `rlhf repair` (or the next build of that version)"})
                    continue
                try:
                    art = Artifact(adir, _read_manifest(adir))
                except CorruptArtifact as e:
                    problems.append({"kind": "corrupt_manifest", "path": str(adir / MANIFEST), "detail": str(e).split(";")[0],
                                     "fix": "`rlhf repair` moves it to quarantine/, then rerun the stage"})
                    continue
                for name in self.verify(art, full=full):
                    problems.append({"kind": "tampered", "path": str(adir / name),
                                     "detail": f"{art.stage} r{art.round} {art.version}: checksum differs from the manifest",
                                     "fix": f"`rlhf stage {art.stage} --round {art.round} --force` or `rlhf repair`"})
        if self.locks_dir.is_dir():
            for lease in sorted(self.locks_dir.glob("*/*.lease")):
                if locks.lease_state(lease) == "stale":
                    problems.append({"kind": "stale_lease", "path": str(lease), "detail": locks.describe(locks.read_lease(lease)),
                                     "fix": "taken over by the next builder, or removed by `rlhf repair`"})
        for att in self.attempts():
            if att.get("status") == "interrupted":
                problems.append({"kind": "interrupted", "path": str(self.attempts_dir / att["stage"] / f"r{att['round']}.json"),
                                 "detail": f"{att['stage']} r{att['round']} {att.get('version')}: {att.get('error')}",
                                 "fix": f"`rlhf stage {att['stage']} --round {att['round']}` resumes it"})
        return problems

    def repair(self) -> list[str]:
        """Make the run directory consistent again; returns what was done, a line each.

        Corrupt or tampered artifacts move to quarantine/ (never deleted: a person may want them),
        leftover builds and stray temporary files of dead builders are removed, stale leases are
        removed, and a dead builder's "running" attempt is recorded as interrupted."""
        done = []
        for p in self.scan(full=True):
            path = Path(p["path"])
            if p["kind"] == "leftover_build":
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed leftover build {path}")
            elif p["kind"] in ("corrupt_manifest", "tampered"):
                adir = path.parent if p["kind"] == "corrupt_manifest" else self._artifact_dir_of(path)
                if adir.is_dir():
                    dest = self.quarantine(adir)
                    done.append(f"quarantined {adir} -> {dest} ({p['kind']})")
            elif p["kind"] == "stale_lease":
                path.unlink(missing_ok=True)
                done.append(f"removed stale lease {path}")
            elif p["kind"] == "interrupted":
                att = read_json(path)
                write_json(path, {**att, "status": "interrupted", "error": "the builder stopped without finishing; rerun to resume"})
                done.append(f"recorded {att['stage']} r{att['round']} as interrupted")
        if self.work_root.is_dir():  # temporary files of a checkpoint save that never finished
            for tmp in self.work_root.glob("*/*/*.tmp"):
                stage, key = tmp.parent.parent.name, tmp.parent.name
                rnd, _, version = key.partition("-")
                if rnd[1:].isdigit() and not self._lease_held(stage, int(rnd[1:]), version):
                    tmp.unlink(missing_ok=True)
                    done.append(f"removed {tmp}")
        return done

    def _artifact_dir_of(self, path: Path) -> Path:
        rel = path.relative_to(self.artifacts_dir)
        return self.artifacts_dir / rel.parts[0] / rel.parts[1]

    def quarantine(self, adir: Path) -> Path:
        dest = self.quarantine_dir / adir.parent.name / f"{adir.name}-{time.time_ns()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(adir, dest)
        return dest

    # ---------------------------------------------------------------- leases
    def lease_path(self, stage: str, round: int, version: str) -> Path:
        return self.locks_dir / stage / f"r{round}-{version}.lease"

    def lease(self, stage: str, round: int, version: str, wait: bool = True,
              on_wait: Callable[[dict[str, Any] | None], None] | None = None) -> locks.Lease | None:
        """The build lease of (stage, round, version); waits while another live builder holds it."""
        return locks.acquire(self.lease_path(stage, round, version), self.lease_ttl_s, wait=wait, on_wait=on_wait)

    def _lease_held(self, stage: str, round: int, version: str) -> bool:
        return locks.lease_state(self.lease_path(stage, round, version)) == "held"

    # ---------------------------------------------------------------- writing (under the lease)
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
        """Checksum and fsync the files, write the manifest, and atomically rename into place."""
        files = {}
        for f in sorted(build_dir.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                fsync_path(f)
                st = f.stat()
                files[str(f.relative_to(build_dir))] = {"sha256": sha256_file(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        for d in sorted({f.parent for f in build_dir.rglob("*")} | {build_dir}, key=lambda p: -len(p.parts)):
            fsync_path(d)
        manifest = {**manifest, "files": files, "status": "complete"}
        write_json(build_dir / MANIFEST, manifest)
        fsync_path(build_dir)
        final = self.artifact_dir(manifest["stage"], manifest["round"], manifest["version"])
        if final.exists():  # a forced rebuild replaces the old complete copy
            trash = final.with_name(f".old-{final.name}-{time.time_ns()}")
            os.replace(final, trash)
            os.replace(build_dir, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(build_dir, final)
        fsync_path(final.parent)
        return Artifact(final, manifest)

    def clean_builds(self, stage: str, round: int, version: str) -> None:
        """Remove leftovers of earlier builds of this version (call it holding this version's lease)."""
        parent = self.artifacts_dir / stage
        if parent.is_dir():
            for d in parent.iterdir():
                if d.name.startswith((".tmp-", ".old-")) and _build_key(d.name) == (round, version):
                    shutil.rmtree(d, ignore_errors=True)

    def clean_stale_builds(self) -> None:
        """Remove leftovers of interrupted builds whose version nobody holds a live lease on."""
        if self.artifacts_dir.is_dir():
            for d in self.artifacts_dir.glob("*/.*"):
                key = _build_key(d.name)
                if d.is_dir() and key is not None and not self._lease_held(d.parent.name, *key):
                    shutil.rmtree(d, ignore_errors=True)
