"""The stage registry: the DAG of the Llama 2 recipe, one name per stage used everywhere.

`pipeline` does not import the stage implementations (they live in higher layers); it names them
by import path, and the runner imports one only when that stage really has to run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import RunConfig, policy_stage, round_stages

InputRefs = dict[str, tuple[str, int]]  # role -> (stage, round)


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str | Callable  # "package.module:function" or a callable(ctx) -> metrics
    inputs: Callable[[RunConfig, int], InputRefs]
    code: tuple[str, ...] = ()  # modules (or packages) whose source is part of the version
    artifact_type: str = "model"  # W&B artifact type: model, dataset or report
    headline: tuple[str, ...] = ()  # metrics shown by `rlhf status`
    rounds: str = "rlhf"  # "zero": round 0 only; "rlhf": rounds >= 1
    description: str = ""
    external: Callable[[RunConfig, int], dict] | None = None  # digests of files outside the registry it reads
    # "module:function" or callable(cfg, round): validates user inputs (files, config) before any work
    # is done or anything is written; raises StageFailed naming the file, line and field.
    check: str | Callable[[RunConfig, int], None] | None = None
    # True: in several processes every rank runs it (its trainer shards the model, pipeline/distributed.py);
    # False: rank 0 runs it alone while the others wait
    distributed: bool = False
    # True: it only samples and scores (collect_preferences, evaluate); with hardware.shard_inference every rank
    # joins it as if it were distributed, each holding a shard of its models (pipeline/distributed.py `load_sharded`)
    samples: bool = False
    # The kind of worker it needs under Prefect work pools (flows/cluster.py): "gpu" (models) or "cpu"
    resource: str = "gpu"


# Modules every model stage depends on (chat formatting, model loading, training loop).
COMMON = ("pipeline.chat", "pipeline.models", "pipeline.context", "pipeline.distributed")


def _data(cfg: RunConfig, r: int) -> InputRefs:
    return {"data": ("data", 0)}


def _file_digest(path: str) -> str:
    from pathlib import Path

    from .io import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return ",".join(f"{f.name}:{sha256_file(f)}" for f in sorted(p.rglob("*")) if f.is_file())
    return "absent"  # a hub dataset or a file that does not exist yet (the stage says what to do)


def _data_files(cfg: RunConfig, r: int) -> dict:
    """User data files are part of the `data` version: editing a file means new data."""
    d = cfg.data
    static = {f"preferences.{i}": _file_digest(s.path) for i, s in enumerate(d.preferences)}  # either source
    if d.source == "demo":
        return static
    srcs = {k: getattr(d, k) for k in ("sft", "prompts", "eval_prompts", "eval_comparisons", "gatt_instructions")}
    return {**{k: _file_digest(s.path) for k, s in srcs.items() if s is not None}, **static}


def _preference_file(cfg: RunConfig, r: int) -> dict:
    src = cfg.collect_preferences.source
    return {} if src == "demo" else {"labeled": _file_digest(src.format(round=r))}


def _rm_inputs(stage: str) -> Callable[[RunConfig, int], InputRefs]:
    def inputs(cfg: RunConfig, r: int) -> InputRefs:
        refs: InputRefs = {"data": ("data", 0), "policy": (policy_stage(cfg, r - 1), r - 1), "pretrained": ("pretrained", 0)}
        for q in range(1, r + 1):
            refs[f"preferences_r{q}"] = ("collect_preferences", q)
        if getattr(cfg, stage).init_from == "previous" and r >= 2:
            refs["previous"] = (stage, r - 1)
        return refs

    return inputs


def _rs_inputs(cfg: RunConfig, r: int) -> InputRefs:
    refs: InputRefs = {
        "data": ("data", 0),
        "policy": (policy_stage(cfg, r - 1), r - 1),
        "reward_model_helpful": ("reward_model_helpful", r),
        "reward_model_safety": ("reward_model_safety", r),
    }
    if cfg.rejection_sampling.keep_all_rounds:
        for q in range(1, r):
            refs[f"earlier_r{q}"] = ("rejection_sampling", q)
    return refs


def _ppo_inputs(cfg: RunConfig, r: int) -> InputRefs:
    return {
        "data": ("data", 0),
        "policy": ("rejection_sampling", r),
        "reward_model_helpful": ("reward_model_helpful", r),
        "reward_model_safety": ("reward_model_safety", r),
    }


def _gatt_inputs(cfg: RunConfig, r: int) -> InputRefs:
    stages = round_stages(cfg, r)
    return {"data": ("data", 0), "policy": (stages[stages.index("ghost_attention") - 1], r)}


def _eval_inputs(cfg: RunConfig, r: int) -> InputRefs:
    stages = round_stages(cfg, r)
    refs: InputRefs = {
        "data": ("data", 0),
        "policy": (policy_stage(cfg, r), r),
        "previous_policy": (policy_stage(cfg, r - 1), r - 1),
        "sft": ("sft", 0),
        "reward_model_helpful": ("reward_model_helpful", r),
        "reward_model_safety": ("reward_model_safety", r),
        "rejection_sampling": ("rejection_sampling", r),
    }
    for s in ("ppo", "ghost_attention"):
        if s in stages:
            refs[s] = (s, r)
    if r >= 2:
        refs["previous_evaluate"] = ("evaluate", r - 1)
    if "judge_reward_model" in stages:
        refs["judge"] = ("judge_reward_model", r)
    return refs


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("data", "data_specs.prepare:run", lambda c, r: {}, ("data_specs",), "dataset",
                  ("n_sft", "n_prompts", "n_eval_prompts"), "zero", "Write (demo) or validate and copy (files) every dataset.", _data_files,
                  check="data_specs.prepare:check", resource="cpu"),
        StageSpec("pretrained", "policies.pretrained:run", _data, ("policies.pretrained", "pipeline.models", "pipeline.chat"), "model",
                  ("params_M", "loss"), "zero", "Resolve, load and register the base checkpoint (or pretrain the tiny demo Llama)."),
        StageSpec("sft", "policies.sft:run", lambda c, r: {"data": ("data", 0), "base": ("pretrained", 0)},
                  ("policies.sft", "policies.trainer", *COMMON), "model",
                  ("eval_loss", "gold_helpfulness", "tokens_per_s"), "zero", "Supervised fine-tuning, loss on answer tokens only.", distributed=True),
        StageSpec("collect_preferences", "policies.collect_preferences:run",
                  lambda c, r: {"data": ("data", 0), "policy": (policy_stage(c, r - 1), r - 1), "pretrained": ("pretrained", 0)},
                  ("policies.collect_preferences", "policies.generation", *COMMON), "dataset",
                  ("n_comparisons", "share_safety"), "rlhf", "New comparisons on samples of the latest policy.", _preference_file,
                  check="policies.collect_preferences:check", samples=True),
        StageSpec("reward_model_helpful", "reward_models.train:run_helpful", _rm_inputs("reward_model_helpful"),
                  ("reward_models", *COMMON), "model", ("accuracy", "accuracy_significantly_better"), "rlhf",
                  "Helpfulness reward model, margin ranking loss.", distributed=True),
        StageSpec("reward_model_safety", "reward_models.train:run_safety", _rm_inputs("reward_model_safety"),
                  ("reward_models", *COMMON), "model", ("accuracy", "accuracy_significantly_better"), "rlhf",
                  "Safety reward model, margin ranking loss.", distributed=True),
        StageSpec("judge_reward_model", "reward_models.train:run_judge", _rm_inputs("judge_reward_model"),
                  ("reward_models", *COMMON), "model", ("accuracy", "n_train"), "rlhf",
                  "Held-out judge RM: trained on the held-out prompts' comparisons only, judges evaluate's win rates "
                  "(evaluate.judge: heldout_rm).", distributed=True),
        StageSpec("rejection_sampling", "policies.rejection_sampling:run", _rs_inputs,
                  ("policies.rejection_sampling", "policies.trainer", "policies.generation", "reward_models", *COMMON), "model",
                  ("best_reward", "median_reward", "gold_helpfulness_selected"), "rlhf", "Best-of-K by the combined reward, then fine-tune.", distributed=True),
        StageSpec("ppo", "policies.ppo:run", _ppo_inputs,
                  ("policies.ppo", "policies.ppo_math", "policies.generation", "reward_models", *COMMON), "model",
                  ("reward", "kl", "stop_reason"), "rlhf", "PPO with the safety-gated, whitened reward and a KL penalty.", distributed=True),
        StageSpec("ghost_attention", "policies.ghost_attention:run", _gatt_inputs,
                  ("policies.ghost_attention", "policies.trainer", "policies.generation", *COMMON), "model",
                  ("adherence_late_before", "adherence_late_after"), "rlhf", "Ghost Attention multi-turn data synthesis and fine-tuning.", distributed=True),
        StageSpec("evaluate", "policies.evaluate:run", _eval_inputs,
                  ("policies.evaluate", "policies.eval_stats", "policies.generation", "reward_models", *COMMON), "report",
                  ("gold_helpfulness", "gold_win_rate_vs_sft", "gold_safety_violation_rate"), "rlhf",
                  "Win rates, RM accuracy, safety, false refusals, GAtt adherence; gold scores in the demo.", samples=True),
    ]
}

ROUND_ZERO = [s.name for s in STAGES.values() if s.rounds == "zero"]


def schedule(cfg: RunConfig, rounds: int | None = None, specs: dict[str, StageSpec] | None = None) -> list[tuple[str, int]]:
    """(stage, round) pairs of the whole run in execution order."""
    specs = specs or STAGES
    if specs is not STAGES:  # custom DAGs (tests): declared order, zero-round stages first
        zero = [(n, 0) for n, s in specs.items() if s.rounds == "zero"]
        rl = [(n, r) for r in range(1, (cfg.rounds if rounds is None else rounds) + 1) for n, s in specs.items() if s.rounds == "rlhf"]
        return zero + rl
    out = [("data", 0)] + [(s, 0) for s in round_stages(cfg, 0)]
    for r in range(1, (cfg.rounds if rounds is None else rounds) + 1):
        out += [(s, r) for s in round_stages(cfg, r)]
    return out


def round_plan(cfg: RunConfig, round: int) -> list[str]:
    return (["data"] + round_stages(cfg, 0)) if round == 0 else round_stages(cfg, round)
