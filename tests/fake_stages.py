"""Tiny stand-ins for the RLHF round's stages, with the real stage names and input wiring.

Used through the flows' testing seam: RLHF_STAGE_SPECS=tests.fake_stages:SPECS. Each stage writes
a small file, records which process ran it (so a test can tell built from cached), and returns
the real stage's headline metrics. `reward_model_*` sleep briefly so parallel runs overlap.
"""
from __future__ import annotations

import json
import os
import time

from pipeline.stages import StageSpec


def _write(ctx, payload: dict) -> None:
    (ctx.out_dir / "out.json").write_text(json.dumps({"stage": ctx.stage, "round": ctx.round, "pid": os.getpid(),
                                                      "inputs": {k: a.version for k, a in ctx.inputs.items()}, **payload}))


def collect_preferences(ctx):
    _write(ctx, {})
    return {"n_comparisons": 4 * ctx.round, "share_safety": 0.5}


def reward_model(ctx):
    t0 = time.time()
    time.sleep(1.0)
    _write(ctx, {"start": t0, "end": time.time()})
    return {"accuracy": 0.6 + 0.01 * ctx.round, "accuracy_significantly_better": 0.8}


def rejection_sampling(ctx):
    _write(ctx, {})
    return {"best_reward": 1.5, "median_reward": 0.5, "gold_helpfulness_selected": 0.7}


def evaluate(ctx):
    _write(ctx, {})
    return {"gold_helpfulness": 0.4 + 0.05 * ctx.round, "win_rate_vs_sft": 0.55, "gold_safety_violation_rate": 0.1}


def _prefs(c, r):
    return {f"preferences_r{q}": ("collect_preferences", q) for q in range(1, r + 1)}


SPECS: dict[str, StageSpec] = {
    "collect_preferences": StageSpec("collect_preferences", collect_preferences, lambda c, r: {}, artifact_type="dataset",
                                     headline=("n_comparisons", "share_safety")),
    "reward_model_helpful": StageSpec("reward_model_helpful", reward_model, _prefs,
                                      headline=("accuracy", "accuracy_significantly_better")),
    "reward_model_safety": StageSpec("reward_model_safety", reward_model, _prefs,
                                     headline=("accuracy", "accuracy_significantly_better")),
    "rejection_sampling": StageSpec("rejection_sampling", rejection_sampling, lambda c, r: {
        "reward_model_helpful": ("reward_model_helpful", r), "reward_model_safety": ("reward_model_safety", r)},
        headline=("best_reward", "median_reward")),
    "evaluate": StageSpec("evaluate", evaluate, lambda c, r: {
        "policy": ("rejection_sampling", r), "reward_model_helpful": ("reward_model_helpful", r),
        **({"previous_evaluate": ("evaluate", r - 1)} if r >= 2 else {})}, artifact_type="report",
        headline=("gold_helpfulness", "win_rate_vs_sft")),
}
