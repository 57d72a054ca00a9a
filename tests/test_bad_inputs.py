"""Bad input is a clear error before any work, and nothing is written (issue 11, items 6 and 7).

The corpus `tests/data/bad/` holds JSONL and JSON data files, labeled preference files, YAML configs and
`--set` overrides; `tests/data/bad/cases.yaml` says how each is fed to the real CLI and what the error must
name (file:line: field, or key / value / allowed). Every case runs against a run directory that already
holds data, pretrained and sft of the tiny preset, whose listing (paths, sizes, mtimes) must not change.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, load_config
from pipeline.context import StageFailed
from pipeline.runner import Runner

HERE = Path(__file__).resolve().parent
BAD = HERE / "data" / "bad"
OK = HERE / "data" / "ok"
CASES = yaml.safe_load((BAD / "cases.yaml").read_text(encoding="utf-8"))
cli = CliRunner()


def _ok_sources() -> list[str]:
    return ["data.source=files", f"data.sft.path={OK / 'sft.jsonl'}", f"data.prompts.path={OK / 'prompts.jsonl'}",
            f"data.eval_prompts.path={OK / 'eval_prompts.jsonl'}"]


def _listing(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size and mtime: any write shows up."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """data, pretrained and sft of the tiny preset: what collect_preferences round 1 needs to reach its check."""
    d = tmp_path_factory.mktemp("bad") / "run"
    runner = Runner(load_config("tiny", [f"run_dir={d}", "tracking.mode=disabled"]), echo=None, show_progress=False)
    for stage in ("data", "pretrained", "sft"):
        runner.run_stage(stage, 0)
    return d


def _args(case: dict, run_dir: Path) -> list[str]:
    path = BAD / case["file"]
    base = ["--run-dir", str(run_dir), "--set", "tracking.mode=disabled"]
    use = case["use"]
    if use == "validate":
        return ["data", "validate", str(path), "--kind", case["kind"]] + (["--format", case["format"]] if "format" in case else [])
    if use == "data":
        sets = _ok_sources() + [f"data.{case['role']}.path={path}"]
        return ["stage", "data", "--config", "tiny", *base, *[a for s in sets for a in ("--set", s)]]
    if use == "labeled":
        return ["stage", "collect_preferences", "--round", "1", "--config", "tiny", *base, "--set", f"collect_preferences.source={path}"]
    if use == "config":
        return ["stage", "data", "--config", str(path), "--run-dir", str(run_dir)]
    if use == "set":
        lines = path.read_text(encoding="utf-8").splitlines()
        return ["stage", "data", "--config", "tiny", *base, *[a for s in lines for a in ("--set", s)]]
    raise AssertionError(f"unknown use {use!r} in cases.yaml")


def test_corpus_covers_every_file_and_kind():
    files = {p.name for p in BAD.iterdir() if p.name != "cases.yaml"}
    named = [c["file"] for c in CASES]
    assert len(files) >= 40 and sorted(named) == sorted(files), set(files) ^ set(named)
    assert {c["use"] for c in CASES} == {"validate", "data", "labeled", "config", "set"}
    assert all(c["expect"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_bad_input_is_rejected_naming_the_place(case, run_dir):
    if case.get("skip_if_cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so device=cuda is valid")
    before = _listing(run_dir)
    res = cli.invoke(app, _args(case, run_dir))
    out = res.output
    assert res.exit_code not in (0, None), out
    assert res.exception is None or isinstance(res.exception, SystemExit), f"raw exception: {res.exception!r}\n{out}"
    assert "Traceback" not in out, out
    for needle in case["expect"]:
        needle = needle.replace("{name}", case["file"])
        assert needle in out, f"{needle!r} not in:\n{out}"
    assert _listing(run_dir) == before, "the run directory changed"


def test_good_inputs_pass_the_checks(run_dir, tmp_path):
    """The data cases fail only because of their bad file: the same command with the good files passes the check."""
    from data_specs.prepare import check as data_check
    from policies.collect_preferences import check as labeled_check

    data_check(load_config("tiny", _ok_sources()), 0)
    labeled = tmp_path / "prefs_r1.jsonl"
    labeled.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi?"}], "response_a": "Hello.", "response_b": "Go away.",
                                   "is_safety_prompt": False, "choice": "a", "strength": "better", "a_safe": True, "b_safe": True}) + "\n")
    labeled_check(load_config("tiny", [f"collect_preferences.source={tmp_path / 'prefs_r{round}.jsonl'}"]), 1)
    # a round whose file does not exist yet passes the check: the stage exports the pairs to label
    labeled_check(load_config("tiny", [f"collect_preferences.source={tmp_path / 'nothing_r{round}.jsonl'}"]), 1)


def test_duplicates_are_reported_by_count(caplog):
    from data_specs.prepare import check

    res = cli.invoke(app, ["data", "validate", str(OK / "sft_duplicates.jsonl"), "--kind", "sft"])
    assert res.exit_code == 0 and "sft_duplicates.jsonl: 2 duplicate record(s)" in res.output, res.output
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        check(load_config("tiny", [*_ok_sources(), f"data.sft.path={OK / 'sft_duplicates.jsonl'}"]), 0)
    assert "data.sft" in caplog.text and "2 duplicate record(s) of 4" in caplog.text


def test_missing_path_without_suffix_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    import datasets

    from data_specs.loaders import load_records

    def no_hub(*a, **k):
        raise AssertionError(f"tried the hub: {a}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in ("data/mysft", "./mysft", "mysft", "data/sub/mysft", str(tmp_path / "mysft")):
        _, issues = load_records(path, "sft", strict=False)
        assert len(issues) == 1 and issues[0].line == 0 and issues[0].reason.startswith("file not found"), (path, issues)
    run = tmp_path / "run"
    res = cli.invoke(app, ["stage", "data", "--config", "tiny", "--run-dir", str(run), "--set", "tracking.mode=disabled",
                           *[a for s in [*_ok_sources(), "data.sft.path=data/mysft"] for a in ("--set", s)]])
    assert res.exit_code == 1 and "data/mysft:0: -: file not found" in res.output, res.output
    assert not run.exists()  # no_hub above fails the test if the hub were asked


# ---------------------------------------------------------------------------------------- orchestration (item 7)


@pytest.mark.parametrize("overrides, key", [
    (["pretrained.trust_remote_code=true"], "pretrained.trust_remote_code"),
    (["pretrained={trust_remote_code: true}"], "pretrained.trust_remote_code"),
    (["pretrained.allow_pickle=true"], "pretrained.allow_pickle"),
    (["ghost_attention.checker=os:system"], "ghost_attention.checker"),
])
def test_flow_parameters_cannot_turn_on_code_execution(overrides, key, monkeypatch):
    from flows.rlhf import ALLOW_UNSAFE_ENV, SERVED_CONFIG_ENV, check_parameters

    monkeypatch.delenv(ALLOW_UNSAFE_ENV, raising=False)
    monkeypatch.delenv(SERVED_CONFIG_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        check_parameters("tiny", overrides)
    assert key in str(e.value) and ALLOW_UNSAFE_ENV in str(e.value)
    # the serving side allows it explicitly: the env var (what `RLHF_ALLOW_UNSAFE_OVERRIDES=1 rlhf serve` sets)
    monkeypatch.setenv(ALLOW_UNSAFE_ENV, "1")
    assert check_parameters("tiny", overrides) is not None


def test_flow_config_file_cannot_turn_on_code_execution_unless_served(monkeypatch, tmp_path):
    from flows.rlhf import ALLOW_UNSAFE_ENV, SERVED_CONFIG_ENV, check_parameters

    monkeypatch.delenv(ALLOW_UNSAFE_ENV, raising=False)
    monkeypatch.delenv(SERVED_CONFIG_ENV, raising=False)
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text("name: trusted\npretrained:\n  model: demo\n  trust_remote_code: true\n")
    with pytest.raises(ConfigError, match="pretrained.trust_remote_code"):
        check_parameters(str(trusted), [])  # a flow caller's own config file
    monkeypatch.setenv(SERVED_CONFIG_ENV, str(trusted))  # what `rlhf serve --config trusted.yaml` records
    assert check_parameters(str(trusted), []).pretrained.trust_remote_code is True
    with pytest.raises(ConfigError, match="pretrained.allow_pickle"):
        check_parameters(str(trusted), ["pretrained.allow_pickle=true"])
    assert check_parameters("tiny", ["sft.epochs=2"]).sft.epochs == 2  # ordinary overrides are fine


def test_rlhf_flow_rejects_unsafe_overrides_before_any_stage(monkeypatch, tmp_path):
    from flows.rlhf import ALLOW_UNSAFE_ENV, SERVED_CONFIG_ENV, rlhf

    monkeypatch.delenv(ALLOW_UNSAFE_ENV, raising=False)
    monkeypatch.delenv(SERVED_CONFIG_ENV, raising=False)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="pretrained.trust_remote_code"):
        rlhf.fn(mode="bootstrap", config="tiny", run_dir=str(run), overrides=["pretrained.trust_remote_code=true"])
    assert not run.exists()


def test_permanent_failures_are_not_retried():
    from prefect.states import Failed

    from flows.rlhf import _retry_transient
    from pipeline.models import CheckpointError
    from pipeline.runner import MissingInputError

    OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})  # torch.cuda.OutOfMemoryError, by name
    oom_wrapped = RuntimeError("stage ppo failed")
    oom_wrapped.__cause__ = OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    permanent = [StageFailed("bad input"), MissingInputError("no sft"), ConfigError("bad key"), OutOfMemoryError("CUDA out of memory"),
                 RuntimeError("CUDA error: out of memory"), oom_wrapped, MemoryError(),
                 FileNotFoundError(2, "No such file or directory", "runs/x/artifacts/sft/r0-abc/model.safetensors"),
                 OSError("runs/x/artifacts/sft/r0-abc does not appear to have a file named config.json"),
                 CheckpointError("checkpoint not found: /models/llama (no such directory or file)")]
    if hasattr(torch.cuda, "OutOfMemoryError"):
        permanent.append(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    transient = [OSError("nfs hiccup"), RuntimeError("CUDA error: unspecified launch failure"), ConnectionResetError("reset by peer"),
                 CheckpointError("cannot read the checkpoint config of 'org/model': We couldn't connect to 'https://huggingface.co'")]
    for exc in permanent:
        assert _retry_transient(None, None, Failed(data=exc)) is False, exc
    for exc in transient:
        assert _retry_transient(None, None, Failed(data=exc)) is True, exc
