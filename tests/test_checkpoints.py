"""Resume checkpoints you can trust: plain tensors only (a planted pickle never runs), atomic saves that
leave no temporary file, a corrupt checkpoint set aside with a warning instead of failing every rerun,
metrics cut back to the checkpoint's step on resume, and the PPO value head as safetensors.

Everything runs a real (tiny) Llama through `train_causal_lm`; the reward-model and PPO resumes run the
real stages through the Runner with a crash injected after a checkpoint."""
import errno
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig, load_config
from pipeline.context import StageContext
from pipeline.io import read_jsonl
from pipeline.registry import Registry
from policies.trainer import load_checkpoint, pack_examples, save_checkpoint, train_causal_lm
from tests.helpers import TEXTS, tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
N_STEPS, EVERY = 9, 3  # checkpoints at steps 3 and 6; metrics rows 0..8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    examples = [(ids, ids) for ids in tok(TEXTS[:8])["input_ids"]]
    return pack_examples(examples, seq_len=32, pad_id=tok.pad_token_id)


def make_ctx(tmp_path, stage="sft") -> StageContext:
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "tracking.mode=disabled"])
    reg = Registry(tmp_path / "run")
    work = reg.work_dir(stage, 0, "test")
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(stage, 0, "test", cfg, {}, tmp_path / "out", work, reg, show_progress=False)


def train(tok, rows, ctx, model=None):
    tc = TrainConfig(learning_rate=1e-3, batch_size=2, micro_batch_size=2, seq_len=32, max_steps=N_STEPS, checkpoint_every=EVERY)
    model = model if model is not None else tiny_llama(tok, hidden=16)
    return model, train_causal_lm(model, rows, rows[:2], tc, ctx, seed=0)


def tmp_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.name.endswith(".tmp")]


def metric_steps(ctx) -> list[int]:
    return [r["step"] for r in read_jsonl(ctx.work_dir / "metrics.jsonl")]


# ------------------------------------------------------------------------------------ format


def test_training_checkpoint_is_plain_tensors(tok, rows, tmp_path):
    ctx = make_ctx(tmp_path)
    train(tok, rows, ctx)
    ckpt = ctx.work_dir / "train_state.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickle beyond tensors and plain values
    assert state["step"] == 6 and {"model", "optimizer", "scheduler", "rng"} <= set(state)
    assert torch.load(ctx.work_dir / "train_state.pt.prev", weights_only=True)["step"] == 3  # the one before is kept
    assert not tmp_files(tmp_path)


class _Payload:
    """Unpickling this creates `marker`: what a planted checkpoint could do with arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_never_runs_and_training_starts_over(tok, rows, tmp_path, caplog):
    ctx = make_ctx(tmp_path)
    marker = tmp_path / "pwned"
    ckpt = ctx.work_dir / "train_state.pt"
    planted = {"step": 6, "model": {}, "optimizer": {}, "scheduler": {}, "rng": _Payload(marker)}
    torch.save(planted, ckpt)
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(ckpt)
    assert not marker.exists(), "loading a checkpoint ran code from it"
    assert state is None
    assert str(ckpt) in caplog.text and "could run code" in caplog.text
    caplog.clear()
    torch.save(planted, ckpt)  # planted again: the stage's rerun trains from scratch
    with caplog.at_level(logging.WARNING):
        _, metrics = train(tok, rows, ctx)
    assert not marker.exists(), "loading a checkpoint ran code from it"
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == N_STEPS
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(ckpt) in warning and "could run code" in warning
    assert "weights_only" not in warning  # never advise loading it unsafely
    assert (ctx.work_dir / "train_state.pt.corrupt").is_file()  # kept aside for inspection, never loaded again
    assert torch.load(ckpt, weights_only=True)["step"] == 6  # the new run's own checkpoint replaced it


# ------------------------------------------------------------------------------------ corrupt


def test_truncated_checkpoint_falls_back_to_the_previous_one(tok, rows, tmp_path, caplog):
    ctx = make_ctx(tmp_path)
    train(tok, rows, ctx)
    ckpt = ctx.work_dir / "train_state.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a truncated checkpoint (copied half-way, disk trouble)
    with caplog.at_level(logging.WARNING):
        _, metrics = train(tok, rows, ctx)  # a rerun: completes instead of failing on the bad file
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(ckpt) in warning and "truncated or corrupt" in warning
    assert metrics["resumed_from_step"] == 3  # from train_state.pt.prev
    assert metric_steps(ctx) == list(range(N_STEPS))


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_unreadable_checkpoint_without_previous_restarts_from_zero(tok, rows, tmp_path, caplog, damage):
    ctx = make_ctx(tmp_path)
    train(tok, rows, ctx)
    ckpt = ctx.work_dir / "train_state.pt"
    (ctx.work_dir / "train_state.pt.prev").unlink()
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "garbage": os.urandom(4096)}[damage])
    with caplog.at_level(logging.WARNING):
        _, metrics = train(tok, rows, ctx)
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == N_STEPS
    assert any(str(ckpt) in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)
    assert not any("weights_only" in r.getMessage() for r in caplog.records)
    assert metric_steps(ctx) == list(range(N_STEPS))
    assert torch.load(ckpt, weights_only=True)["step"] == 6  # a good checkpoint again


def test_checkpoint_pointing_to_missing_shards_falls_back_to_the_previous_one(tok, rows, tmp_path, caplog):
    """Several processes write their shards to a folder that the checkpoint file points to: a file whose folder is
    gone (deleted, or a copy of the work dir without it) is set aside, naming the folder, and .prev is used."""
    ctx = make_ctx(tmp_path)
    train(tok, rows, ctx)
    ckpt = ctx.work_dir / "train_state.pt"
    state = torch.load(ckpt, weights_only=True)
    pointer = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    torch.save({**pointer, "shards": "train_state.pt.step6.shards", "world_size": 2}, ckpt)
    (ctx.work_dir / "train_state.pt.step1.shards").mkdir()  # a folder nothing points to: removed on load
    (ctx.work_dir / ".train_state.pt.step9.shards.partial").mkdir()  # a shard save killed mid-write: removed on load
    (ctx.work_dir / ".train_state.pt.x.tmp").mkdir()  # a folder named like a save's temporary file is not one: left alone
    with caplog.at_level(logging.WARNING):
        _, metrics = train(tok, rows, ctx)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "train_state.pt.step6.shards" in warning and "missing" in warning
    assert metrics["resumed_from_step"] == 3  # from train_state.pt.prev
    assert not (ctx.work_dir / "train_state.pt.step1.shards").exists()
    assert not (ctx.work_dir / ".train_state.pt.step9.shards.partial").exists()
    assert (ctx.work_dir / ".train_state.pt.x.tmp").is_dir()


def test_checkpoint_missing_state_is_set_aside(tmp_path, caplog):
    path = tmp_path / "train_state.pt"
    save_checkpoint(path, step=4, model={"w": torch.ones(2)})  # no optimizer: not one of our training states
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(path, required=("model", "optimizer", "step")) is None
    assert any(str(path) in r.getMessage() and "optimizer" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ atomic save


def test_failed_save_removes_its_temporary_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "work" / "train_state.pt"
    save_checkpoint(path, step=3, w=torch.ones(4))

    def disk_full(obj, f, *a, **k):
        f = open(f, "wb") if not hasattr(f, "write") else f
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as err:
        save_checkpoint(path, step=6, w=torch.zeros(4))
    assert err.value.errno == errno.ENOSPC and str(path) in str(err.value)
    assert not tmp_files(tmp_path), "the temporary file leaked"
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3  # the last good checkpoint is untouched


KILLED_SAVE = r'''
import os, signal, sys, time
from pathlib import Path
import torch
from policies.trainer import save_checkpoint

path = Path(sys.argv[1])
save_checkpoint(path, step=3, w=torch.ones(4))

def dying(obj, f, *a, **k):  # killed half-way through writing the next checkpoint
    f = open(f, "wb") if not hasattr(f, "write") else f
    f.write(b"PK\x03\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), int(sys.argv[2]))
    time.sleep(30)

torch.save = dying
save_checkpoint(path, step=6, w=torch.zeros(4))
'''


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_save_killed_midway_leaves_no_tmp_after_the_next_load(tmp_path, caplog, sig):
    path = tmp_path / "work" / "train_state.pt"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path), str(int(sig))], cwd=REPO, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -sig, proc.stderr
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(path)  # what the rerun does first
    assert state["step"] == 3 and torch.equal(state["w"], torch.ones(4))
    assert not tmp_files(tmp_path), "the killed save's temporary file is still there"


# ------------------------------------------------------------------------------------ metrics on resume


def test_resume_logs_each_step_once(tok, rows, tmp_path):
    ctx = make_ctx(tmp_path)
    model, _ = train(tok, rows, ctx)  # leaves a checkpoint at step 6 and metrics for steps 0..8, like a crash at the end
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.load(ctx.work_dir / "train_state.pt", weights_only=True)["step"] == 6
    assert metric_steps(ctx) == list(range(N_STEPS))
    _, metrics = train(tok, rows, ctx)
    assert metrics["resumed_from_step"] == 6
    assert metric_steps(ctx) == list(range(N_STEPS))  # steps 6..8 logged again, each once
    resumed = tiny_llama(tok, hidden=16)
    train(tok, rows, ctx, model=resumed)
    assert all(torch.allclose(final[k], v) for k, v in resumed.state_dict().items())  # the resume continues exactly


# ------------------------------------------------------------------------------------ real stages


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """data -> pretrained -> sft -> collect_preferences -> reward models -> rejection_sampling on the tiny preset."""
    from pipeline.runner import Runner

    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=disabled"])
    runner = Runner(cfg, echo=None, show_progress=False)
    for stage, r in [("data", 0), ("pretrained", 0), ("sft", 0), ("collect_preferences", 1), ("reward_model_helpful", 1),
                     ("reward_model_safety", 1), ("rejection_sampling", 1)]:
        runner.run_stage(stage, r)
    return run_dir


def _crash_once_at(monkeypatch, at: int) -> list:
    """Make the stage crash right after it logs step `at` (once), as a kill would."""
    real = StageContext.log
    fired = []

    def log(self, metrics, step=None):
        real(self, metrics, step)
        if step == at and not fired:
            fired.append(step)
            raise RuntimeError(f"simulated crash after step {at}")

    monkeypatch.setattr(StageContext, "log", log)
    return fired


@pytest.mark.parametrize("stage,extra,ckpt_name,crash_at,resumed", [
    ("reward_model_helpful", ["reward_model_helpful.checkpoint_every=2", "reward_model_helpful.batch_size=4",
                              "reward_model_helpful.micro_batch_size=4"], "rm_state.pt", 4, 4),
    ("ppo", ["ppo.steps=4", "ppo.checkpoint_every=2"], "ppo_state.pt", 2, 2),
])
def test_stage_resume_logs_each_step_once(stage_inputs, monkeypatch, stage, extra, ckpt_name, crash_at, resumed):
    from pipeline.runner import Runner

    cfg = load_config("tiny", [f"run_dir={stage_inputs}", "tracking.mode=disabled", *extra])
    runner = Runner(cfg, echo=None, show_progress=False)
    fired = _crash_once_at(monkeypatch, crash_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_stage(stage, 1)
    assert fired
    work = next((stage_inputs / "work" / stage).glob("r1-*"))
    assert torch.load(work / ckpt_name, weights_only=True)["step"] == resumed
    res = runner.run_stage(stage, 1)  # the rerun resumes
    assert res.artifact.metrics["resumed_from_step"] == resumed
    steps = [r["step"] for r in read_jsonl(res.artifact.file("metrics.jsonl")) if "stopped" not in r]
    total = res.artifact.metrics["steps"] if stage != "ppo" else 4
    assert steps == list(range(total))  # the steps logged before the crash and again after the resume: each once
    if stage == "ppo":
        from policies.ppo import load_value_head

        assert res.artifact.metrics["stop_reason"] == "completed"
        # the summary covers every step, those before the resume too (it read None when only the last ran)
        m = res.artifact.metrics
        assert m["steps_done"] == total and m["reward_first"] is not None and m["reward"] is not None
        first = read_jsonl(res.artifact.file("metrics.jsonl"))[0]
        assert m["reward_first"] == first["reward"]
        assert not res.artifact.file("value_head.pt").exists()
        assert "value_head.safetensors" in res.artifact.manifest["files"]
        assert load_value_head(res.artifact.path).v.weight.shape == (1, 32)
