"""The RLHF pipeline as one Prefect flow, `rlhf`, with four deployments.

    rlhf server &                                   # local Prefect server (or `prefect server start`)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    rlhf serve --config demo --run-dir runs/demo &  # serves rlhf/iteration, bootstrap, full, stage
    prefect deployment run rlhf/iteration --param round=3
    prefect deployment run rlhf/stage --param stage=reward_model_safety --param round=2 --param force=true

Each pipeline stage is a Prefect task named after the stage; the task only calls
`Runner.run_stage` (the logic lives in the stages) and returns a small reference to the registry
artifact, never a model. Stages of a round that do not depend on each other (the two reward models)
run in parallel. Transient errors are retried; a stage that stopped on purpose (StageFailed),
missing inputs, config errors, a missing checkpoint and running out of (GPU) memory are not.
Flow parameters cannot turn on code execution (`UNSAFE_KEYS`: trust_remote_code, allow_pickle, a
GAtt checker module) unless the served config sets it or the serving side was started with
RLHF_ALLOW_UNSAFE_OVERRIDES=1. Each round ends with a summary table artifact
`rlhf-round-<r>`. `rlhf run` does not need Prefect at all.

With `dispatch=pools` (the deployments of prefect.yaml) each stage runs instead as a flow run of its own
deployment on a worker of its work pool: flows/cluster.py.
"""
from __future__ import annotations

import builtins
import os
import time
from typing import Annotated, Any, Literal

from pydantic import Field

# Keep Prefect from reaching out; set before prefect is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline.config import ConfigError, RunConfig, load_config  # noqa: E402
from pipeline.context import StageFailed  # noqa: E402
from pipeline.registry import Registry  # noqa: E402
from pipeline.runner import MissingInputError  # noqa: E402
from pipeline.stages import STAGES, StageSpec, round_plan  # noqa: E402

DEPLOYMENTS = ("iteration", "bootstrap", "full", "stage")
# Errors no retry can fix: a guard tripped, an input is missing, the config is wrong, a file is not there.
PERMANENT = (StageFailed, MissingInputError, ConfigError, ValueError, KeyError, FileNotFoundError, NotADirectoryError,
             IsADirectoryError, MemoryError)
# An OSError from loading a checkpoint that is simply not there (transformers / huggingface_hub wording).
_MISSING_CHECKPOINT = ("does not appear to have a file named", "no file named", "is not a local folder and is not a valid model identifier",
                       "no such file or directory", "checkpoint not found", "has no config.json", "gguf file not found")
# A network problem reaching the hub is worth a retry even when it surfaces as a checkpoint error.
_TRANSIENT_HINTS = ("couldn't connect", "connection", "timed out", "timeout", "temporarily", "service unavailable", "bad gateway",
                    "too many requests")

# Keys that make the pipeline run code the flow's caller chooses: remote model code, pickle weights, a checker module.
UNSAFE_KEYS = ("pretrained.trust_remote_code", "pretrained.allow_pickle", "ghost_attention.checker")
ALLOW_UNSAFE_ENV = "RLHF_ALLOW_UNSAFE_OVERRIDES"  # set to 1 on the serving side to let flow parameters set UNSAFE_KEYS
SERVED_CONFIG_ENV = "RLHF_SERVED_CONFIG"  # the config `rlhf serve` was started with: its own values of UNSAFE_KEYS stand

Mode = Literal["iteration", "bootstrap", "full", "stage"]
StageName = Literal[tuple(STAGES)]  # the stage registry's names: a bad one is refused when the run is created


def plan(cfg: RunConfig, round: int) -> list[str]:
    """The stages of a round (round 0: data, pretrained, sft)."""
    return round_plan(cfg, round)


def levels(cfg: RunConfig, round: int, stages: list[str]) -> list[list[str]]:
    """Group a round's stages into waves: a stage waits only for the stages of this round it reads.

    With the Llama 2 DAG: [collect_preferences], [reward_model_helpful, reward_model_safety],
    [rejection_sampling], [ppo], [ghost_attention], [evaluate].
    """
    done: set[str] = set()
    waves: list[list[str]] = []
    todo = list(stages)
    while todo:
        wave = [s for s in todo
                if all(dep in done or dep not in todo for dep, r in STAGES[s].inputs(cfg, round).values() if r == round)]
        if not wave:  # a cycle cannot happen with round-indexed inputs; keep declared order if it does
            wave = todo[:1]
        waves.append(wave)
        done.update(wave)
        todo = [s for s in todo if s not in wave]
    return waves


def next_round(cfg: RunConfig) -> int:
    """1 + the highest round with a complete `evaluate`, or 1."""
    rounds = [a.round for a in Registry(cfg.run_dir).iter_artifacts("evaluate")]
    return max(rounds, default=0) + 1


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or torch.OutOfMemoryError), or a RuntimeError saying 'out of memory';
    by class name and message, so it works where torch has no CUDA."""
    return any(type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower() for e in _chain(exc))


def is_permanent(exc: BaseException | None) -> bool:
    """True for failures no retry can fix: bad input or config, missing inputs or checkpoints, out of memory."""
    if exc is None:
        return False
    chain = _chain(exc)
    if is_out_of_memory(exc):
        return True
    text = " ".join(str(e).lower() for e in chain)
    for e in chain:
        if type(e).__name__ == "CheckpointError" or (isinstance(e, OSError) and any(h in str(e).lower() for h in _MISSING_CHECKPOINT)):
            return not any(h in text for h in _TRANSIENT_HINTS)
    return isinstance(exc, PERMANENT)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry unless the failure is one no retry can fix."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:  # noqa: BLE001
            exc = e
    return not is_permanent(exc)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _value(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_parameters(config: str, overrides: list[str], run_dir: str | None = None, *,
                     allow_unsafe: bool | None = None, served_config: str | None = None) -> RunConfig:
    """The run's config from the flow's parameters, refusing any that turn on code execution.

    `pretrained.trust_remote_code`, `pretrained.allow_pickle` and `ghost_attention.checker` run code chosen
    by whoever sets them. Through the Prefect API (the flow's `config` and `overrides` parameters) they may
    only keep the values of the config the serving side was started with (`served_config`, default: the
    env var RLHF_SERVED_CONFIG that `serve_deployments` sets; without one, the defaults: all off), unless
    the serving side allows it explicitly: `allow_unsafe` (default: env RLHF_ALLOW_UNSAFE_OVERRIDES=1)."""
    cfg = load_config(config, overrides, run_dir=run_dir)
    if allow_unsafe is None:
        allow_unsafe = _truthy(os.environ.get(ALLOW_UNSAFE_ENV))
    if allow_unsafe:
        return cfg
    served = served_config if served_config is not None else os.environ.get(SERVED_CONFIG_ENV)
    base = load_config(served, [], check_device=False) if served else RunConfig()
    bad = []
    for key in UNSAFE_KEYS:
        value, allowed = _value(cfg, key), _value(base, key)
        if value not in (None, False) and value != allowed:
            bad.append(f"{key}={value!r} (allowed: {allowed!r}, the value of {'the served config ' + repr(served) if served else 'the defaults'})")
    if bad:
        raise ConfigError("flow parameters (config/overrides) cannot turn on settings that run code: " + "; ".join(bad) +
                          f". Put them in the config the serving side starts with, or start it with {ALLOW_UNSAFE_ENV}=1 "
                          "(`RLHF_ALLOW_UNSAFE_OVERRIDES=1 rlhf serve ...`) if flow callers may set them.")
    return cfg


def _headline(spec: StageSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    keys = spec.headline or [k for k, v in metrics.items() if isinstance(v, (int, float, str, bool))][:3]
    return {k: metrics[k] for k in keys if k in metrics}


@task(name="stage", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient, log_prints=True)
def run_stage(stage: str, round: int, config: str, run_dir: str | None, overrides: list[str], force: bool) -> dict[str, Any]:
    """One pipeline stage: `Runner.run_stage`, returning a reference to the registry artifact."""
    from pipeline.runner import Runner
    from pipeline.tracking import tracker_factory

    cfg = load_config(config, overrides, run_dir=run_dir)
    logger = get_run_logger()
    runner = Runner(cfg, tracker_factory=tracker_factory(cfg), echo=logger.info, show_progress=False)
    res = runner.run_stage(stage, round, force=force)
    art = res.artifact
    return {"stage": stage, "round": round, "version": art.version, "path": str(art.path), "cached": res.cached,
            "seconds": builtins.round(res.seconds, 3), "build_s": art.manifest.get("duration_s"),
            "metrics": _headline(runner.spec(stage), art.metrics)}


def _run_round(cfg: RunConfig, round: int, stages: list[str], args: dict[str, Any], retries: int,
               dispatch: str = "local") -> list[dict[str, Any]]:
    refs: list[dict[str, Any]] = []
    for wave in levels(cfg, round, stages):
        if dispatch == "pools":  # each stage is a flow run of its own deployment, on a worker of its pool
            from prefect.runtime import flow_run

            from flows.cluster import run_wave

            for ref in run_wave(cfg, round, wave, args, parent=flow_run.id, echo=get_run_logger().info):
                refs.append({**ref, "metrics": _headline(STAGES[ref["stage"]], ref["metrics"])})
            continue
        futures = [run_stage.with_options(name=s, task_run_name=f"{s}-r{round}", retries=retries, retry_delay_seconds=10)
                   .submit(s, round, **args) for s in wave]
        refs += [f.result() for f in futures]  # raises the first failure: later waves never start
    _summary_table(cfg, round, refs)
    return refs


def _summary_table(cfg: RunConfig, round: int, refs: list[dict[str, Any]]) -> None:
    rows = [{"stage": r["stage"], "version": r["version"], "cached": r["cached"], "seconds": r["seconds"],
             "build_s": r["build_s"], "metrics": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in r["metrics"].items())} for r in refs]
    create_table_artifact(rows, key=f"rlhf-round-{round}",
                          description=f"RLHF run `{cfg.name}` round {round} ({cfg.run_dir}): "
                                      f"{sum(not r['cached'] for r in refs)} built, {sum(r['cached'] for r in refs)} cached")


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    what = p.get("stage") if p.get("mode") == "stage" else p.get("mode", "iteration")
    return f"{what}-r{p['round']}" if p.get("round") is not None else str(what)


@flow(name="rlhf", task_runner=ThreadPoolTaskRunner(max_workers=2), persist_result=False, flow_run_name=_flow_run_name,
      validate_parameters=True, log_prints=True)
def rlhf(
    mode: Mode = "iteration",
    round: Annotated[int | None, Field(ge=0)] = None,
    stage: StageName | None = None,
    config: str = "demo",
    run_dir: str | None = None,
    overrides: list[str] = [],  # noqa: B006 - Prefect copies parameters; never mutated
    force: bool = False,
    retries: Annotated[int, Field(ge=0, le=10)] = 1,
    dispatch: Literal["local", "pools"] = "local",
    slot: str | None = None,
) -> list[dict[str, Any]]:
    """Run the RLHF pipeline (or a part of it) through the stage runner; returns artifact references.

    Args:
        mode: iteration: one RLHF round; bootstrap: data, pretrained, sft; full: bootstrap and every
            round of the config; stage: one stage.
        round: RLHF round. Default: the next round without a complete evaluate (0 for round-0 stages).
        stage: The stage to run in mode 'stage'.
        config: Preset name or path to a YAML config, as seen by the process that runs the flow.
        run_dir: Run directory (default: the config's run_dir).
        overrides: Dotted config overrides, e.g. ["sft.learning_rate=1e-5"].
        force: Recompute even when a complete artifact with the same version exists.
        retries: Retries per stage for transient failures (never for bad input or config).
        dispatch: local: the stages run as tasks of this flow run; pools: each stage runs as its own
            deployment (rlhf/<stage>) on a worker of its pool (flows/cluster.py).
        slot: Global concurrency limit to hold `hardware.gpus` slots of while the stage runs (mode 'stage';
            the per-stage GPU deployments of prefect.yaml set it to `gpu`).
    """
    cfg = check_parameters(config, overrides, run_dir=run_dir)  # a bad or unsafe config fails here, before any stage
    logger = get_run_logger()
    args = {"config": config, "run_dir": cfg.run_dir, "overrides": list(overrides), "force": force}
    t0 = time.time()
    if mode == "stage":
        if stage is None:
            raise ConfigError("mode 'stage' needs the parameter stage (e.g. --param stage=reward_model_safety)")
        spec = STAGES[stage]
        r = round if round is not None else (0 if spec.rounds == "zero" else next_round(cfg))
        if slot:
            from flows.cluster import gpu_slot

            with gpu_slot(cfg, slot):
                refs = _run_round(cfg, r, [stage], args, retries)
        else:
            refs = _run_round(cfg, r, [stage], args, retries, dispatch)
    elif mode == "bootstrap":
        refs = _run_round(cfg, 0, plan(cfg, 0), args, retries, dispatch)
    elif mode == "full":
        refs = []
        for r in range(0, cfg.rounds + 1):
            refs += _run_round(cfg, r, plan(cfg, r), args, retries, dispatch)
    else:
        r = round if round is not None else next_round(cfg)
        if r < 1:
            raise ConfigError("an iteration is an RLHF round >= 1; use the bootstrap deployment for round 0")
        refs = _run_round(cfg, r, plan(cfg, r), args, retries, dispatch)
    built = sum(not x["cached"] for x in refs)
    logger.info(f"{mode}: {len(refs)} stages ({built} built, {len(refs) - built} cached) in {time.time() - t0:.1f}s")
    return refs


def deployments(config: str = "demo", run_dir: str | None = None) -> list[Any]:
    """The four deployments of `rlhf`; each fixes `mode` through its default parameters."""
    base = {"config": config, "run_dir": run_dir}
    docs = {
        "iteration": "One RLHF round: preferences, both reward models in parallel, rejection sampling, PPO / GAtt where scheduled, evaluate.",
        "bootstrap": "Round 0: data, pretrained checkpoint, SFT.",
        "full": "Bootstrap and every RLHF round of the config (complete stages are cache hits).",
        "stage": "One stage (--param stage=NAME --param round=R); its inputs come from the registry.",
    }
    return [rlhf.to_deployment(name=name, parameters={**base, "mode": name}, description=docs[name], tags=["rlhf"])
            for name in DEPLOYMENTS]


def serve_deployments(config: str = "demo", run_dir: str | None = None, limit: int | None = None,
                      allow_unsafe_overrides: bool | None = None) -> None:
    """Register and serve all four deployments against PREFECT_API_URL (blocks until interrupted).

    Flow runs may not turn on `UNSAFE_KEYS` through their parameters beyond what `config` itself sets,
    unless `allow_unsafe_overrides` (default: env RLHF_ALLOW_UNSAFE_OVERRIDES=1) is true. Both are passed to
    the flow-run processes through the environment."""
    from prefect import serve

    load_config(config, [], run_dir=run_dir)  # fail fast on a bad config, before registering anything
    if allow_unsafe_overrides is None:
        allow_unsafe_overrides = _truthy(os.environ.get(ALLOW_UNSAFE_ENV))
    os.environ[ALLOW_UNSAFE_ENV] = "1" if allow_unsafe_overrides else "0"
    os.environ[SERVED_CONFIG_ENV] = config
    serve(*deployments(config, run_dir), limit=limit)


if __name__ == "__main__":  # python -m flows.rlhf serve [CONFIG [RUN_DIR]]
    import sys

    if sys.argv[1:2] == ["serve"]:
        serve_deployments(*(sys.argv[2:4]))
    else:
        sys.exit("usage: python -m flows.rlhf serve [CONFIG [RUN_DIR]]")
