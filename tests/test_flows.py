"""Prefect orchestration against a real local Prefect server, and the docker files.

The integration test starts `rlhf server` (SQLite under tmp_path) and `rlhf serve`, then runs the
`rlhf/bootstrap` and `rlhf/iteration` deployments with the Prefect CLI, the way a user does, on
the real stages of the tiny config.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config, round_stages
from pipeline.context import StageFailed
from pipeline.runner import MissingInputError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROUND_STAGES = round_stages(load_config("tiny"), 1)


# ---------------------------------------------------------------------------------------- unit


def test_round_waves_run_reward_models_in_parallel():
    from flows.rlhf import levels, plan

    cfg = load_config("demo")
    assert levels(cfg, 3, round_stages(cfg, 3)) == [["collect_preferences"], ["reward_model_helpful", "reward_model_safety"],
                                                   ["rejection_sampling"], ["ppo"], ["ghost_attention"], ["evaluate"]]
    assert levels(cfg, 1, round_stages(cfg, 1))[-2:] == [["rejection_sampling"], ["evaluate"]]
    assert plan(cfg, 0) == ["data", "pretrained", "sft"]


def test_no_retry_for_bad_input():
    from prefect.states import Failed

    from flows.rlhf import _retry_transient

    for exc, retry in [(StageFailed("guard"), False), (MissingInputError("no sft"), False), (OSError("nfs hiccup"), True),
                       (RuntimeError("CUDA error: unspecified launch failure"), True)]:
        assert _retry_transient(None, None, Failed(data=exc)) is retry, exc


def test_four_deployments_fix_the_mode():
    from flows.rlhf import deployments

    deps = deployments("tiny", "runs/x")
    assert [d.name for d in deps] == ["iteration", "bootstrap", "full", "stage"]
    assert all(d.parameters == {"config": "tiny", "run_dir": "runs/x", "mode": d.name} for d in deps)
    assert all(d.enforce_parameter_schema for d in deps)


# ---------------------------------------------------------------------------------------- integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _api(url, "/health") is True:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None, grace: float = 5) -> None:
    """Stop a process started with start_new_session=True and everything in its process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def start_prefect_server(tmp: Path, **extra_env: str) -> tuple[subprocess.Popen, dict, str, Path]:
    """A real Prefect server on 127.0.0.1 (`rlhf server`, its own home under `tmp`), waited on until healthy.
    Returns (process, the environment that talks to it, its API URL, its log). Stop it with `_stop`."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PREFECT_HOME": str(tmp / "client"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           **extra_env}
    log = tmp / "server.log"
    server = subprocess.Popen([str(BIN / "rlhf"), "server", "--port", str(port), "--home", str(tmp / "server"), "--no-ui"],
                              env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, server, log)
    except BaseException:
        _stop(server)
        raise
    return server, env, url, log


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """A real Prefect server plus `rlhf serve` of the tiny config (real stages)."""
    tmp = tmp_path_factory.mktemp("prefect")
    run_dir = tmp / "run"
    server = serve = None
    serve_log = tmp / "serve.log"
    try:
        server, env, url, server_log = start_prefect_server(tmp, PREFECT_RUNNER_POLL_FREQUENCY="1")
        home = Path(env["HOME"])
        serve = subprocess.Popen([str(BIN / "rlhf"), "serve", "--config", "tiny", "--run-dir", str(run_dir)],
                                 env=env, cwd=ROOT, stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while "rlhf/stage" not in serve_log.read_text():
            if serve.poll() is not None or time.time() - t0 > 60:
                pytest.fail(f"rlhf serve did not start:\n{serve_log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"env": env, "url": url, "run_dir": run_dir, "home": home, "server_log": server_log, "serve_log": serve_log}
    finally:
        _stop(serve)  # first, so it can pause its deployments while the server is still up
        _stop(server)


def _deployment_run(stack, *params: str, watch: bool = True, deployment: str = "rlhf/iteration") -> subprocess.CompletedProcess:
    args = [str(BIN / "prefect"), "deployment", "run", deployment]
    for p in params:
        args += ["--param", p]
    return subprocess.run(args + (["--watch"] if watch else []), env=stack["env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _flow_run(stack, out: str) -> dict:
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    return _api(stack["url"], f"/flow_runs/{run_id}")


def _round_table(stack, round: int) -> tuple[dict, list[dict]]:
    (art,) = _api(stack["url"], "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [f"rlhf-round-{round}"]}}})
    return art, json.loads(art["data"])


def _artifact_dirs(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in (run_dir / "artifacts").glob("*/*") if not p.name.startswith(".")}


@pytest.mark.integration
def test_iteration_deployment_builds_then_caches_a_round(prefect_stack):
    from pipeline.registry import Registry

    stack, run_dir = prefect_stack, prefect_stack["run_dir"]
    boot = _deployment_run(stack, deployment="rlhf/bootstrap")  # data, pretrained, sft
    assert boot.returncode == 0, boot.stdout + boot.stderr + stack["serve_log"].read_text()[-4000:]
    assert all(Registry(run_dir).find(s, 0) for s in ("data", "pretrained", "sft"))
    first = _deployment_run(stack, "round=1")
    logs = f"{first.stdout}\n{first.stderr}\n--- serve log ---\n{stack['serve_log'].read_text()[-4000:]}"
    assert first.returncode == 0, logs
    run = _flow_run(stack, first.stdout)
    assert run["state_type"] == "COMPLETED" and run["name"] == "iteration-r1" and run["parameters"]["round"] == 1, logs

    reg = Registry(run_dir)
    arts = {s: reg.find(s, 1) for s in ROUND_STAGES}
    assert all(arts.values()), arts
    helpful, safety = arts["reward_model_helpful"].manifest, arts["reward_model_safety"].manifest
    assert helpful["started_at"] < safety["finished_at"] and safety["started_at"] < helpful["finished_at"], \
        "the reward models did not run in parallel"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 3 + len(ROUND_STAGES)  # one W&B run per built stage

    art, rows = _round_table(stack, 1)
    assert art["type"] == "table" and art["flow_run_id"] == run["id"]
    assert [r["stage"] for r in rows] == ROUND_STAGES and not any(r["cached"] for r in rows)
    assert {r["stage"]: r["version"] for r in rows} == {s: a.version for s, a in arts.items()}
    assert "accuracy=" in rows[1]["metrics"]

    dirs = _artifact_dirs(run_dir)
    second = _deployment_run(stack, "round=1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert _flow_run(stack, second.stdout)["state_type"] == "COMPLETED"
    art2, rows2 = _round_table(stack, 1)
    assert art2["flow_run_id"] != run["id"] and all(r["cached"] for r in rows2), rows2
    assert _artifact_dirs(run_dir) == dirs  # nothing rebuilt
    written = [p for p in stack["home"].rglob("*") if p.is_file()]
    assert all("matplotlib" in str(p) for p in written), written  # no W&B or Prefect files in $HOME (only matplotlib's font cache)


@pytest.mark.integration
def test_bad_parameters_are_rejected_naming_the_field(prefect_stack):
    for param, field in [("round=abc", "round"), ("mode=bogus", "mode"), ("round=-1", "round"), ("stage=sfft", "stage")]:
        res = _deployment_run(prefect_stack, param, watch=False)
        msg = res.stdout + res.stderr
        assert res.returncode != 0 and f"Validation failed for field '{field}'" in msg, msg
    # parameters cannot turn on code execution unless the serving side allows it (RLHF_ALLOW_UNSAFE_OVERRIDES)
    res = _deployment_run(prefect_stack, 'overrides=["pretrained.trust_remote_code=true"]', deployment="rlhf/bootstrap")
    run = _flow_run(prefect_stack, res.stdout)
    assert run["state_type"] == "FAILED" and "pretrained.trust_remote_code" in (run["state"]["message"] or ""), run["state"]


# ---------------------------------------------------------------------------------------- docker


def test_compose_and_dockerfile_refer_to_existing_files():
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "setup", "worker-cpu", "worker-gpu", "rlhf-serve"} <= set(services)
    for svc in services.values():
        if "build" in svc:
            ctx = (ROOT / "docker" / svc["build"]["context"]).resolve()
            assert ctx == ROOT and (ctx / svc["build"]["dockerfile"]).is_file()

    def command(name: str) -> str:
        c = services[name]["command"]
        return " ".join(c if isinstance(c, list) else [c])

    assert "rlhf serve" in command("rlhf-serve") and services["rlhf-serve"]["profiles"] == ["serve"]
    assert "rlhf cluster setup" in command("setup") and "prefect --no-prompt deploy --all" in command("setup")
    assert "--pool gpu --limit 1" in command("worker-gpu") and "--pool cpu" in command("worker-cpu")
    named = set(compose["volumes"])
    for svc in services.values():
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in named
    for name in ("worker-cpu", "worker-gpu", "rlhf-serve"):  # every process that builds sees the one run directory
        assert "runs:/runs" in services[name]["volumes"]
    env = services["prefect-server"]["environment"]
    assert str(env["PREFECT_SERVER_ANALYTICS_ENABLED"]).lower() == "false"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://") and "@postgres:5432/" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker-gpu"]["depends_on"]["setup"]["condition"] == "service_completed_successfully"

    lines = (ROOT / "docker" / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ") and "--from" not in line]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile COPY source {src} does not exist"
    assert any("pip install" in line and "torch" in line for line in lines)
    extras = next(line for line in lines if line.startswith("ARG EXTRAS="))
    # the GPU image samples with vLLM and can shard with DeepSpeed; every extra it names exists in pyproject.toml
    assert set(extras.split("=", 1)[1].split(",")) == {"vllm", "deepspeed"} and any('".[${EXTRAS}]"' in line for line in lines)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(f"\n{name} = [" in pyproject for name in ("vllm", "deepspeed"))
