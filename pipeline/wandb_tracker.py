"""W&B mirror of the registry: every stage run is a W&B run, every artifact a W&B artifact.

    rlhf run                      # offline by default: runs land in <run_dir>/wandb/offline-run-*
    rlhf sync --run-dir runs/demo # upload them later (needs an API key) and restore input lineage

The registry stays the source of truth; a tracking failure only warns, it never fails a stage.
All W&B files (runs, staging copies, cache, settings) stay under `<run_dir>/wandb`, nothing goes
to $HOME. A run's inputs are recorded in its config (and in `rlhf-lineage.json` beside the run);
online runs also `use_artifact` them at once, offline runs cannot, so `rlhf sync` does it after the
upload. Artifact names carry the run's name (`<run>-<stage>`, e.g. `demo-sft`), so the `latest` and
`round-<r>` aliases of two runs in one project never collide. Weights too large to copy are file://
references with W&B's own checksum beside the registry's sha256.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from .io import stable_hash

LARGE_FILE_BYTES = 5 * 1024 * 1024  # bigger files (weights) are logged as file:// references
LINEAGE_FILE = "rlhf-lineage.json"
_INIT_LOCK = threading.Lock()  # reward models run in parallel threads; wandb.init is not re-entrant


def wandb_env(run_dir: str | Path) -> dict[str, str]:
    """Environment that keeps every W&B file under `<run_dir>/wandb` and W&B quiet."""
    root = Path(run_dir).resolve()
    base = root / "wandb"
    env = {
        "WANDB_DIR": str(root),  # wandb writes <WANDB_DIR>/wandb/offline-run-*
        "WANDB_DATA_DIR": str(base / ".data"),  # artifact staging copies
        "WANDB_CACHE_DIR": str(base / ".cache"),
        "WANDB_ARTIFACT_DIR": str(base / ".artifacts"),
        "WANDB_CONFIG_DIR": str(base / ".config"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_CODE": "true",
    }
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def api_key_configured() -> bool:
    """Whether W&B has credentials (WANDB_API_KEY or a ~/.netrc entry) without prompting."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:  # noqa: BLE001 - no readable netrc means no key
        return False


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "hist": [..]} -> {"a/b": 1}: nested dicts flattened, lists skipped except 95%
    intervals: {"x_ci95": [lo, hi]} -> {"x_ci95_low": lo, "x_ci95_high": hi}."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{name}/"))
        elif key.endswith("_ci95") and isinstance(value, (list, tuple)) and len(value) == 2 \
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out[f"{name}_low"], out[f"{name}_high"] = value
        elif isinstance(value, (list, tuple)):
            continue
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out


def artifact_name(run_name: str, stage: str) -> str:
    """The W&B artifact name of a stage's output in the run `run_name`: `<run>-<stage>`, W&B's character set."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-.") or "run"
    return f"{safe}-{stage}"


def input_refs(inputs: dict[str, Any], run_name: str) -> dict[str, dict[str, Any]]:
    """role -> {stage, round, version, digest, artifact}; the digest is over the input's file checksums, `artifact`
    the W&B name:alias the input was logged under (inputs come from the same run directory, so the same run)."""
    return {
        role: {"stage": a.stage, "round": a.round, "version": a.version,
               "digest": stable_hash(a.manifest.get("files", {}), 16),
               "artifact": f"{artifact_name(run_name, a.stage)}:version-{a.version}"}
        for role, a in sorted(inputs.items())
    }


def use_inputs(run: Any, refs: dict[str, dict[str, Any]], what: str, echo: Any = None) -> int:
    """`run.use_artifact` every recorded input (online); returns how many W&B knew. An input built with tracking
    off (or not yet synced) is not in W&B: a warning, never an error."""
    used = 0
    for role, ref in refs.items():
        name = ref.get("artifact") or f"{ref['stage']}:version-{ref['version']}"  # lineage files written before run names
        try:
            run.use_artifact(name)
            used += 1
        except Exception as e:  # noqa: BLE001
            (echo or _warn)(f"warning: {what}: input {role} ({name}) not found in W&B: {e}")
    return used


class WandbTracker:
    """One W&B run per stage run; `run` is None when W&B could not start (then all calls no-op)."""

    def __init__(self, run: Any, cfg: Any, spec: Any, round: int, version: str, inputs: dict[str, dict]):
        self.run = run
        self.cfg = cfg
        self.spec = spec
        self.round = round
        self.version = version
        self.inputs = inputs

    @classmethod
    def factory(cls, cfg: Any, spec: Any, round: int, version: str, inputs: dict[str, Any]) -> "WandbTracker":
        """What `pipeline.tracking.tracker_factory(cfg)` returns. Never raises."""
        refs: dict[str, dict] = {}
        try:
            refs = input_refs(inputs, cfg.name)
            run = cls._init(cfg, spec, round, version, refs)
        except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
            _warn(f"W&B tracking disabled for {spec.name} round {round}: {type(e).__name__}: {e}")
            run = None
        return cls(run, cfg, spec, round, version, refs)

    @staticmethod
    def _init(cfg: Any, spec: Any, round: int, version: str, refs: dict[str, dict]) -> Any:
        mode = cfg.tracking.mode
        if mode == "disabled":
            return None
        os.environ.update(wandb_env(cfg.run_dir))
        if mode == "online" and not api_key_configured():
            _warn("W&B mode is online but no API key is configured (WANDB_API_KEY or `wandb login`); "
                  "logging offline instead, upload later with `rlhf sync`")
            mode = "offline"
        import wandb

        offline = mode == "offline"
        settings = wandb.Settings(silent=True, console="off", disable_git=False, save_code=False,
                                  x_disable_stats=offline, x_disable_machine_info=offline)
        config = {**cfg.stage_config(spec.name), "round": round, "version": version, "run": cfg.name, "inputs": refs}
        with _INIT_LOCK:
            run = wandb.init(
                project=cfg.tracking.project, entity=cfg.tracking.entity, group=cfg.name, job_type=spec.name,
                name=f"{spec.name}-r{round}", config=config, tags=[f"round-{round}"], mode=mode,
                dir=str(Path(cfg.run_dir).resolve()), reinit="create_new", settings=settings,
            )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        if not offline:  # offline runs cannot reach W&B's artifact store: `rlhf sync` records them after the upload
            use_inputs(run, refs, f"{spec.name} r{round}")
        # sidecar for `rlhf sync`: what this run consumed, readable without parsing the .wandb file
        run_dir = Path(run.dir).parent  # .../wandb/offline-run-<ts>-<id>/files -> the run folder
        (run_dir / LINEAGE_FILE).write_text(json.dumps({
            "run_id": run.id, "project": cfg.tracking.project, "entity": cfg.tracking.entity,
            "stage": spec.name, "round": round, "version": version, "inputs": refs,
        }, indent=1))
        return run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Stage metrics; `step` becomes the chart x-axis (a metric, so out-of-order steps are kept)."""
        if self.run is None:
            return
        try:
            row = flatten_metrics(metrics)
            if step is not None:
                row["step"] = step
            self.run.log(row)
        except Exception as e:  # noqa: BLE001
            _warn(f"W&B log failed for {self.spec.name}: {e}")

    def finish(self, artifact: Any | None, failed: str | None = None) -> None:
        """Summary = the artifact's metrics; log the artifact with aliases round-<r> and latest."""
        if self.run is None:
            return
        try:
            if failed is not None or artifact is None:
                self.run.summary["failed"] = failed or "failed"
                self.run.finish(exit_code=1)
                return
            self.run.summary.update(flatten_metrics(artifact.metrics))
            self.run.log_artifact(self._wandb_artifact(artifact),
                                  aliases=[f"round-{self.round}", "latest", f"version-{artifact.version}"])
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            _warn(f"W&B finish failed for {self.spec.name}: {e}")
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.run = None

    def _wandb_artifact(self, artifact: Any) -> Any:
        import wandb

        files = artifact.manifest.get("files", {})
        large = {name: info.get("sha256") for name, info in files.items() if info.get("bytes", 0) > LARGE_FILE_BYTES}
        meta = {"version": artifact.version, "round": artifact.round, "stage": artifact.stage, "run": self.cfg.name,
                "run_dir": str(Path(self.cfg.run_dir).resolve()), "path": str(artifact.path.resolve()),
                "inputs": self.inputs, "sha256_of_references": large}
        art = wandb.Artifact(artifact_name(self.cfg.name, artifact.stage), type=self.spec.artifact_type, metadata=meta)
        for f in sorted(artifact.path.rglob("*")):
            if not f.is_file():
                continue
            name = f.relative_to(artifact.path).as_posix()
            if name in large:
                # weights stay where they are: W&B checksums the file (its digest is verified on download) and
                # the registry's sha256 is in the metadata
                art.add_reference(f.resolve().as_uri(), name=name, checksum=True)
            else:
                art.add_file(str(f), name=name)
        return art


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(f"warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- sync


def offline_runs(run_dir: str | Path) -> list[Path]:
    return sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if p.is_dir())


def _synced(offline_run: Path) -> bool:
    return any(offline_run.glob("*.wandb.synced"))  # the marker `wandb sync` leaves


def sync(run_dir: str | Path, echo=print) -> int:
    """Upload the run's offline W&B runs, then record their inputs with `use_artifact` online."""
    pending = [r for r in offline_runs(run_dir) if not _synced(r)]
    if not pending:
        echo(f"nothing to sync: no unsynced offline W&B runs under {Path(run_dir) / 'wandb'}")
        return 0
    os.environ.update(wandb_env(run_dir))
    if not api_key_configured():
        echo("error: no W&B API key configured: set WANDB_API_KEY or run `wandb login`, then rerun `rlhf sync`")
        return 2
    done = subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, pending)], env=dict(os.environ))
    if done.returncode != 0:
        echo(f"error: `wandb sync` failed with exit code {done.returncode}")
        return done.returncode
    for path in pending:  # after all uploads, so every input artifact exists online
        if _synced(path):
            restore_lineage(path, echo)
    return 0


def restore_lineage(offline_run: Path, echo=print) -> None:
    """Resume the uploaded run and `use_artifact` each recorded input (by its version alias)."""
    info_file = offline_run / LINEAGE_FILE
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    if not info["inputs"]:
        return
    import wandb

    run = wandb.init(id=info["run_id"], project=info["project"], entity=info["entity"], resume="must", mode="online",
                     reinit="create_new", settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    try:
        use_inputs(run, info["inputs"], f"{info['stage']} r{info['round']}", echo)
    finally:
        run.finish()
    echo(f"lineage restored: {info['stage']} r{info['round']} <- {len(info['inputs'])} inputs")
