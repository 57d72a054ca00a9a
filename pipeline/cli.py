"""`rlhf`: run the pipeline, rerun one stage, inspect the registry.

    rlhf run                                   # whole pipeline on the embedded demo
    rlhf stage reward_model_safety --round 2   # one stage; inputs come from the registry
    rlhf status                                # rounds x stages, versions, headline metrics
    rlhf lineage VERSION                       # what an artifact was built from
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .stages import STAGES  # the stage list lives once, there

# Keep Prefect and W&B from reaching out (DEVELOPERS.md); set before either is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

app = typer.Typer(help="Llama 2-Chat style RLHF pipeline: SFT, reward models, rejection sampling, PPO, Ghost Attention.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Validate and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option("demo", "--config", "-c", help="Preset name (demo, llama2-7b, ...) or path to a YAML file.")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (default: the config's run_dir, runs/demo for the demo).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set sft.learning_rate=1e-5 (repeatable).")
InputOpt = typer.Option(None, "--input", help="Build on a specific existing artifact instead of the version the config implies: "
                        "STAGE=VERSION or ROLE=VERSION (a unique prefix is enough; repeatable; recorded in the manifest).")


NprocOpt = typer.Option(1, "--nproc", min=1, help="Processes on this machine (torchrun): training stages run data parallel "
                        "with FSDP2-sharded models; the others run on rank 0 alone. Same artifacts and versions as one process.")


def _launch(nproc: int) -> None:
    """Run this very command again under torchrun with `nproc` local processes, and exit with its code
    (pipeline/distributed.py). Inside torchrun (WORLD_SIZE set) or with one process, do nothing."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    import subprocess

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline.cli", *argv]
    raise typer.Exit(subprocess.call(cmd))


def _echo(msg: str) -> None:
    """Print, on rank 0 only when several processes run the command."""
    from .distributed import world

    if world().is_main:
        typer.echo(msg)


def _pins(inputs: list[str] | None) -> dict[str, str]:
    pins = {}
    for item in inputs or []:
        key, sep, version = item.partition("=")
        if not sep or not key or not version:
            _fail(f"error: --input {item!r}: expected STAGE=VERSION, e.g. --input sft=3fa2c1d0e9b8")
        pins[key.strip()] = version.strip()
    return pins


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg="red", err=True)
    raise typer.Exit(code)


def _load(config: str, overrides: list[str] | None, **top):
    from .config import ConfigError, load_config

    try:
        return load_config(config, overrides or [], **top)
    except ConfigError as e:
        _fail(f"error: {e}")


def _runner(cfg, echo=True, pins=None):
    from .runner import Runner
    from .tracking import tracker_factory

    try:
        return Runner(cfg, tracker_factory=tracker_factory(cfg), echo=(lambda s: typer.echo(s)) if echo else None, pins=pins)
    except ValueError as e:
        _fail(f"error: {e}")


def _interrupted(stage_desc: str) -> None:
    _fail(f"interrupted: {stage_desc}; the attempt is recorded as interrupted, rerun the same command to resume", 143)


@app.command()
def run(
    config: str = ConfigOpt,
    rounds: Optional[int] = typer.Option(None, "--rounds", help="RLHF rounds after SFT (default: the config's rounds)."),
    run_dir: Optional[str] = RunDirOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage even if a complete artifact exists."),
    input_: Optional[List[str]] = InputOpt,
    nproc: int = NprocOpt,
) -> None:
    """Run the whole pipeline, stage after stage, skipping what is already complete."""
    from .context import StageFailed
    from .errors import Interrupted

    _launch(nproc)
    cfg = _load(config, set_, run_dir=run_dir, rounds=rounds)
    runner = _runner(cfg, pins=_pins(input_))
    _check_plan(cfg, runner, force)
    t0 = time.time()
    _echo(f"run {cfg.name}: {cfg.rounds} rounds, run dir {cfg.run_dir}")
    try:
        results = runner.run_all(force=force)
    except StageFailed as e:
        _fail(f"error: {e}", 1)
    except Interrupted:
        _interrupted(f"rlhf run --run-dir {cfg.run_dir}")
    built = sum(not r.cached for r in results)
    _echo(run_summary(results))
    _echo(f"finished: {len(results)} stages ({built} built, {len(results) - built} cached) in {time.time() - t0:.1f}s")
    report_md = newest_report(results)
    _echo(f"report: {report_md}" if report_md else "report: none (no evaluate stage ran; rounds = 0)")


def run_summary(results) -> str:
    """A plain-text table of a run's stages (stage, round, cached/built, seconds, headline metrics): readable in
    a terminal and in a log file alike."""
    rows = [("stage", "round", "result", "seconds", "headline")]
    for r in results:
        head = ", ".join(f"{k}={_fmt(v)}" for k, v in _headline(r.artifact).items())
        rows.append((r.artifact.stage, str(r.artifact.round), "cached" if r.cached else "built", f"{r.seconds:.1f}", head))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i in (1, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row[:4], widths))) + "  " + row[4]
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def newest_report(results) -> Path | None:
    """report.md of the newest round's `evaluate` among the run's results, if any."""
    evals = sorted((r.artifact for r in results if r.artifact.stage == "evaluate"), key=lambda a: a.round)
    for art in reversed(evals):
        if art.file("report.md").is_file():
            return art.file("report.md")
    return None


@app.command()
def stage(
    name: str = typer.Argument(..., help="Stage name: " + ", ".join(STAGES) + "."),
    round: int = typer.Option(0, "--round", "-r", help="RLHF round (0 for data, pretrained and sft)."),
    config: str = ConfigOpt,
    run_dir: Optional[str] = RunDirOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Recompute even if a complete artifact with this version exists "
                               "(also replaces a corrupt or tampered copy and discards resume checkpoints)."),
    input_: Optional[List[str]] = InputOpt,
    nproc: int = NprocOpt,
) -> None:
    """Run (or rerun) one stage; its inputs are the versions the config implies (or --input), read from the registry."""
    from .context import StageFailed
    from .errors import Interrupted

    if name not in STAGES:
        _fail(f"error: unknown stage {name!r}; stages: {', '.join(STAGES)}")
    _launch(nproc)
    cfg = _load(config, set_, run_dir=run_dir)
    try:
        res = _runner(cfg, pins=_pins(input_)).run_stage(name, round, force=force)
    except (StageFailed, ValueError) as e:
        _fail(f"error: {e}", 1)
    except Interrupted:
        _interrupted(f"stage {name} round {round}")
    _echo(json.dumps({"stage": name, "round": round, "version": res.artifact.version, "cached": res.cached,
                           "path": str(res.artifact.path), "metrics": _headline(res.artifact)}, default=str))


def _headline(artifact) -> dict:
    spec = STAGES.get(artifact.stage)
    keys = spec.headline if spec else ()
    return {k: artifact.metrics[k] for k in keys if k in artifact.metrics}


def status_rows(run_dir: str) -> list[dict]:
    """One row per (stage, round): complete artifacts, then running / failed attempts without one."""
    from .registry import Registry

    reg = Registry(run_dir)
    rows = []
    for a in reg.iter_artifacts():
        newest = reg.find(a.stage, a.round)
        if newest is None or newest.version != a.version:
            continue
        rows.append({"stage": a.stage, "round": a.round, "version": a.version, "status": "complete",
                     "inputs": a.inputs, "metrics": a.metrics, "duration_s": a.manifest.get("duration_s"), "path": str(a.path)})
    shown = {(r["stage"], r["round"]): r["version"] for r in rows}
    for att in reg.attempts():
        key = (att["stage"], att["round"])
        # a running or failed attempt matters unless it produced the artifact already shown
        if att.get("status") in ("running", "failed", "interrupted") and shown.get(key) != att.get("version"):
            rows.append({"stage": att["stage"], "round": att["round"], "version": att.get("version"), "status": att["status"],
                         "inputs": {}, "metrics": {}, "error": att.get("error"), "duration_s": None, "path": None,
                         "lease": att.get("lease")})
    order = {s: i for i, s in enumerate(STAGES)}
    rows.sort(key=lambda r: (r["round"], order.get(r["stage"], 99)))
    return rows


@app.command()
def status(
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {run_dir, artifacts: [{stage, round, version, status, inputs, metrics, path}]}."),
) -> None:
    """Rounds x stages with status, version, duration and headline metrics."""
    rows = status_rows(run_dir)
    if as_json:
        typer.echo(json.dumps({"run_dir": run_dir, "artifacts": rows}, default=str, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    if not rows:
        typer.echo(f"no artifacts in {run_dir} yet (start with `rlhf run --run-dir {run_dir}`)")
        return
    table = Table(title=f"RLHF run {run_dir}")
    for col in ("round", "stage", "status", "version", "duration", "metrics"):
        table.add_column(col)
    for r in rows:
        spec = STAGES.get(r["stage"])
        keys = spec.headline if spec else ()
        shown = ", ".join(f"{k}={_fmt(r['metrics'][k])}" for k in keys if k in r["metrics"]) or (r.get("error") or "")[:80]
        if r.get("lease"):
            shown = f"lease held by {r['lease']}"
        dur = f"{r['duration_s']:.1f}s" if r.get("duration_s") is not None else ""
        color = {"complete": "green", "running": "yellow", "failed": "red", "interrupted": "magenta"}.get(r["status"], "white")
        table.add_row(str(r["round"]), r["stage"], f"[{color}]{r['status']}[/{color}]", r["version"] or "", dur, shown)
    Console(width=max(150, Console().width)).print(table)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _check_plan(cfg, runner, force: bool) -> None:
    """Refuse, before any work, a run with a stage that will not fit in memory (`rlhf plan`)."""
    if not cfg.hardware.check_plan:
        return
    from .plan import PlanError, make_plan, model_shape, refusal
    from .stages import schedule

    todo = sorted({s for s, r in schedule(cfg) if force or runner.registry.find(s, r, _expected(runner, s, r)) is None} - {"data"})
    if not todo:
        return
    try:
        plans, usable, what = make_plan(cfg, model_shape(cfg), cfg.hardware.gpu_memory_gb, todo)
    except PlanError as e:
        _fail(f"error: {e}", 1)
    msg = refusal(plans, usable, what)
    if msg:
        _fail(f"error: {msg}", 1)


def _expected(runner, stage: str, round: int) -> str | None:
    try:
        return runner.expected_version(stage, round)
    except Exception:  # noqa: BLE001 - a stage the runner will explain itself (missing pin, bad input)
        return None


@app.command()
def plan(
    config: str = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GiB per GPU to plan for (default: hardware.gpu_memory_gb, "
                                               "else this machine's GPU, else its RAM)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="GPUs (processes) per node (default: hardware.gpus)."),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Nodes (default: hardware.nodes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Estimated peak memory per device of every stage (weights, gradients, optimiser state, activations,
    logits, KV cache, resident reward models), from the model config on the meta device; exit 1 when a
    stage will not fit, naming the fix."""
    from .plan import GiB, PlanError, make_plan, model_shape, refusal

    cfg = _load(config, set_, check_device=False)  # planning for GPUs needs none here
    try:
        shape = model_shape(cfg)
        plans, usable, what = make_plan(cfg, shape, gpu_memory if gpu_memory is not None else cfg.hardware.gpu_memory_gb,
                                        gpus=gpus, nodes=nodes)
    except PlanError as e:
        _fail(f"error: {e}", 1)
    if as_json:
        typer.echo(json.dumps({"config": cfg.name, "params": shape.params, "device": what, "usable_gib": round(usable / GiB, 2),
                               "stages": [p.row() for p in plans]}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{cfg.name}: {shape.params / 1e6:,.1f}M parameters, {what} (90% usable: {usable / GiB:.1f} GiB)")
        for col in ("stage", "peak GiB", "fits", "biggest terms (GiB)", "what it assumes"):
            table.add_column(col)
        for p in plans:
            terms = sorted(((k, v) for k, v in p.terms.items() if k != "peak"), key=lambda kv: -kv[1])[:3]
            table.add_row(p.stage, f"{p.peak_bytes / GiB:.2f}", "[green]yes[/green]" if p.fits else "[red]no[/red]",
                          ", ".join(f"{k} {v / GiB:.2f}" for k, v in terms), p.note)
        Console(width=max(150, Console().width)).print(table)
        msg = refusal(plans, usable, what)
        if msg:
            typer.secho(msg, fg="red", err=True)
    if any(not p.fits for p in plans):
        raise typer.Exit(1)


@app.command()
def verify(
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory to check."),
    fast: bool = typer.Option(False, "--fast", help="Trust files whose size and mtime match the manifest (no hashing)."),
    as_json: bool = typer.Option(False, "--json", help="Print the problems as JSON."),
) -> None:
    """Check every artifact against its manifest's checksums; list corrupt manifests, leftover builds,
    stale leases and interrupted builds. Exit 1 when anything is wrong."""
    from .registry import Registry

    reg = Registry(run_dir)
    problems = reg.scan(full=not fast)
    n = sum(1 for _ in reg.iter_artifacts())
    if as_json:
        typer.echo(json.dumps({"run_dir": run_dir, "artifacts": n, "problems": problems}, indent=1))
    else:
        for p in problems:
            typer.echo(f"{p['kind']}: {p['path']}: {p['detail']} -> {p['fix']}")
        typer.echo(f"{n} artifacts checked{' (size and mtime)' if fast else ' (sha256)'}, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)


@app.command()
def repair(
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory to repair."),
) -> None:
    """Quarantine corrupt or tampered artifacts, remove leftover builds, stray temporary files and stale
    leases, and record dead builders as interrupted. Then rerun the stages to rebuild what is missing."""
    from .registry import Registry

    done = Registry(run_dir).repair()
    for line in done:
        typer.echo(line)
    typer.echo(f"{len(done)} repairs in {run_dir}" if done else f"nothing to repair in {run_dir}")


@app.command()
def lineage(
    version: str = typer.Argument(..., help="Artifact version (a unique prefix is enough)."),
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as JSON."),
) -> None:
    """The tree of artifacts an artifact was built from."""
    from .registry import Registry

    reg = Registry(run_dir)
    art = reg.by_version(version)
    if art is None:
        _fail(f"error: no artifact with version {version!r} in {run_dir}", 1)
    tree = reg.lineage(art)
    if as_json:
        typer.echo(json.dumps(tree, indent=1))
        return
    from rich.tree import Tree
    from rich.console import Console

    def add(node, t):
        for child in node["inputs"]:
            sub = t.add(f"{child['role']}: {child['stage']} r{child['round']} {child['version']}" + (" [red](missing)" if child.get("missing") else ""))
            add(child, sub)

    root = Tree(f"{tree['stage']} r{tree['round']} {tree['version']}")
    add(tree, root)
    Console().print(root)


REPORT_COLUMNS = ("gold_helpfulness", "gold_helpfulness_greedy", "gold_safety_violation_rate", "false_refusal_rate",
                  "gold_win_rate_vs_sft", "gold_win_rate_vs_previous", "judge_win_rate_vs_sft", "judge_win_rate_vs_previous",
                  "rm_win_rate_vs_sft", "rm_win_rate_vs_previous", "rm_accuracy_helpful", "rm_accuracy_safety",
                  "gatt_adherence_late_turns", "kl_to_sft", "better_than_sft", "reward_hacking")


def report_rows(run_dir: str) -> list[dict]:
    """Per-round results: the SFT baseline (round 0) and each round's `evaluate` metrics, each with its
    95% bootstrap interval `<name>_ci95` where evaluate reported one, the judge behind the headline win
    rate, and the reward-hacking tests that fired."""
    from .registry import Registry

    def row(rd: str, m: dict) -> dict:
        out = {"round": rd}
        for k in REPORT_COLUMNS:
            out[k] = m.get(k)
            if f"{k}_ci95" in m:
                out[f"{k}_ci95"] = m[f"{k}_ci95"]
        out["judge"] = m.get("judge")
        out["reward_hacking_tests"] = m.get("reward_hacking_tests")
        return out

    reg = Registry(run_dir)
    rows = []
    sft = reg.find("sft", 0)
    if sft is not None:
        rows.append(row("0 (SFT)", sft.metrics))
    evals = sorted((a for a in reg.iter_artifacts("evaluate") if reg.find("evaluate", a.round).version == a.version), key=lambda a: a.round)
    for a in evals:
        rows.append(row(str(a.round), a.metrics))
    return rows


def _report_cell(r: dict, c: str) -> str:
    """"0.520 [0.470, 0.570]": a value with its 95% interval; reward hacking with the tests that fired."""
    v = r.get(c)
    if v is None:
        return ""
    if c == "reward_hacking" and v:
        fired = ", ".join(f"{t['metric']} {t['comparison']}" for t in r.get("reward_hacking_tests") or [])
        return f"True ({fired})" if fired else "True"
    if not isinstance(v, float):
        return str(v)
    ci = r.get(f"{c}_ci95")
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


@app.command()
def report(
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a Markdown table."),
) -> None:
    """Per-round results table (Markdown) from the registry: gold scores, gold- and RM-judged win rates, RM
    accuracy, GAtt adherence, each with its 95% bootstrap interval over prompts, and the reward-hacking flag."""
    rows = report_rows(run_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        _fail(f"no sft or evaluate artifacts in {run_dir}", 1)
    cols = ["round", *(c for c in REPORT_COLUMNS if any(r.get(c) is not None for r in rows))]
    typer.echo("| " + " | ".join(cols) + " |")
    typer.echo("|" + " --- |" * len(cols))
    for r in rows:
        typer.echo("| " + " | ".join(_report_cell(r, c) for c in cols) + " |")
    judges = sorted({r["judge"] for r in rows if r.get("judge")})
    if judges:
        typer.echo("")
        typer.echo(f"Values: estimate [95% bootstrap interval over prompts]. Headline win-rate judge: {', '.join(judges)}; "
                   "rm_win_rate_* are judged by the optimised reward models (not independent).")


@app.command()
def export(
    version: str = typer.Argument(..., help="Version of a policy artifact (sft, rejection_sampling, ppo, ghost_attention, "
                                  "pretrained); a unique prefix is enough."),
    out: str = typer.Option(..., "--out", help="Folder to write (new or empty)."),
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload the folder to this hub repo "
                                              "(org/name, created private if missing); needs HF_TOKEN or `hf auth login`."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Export a policy as a Hugging Face model folder (LoRA merged, chat template, model card) that
    AutoModelForCausalLM.from_pretrained loads; optionally push it to the hub."""
    from .export import ExportError, export_policy, push_to_hub as push

    try:
        folder = export_policy(run_dir, version, out, overwrite=overwrite)
    except ExportError as e:
        _fail(f"error: {e}", 1)
    typer.echo(f"exported to {folder}")
    if push_to_hub:
        try:
            typer.echo(f"pushed to {push(folder, push_to_hub)}")
        except ExportError as e:
            _fail(f"error: {e}", 1)


@data_app.command("validate")
def data_validate(
    path: str = typer.Argument(..., help="JSONL, JSON or Parquet file, directory, or hub dataset name."),
    kind: str = typer.Option(..., "--kind", help="Record kind: sft, preference, prompt or gatt."),
    format: str = typer.Option("auto", "--format", help="auto, own, trl, hh_rlhf or mapped."),
    domain: str = typer.Option("auto", "--domain", help="Preference data: helpfulness, safety (e.g. HH-RLHF harmless-base) "
                               "or auto (each record's is_safety_prompt), as in data.preferences; shows the domain mix."),
) -> None:
    """Count valid records and summarise them; list bad records with file, line, field and reason."""
    from data_specs.validate import main

    raise typer.Exit(main(path, kind, format, domain))


# ---------------------------------------------------------------- orchestration and tracking (flows/, W&B)


@app.command()
def serve(
    config: str = ConfigOpt,
    run_dir: Optional[str] = RunDirOpt,
) -> None:
    """Serve the Prefect deployments rlhf/iteration, rlhf/bootstrap, rlhf/full and rlhf/stage (needs PREFECT_API_URL)."""
    from flows.rlhf import serve_deployments

    serve_deployments(config, run_dir)


cluster_app = typer.Typer(help="Prefect work pools for a cluster: each stage its own deployment (flows/cluster.py).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("setup")
def cluster_setup(
    gpu_slots: int = typer.Option(..., "--gpu-slots", help="GPUs the workers share: the limit of the global concurrency limit `gpu`."),
    config: str = ConfigOpt,
    pool_type: str = typer.Option("process", "--pool-type", help="Work pool type: process, or kubernetes (the GPU pool "
                                  "then uses docker/k8s-base-job-template.json)."),
) -> None:
    """Create the work pools `cpu` and `gpu` (orchestration.pools) and the global concurrency limit `gpu` (needs PREFECT_API_URL)."""
    from flows.cluster import setup

    from .config import ConfigError

    try:
        setup(gpu_slots, config, pool_type, echo=typer.echo)
    except ConfigError as e:
        _fail(f"error: {e}")


@cluster_app.command("yaml")
def cluster_yaml(config: str = ConfigOpt, run_dir: Optional[str] = RunDirOpt) -> None:
    """Print prefect.yaml (the round flows and one deployment per stage, from the stage registry) for `prefect deploy --all`."""
    from flows.cluster import prefect_yaml_text

    typer.echo(prefect_yaml_text(config, run_dir), nl=False)


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(4200, "--port", help="Port of the API and UI."),
    home: Optional[str] = typer.Option(None, "--home", help="PREFECT_HOME with the SQLite database (default: ./.prefect)."),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve the web UI too."),
) -> None:
    """Start a local Prefect server (SQLite under --home, analytics off) and print the PREFECT_API_URL to use."""
    from flows.server import start_server

    raise typer.Exit(start_server(host, port, home, ui=ui))


@app.command()
def sync(
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory whose offline W&B runs are uploaded."),
) -> None:
    """Upload offline W&B runs (`wandb sync`) and restore input lineage (`use_artifact`); needs a W&B API key."""
    from .wandb_tracker import sync as wandb_sync

    code = wandb_sync(run_dir, echo=typer.echo)
    if code:
        raise typer.Exit(code)




@app.command()
def dashboard(
    run_dir: str = typer.Option("runs/demo", "--run-dir", help="Run directory to show (it may not exist yet)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8501, "--port", help="Port of the web dashboard."),
) -> None:
    """Web dashboard of the run (Streamlit): rounds, trends, curves, samples, lineage. Reads the registry only."""
    from dashboard.launch import run as run_dashboard

    raise typer.Exit(run_dashboard(run_dir, host, port))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a process of `--nproc N` / torchrun: leave together (distributed.leave)
        from .distributed import leave

        try:
            app()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - print it, then leave with the others
            import traceback

            traceback.print_exc()
            code = 1
        leave(code)
    sys.exit(app())
