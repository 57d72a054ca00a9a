"""Prefect at cluster scale with real parts: a Prefect server on 127.0.0.1, the work pools and GPU slot
limit from `rlhf cluster setup`, the deployments of `rlhf cluster yaml` registered with
`prefect deploy --all`, and real process workers (one `cpu`, two `gpu` with one run each) running the
tiny config's real stages. One worker is SIGKILLed mid-stage and a fresh one started.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config, round_stages
from pipeline.registry import Registry
from pipeline.stages import STAGES
from tests.test_distributed import descendants
from tests.test_flows import BIN, ROOT, _api, _stop, start_prefect_server

ROUND_STAGES = round_stages(load_config("tiny"), 1)
KILLED = "rejection_sampling"  # the stage whose worker is killed mid-build


def test_checked_in_prefect_yaml_is_generated_from_the_stage_registry():
    from flows.cluster import prefect_yaml, prefect_yaml_text

    assert (ROOT / "prefect.yaml").read_text() == prefect_yaml_text(), "prefect.yaml is stale: run `rlhf cluster yaml > prefect.yaml`"
    deps = {d["name"]: d for d in prefect_yaml()["deployments"]}
    assert set(deps) == {"iteration", "bootstrap", "full", *STAGES}
    assert all(deps[m]["parameters"]["dispatch"] == "pools" and deps[m]["work_pool"]["name"] == "cpu" for m in ("iteration", "bootstrap", "full"))
    assert deps["data"]["work_pool"]["name"] == "cpu" and "slot" not in deps["data"]["parameters"]
    for s in ("sft", "reward_model_helpful", "ppo", "evaluate"):
        assert deps[s]["work_pool"] == {"name": "gpu", "job_variables": {"gpus": 1}} and deps[s]["parameters"]["slot"] == "gpu"
        assert deps[s]["parameters"]["stage"] == s and deps[s]["parameters"]["mode"] == "stage"


def test_job_variables_follow_the_config():
    from flows.cluster import job_variables

    cfg = load_config("llama2-7b", ["orchestration.job_variables={gpu: {memory: 640Gi}}"], check_device=False)
    assert job_variables(cfg, "ppo") == {"gpus": cfg.hardware.gpus, "memory": "640Gi"} and cfg.hardware.gpus == 8
    assert job_variables(cfg, "data") == {}


def test_cluster_setup_refuses_bad_arguments_by_name():
    for args, msg in ((["--gpu-slots", "0"], "--gpu-slots must be >= 1 (got 0)"),
                      (["--gpu-slots", "1", "--pool-type", "docker"], "--pool-type 'docker': allowed values: process, kubernetes")):
        res = subprocess.run([str(BIN / "rlhf"), "cluster", "setup", *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_k8s_template_requests_the_gpus_and_mounts_the_runs():
    t = json.loads((ROOT / "docker" / "k8s-base-job-template.json").read_text())
    container = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert {"name": "runs", "mountPath": "/runs"} in container["volumeMounts"]
    props = t["variables"]["properties"]
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(t["job_configuration"])))
    assert used <= set(props), used - set(props)  # every placeholder is a declared variable


# ---------------------------------------------------------------------------------------- integration


def _prefect(env, *args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def _worker(env, pool: str, name: str, log_dir: Path, limit: int | None = None) -> subprocess.Popen:
    args = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name] + (["--limit", str(limit)] if limit else [])
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=(log_dir / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _flow_runs(url: str) -> list[dict]:
    return _api(url, "/flow_runs/filter", {"limit": 200})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    run_dir = tmp / "run"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"], env, url, _ = start_prefect_server(tmp, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1",
                                                            RLHF_PROGRESS="lines", OMP_NUM_THREADS="1")
        setup = subprocess.run([str(BIN / "rlhf"), "cluster", "setup", "--gpu-slots", "2", "--config", "tiny"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        spec = tmp / "prefect.yaml"
        spec.write_text(subprocess.run([str(BIN / "rlhf"), "cluster", "yaml", "--config", "tiny", "--run-dir", str(run_dir)], env=env,
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        deploy = _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(spec), timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        procs["cpu"] = _worker(env, "cpu", "cpu-1", tmp)
        procs["gpu-a"] = _worker(env, "gpu", "gpu-a", tmp, limit=1)
        procs["gpu-b"] = _worker(env, "gpu", "gpu-b", tmp, limit=1)
        yield {"env": env, "url": url, "run_dir": run_dir, "procs": procs, "tmp": tmp, "setup": setup.stdout, "deploy": deploy.stdout}
    finally:
        for name, p in reversed(list(procs.items())):
            for pid in descendants(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _stop(p)


def _logs(c) -> str:
    return "\n".join(f"--- {f.name} ---\n{f.read_text()[-3000:]}" for f in sorted(c["tmp"].glob("*.log")))


@pytest.mark.integration
def test_a_round_runs_stage_by_stage_on_pool_workers_and_survives_a_killed_worker(cluster):
    from pipeline.runner import Runner

    c, env, url, run_dir = cluster, cluster["env"], cluster["url"], cluster["run_dir"]
    assert "global concurrency limit 'gpu' created with 2 slots" in c["setup"]
    limits = _api(url, "/v2/concurrency_limits/filter", {})
    assert [(x["name"], x["limit"]) for x in limits] == [("gpu", 2)]
    pools = {p["name"]: p["type"] for p in _api(url, "/work_pools/filter", {})}
    assert pools == {"cpu": "process", "gpu": "process"}

    boot = _prefect(env, "deployment", "run", "rlhf/bootstrap", "--watch", timeout=600)
    assert boot.returncode == 0, boot.stdout + boot.stderr + _logs(c)

    # round 1, watched in the background; SIGKILL the GPU worker that builds rejection sampling, mid-build
    it = subprocess.Popen([str(BIN / "prefect"), "deployment", "run", "rlhf/iteration", "--param", "round=1", "--watch"], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reg, killed, t0 = Registry(run_dir), None, time.time()
    while killed is None and time.time() - t0 < 400 and it.poll() is None:
        att = reg.attempt(KILLED, 1)
        if att and att.get("status") == "running" and reg.find(KILLED, 1) is None:
            builder = att["pid"]
            worker = next(n for n in ("gpu-a", "gpu-b") if builder in descendants(c["procs"][n].pid))
            for pid in [c["procs"][worker].pid, *descendants(c["procs"][worker].pid)]:
                os.kill(pid, signal.SIGKILL)
            killed = worker
        time.sleep(0.05)
    assert killed, f"never saw {KILLED} building\n" + _logs(c)
    c["procs"]["gpu-c"] = _worker(env, "gpu", "gpu-c", c["tmp"], limit=1)  # a fresh worker joins
    out, _ = it.communicate(timeout=300)
    assert it.returncode == 0, out + _logs(c)

    # the round equals what `rlhf run` builds: the versions its config implies, one artifact each
    cfg = load_config("tiny", [], run_dir=str(run_dir))
    runner = Runner(cfg, echo=None)
    for s in ROUND_STAGES:
        (art,) = reg.versions(s, 1)
        assert art.version == runner.expected_version(s, 1), s
    assert not list((run_dir / "artifacts").glob("*/.tmp-*")), "a build was left behind"
    assert not [p for p in (run_dir / "locks").rglob("*.lease")], "a lease was left behind"
    assert reg.attempt(KILLED, 1)["status"] == "complete"
    assert [p["kind"] for p in reg.scan()] == []

    # the two reward models ran at once, so on the two GPU workers (each takes one run at a time)
    helpful, safety = reg.find("reward_model_helpful", 1).manifest, reg.find("reward_model_safety", 1).manifest
    assert helpful["started_at"] < safety["finished_at"] and safety["started_at"] < helpful["finished_at"], (helpful, safety)

    # Prefect: one flow run per stage, the killed one Crashed and resubmitted; the round flow ran nothing itself
    runs = _flow_runs(url)
    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    states = {n: sorted(r["state_type"] for r in rs) for n, rs in by_name.items()}
    assert states[f"{KILLED}-r1"] == ["COMPLETED", "CRASHED"], states
    crashed = next(r for r in by_name[f"{KILLED}-r1"] if r["state_type"] == "CRASHED")
    assert "died" in crashed["state"]["message"] and "resubmits" in crashed["state"]["message"], crashed["state"]
    assert all(states[f"{s}-r1"] == ["COMPLETED"] for s in ROUND_STAGES if s != KILLED), states
    children = [r for s in ROUND_STAGES for r in by_name[f"{s}-r1"]]
    assert {r["work_pool_name"] for r in children} == {"gpu"} and all(r["parent_task_run_id"] for r in children)
    assert states["iteration-r1"] == ["COMPLETED"]
    (table,) = _api(url, "/artifacts/latest/filter", {"artifacts": {"key": {"any_": ["rlhf-round-1"]}}})
    rows = json.loads(table["data"])
    assert {r["stage"]: r["version"] for r in rows} == {s: reg.find(s, 1).version for s in ROUND_STAGES}
    assert yaml.safe_load((c["tmp"] / "prefect.yaml").read_text())["deployments"][0]["parameters"]["run_dir"] == str(run_dir)


@pytest.mark.integration
def test_gpu_slots_serialise_stages_beyond_the_limit(cluster):
    """Two holders of a 1-slot limit never overlap; a missing limit is a clear error naming the fix."""
    script = r"""
import json, threading, time, sys
from pipeline.config import load_config
from flows.cluster import gpu_slot
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
with get_client(sync_client=True) as c:
    c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="one-gpu", limit=1))
cfg = load_config("tiny", [])
spans = []
def hold():
    with gpu_slot(cfg, "one-gpu"):
        t = time.time(); time.sleep(1.5); spans.append((t, time.time()))
ts = [threading.Thread(target=hold) for _ in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
try:
    with gpu_slot(cfg, "no-such-limit"):
        pass
    err = None
except Exception as e:
    err = f"{type(e).__name__}: {e}"
print(json.dumps({"spans": sorted(spans), "err": err}))
"""
    res = subprocess.run([str(BIN / "python"), "-c", script], env=cluster["env"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    (a0, a1), (b0, b1) = out["spans"]
    assert b0 >= a1 - 0.05, out["spans"]  # the second waited for the first's slot
    assert out["err"].startswith("ConfigError") and "rlhf cluster setup --gpu-slots" in out["err"], out["err"]
