"""Prefect at cluster scale: every stage is its own deployment, dispatched to a work pool by kind.

    rlhf server &                                   # or a Prefect server with Postgres (docker/docker-compose.yml)
    export PREFECT_API_URL=http://SERVER:4200/api
    rlhf cluster setup --gpu-slots 8                # work pools `cpu` and `gpu`, global concurrency limit `gpu`
    prefect deploy --all                            # prefect.yaml: rlhf/iteration, rlhf/bootstrap, rlhf/full, rlhf/<stage>
    prefect worker start --pool gpu --limit 1       # on every GPU machine, one per GPU slot (shared run directory)
    prefect worker start --pool cpu                 # runs the round flows (they only wait) and the data stage
    prefect deployment run rlhf/iteration --param round=1 --watch

The round flow (`rlhf`, dispatch=pools) submits each wave of a round's stages with `run_deployment` to
the deployment named after the stage (`rlhf/reward_model_safety`, ...) in the pool of the stage's kind
(`StageSpec.resource` in the stage registry: cpu or gpu), with the config's job variables (GPU count,
memory). The two reward models are one wave, so they run at once on two workers; a GPU stage holds
`hardware.gpus` slots of the global concurrency limit `gpu` while it builds, so PPO waits for a free
GPU. All workers share the run directory: the registry's leases make two workers on one version safe
(one builds, the other reuses it), and a build whose worker died is resumed, not duplicated.

A worker that dies mid-stage leaves its flow run "Running" in Prefect (nobody is left to report it).
The round flow sees it through the registry: the stage's attempt reads "interrupted" once its builder
is gone (the build lease names the builder: pid on the same host, heartbeat elsewhere). It then
marks the flow run Crashed and submits the stage again, up to `orchestration.resubmits` times; the new
build takes the lease over and resumes from the last checkpoint. A stage that failed with an error
(bad input, out of memory, a tripped guard) is never resubmitted. Its GPU slots come back when their
lease (`orchestration.slot_lease_s`) runs out.

`prefect.yaml` is generated from the stage registry (`rlhf cluster yaml > prefect.yaml`; a test checks
the checked-in file is current), so the stage list still lives once.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.registry import Registry
from pipeline.stages import STAGES

FLOW = "rlhf"
ENTRYPOINT = "flows/rlhf.py:rlhf"
ROUND_DEPLOYMENTS = {
    "iteration": "One RLHF round; each stage runs as its own deployment on a worker of its pool.",
    "bootstrap": "Round 0 (data, pretrained, sft), each stage on a worker of its pool.",
    "full": "Bootstrap and every RLHF round of the config, each stage on a worker of its pool.",
}
K8S_TEMPLATE = Path(__file__).resolve().parent.parent / "docker" / "k8s-base-job-template.json"


class DispatchError(RuntimeError):
    """A dispatched stage ended without an artifact (failed, cancelled, or its worker died too often)."""


def kind(stage: str) -> str:
    return STAGES[stage].resource


def job_variables(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """Job variables of a stage's flow run: the GPU count for GPU stages, then the config's per-kind values."""
    k = kind(stage)
    base: dict[str, Any] = {"gpus": cfg.hardware.gpus} if k == "gpu" else {}
    return {**base, **cfg.orchestration.job_variables.get(k, {})}  # type: ignore[call-overload]


def prefect_yaml(config: str = "demo", run_dir: str | None = None) -> dict[str, Any]:
    """The deployments `prefect deploy --all` registers: the round flows in the cpu pool, one per stage in its kind's pool."""
    cfg = load_config(config, [], run_dir=run_dir, check_device=False)
    pools = cfg.orchestration.pools
    base = {"config": config, "run_dir": run_dir}
    deployments = [{"name": mode, "description": doc, "entrypoint": ENTRYPOINT, "tags": ["rlhf"],
                    "parameters": {**base, "mode": mode, "dispatch": "pools"}, "work_pool": {"name": pools["cpu"]}}
                   for mode, doc in ROUND_DEPLOYMENTS.items()]
    for name, spec in STAGES.items():
        params: dict[str, Any] = {**base, "mode": "stage", "stage": name}
        if spec.resource == "gpu":
            params["slot"] = cfg.orchestration.gpu_limit
        deployments.append({"name": name, "description": f"Stage {name}: {spec.description}", "entrypoint": ENTRYPOINT,
                            "tags": ["rlhf", "stage", spec.resource], "parameters": params,
                            "work_pool": {"name": pools[spec.resource], "job_variables": job_variables(cfg, name)}})  # type: ignore[index]
    return {"name": "rlhf-llama2", "build": None, "push": None, "deployments": deployments}


def prefect_yaml_text(config: str = "demo", run_dir: str | None = None) -> str:
    import yaml

    head = ("# Generated from the stage registry by `rlhf cluster yaml` (pipeline/stages.py); do not edit by hand.\n"
            "# Register everything: `prefect deploy --all` from the repository root (the workers' working directory).\n")
    return head + yaml.safe_dump(prefect_yaml(config, run_dir), sort_keys=False, width=120)


# ---------------------------------------------------------------------------------------- set-up


def setup(gpu_slots: int, config: str = "demo", pool_type: str = "process", echo: Callable[[str], None] = print) -> None:
    """Create (or update) the work pools of the config and the global concurrency limit of GPU slots.

    pool_type "kubernetes" gives the GPU pool the base job template in docker/ (GPU requests, the shared
    run volume); it needs the prefect-kubernetes package where the worker runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    if gpu_slots < 1:
        raise ConfigError(f"--gpu-slots must be >= 1 (got {gpu_slots}): the number of GPUs the workers share")
    if pool_type not in ("process", "kubernetes"):
        raise ConfigError(f"--pool-type {pool_type!r}: allowed values: process, kubernetes")
    cfg = load_config(config, [], check_device=False)
    o = cfg.orchestration
    with get_client(sync_client=True) as client:
        for k, name in o.pools.items():
            if pool_type == "kubernetes" and k == "gpu":
                template = json.loads(K8S_TEMPLATE.read_text())
            elif pool_type == "process":  # the worker's own default: workers starting at once need not all write it
                from prefect.workers.process import ProcessWorker

                template = ProcessWorker.get_default_base_job_template()
            else:
                template = {}
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
                echo(f"work pool {name!r} ({pool_type}) created for {k} stages")
            except ObjectAlreadyExists:
                echo(f"work pool {name!r} exists; kept")
        try:
            client.read_global_concurrency_limit_by_name(o.gpu_limit)
            client.update_global_concurrency_limit(o.gpu_limit, GlobalConcurrencyLimitUpdate(limit=gpu_slots, active=True))
            echo(f"global concurrency limit {o.gpu_limit!r} set to {gpu_slots} slots")
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=o.gpu_limit, limit=gpu_slots))
            echo(f"global concurrency limit {o.gpu_limit!r} created with {gpu_slots} slots")


@contextlib.contextmanager
def gpu_slot(cfg: RunConfig, name: str) -> Iterator[None]:
    """Hold `hardware.gpus` slots of the global concurrency limit `name` (waiting for them) while a GPU stage runs."""
    from prefect.concurrency.sync import concurrency
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError  # not re-exported by prefect 3.8

    occupy = cfg.hardware.gpus
    try:
        with concurrency(name, occupy=occupy, lease_duration=cfg.orchestration.slot_lease_s, strict=True):
            yield
    except ConcurrencySlotAcquisitionError as e:
        raise ConfigError(f"cannot take {occupy} slot(s) of the global concurrency limit {name!r}: {e}. Create it with "
                          f"`rlhf cluster setup --gpu-slots N` (or `prefect gcl create {name} --limit N`), N = the GPUs "
                          "the workers share.") from e


# ---------------------------------------------------------------------------------------- dispatch


def _submit(stage: str, round: int, cfg: RunConfig, args: dict[str, Any], tries: int, parent: str | None) -> Any:
    from prefect.deployments import run_deployment

    params = {"round": round, "config": args["config"], "run_dir": args["run_dir"], "overrides": args["overrides"],
              "force": args["force"] and tries == 0}  # a resubmitted stage resumes its build, it does not restart it
    return run_deployment(f"{FLOW}/{stage}", parameters=params, job_variables=job_variables(cfg, stage), timeout=0,
                          flow_run_name=f"{stage}-r{round}" + (f"-retry{tries}" if tries else ""),
                          idempotency_key=f"{parent}:{stage}:r{round}:{tries}" if parent else None, tags=["rlhf", kind(stage)])


def builder_died(registry: Registry, stage: str, round: int, since: float) -> bool:
    """True when the build of (stage, round) that started after `since` was interrupted: its builder is gone."""
    att = registry.attempt(stage, round)
    return bool(att) and att.get("status") == "interrupted" and float(att.get("started_at") or 0) >= since - 1


def _reference(runner: Any, stage: str, round: int, started: float, run_name: str) -> dict[str, Any]:
    """The registry artifact a completed stage run produced (the version the runner's config implies)."""
    registry = runner.registry
    version = runner.expected_version(stage, round)
    art = registry.find(stage, round, version)
    if art is None:
        raise DispatchError(f"stage {stage} round {round}: flow run {run_name} completed, but version {version} (what this "
                            f"config implies) is not in {registry.run_dir}: do the workers run other code or see another "
                            "run directory? They must share the run directory and run the same code.")
    m = art.manifest
    cached = float(m.get("finished_at") or 0) < started
    return {"stage": stage, "round": round, "version": version, "path": str(art.path), "cached": cached,
            "seconds": float(f"{time.time() - started:.3f}"), "build_s": m.get("duration_s"), "metrics": dict(art.metrics)}


def run_wave(cfg: RunConfig, round: int, wave: list[str], args: dict[str, Any], parent: str | None = None,
             echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Submit a wave's stages to their deployments at once and wait for all; resubmit those whose worker died."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from pipeline.runner import Runner

    runner = Runner(cfg, echo=None)  # the versions this config implies: what each completed stage must have built
    o, registry = cfg.orchestration, runner.registry
    runs = {s: _submit(s, round, cfg, args, 0, parent) for s in wave}
    tries = {s: 0 for s in wave}
    refs: dict[str, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        while len(refs) < len(wave):
            time.sleep(o.poll_s)
            for s in wave:
                if s in refs:
                    continue
                fr = client.read_flow_run(runs[s].id)
                state = fr.state
                started = fr.start_time.timestamp() if fr.start_time else None
                if state is not None and state.is_completed():
                    refs[s] = _reference(runner, s, round, started or time.time(), fr.name)
                    continue
                died = state is not None and state.is_running() and started is not None and builder_died(registry, s, round, started)
                if died:
                    client.set_flow_run_state(fr.id, Crashed(message=f"the builder of {s} round {round} died (its worker is "
                                                                     "gone); the round flow resubmits the stage"), force=True)
                if died or (state is not None and state.is_crashed()):
                    if tries[s] >= o.resubmits:
                        raise DispatchError(f"stage {s} round {round}: its worker died {tries[s] + 1} times "
                                            f"(orchestration.resubmits={o.resubmits}); last flow run {fr.name}")
                    tries[s] += 1
                    echo(f"{s} round {round}: flow run {fr.name} crashed (worker gone); resubmitting ({tries[s]}/{o.resubmits})")
                    runs[s] = _submit(s, round, cfg, args, tries[s], parent)
                elif state is not None and state.is_final():
                    raise DispatchError(f"stage {s} round {round}: flow run {fr.name} ended {state.type.value}: {state.message}")
    return [refs[s] for s in wave]
