"""What a stage's `run(ctx)` receives: its config, its input artifacts, where to write, how to log.

A stage is a plain function `run(ctx) -> metrics`. It does not import Prefect, reads no
environment variables, and can be called from a test, the CLI or a Prefect task.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .errors import StageFailed  # noqa: F401 - stages import it from here
from .registry import Artifact, Registry


@dataclass
class StageContext:
    stage: str
    round: int
    version: str
    config: RunConfig
    inputs: dict[str, Artifact]
    out_dir: Path  # build directory; becomes the artifact on success
    work_dir: Path  # persists across crashes: checkpoints for resume
    registry: Registry
    log_fn: Callable[[dict[str, Any], int | None], None] | None = None  # the tracker's log
    show_progress: bool = True
    is_main: bool = True  # False on the other ranks of a multi-process build: they log and write nothing that lasts
    _t0: float = field(default_factory=time.time)

    @property
    def section(self) -> Any:
        """This stage's own config model (e.g. `ctx.config.sft`)."""
        return getattr(self.config, self.stage)

    @property
    def seed(self) -> int:
        """A seed per (run seed, stage, round), so rounds do not repeat each other's samples."""
        return (self.config.seed * 1_000_003 + sum(map(ord, self.stage)) * 101 + self.round) % (2**31)

    @property
    def device(self) -> str:
        from .distributed import resolve_device

        return resolve_device(self.config.device)

    def _dtype(self, setting: str) -> str:
        """A dtype setting resolved: auto is bfloat16 on a GPU, float32 on the CPU (where bf16 matmuls are slower)."""
        if setting == "auto":
            return "bfloat16" if self.device == "cuda" else "float32"
        return setting

    @property
    def inference_dtype(self) -> str:
        """The dtype of models loaded to sample and score (`dtype` in the config)."""
        return self._dtype(self.config.dtype)

    @property
    def artifact_dtype(self) -> str:
        """The dtype model artifacts are saved in (`artifact_dtype`)."""
        return self._dtype(self.config.artifact_dtype)

    def input(self, role: str) -> Artifact:
        if role not in self.inputs:
            raise StageFailed(f"stage {self.stage} round {self.round} has no input {role!r} (has: {', '.join(self.inputs)})")
        return self.inputs[role]

    def inputs_like(self, prefix: str) -> list[Artifact]:
        """Inputs whose role starts with `prefix`, ordered by round (e.g. all preference batches)."""
        return sorted((a for r, a in self.inputs.items() if r.startswith(prefix)), key=lambda a: a.round)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Append a metrics row to the stage's history (kept in the artifact) and the tracker (rank 0 only)."""
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.work_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self.log_fn is not None:
            self.log_fn(metrics, step)

    def resume_metrics(self, step: int) -> int:
        """Cut the metrics history back to rows logged before `step` (a resumed run logs them again).

        Call it right after loading a checkpoint saved at `step`; rows without a step are kept.
        Returns how many rows were dropped."""
        if not self.is_main:
            return 0
        path = self.work_dir / "metrics.jsonl"
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash
                dropped += 1
                continue
            if row.get("step") is not None and row["step"] >= step:
                dropped += 1
            else:
                kept.append(line)
        from .io import atomic_write_text

        atomic_write_text(path, "".join(l + "\n" for l in kept))
        return dropped

    def progress(self, total: int | None, desc: str, unit: str = "it", *, stream=None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        """A progress bar with rate and ETA (API: ``update(n)``, ``set_postfix(**kw)``, ``close()``).

        On a terminal (``stream``, stderr by default, is a TTY) a tqdm bar. Otherwise (CI, a log file, Prefect
        logs) a plain line ``sft r0: train 120/500 step (24%), 3.2 step/s, ETA 1:58, loss=0.512`` at most every
        `interval` seconds and one when the bar closes, instead of hundreds of carriage returns."""
        import sys

        stream = sys.stderr if stream is None else stream
        label = f"{self.stage} r{self.round}: {desc}"
        isatty = getattr(stream, "isatty", None)
        if not self.show_progress or (callable(isatty) and isatty()):
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=label, unit=unit, disable=not self.show_progress, file=stream,
                        dynamic_ncols=True, leave=False, mininterval=1.0)

        def clock_str(seconds: float) -> str:
            m, sec = divmod(int(round(seconds)), 60)
            h, m = divmod(m, 60)
            return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"

        class LineProgress:
            def __init__(self):
                self.n = 0
                self.t0 = self.last = clock()
                self.base = 0  # a resume's initial jump (update(start) right away) does not count towards the rate
                self.postfix = ""
                self.closed = False

            def line(self, final: bool = False) -> str:
                elapsed = clock() - self.t0
                rate = (self.n - self.base) / elapsed if elapsed > 0 else 0.0
                parts = [f"{label} {self.n}/{total} {unit}" + (f" ({100 * self.n / total:.0f}%)" if total else "")
                         if total is not None else f"{label} {self.n} {unit}"]
                parts.append(f"{rate:.3g} {unit}/s")
                if final:
                    parts.append(f"done in {clock_str(elapsed)}")
                elif total and rate > 0:
                    parts.append(f"ETA {clock_str(max(0, total - self.n) / rate)}")
                if self.postfix:
                    parts.append(self.postfix)
                return ", ".join(parts)

            def write(self, text: str) -> None:
                try:
                    stream.write(text + "\n")
                    stream.flush()
                except (OSError, ValueError):  # a closed or broken log stream never fails a stage
                    pass

            def update(self, n: int = 1) -> None:
                now = clock()
                if self.n == 0 and now - self.t0 < 0.5 and n > 1:
                    self.base = n
                self.n += n
                if now - self.last >= interval:
                    self.last = now
                    self.write(self.line())

            def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
                items = {**(ordered_dict or {}), **kwargs}
                self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

            def close(self) -> None:
                if not self.closed:
                    self.closed = True
                    self.write(self.line(final=True))

        return LineProgress()
