"""Experiment tracking. W&B is wired in by `tracker_factory`; mode 'disabled' means no tracker.

The registry is the source of truth; W&B mirrors it (metrics, config, artifacts, lineage).
"""
from __future__ import annotations

from typing import Any, Callable


def tracker_factory(cfg) -> Callable[..., Any] | None:
    """A callable (cfg, spec, round, version, inputs) -> tracker with .log(metrics, step) and
    .finish(artifact, failed=None); None when tracking is disabled or not available."""
    if cfg.tracking.mode == "disabled":
        return None
    try:
        from .wandb_tracker import WandbTracker
    except ImportError:
        return None
    return WandbTracker.factory
