"""Several processes (pipeline/distributed.py): `rlhf run --nproc 2` on the CPU (gloo, FSDP2) builds the same
artifacts as one process, with the same losses; a killed 2-process stage resumes; bad splits are refused."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.distributed import World, share
from pipeline.registry import Registry

pytestmark = pytest.mark.integration

RLHF = str(Path(sys.executable).with_name("rlhf"))
TRAINING = ("sft", "reward_model_helpful", "reward_model_safety", "rejection_sampling")  # and ghost_attention, below


def rlhf(*args, timeout=600, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "RLHF_PROGRESS": "lines"}
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _tiny(run, *sets):
    return ["--config", "tiny", "--run-dir", str(run), "--set", "tracking.mode=disabled", *[x for s in sets for x in ("--set", s)]]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _failure(p) -> str:
    """What a failed multi-process command said: every rank's error lines (a rank's traceback can be long), then the end."""
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "Error" in line and "File " not in line]
    return "\n".join(errors[:40]) + "\n---\n" + p.stdout[-2000:] + p.stderr[-4000:]


def losses(art, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in art.file("metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_share_gives_every_item_to_exactly_one_rank():
    items = list(range(10))
    parts = [share(items, World(r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert share(items, World()) == items


@pytest.fixture(scope="module")
def two_process_run(tiny_run, tmp_path_factory):
    """The tiny recipe's round 1 in 2 processes, on a copy of the single-process run's round 0 (data, pretrained, sft
    are rebuilt too: sft in 2 processes)."""
    cfg, arts = tiny_run
    run = tmp_path_factory.mktemp("dist") / "run"
    for stage in ("data", "pretrained"):
        src = arts[(stage, 0)].path
        shutil.copytree(src, run / "artifacts" / stage / src.name)
    p = rlhf("run", *_tiny(run), "--nproc", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return run, arts, p


def test_two_processes_build_the_same_versions_with_the_same_losses(two_process_run):
    run, arts, p = two_process_run
    reg = Registry(run)
    for stage in TRAINING:
        r = 0 if stage == "sft" else 1
        one, two = arts[(stage, r)], reg.find(stage, r)
        assert two is not None and two.version == one.version, stage  # same config, same code: same version
        assert two.manifest["world_size"] == 2 and two.metrics.get("world_size", 2) == 2, stage
        a, b = losses(one), losses(two)
        assert len(a) == len(b) > 0, stage
        # the same global batch: FSDP2's gradient equals one process's up to float summation order
        assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (stage, a, b)
        # and the same gradient: its norm (before clipping) is that of the global batch, not a rank's share or mean
        ga, gb = losses(one, "grad_norm"), losses(two, "grad_norm")
        assert len(ga) == len(a) and all(abs(x - y) <= 1e-3 * x for x, y in zip(ga, gb)), (stage, ga, gb)
    # PPO in 2 processes: each rank samples half of every rollout batch, so the rollouts (and losses) differ from one
    # process's; the split of each mini-batch's gradient is checked exactly in tests/test_scale.py
    ppo = reg.find("ppo", 1)
    assert ppo.manifest["world_size"] == 2 and ppo.metrics["stop_reason"] == "completed"
    rows = [json.loads(line) for line in ppo.file("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == list(range(len(rows)))
    assert all(r["response_length"] > 0 and abs(r["kl"]) < 1.0 for r in rows)
    assert reg.find("evaluate", 1).manifest["world_size"] == 1  # evaluate runs on rank 0 alone
    # one artifact per (stage, round), no leftovers; rank 1 wrote nothing into the registry
    for stage_dir in (run / "artifacts").iterdir():
        assert len([d for d in stage_dir.iterdir() if not d.name.startswith(".")]) == 1, stage_dir
    assert not list(run.rglob("*.build*")) and not list(run.rglob("*rank1*"))
    # rank 0 alone prints: one summary table
    assert p.stdout.count("finished:") == 1


def test_ghost_attention_in_two_processes_equals_one(two_process_run, tmp_path):
    """GAtt starts from the round's PPO policy, which 2 processes sample differently: rebuild it in 2 processes on a
    copy of the single-process registry (same PPO policy) and compare with the single-process GAtt."""
    run0, arts, _ = two_process_run
    cfg_dir = Path(arts[("data", 0)].path).parents[2]
    run = tmp_path / "run"
    shutil.copytree(cfg_dir / "artifacts", run / "artifacts", ignore=lambda d, names: [n for n in names if n in ("ghost_attention", "evaluate")])
    p = rlhf("stage", "ghost_attention", "--round", "1", *_tiny(run), "--nproc", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    one, two = arts[("ghost_attention", 1)], Registry(run).find("ghost_attention", 1)
    assert two.version == one.version and two.manifest["world_size"] == 2
    a, b = losses(one), losses(two)
    assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    ga, gb = losses(one, "grad_norm"), losses(two, "grad_norm")
    assert all(abs(x - y) <= 1e-3 * x for x, y in zip(ga, gb)), (ga, gb)


def test_deepspeed_zero3_in_two_processes_equals_one(two_process_run, tmp_path):
    """hardware.sharding=deepspeed: the same stages sharded by DeepSpeed ZeRO-3 (on the CPU: its CPU accelerator over
    gloo) build the same versions with the same per-step losses and gradient norms as one process. The reward model
    takes two micro-batches per rank and step, so DeepSpeed's gradient accumulation is exercised too (sft's micro-batch
    stays: its version is the input of the copied round-1 preferences)."""
    _, arts, _ = two_process_run
    cfg_dir = Path(arts[("data", 0)].path).parents[2]
    skip = ("sft", "reward_model_helpful")
    sets = ("reward_model_helpful.micro_batch_size=2",)
    runs = {}
    for name, extra in (("one", ()), ("two", ("hardware.sharding=deepspeed",))):
        run = runs[name] = tmp_path / name
        shutil.copytree(cfg_dir / "artifacts", run / "artifacts", ignore=lambda d, names: [n for n in names if n in skip])
        for stage, r in (("sft", 0), ("reward_model_helpful", 1)):
            p = rlhf("stage", stage, "--round", str(r), *_tiny(run, *sets, *extra), *(("--nproc", "2") if name == "two" else ()))
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    for stage, r in (("sft", 0), ("reward_model_helpful", 1)):
        one, two = Registry(runs["one"]).find(stage, r), Registry(runs["two"]).find(stage, r)
        assert two.version == one.version and two.manifest["world_size"] == 2, stage
        assert two.metrics["sharding"] == "deepspeed" and one.metrics["sharding"] == "single", stage
        a, b = losses(one), losses(two)
        assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (stage, a, b)
        ga, gb = losses(one, "grad_norm"), losses(two, "grad_norm")
        assert all(abs(x - y) <= 1e-3 * x for x, y in zip(ga, gb)), (stage, ga, gb)


def test_ppo_with_its_policy_sharded_equals_replicated(two_process_run, tmp_path):
    """ppo.shard_policy: the policy and value head sharded with FSDP2 (gathered whole only to sample) train like the
    replicated policy of the same 2 processes: same rollouts, rewards and losses step by step."""
    run0, _, _ = two_process_run
    run = tmp_path / "run"
    shutil.copytree(run0 / "artifacts", run / "artifacts", ignore=lambda d, names: [n for n in names if n in ("ppo", "ghost_attention", "evaluate")])
    # sharded, every forward is a collective: a mini-batch that does not split evenly is refused before any work
    p = rlhf("stage", "ppo", "--round", "1", *_tiny(run, "ppo.shard_policy=true", "ppo.mini_batch_size=3"), "--nproc", "2")
    assert p.returncode != 0 and "ppo.mini_batch_size=3 does not split over 2 processes" in p.stdout + p.stderr
    p = rlhf("stage", "ppo", "--round", "1", *_tiny(run, "ppo.shard_policy=true"), "--nproc", "2")
    assert p.returncode == 0, _failure(p)
    # and with hardware.shard_inference: the policy loaded by rank 0 alone, sampled a block at a time in lockstep
    # (never gathered whole), the reward models sharded too
    big = tmp_path / "big"
    shutil.copytree(run0 / "artifacts", big / "artifacts", ignore=lambda d, names: [n for n in names if n in ("ppo", "ghost_attention", "evaluate")])
    p = rlhf("stage", "ppo", "--round", "1", *_tiny(big, "ppo.shard_policy=true", "hardware.shard_inference=true"), "--nproc", "2")
    assert p.returncode == 0, _failure(p)
    replicated = Registry(run0).find("ppo", 1)
    for sharded in (Registry(run).find("ppo", 1), Registry(big).find("ppo", 1)):
        assert sharded.manifest["world_size"] == 2 and sharded.metrics["stop_reason"] == replicated.metrics["stop_reason"]
        assert (sharded.metrics["sharding"], replicated.metrics["sharding"]) == ("fsdp2", "replicated")
        rows = [[json.loads(line) for line in a.file("metrics.jsonl").read_text().splitlines() if "reward" in line]
                for a in (replicated, sharded)]
        assert len(rows[0]) == len(rows[1]) > 1
        for a, b in zip(*rows):
            assert a["response_length"] == b["response_length"] and a["reward"] == pytest.approx(b["reward"], rel=1e-5), (a, b)
            for k in ("policy_loss", "value_loss", "kl", "approx_kl"):
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), (k, a, b)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_a_killed_two_process_stage_resumes_from_its_checkpoint(two_process_run, tmp_path, engine):
    run0, _, _ = two_process_run
    run = tmp_path / "run"
    shutil.copytree(run0 / "artifacts" / "data", run / "artifacts" / "data")
    shutil.copytree(run0 / "artifacts" / "pretrained", run / "artifacts" / "pretrained")
    sets = ("sft.max_steps=300", "sft.checkpoint_every=10", "threads=1", f"hardware.sharding={engine}")
    env = {**os.environ, "WANDB_MODE": "disabled", "RLHF_PROGRESS": "lines"}
    proc = subprocess.Popen([RLHF, "stage", "sft", *_tiny(run, *sets), "--nproc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    deadline = time.time() + 300
    ckpts = []
    while time.time() < deadline and not ckpts:
        ckpts = list((run / "work").rglob("train_state.pt")) if (run / "work").exists() else []
        time.sleep(0.2)
    assert ckpts, "no checkpoint was written"
    time.sleep(0.5)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks (torchrun starts them in sessions of their own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert Registry(run).find("sft", 0) is None

    # the checkpoint is per rank: each process wrote its own shard, nothing was gathered into the file
    import torch

    pointer = torch.load(ckpts[0], weights_only=True)
    assert "model" not in pointer and pointer["world_size"] == 2 and pointer["engine"] == engine
    shards = ckpts[0].parent / pointer["shards"]
    files = sorted(str(f.relative_to(shards)) for f in shards.rglob("*") if f.is_file())
    if engine == "fsdp2":
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    else:  # DeepSpeed's own layout: a model and an optimiser partition per rank
        assert [f for f in files if "zero_pp_rank" in f] == [f"state/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt"
                                                           for r in (0, 1) for k in ("model", "optim")], files
    one_proc = tmp_path / "one_proc"  # the same crashed run, resumed by ONE process from the two processes' shards
    shutil.copytree(run, one_proc)

    p = rlhf("stage", "sft", *_tiny(run, *sets), "--nproc", "2")
    assert p.returncode == 0, _failure(p)
    art = Registry(run).find("sft", 0)
    assert art.metrics["resumed_from_step"] >= 10 and art.metrics["world_size"] == 2
    steps = [json.loads(line)["step"] for line in art.file("metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == list(range(300))  # every step logged once, none lost or repeated across the crash

    # the uninterrupted single-process run of the same stage ends at the same loss
    ref = tmp_path / "ref"
    shutil.copytree(run / "artifacts" / "data", ref / "artifacts" / "data")
    shutil.copytree(run / "artifacts" / "pretrained", ref / "artifacts" / "pretrained")
    p = rlhf("stage", "sft", *_tiny(ref, *sets))
    assert p.returncode == 0, p.stderr[-3000:]
    one = Registry(ref).find("sft", 0)
    assert one.version == art.version
    assert abs(one.metrics["train_loss"] - art.metrics["train_loss"]) <= 1e-3 * abs(one.metrics["train_loss"])

    p = rlhf("stage", "sft", *_tiny(one_proc, *sets))
    if engine == "deepspeed":  # DeepSpeed's checkpoints resume with as many processes: refused, saying so, nothing built
        assert p.returncode != 0 and "--nproc 2" in p.stdout + p.stderr and "DeepSpeed" in p.stdout + p.stderr
        assert Registry(one_proc).find("sft", 0) is None
        return
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = Registry(one_proc).find("sft", 0)
    assert resumed.metrics["resumed_from_step"] >= 10 and resumed.metrics["world_size"] == 1
    assert abs(one.metrics["train_loss"] - resumed.metrics["train_loss"]) <= 1e-3 * abs(one.metrics["train_loss"])


def test_a_batch_that_does_not_split_over_the_processes_is_refused(two_process_run, tmp_path):
    run0, _, _ = two_process_run
    run = tmp_path / "run"
    shutil.copytree(run0 / "artifacts" / "data", run / "artifacts" / "data")
    shutil.copytree(run0 / "artifacts" / "pretrained", run / "artifacts" / "pretrained")
    p = rlhf("stage", "sft", *_tiny(run, "sft.batch_size=5", "sft.micro_batch_size=5"), "--nproc", "2")
    assert p.returncode != 0
    assert "sft.batch_size=5 does not split over 2 processes" in p.stdout + p.stderr
    assert Registry(run).find("sft", 0) is None


def test_sampling_and_scoring_with_models_sharded_over_two_processes_equal_whole_models(tmp_path):
    """hardware.shard_inference's pieces: a policy (tied embeddings) and a reward model FSDP2-sharded over 2 processes
    from the start (rank 0 reads them; each rank holds half), sampled and scored in lockstep with an uneven share of
    prompts per rank, give exactly what the whole models give on each rank's share."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.models import save_policy
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    save_policy(LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)), tok, tmp_path / "policy")
    rm = LlamaForSequenceClassification(LlamaConfig(**common, num_labels=1))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    out = tmp_path / "out.json"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(root / "tests/scripts/sharded_inference.py"),
                        str(tmp_path / "policy"), str(tmp_path / "rm"), str(out)], capture_output=True, text=True, timeout=300, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, _failure(p)
    r = json.loads(out.read_text())
    assert r["whole_params"] > 0 and r["local_params"] <= 0.5 * r["whole_params"] + 64  # each rank holds half of every block
    for name in ("sampled", "greedy"):
        sharded, whole = r[name]["sharded"], r[name]["whole"]
        assert len(sharded) == 11 and all(len(s) == 3 for s in sharded)
        assert sharded == whole, name
    lengths = {len(c) for per in r["sampled"]["sharded"] for c in per}
    assert len(lengths) > 1  # rows stopped at different steps: the lockstep paced ranks with nothing left
    assert r["scores"]["sharded_is_sharded"]
    assert r["scores"]["sharded"] == pytest.approx(r["scores"]["whole"], abs=1e-5)


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seconds", "tokens_per_s", "pairs_per_s"):
            out[prefix + k] = float(v)
    return out


def test_shard_inference_in_two_processes_equals_one(two_process_run, tmp_path):
    """hardware.shard_inference (models too big for one device): sft and a reward model load in host memory and
    shard onto the devices, score their held-out data with the sharded model (the RM re-read, sharded, from its
    artifact) and hand the stage back in host memory; `evaluate` joins every rank, each holding a shard of every
    model. On copies of the single-process registry they build the same versions with the same losses, accuracies
    and evaluation as one process."""
    _, arts, _ = two_process_run
    cfg_dir = Path(arts[("data", 0)].path).parents[2]
    sets = ("hardware.shard_inference=true",)
    train = tmp_path / "train"
    shutil.copytree(cfg_dir / "artifacts", train / "artifacts", ignore=lambda d, names: [n for n in names if n in ("sft", "reward_model_helpful")])
    for stage, r in (("sft", 0), ("reward_model_helpful", 1)):
        p = rlhf("stage", stage, "--round", str(r), *_tiny(train, *sets), "--nproc", "2")
        assert p.returncode == 0, _failure(p)
        one, two = arts[(stage, r)], Registry(train).find(stage, r)
        assert two.version == one.version and two.manifest["world_size"] == 2, stage
        a, b = losses(one), losses(two)
        assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (stage, a, b)
    sft_one, sft_two = arts[("sft", 0)].metrics, Registry(train).find("sft", 0).metrics
    assert sft_two["eval_loss"] == pytest.approx(sft_one["eval_loss"], rel=1e-4)
    rm_one, rm_two = arts[("reward_model_helpful", 1)].metrics, Registry(train).find("reward_model_helpful", 1).metrics
    assert rm_two["n_eval"] == rm_one["n_eval"] > 0 and rm_two["accuracy"] == pytest.approx(rm_one["accuracy"], abs=1e-9)
    assert rm_two["mean_margin"] == pytest.approx(rm_one["mean_margin"], rel=1e-3, abs=1e-4)

    ev = tmp_path / "evaluate"  # the single-process inputs exactly, so that the evaluation can be compared
    shutil.copytree(cfg_dir / "artifacts", ev / "artifacts", ignore=lambda d, names: [n for n in names if n == "evaluate"])
    p = rlhf("stage", "evaluate", "--round", "1", *_tiny(ev, *sets), "--nproc", "2")
    assert p.returncode == 0, _failure(p)
    one, two = arts[("evaluate", 1)], Registry(ev).find("evaluate", 1)
    assert two.version == one.version and two.manifest["world_size"] == 2  # it joined every rank
    a, b = _numbers(one.metrics), _numbers(two.metrics)
    assert a.keys() == b.keys() and len(a) > 20
    different = {k: (a[k], b[k]) for k in a if b[k] != pytest.approx(a[k], rel=1e-3, abs=1e-4)}
    assert not different


def test_on_main_runs_once_and_raises_its_failure_on_every_rank(tmp_path):
    """An external judge command in a stage every rank joins runs on rank 0 alone; its failure stops every rank
    (instead of rank 0 failing while the others wait in the next collective)."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(root / "tests/scripts/on_main.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, _failure(p)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["got"] for r in ranks] == [{"from": 0}, {"from": 0}]
    assert ranks[0]["calls"] == [0, 0] and ranks[1]["calls"] == []
    assert all(r["error"] == "judge command exited with 3" for r in ranks)
