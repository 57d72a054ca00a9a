"""The registry under faults: pinned inputs, tampering, corrupt manifests, concurrent builders,
foreign-host leases, SIGTERM, a full disk, and SIGKILL at random moments across the real tiny pipeline.

Real processes and real files throughout: builders are `python -c` / `rlhf` subprocesses, the full
disk is a 1 MiB tmpfs (or, where mounting is not allowed, a file-size limit), leases are the files
other hosts would see on a shared volume.
"""
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import locks
from pipeline.cli import app, status_rows
from pipeline.config import load_config
from pipeline.errors import CorruptArtifact
from pipeline.registry import Registry
from pipeline.runner import MissingInputError, Runner

RLHF = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}


def tiny(run_dir, *extra):
    return load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=disabled", *extra])


def quiet_runner(cfg, **kw):
    return Runner(cfg, echo=None, show_progress=False, **kw)


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files, hidden builds and leases: none may survive a finished command."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".old-"))
             or p.suffix == ".lease" or ".stale-" in p.name or p.name.endswith(".hb")]
    return sorted(str(p.relative_to(run_dir)) for p in found)


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    """data, pretrained and sft of the tiny preset, built once; tests copy it."""
    run_dir = tmp_path_factory.mktemp("r0") / "run"
    quiet_runner(tiny(run_dir)).run_all(rounds=0)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # -a keeps mtimes, as a backup tool would
    return dst


# ------------------------------------------------------------------------------------------ pinned inputs


def test_inputs_are_pinned_to_the_version_the_config_implies(round0, tmp_path):
    """The repro of the issue: a pretrained built with another config must not become sft's input."""
    run_dir = copy_run(round0, tmp_path / "run")
    base = quiet_runner(tiny(run_dir)).run_all(rounds=0)
    pretrained_5 = base[1].artifact
    other = quiet_runner(tiny(run_dir, "pretrained.demo.pretrain_steps=6")).run_stage("pretrained", 0)
    assert other.artifact.version != pretrained_5.version and not other.cached
    # the newest pretrained is now the 6-step one; a rerun with the original config still reads the 5-step one
    again = quiet_runner(tiny(run_dir)).run_all(rounds=0)
    assert all(r.cached for r in again)
    assert again[2].artifact.inputs["base"]["version"] == pretrained_5.version
    forced = quiet_runner(tiny(run_dir)).run_stage("sft", 0, force=True)
    assert forced.artifact.inputs["base"]["version"] == pretrained_5.version
    # the 6-step config asks for an sft on the 6-step model: it is built on exactly that one
    sft6 = quiet_runner(tiny(run_dir, "pretrained.demo.pretrain_steps=6")).run_stage("sft", 0)
    assert not sft6.cached and sft6.artifact.inputs["base"]["version"] == other.artifact.version


def test_missing_pinned_version_names_it_the_command_and_the_alternatives(round0, tmp_path):
    run_dir = copy_run(round0, tmp_path / "run")
    with pytest.raises(MissingInputError) as e:
        quiet_runner(tiny(run_dir, "pretrained.demo.pretrain_steps=7")).run_stage("sft", 0)
    msg = str(e.value)
    built = Registry(run_dir).find("pretrained", 0).version
    assert "base: stage pretrained round 0 version" in msg and "rlhf stage pretrained --round 0" in msg
    assert f"--input pretrained={built}" in msg  # the way to build on what exists instead


def test_input_pin_builds_on_a_chosen_artifact_and_is_recorded(round0, tmp_path):
    run_dir = copy_run(round0, tmp_path / "run")
    sft = Registry(run_dir).find("sft", 0)
    pre6 = quiet_runner(tiny(run_dir, "pretrained.demo.pretrain_steps=6")).run_stage("pretrained", 0).artifact
    res = quiet_runner(tiny(run_dir), pins={"pretrained": pre6.version[:8]}).run_stage("sft", 0)
    assert not res.cached and res.artifact.version != sft.version
    assert res.artifact.inputs["base"]["version"] == pre6.version
    assert res.artifact.manifest["pinned"] == {"base": pre6.version}
    by_role = quiet_runner(tiny(run_dir), pins={"base": pre6.version}).run_stage("sft", 0)
    assert by_role.cached and by_role.artifact.version == res.artifact.version
    assert quiet_runner(tiny(run_dir)).run_stage("sft", 0).artifact.version == sft.version  # unpinned: the config's
    with pytest.raises(MissingInputError, match="--input pretrained=ffff"):
        quiet_runner(tiny(run_dir), pins={"pretrained": "ffff"}).run_stage("sft", 0)
    with pytest.raises(ValueError, match="neither a stage nor an input role"):
        quiet_runner(tiny(run_dir), pins={"bogus": "ffff"})


def test_cli_input_option(round0, tmp_path):
    run_dir = copy_run(round0, tmp_path / "run")
    pre = Registry(run_dir).find("pretrained", 0).version
    out = CliRunner().invoke(app, ["stage", "sft", "--config", "tiny", "--run-dir", str(run_dir), "--set", "tracking.mode=disabled",
                                   "--set", "pretrained.demo.pretrain_steps=9", "--input", f"pretrained={pre}"])
    assert out.exit_code == 0, out.output
    version = json.loads(out.output.strip().splitlines()[-1])["version"]
    assert Registry(run_dir).by_version(version).inputs["base"]["version"] == pre
    bad = CliRunner().invoke(app, ["stage", "sft", "--config", "tiny", "--run-dir", str(run_dir), "--input", "pretrained"])
    assert bad.exit_code == 2 and "expected STAGE=VERSION" in bad.output


# ------------------------------------------------------------------------------------------ verification


def test_tampered_input_is_refused_naming_the_file_and_force_rebuilds(round0, tmp_path):
    run_dir = copy_run(round0, tmp_path / "run")
    reg = Registry(run_dir)
    data = reg.find("data", 0)
    prompts = data.file("prompts.jsonl")
    text = prompts.read_text()
    prompts.write_text(text.replace("capital", "Capital", 1))  # same size, new content, new mtime
    with pytest.raises(CorruptArtifact) as e:
        quiet_runner(tiny(run_dir)).run_stage("sft", 0, force=True)
    assert str(prompts) in str(e.value) and "rlhf stage data --round 0 --force" in str(e.value)
    with pytest.raises(CorruptArtifact):  # its own cache hit is refused too
        quiet_runner(tiny(run_dir)).run_stage("data", 0)
    out = CliRunner().invoke(app, ["verify", "--run-dir", str(run_dir)])
    assert out.exit_code == 1 and "tampered" in out.output and "prompts.jsonl" in out.output
    rebuilt = quiet_runner(tiny(run_dir)).run_stage("data", 0, force=True)
    assert rebuilt.artifact.version == data.version and prompts.read_text() == text
    assert CliRunner().invoke(app, ["verify", "--run-dir", str(run_dir)]).exit_code == 0


def test_verify_fast_path_and_full_hash(round0, tmp_path):
    run_dir = copy_run(round0, tmp_path / "run")
    reg = Registry(run_dir)
    sft = reg.find("sft", 0)
    f = sft.file("model.safetensors")
    st = f.stat()
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF
    f.write_bytes(bytes(blob))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as recorded: only a hash can tell
    assert reg.verify(sft) == []  # the documented fast path trusts size + mtime
    assert reg.verify(sft, full=True) == ["model.safetensors"]
    f.touch()  # a new mtime sends the fast path to the hash
    assert reg.verify(sft) == ["model.safetensors"]
    f.unlink()
    assert reg.verify(sft) == ["model.safetensors"]


def test_corrupt_manifest_names_the_file_and_force_or_repair_recovers(round0, tmp_path):
    run_dir = copy_run(round0, tmp_path / "run")
    reg = Registry(run_dir)
    sft = reg.find("sft", 0)
    manifest = sft.path / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])  # truncated
    with pytest.raises(CorruptArtifact) as e:
        quiet_runner(tiny(run_dir)).run_stage("sft", 0)
    assert str(manifest) in str(e.value) and "rlhf repair" in str(e.value)
    out = CliRunner().invoke(app, ["stage", "sft", "--config", "tiny", "--run-dir", str(run_dir), "--set", "tracking.mode=disabled"])
    assert out.exit_code == 1 and "manifest.json" in out.output
    res = quiet_runner(tiny(run_dir)).run_stage("sft", 0, force=True)
    assert not res.cached and res.artifact.version == sft.version
    assert list((run_dir / "quarantine" / "sft").iterdir())  # the broken copy is kept aside, not deleted
    # the same through `rlhf repair` and a plain rerun
    manifest.write_text("{not json")
    out = CliRunner().invoke(app, ["repair", "--run-dir", str(run_dir)])
    assert out.exit_code == 0 and "quarantined" in out.output
    assert quiet_runner(tiny(run_dir)).run_stage("sft", 0).cached is False
    assert CliRunner().invoke(app, ["verify", "--run-dir", str(run_dir)]).exit_code == 0


# ------------------------------------------------------------------------------------------ leases


BUILDER = r'''
import json, sys, time
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.stages import StageSpec

def slow(ctx):
    with open(sys.argv[2], "a") as f:
        f.write("build\n")
    print("STARTED", flush=True)
    for step in range(5):
        ctx.log({"loss": 1.0 / (step + 1)}, step=step)
        time.sleep(float(sys.argv[3]))
    (ctx.out_dir / "out.txt").write_text("done")
    return {"steps": 5}

cfg = load_config("tiny", ["run_dir=" + sys.argv[1], "tracking.mode=disabled"])
specs = {"sft": StageSpec("sft", slow, lambda c, r: {}, rounds="zero")}
res = Runner(cfg, specs=specs, echo=lambda s: print(s, flush=True), show_progress=False).run_stage("sft", 0)
print("RESULT", json.dumps({"version": res.artifact.version, "cached": res.cached}), flush=True)
'''


def _builder(run_dir, log, delay="0.4"):
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(run_dir), str(log), delay], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def _result(out: str) -> dict:
    return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT")).split(" ", 1)[1])


def test_two_concurrent_builders_make_one_build(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "builds.log"
    first = _builder(run_dir, log)
    assert first.stdout.readline().startswith("[run]")
    assert first.stdout.readline().startswith("STARTED")
    second = _builder(run_dir, log)
    rows = status_rows(str(run_dir))
    assert rows[0]["status"] == "running" and f"pid {first.pid} on {socket.gethostname()}" in rows[0]["lease"]
    out1, _ = first.communicate(timeout=120)
    out2, _ = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert log.read_text() == "build\n"  # one build, not two
    r1, r2 = _result(out1), _result(out2)
    assert r1["version"] == r2["version"] and r2["cached"] and not r1["cached"]
    assert "[wait]" in out2 and "built by another process" in out2
    art = Registry(run_dir).find("sft", 0, r1["version"])
    rows = [json.loads(l) for l in art.file("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # metrics not mixed
    assert leftovers(run_dir) == []


def test_foreign_host_lease_is_respected_until_it_expires(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "builds.log"
    # learn the version this builder builds (versions do not depend on the run directory)
    probe = subprocess.run([sys.executable, "-c", BUILDER, str(tmp_path / "probe"), str(tmp_path / "probe.log"), "0"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    version = _result(probe.stdout)["version"]
    reg = Registry(run_dir)
    lease = reg.lease_path("sft", 0, version)
    lease.parent.mkdir(parents=True)
    # another host's builder on the shared volume; its pid means nothing here; heartbeat now, 4 s ttl
    lease.write_text(json.dumps({"host": "gpu-node-7", "pid": 999999, "token": "t", "ttl_s": 4, "heartbeat_at": time.time()}))
    assert locks.lease_state(lease) == "held"
    assert reg.lease("sft", 0, version, wait=False) is None
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", BUILDER, str(run_dir), str(log), "0"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[wait]" in proc.stdout and "gpu-node-7" in proc.stdout
    assert time.time() - t0 >= 3.0  # it waited for the expiry before taking over
    assert log.read_text() == "build\n" and _result(proc.stdout)["version"] == version
    assert leftovers(run_dir) == []


def test_cleanup_keeps_a_build_whose_lease_is_live_on_another_host(tmp_path):
    reg = Registry(tmp_path / "run")
    live = reg.new_build_dir("sft", 0, "aaaaaaaaaaaa")
    dead = reg.new_build_dir("sft", 0, "bbbbbbbbbbbb")
    lease = reg.lease_path("sft", 0, "aaaaaaaaaaaa")
    lease.parent.mkdir(parents=True)
    # the pid in the build dir's name is ours, but the lease says another host is building it
    lease.write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "token": "t", "ttl_s": 60, "heartbeat_at": time.time()}))
    reg.clean_stale_builds()
    assert live.is_dir() and not dead.exists()
    lease.write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "token": "t", "ttl_s": 60, "heartbeat_at": time.time() - 61}))
    reg.clean_stale_builds()  # expired: the other host is gone
    assert not live.exists()


def test_lease_of_a_dead_local_builder_is_taken_over_at_once(tmp_path):
    path = tmp_path / "locks" / "x.lease"
    path.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old", "ttl_s": 3600,
                                "heartbeat_at": time.time()}))
    assert locks.lease_state(path) == "stale"
    lease = locks.acquire(path, ttl_s=30, wait=False)  # taken over without waiting for the hour-long ttl
    assert lease is not None and lease.took_over["token"] == "old"
    assert json.loads(path.read_text())["token"] == lease.token
    lease.release()
    assert not path.exists()


def test_heartbeat_keeps_a_long_build_alive(tmp_path):
    path = tmp_path / "x.lease"
    lease = locks.acquire(path, ttl_s=0.6)
    first = json.loads(path.read_text())["heartbeat_at"]
    time.sleep(1.5)  # longer than the ttl: without heartbeats the lease would read stale
    info = json.loads(path.read_text())
    assert info["heartbeat_at"] > first and locks.lease_state(path) == "held"
    assert locks.acquire(path, ttl_s=0.6, wait=False) is None
    lease.release()
    assert locks.acquire(path, ttl_s=0.6, wait=False) is not None


# ------------------------------------------------------------------------------------------ signals and disks


def test_sigterm_is_recorded_as_interrupted_and_leaves_nothing(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "builds.log"
    proc = _builder(run_dir, log, delay="5")
    while "STARTED" not in proc.stdout.readline():
        pass
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    rows = status_rows(str(run_dir))
    assert [(r["stage"], r["status"]) for r in rows] == [("sft", "interrupted")]
    assert "interrupted" in rows[0]["error"] and "resume" in rows[0]["error"]
    assert leftovers(run_dir) == [] and Registry(run_dir).find("sft", 0) is None
    rerun = _builder(run_dir, log, delay="0")
    out, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0 and not _result(out)["cached"]
    assert [r["status"] for r in status_rows(str(run_dir))] == ["complete"]


def test_sigkilled_builder_reads_interrupted_and_repair_cleans(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "builds.log"
    proc = _builder(run_dir, log, delay="5")
    while "STARTED" not in proc.stdout.readline():
        pass
    proc.kill()
    proc.wait()
    rows = status_rows(str(run_dir))
    assert [(r["stage"], r["status"]) for r in rows] == [("sft", "interrupted")]
    assert leftovers(run_dir)  # the hidden build and the lease of the dead builder
    from dashboard.data import stage_label, stage_table

    table = stage_table(run_dir)
    sft = table[(table["stage"] == "sft") & (table["round"] == 0)].iloc[0]
    assert stage_label(sft).startswith("interrupted: the builder (pid")  # the dashboard says so too
    out = CliRunner().invoke(app, ["verify", "--run-dir", str(run_dir)])
    assert out.exit_code == 1 and "leftover_build" in out.output and "stale_lease" in out.output
    out = CliRunner().invoke(app, ["repair", "--run-dir", str(run_dir)])
    assert out.exit_code == 0 and "removed leftover build" in out.output
    assert leftovers(run_dir) == []


def _small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path`; None if this machine does not allow mounting."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return None
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    return path if ok else None


def _limit_file_size(nbytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_full_disk_fails_cleanly_and_the_rerun_completes(round0, tmp_path):
    mnt = tmp_path / "disk"
    disk = _small_disk(mnt, "700k")
    run_dir = mnt / "run"
    try:
        subprocess.run(["cp", "-a", str(round0 / "artifacts" / "data"), "-t", str(mnt)], check=False)  # fills ~360 KB
        (mnt / "data").rename(mnt / "ballast") if (mnt / "data").exists() else None
        cmd = [*RLHF, "run", "--config", "tiny", "--rounds", "0", "--run-dir", str(run_dir), "--set", "tracking.mode=disabled"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300,
                              preexec_fn=None if disk else _limit_file_size(150_000))
        assert proc.returncode != 0
        assert ("No space left on device" in proc.stderr + proc.stdout) or ("File too large" in proc.stderr + proc.stdout)
        rows = status_rows(str(run_dir))
        assert rows and rows[-1]["status"] in ("failed", "interrupted") and not any(r["status"] == "running" for r in rows)
        assert leftovers(run_dir) == []
        if disk:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert Registry(run_dir).scan() == [] and leftovers(run_dir) == []
    finally:
        if disk:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------ fault injection


def _snapshot(run_dir: Path) -> dict:
    reg = Registry(run_dir)
    return {(a.stage, a.round): a for a in reg.iter_artifacts()}


# stages whose metrics do not depend on wall-clock time (durations and rates do, and are skipped)
TIMING_KEYS = ("seconds", "tokens_per_s", "pairs_per_s", "samples_per_s", "duration", "time", "_s", "resumed_from_step",
               "peak_memory")  # measurements of the process, not results


def _stable_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING_KEYS)}


def _assert_equals_uninterrupted(run_dir: Path, ref: dict) -> int:
    reg = Registry(run_dir)
    assert reg.scan(full=True) == []  # every artifact verifies (sha256), no leftovers, no stale leases
    assert leftovers(run_dir) == []
    assert not any(r["status"] != "complete" for r in status_rows(str(run_dir)))
    got = _snapshot(run_dir)
    assert {k: a.version for k, a in got.items()} == {k: a.version for k, a in ref.items()}
    for key, art in got.items():
        assert _stable_metrics(art.metrics) == _stable_metrics(ref[key].metrics), key
    return len(got)


def test_sigkill_at_20_random_moments_loses_nothing(tiny_run, tmp_path):
    """The tiny pipeline (`rlhf run --config tiny`, every stage of a round) is SIGKILLed at 20 seeded
    random moments, each kill followed by a rerun. Whenever a rerun completes the pipeline, and at the
    end, every artifact verifies, nothing temporary is left, and the registry equals an uninterrupted
    run's (same versions; same metrics); on a fast machine the pipeline then starts over in a new
    directory so that all 20 kills land inside builds."""
    ref_cfg, ref = tiny_run
    rng = random.Random(20261125)
    kills, killed_in, passes = 0, [], 0
    window = {}  # stage -> seconds; grows each time a kill lands in the same stage again, so the run progresses
    run_dir = tmp_path / "run0"
    while kills < 20:
        cmd = [*RLHF, "run", "--config", "tiny", "--run-dir", str(run_dir), "--set", "tracking.mode=disabled"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        # wait for the first stage this process really builds, then kill at a random moment inside it
        line = ""
        while True:
            line = proc.stdout.readline()
            if not line or line.startswith("[run]"):
                break
        if not line:  # nothing left to build: this pass is complete
            proc.communicate()
            assert proc.returncode == 0
            _assert_equals_uninterrupted(run_dir, ref)
            passes += 1
            run_dir = tmp_path / f"run{passes}"
            continue
        stage = line.split()[1]
        window[stage] = window.get(stage, 0.3) * (1.6 if killed_in and killed_in[-1] == stage else 1.0)
        time.sleep(rng.uniform(0.0, 1.0) * window[stage])
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            killed_in.append(stage)
        proc.communicate()
    final = subprocess.run([*RLHF, "run", "--config", "tiny", "--run-dir", str(run_dir), "--set", "tracking.mode=disabled"],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    n = _assert_equals_uninterrupted(run_dir, ref)
    assert len(set(killed_in)) >= 4, killed_in  # spread across stages
    print(f"fault injection: {kills} kills in {sorted(set(killed_in))} over {passes + 1} pipeline(s); {n} artifacts verified")


def test_force_rebuilds_even_when_taking_the_lease_is_slow(tmp_path, monkeypatch):
    """An uncontended lease that takes long to create (a slow shared disk) is not another builder:
    --force must rebuild, not return the existing artifact as 'built by another process'."""
    calls = []

    def stage(ctx):
        calls.append(1)
        (ctx.out_dir / "x.txt").write_text("x")
        return {}

    from pipeline.stages import StageSpec

    specs = {"sft": StageSpec("sft", stage, lambda c, r: {}, rounds="zero")}
    cfg = tiny(tmp_path / "run")
    Runner(cfg, specs=specs, echo=None).run_stage("sft", 0)
    slow_create = locks._try_create

    def slow(path, lease):
        time.sleep(0.05)
        return slow_create(path, lease)

    monkeypatch.setattr(locks, "_try_create", slow)
    res = Runner(cfg, specs=specs, echo=None).run_stage("sft", 0, force=True)
    assert not res.cached and len(calls) == 2
    lease = locks.acquire(tmp_path / "l.lease", ttl_s=5)
    assert not lease.contended
    lease.release()
