"""The stage runner: resolve inputs, compute the version, reuse or build, register.

    version = hash(stage, round, resolved stage config, input versions, code fingerprint)

Same inputs and config give the same version, so a rerun is a cache hit (milliseconds, nothing
heavy is imported); `force=True` rebuilds. A failure leaves no complete-looking artifact.
"""
from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from . import distributed
from .config import RunConfig
from .context import StageContext, StageFailed
from .errors import CorruptArtifact, Interrupted
from .io import sha256_file, stable_hash
from .registry import Artifact, Registry
from .stages import STAGES, StageSpec, schedule

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "pydantic")


class MissingInputError(StageFailed):
    """An input artifact is not in the registry; the message says which command produces it."""


@dataclass
class StageResult:
    artifact: Artifact
    cached: bool
    seconds: float


# ---------------------------------------------------------------------------------------- code


@lru_cache(maxsize=None)
def _module_files(module: str) -> tuple[Path, ...]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ()
    origin = Path(spec.origin)
    if origin.name == "__init__.py":  # a package: every module in it
        return tuple(sorted(origin.parent.rglob("*.py")))
    return (origin,)


@lru_cache(maxsize=None)
def _library_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for lib in LIBRARIES:
        try:
            out.append((lib, importlib.metadata.version(lib)))
        except importlib.metadata.PackageNotFoundError:
            out.append((lib, "absent"))
    return tuple(out)


def code_fingerprint(spec: StageSpec) -> str:
    """Hash of the stage's own modules and the library versions (editing PPO keeps SFT's version)."""
    parts: dict[str, Any] = {"libs": _library_versions()}
    if callable(spec.entry):
        import inspect

        try:
            parts["entry"] = inspect.getsource(spec.entry)
        except (OSError, TypeError):  # defined in a string (python -c): fall back to its bytecode
            parts["entry"] = spec.entry.__code__.co_code.hex()
    else:
        modules = (spec.entry.split(":")[0], *spec.code)
        for m in sorted(set(modules)):
            try:
                files = _module_files(m)
            except (ImportError, ValueError):
                files = ()
            parts[m] = [sha256_file(f)[:16] for f in files] or "missing"
    return stable_hash(parts, 16)


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Git commit of the project (and whether the tree was dirty), for every manifest."""
    root = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"package": _package_version()}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _package_version() -> str:
    try:
        return importlib.metadata.version("rlhf-llama2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------- runner


class Runner:
    """Builds stages. Inputs are pinned: a stage reads exactly the upstream versions that the current
    config implies (computed recursively, like Make or DVC), or the versions given in `pins`."""

    def __init__(self, cfg: RunConfig, specs: dict[str, StageSpec] | None = None, tracker_factory: Callable | None = None,
                 echo: Callable[[str], None] | None = print, show_progress: bool = True, pins: dict[str, str] | None = None):
        self.cfg = cfg
        self.specs = specs or STAGES
        self.registry = Registry(cfg.run_dir)
        self.tracker_factory = tracker_factory
        self.echo = echo or (lambda s: None)
        self.show_progress = show_progress
        self.pins = dict(pins or {})  # stage name or input role -> version (prefix), e.g. {"sft": "3fa2c1"}
        # several processes (torchrun): rank 0 alone builds, commits and reports; the others join the builds of
        # stages whose spec is `distributed` (pipeline/distributed.py) and otherwise wait for rank 0's result
        self.world = distributed.init(distributed.resolve_device(cfg.device))
        if not self.world.is_main:
            self.echo = lambda s: None
        self._expected: dict[tuple[str, int], str] = {}
        roles = {role for stage, r in schedule(cfg, max(cfg.rounds, 1), self.specs) for role in self.specs[stage].inputs(cfg, r)}
        for key in self.pins:
            if key not in self.specs and key not in roles:
                raise ValueError(f"--input {key}=...: {key!r} is neither a stage nor an input role; stages: {', '.join(self.specs)}")

    def spec(self, stage: str) -> StageSpec:
        if stage not in self.specs:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(self.specs)}")
        return self.specs[stage]

    def _check_round(self, stage: str, round: int) -> StageSpec:
        spec = self.spec(stage)
        if spec.rounds == "zero" and round != 0:
            raise ValueError(f"stage {stage} runs in round 0 only (got --round {round})")
        if spec.rounds == "rlhf" and round < 1:
            raise ValueError(f"stage {stage} runs in rounds >= 1 (got --round {round})")
        return spec

    def _pinned(self, role: str, stage: str) -> str | None:
        return self.pins.get(role, self.pins.get(stage))

    def input_versions(self, stage: str, round: int) -> dict[str, str]:
        """role -> the version this stage must read: a pin, else what the config implies upstream."""
        out = {}
        for role, (s, r) in self._check_round(stage, round).inputs(self.cfg, round).items():
            pin = self._pinned(role, s)
            if pin is not None:
                art = self.registry.by_version(pin)
                if art is None or art.stage != s:
                    raise MissingInputError(f"--input {role if role in self.pins else s}={pin}: no complete {s} artifact with "
                                            f"that version in {self.registry.run_dir} (`rlhf status --run-dir {self.cfg.run_dir}` lists them)")
                out[role] = art.version
            else:
                out[role] = self.expected_version(s, r)
        return out

    def expected_version(self, stage: str, round: int) -> str:
        """The version the current config (and pins) imply for (stage, round), built or not."""
        key = (stage, round)
        if key not in self._expected:
            self._expected[key] = self.version(stage, round, self.input_versions(stage, round))
        return self._expected[key]

    def resolve_inputs(self, stage: str, round: int) -> dict[str, Artifact]:
        """The input artifacts, each the exact version required, verified; else MissingInputError
        naming every missing one and the command that builds it."""
        found, missing = {}, []
        for role, version in self.input_versions(stage, round).items():
            s, r = self.spec(stage).inputs(self.cfg, round)[role]
            art = self.registry.find(s, r, version)
            if art is None:
                missing.append((role, s, r, version))
            else:
                found[role] = self.registry.check(art)
        if missing:
            lines = [f"stage {stage} round {round} cannot run: missing inputs in {self.registry.run_dir}:"]
            for role, s, r, version in missing:
                lines.append(f"  {role}: stage {s} round {r} version {version} (what the current config implies) -> "
                             f"produce it with `rlhf stage {s} --round {r} --run-dir {self.cfg.run_dir}` (same --config/--set)")
                others = [a.version for a in self.registry.versions(s, r)]
                if others:
                    lines.append(f"     other versions of {s} round {r} exist ({', '.join(others[:3])}), built with another "
                                 f"config or code; to build on one of them, pass `--input {s}={others[0]}`")
            raise MissingInputError("\n".join(lines))
        return found

    def version(self, stage: str, round: int, inputs: dict[str, str]) -> str:
        """hash(stage, round, resolved stage config, input versions, code fingerprint, external files)."""
        spec = self.spec(stage)
        return stable_hash({
            "stage": stage,
            "round": round,
            "config": self.cfg.stage_config(stage),
            "inputs": dict(sorted(inputs.items())),
            "code": code_fingerprint(spec),
            "external": spec.external(self.cfg, round) if spec.external else {},
        }, 12)

    def _cached(self, stage: str, round: int, version: str, force: bool) -> Artifact | None:
        """The complete artifact of this version, verified; None if absent (or corrupt under --force)."""
        try:
            existing = self.registry.find(stage, round, version)
            return self.registry.check(existing) if existing is not None else None
        except CorruptArtifact as e:
            if not force:
                raise
            where = self.registry.quarantine(self.registry.artifact_dir(stage, round, version))
            self.echo(f"[repair] {stage} round {round}: {str(e).split(';')[0].split('. Rebuild')[0]}; moved to {where}, rebuilding")
            return None

    def run_stage(self, stage: str, round: int = 0, force: bool = False) -> StageResult:
        if not self.world.is_main:
            return self._follow(stage, round)
        self._joined = False
        try:
            result = self._lead(stage, round, force)
        except BaseException as e:
            if not self._joined:  # the other ranks wait for word (after a joined build they fail or are stopped by torchrun)
                distributed.tell(("failed", f"{type(e).__name__}: {e}"))
            raise
        distributed.tell(("done", result.artifact.version, result.cached))
        return result

    def _all_ranks(self, spec: StageSpec) -> bool:
        """Whether every rank runs this stage's build: a distributed stage, or one that only samples and scores when its
        models are sharded over the ranks (`hardware.shard_inference`); else rank 0 builds it alone."""
        return spec.distributed or (spec.samples and self.cfg.hardware.shard_inference)

    def _follow(self, stage: str, round: int) -> StageResult:
        """A rank other than 0: join rank 0's build of a distributed stage, with a scratch output folder
        (rank 0's is the artifact), then take the artifact rank 0 committed."""
        import tempfile

        t0 = time.time()
        spec = self._check_round(stage, round)
        while True:
            msg = distributed.hear()
            if msg[0] == "failed":
                raise StageFailed(f"stage {stage} round {round} failed on rank 0: {msg[1]}")
            if msg[0] == "done":
                art = self.registry.find(stage, round, msg[1])
                if art is None:
                    raise StageFailed(f"rank 0 built {stage} round {round} ({msg[1]}) but this rank cannot see it in "
                                      f"{self.registry.run_dir}: the run directory must be shared by every process")
                return StageResult(art, msg[2], time.time() - t0)
            _, version, work = msg  # "build"
            inputs = self.resolve_inputs(stage, round)
            scratch = Path(tempfile.mkdtemp(prefix=f"rlhf-{stage}-r{round}-rank{self.world.rank}-"))
            ctx = StageContext(stage, round, version, self.cfg, inputs, scratch, Path(work), self.registry, log_fn=None,
                               show_progress=False, is_main=False)
            try:
                with _sigterm_interrupts():
                    _quiet_libraries()
                    _seed_everything(ctx.seed, self.cfg.threads)
                    _entry(spec)(ctx)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def _lead(self, stage: str, round: int, force: bool) -> StageResult:
        t0 = time.time()
        spec = self._check_round(stage, round)
        inputs = self.resolve_inputs(stage, round)
        version = self.version(stage, round, {role: a.version for role, a in inputs.items()})
        existing = self._cached(stage, round, version, force)
        if existing is not None and not force:
            self.echo(f"[cached] {stage} round {round} ({version})")
            return StageResult(existing, True, time.time() - t0)
        if spec.check is not None:  # bad user input stops here, before anything is written
            _import_entry(spec.check)(self.cfg, round)

        def waiting(info):
            from .locks import describe

            self.echo(f"[wait]   {stage} round {round} ({version}) is being built by {describe(info)}")

        lease = self.registry.lease(stage, round, version, on_wait=waiting)
        try:
            if lease.contended:  # someone else held the lease: if they built it meanwhile, use theirs, never build twice
                done = self._cached(stage, round, version, force=False)
                if done is not None:
                    self.echo(f"[cached] {stage} round {round} ({version}) built by another process")
                    return StageResult(done, True, time.time() - t0)
            return self._build(spec, stage, round, version, inputs, force, t0)
        finally:
            lease.release()

    def _build(self, spec: StageSpec, stage: str, round: int, version: str, inputs: dict[str, Artifact], force: bool,
               t0: float) -> StageResult:
        """Build (stage, round, version); the caller holds its lease."""
        self.echo(f"[run]    {stage} round {round} ({version})")
        self.registry.clean_builds(stage, round, version)
        work = self.registry.work_dir(stage, round, version)
        if force:  # recompute from scratch: checkpoints of an earlier attempt are not reused
            shutil.rmtree(work, ignore_errors=True)
        build = self.registry.new_build_dir(stage, round, version)
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        self.registry.record_attempt(stage, round, status="running", version=version, started_at=started, pid=os.getpid(),
                                     host=socket.gethostname())
        tracker = self.tracker_factory(self.cfg, spec, round, version, inputs) if self.tracker_factory else None
        ctx = StageContext(stage, round, version, self.cfg, inputs, build, work, self.registry,
                           log_fn=tracker.log if tracker else None, show_progress=self.show_progress)
        try:
            with _sigterm_interrupts():
                fn = _entry(spec)
                _quiet_libraries()
                _seed_everything(ctx.seed, self.cfg.threads)
                joins = self._all_ranks(spec)
                if joins and self.world.distributed:
                    distributed.tell(("build", version, str(work)))
                    self._joined = True
                with contextlib.nullcontext() if joins else distributed.solo():
                    metrics = fn(ctx) or {}
                if (work / "metrics.jsonl").exists():
                    shutil.copy2(work / "metrics.jsonl", build / "metrics.jsonl")
                finished = time.time()
                manifest = {
                    "stage": stage,
                    "round": round,
                    "version": version,
                    "run": self.cfg.name,
                    "inputs": {role: {"stage": a.stage, "round": a.round, "version": a.version} for role, a in inputs.items()},
                    "pinned": {role: a.version for role, a in inputs.items() if self._pinned(role, a.stage) is not None},
                    "config": self.cfg.stage_config(stage),
                    "code": {**code_version(), "fingerprint": code_fingerprint(spec), "libraries": dict(_library_versions())},
                    "metrics": _jsonable(metrics),
                    "started_at": started,
                    "finished_at": finished,
                    "duration_s": builtins.round(finished - started, 3),
                    "artifact_type": spec.artifact_type,
                    "world_size": self.world.size if joins else 1,
                }
                artifact = self.registry.commit(build, manifest)
        except BaseException as e:  # noqa: BLE001 - record every failure, then re-raise
            shutil.rmtree(build, ignore_errors=True)
            interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
            reason = f"{type(e).__name__}: {e}" if not interrupted else f"interrupted ({type(e).__name__}); rerun to resume"
            self.registry.record_attempt(stage, round, status="interrupted" if interrupted else "failed", version=version,
                                         started_at=started, finished_at=time.time(), error=reason,
                                         traceback=traceback.format_exc()[-4000:])
            if tracker:
                tracker.finish(None, failed=reason)
            raise
        shutil.rmtree(work, ignore_errors=True)  # checkpoints are no longer needed once complete
        self.registry.record_attempt(stage, round, status="complete", version=version, started_at=started, finished_at=time.time())
        if tracker:
            tracker.finish(artifact)
        self.echo(f"[done]   {stage} round {round} in {time.time() - t0:.1f}s")
        return StageResult(artifact, False, time.time() - t0)

    def run_all(self, rounds: int | None = None, force: bool = False) -> list[StageResult]:
        results = []
        for stage, r in schedule(self.cfg, rounds, self.specs):
            results.append(self.run_stage(stage, r, force=force))
        return results


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into `Interrupted` while a stage builds (main thread only), so the attempt is
    recorded as interrupted and the half build removed before the process exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _entry(spec: StageSpec) -> Callable[[StageContext], dict]:
    return _import_entry(spec.entry, spec.name)


def _import_entry(entry: str | Callable, name: str = "") -> Callable:
    """A callable, or the function named by "package.module:function"."""
    if callable(entry):
        return entry
    module, _, func = entry.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise StageFailed(f"stage {name} is not implemented in this version (module {module} is missing)") from e
        raise
    return getattr(mod, func)


def _quiet_libraries() -> None:
    """Our own progress bars and logs say what is happening; silence the libraries' chatter."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _seed_everything(seed: int, threads: int | None) -> None:
    import random

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
        if threads:
            torch.set_num_threads(threads)
    except ImportError:
        pass


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
