"""The supervised training loop shared by sft, rejection_sampling and ghost_attention.

* Examples are (input_ids, labels) with labels = -100 on prompt tokens (Llama 2 sec. 3.1: loss on
  answer tokens only).
* Packing: examples are packed first-fit-decreasing into rows of `seq_len`; position ids restart
  at every example, which makes transformers build a block-diagonal causal mask, so attention
  never crosses an example boundary. No padding is wasted beyond each row's tail.
* Cosine schedule with warm-up, AdamW with weight decay on matrices only, gradient accumulation.
* Checkpoints (model, optimiser, scheduler, step, RNG) in the stage's work dir; a rerun resumes. They hold
  tensors and plain values only and load with `weights_only=True`; an unreadable one is set aside (see below).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.chat import IGNORE
from pipeline.config import LoraConfig, TrainConfig
from pipeline.context import StageFailed
from pipeline.distributed import Sharded, all_sum, barrier, check_divisible, free_memory, from_main, load_device, share, world
from pipeline.io import fsync_path
from pipeline.models import QLoRAUnavailable, is_quantized, load_policy, qlora_quantization

Example = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    length: int  # real tokens (before tail padding)


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> list[PackedRow]:
    """First-fit-decreasing packing. Too-long examples are truncated to `seq_len` (from the left of
    the prompt, so the answer survives). Tail padding has labels -100 and its own positions."""
    items = []
    for ids, labels in examples:
        if len(ids) > seq_len:
            ids, labels = ids[-seq_len:], labels[-seq_len:]
        if any(l != IGNORE for l in labels):
            items.append((ids, labels))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(items[i][0])
        for b, free in enumerate(space):  # first fit; rows are short lists, this stays cheap
            if free >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(seq_len - n)
    rows = []
    for b in bins:
        ids, labels, pos = [], [], []
        for i in sorted(b):
            ids += items[i][0]
            labels += items[i][1]
            pos += list(range(len(items[i][0])))
        pad = seq_len - len(ids)
        rows.append(PackedRow(ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(pad)), len(ids)))
    return rows


def collate(rows: Sequence[PackedRow], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Stack rows, trimming columns that are padding in every row."""
    width = max(max((j + 1 for j, l in enumerate(r.labels) if l != IGNORE), default=1) for r in rows)
    return {
        "input_ids": torch.tensor([r.input_ids[:width] for r in rows], device=device),
        "labels": torch.tensor([r.labels[:width] for r in rows], device=device),
        "position_ids": torch.tensor([r.position_ids[:width] for r in rows], device=device),
    }


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, and how many there were."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def cosine_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def load_trainable(path, lora: LoraConfig, device: str):
    """(model, tokenizer) of the policy a fine-tuning stage trains: with QLoRA the base is loaded in 4 bit."""
    try:
        return load_policy(path, device, quantize_4bit=lora.enabled and lora.quantize_4bit)
    except QLoRAUnavailable as e:
        raise StageFailed(str(e)) from e


def apply_lora(model, lora: LoraConfig, device: str, task_type: str = "CAUSAL_LM"):
    if not lora.enabled:
        return model
    if lora.quantize_4bit and not is_quantized(model):
        try:
            qlora_quantization(device)  # says why QLoRA cannot run here, if it cannot
        except QLoRAUnavailable as e:
            raise StageFailed(str(e)) from e
        raise StageFailed("QLoRA (lora.quantize_4bit): this stage loaded its base in full precision; load it with load_trainable")
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    if is_quantized(model):  # norms and embeddings to fp32, input grads on (peft's QLoRA preparation)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, cfg)


def merge_lora(model):
    """A plain transformers model again (adapters merged), so downstream stages load it as usual.

    A QLoRA model's adapters are merged into the base reloaded in bf16 from its artifact, not into the 4-bit
    weights (merging into NF4 would re-quantise: lossy, and the artifact would need bitsandbytes to load)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if not is_quantized(model):
        return model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters, peft_cfg = get_peft_model_state_dict(model), model.peft_config["default"]
    path, device = model.get_base_model().config._name_or_path, next(model.parameters()).device
    del model
    torch.cuda.empty_cache()
    base, _ = load_policy(path, str(device), dtype="bfloat16")
    merged = get_peft_model(base, peft_cfg)
    set_peft_model_state_dict(merged, adapters)
    return merged.merge_and_unload()


# ---------------------------------------------------------------------------------------- checkpoints
#
# A resume checkpoint is a `torch.save` zip holding only tensors and plain values (dicts, lists, tuples,
# ints, floats, strings, bools, None): model/optimiser/scheduler state dicts, the step, torch's RNG
# state. It is read back with `weights_only=True`, so a planted file cannot run code. Writes are atomic
# (temporary file beside the target, fsync, rename); the previous checkpoint is kept as `<name>.prev`.
# A checkpoint that cannot be read is moved aside to `<name>.corrupt` with a warning naming it and why,
# and training resumes from `<name>.prev` or, failing that, from step 0.
#
# With several processes the model and optimiser state are not gathered: every rank writes its own shard
# (torch.distributed.checkpoint) into `<name>.step<N>.shards/`, a folder written under a temporary name and
# renamed when complete, and the file `<name>` (written last, as above) points to it. The folders the file and
# its `.prev` point to are kept, any other is removed. Any number of processes reads them back.

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 2  # 2: state dicts keyed by parameter name (torch.distributed.checkpoint.state_dict), any world size


class _Unusable(ValueError):
    """A checkpoint that loads but is not training state we wrote."""


def _prev(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _tmp_files(path: Path) -> list[Path]:
    """Temporary files of `path`'s saves (ours: `.<name>.*.tmp`; older code's: `<stem>.tmp`)."""
    if not path.parent.is_dir():
        return []
    legacy = path.with_suffix(".tmp")
    return sorted(p for p in path.parent.glob(f".{path.name}.*.tmp") if p.is_file()) + ([legacy] if legacy.is_file() else [])


def _remove_stale_tmp(path: Path) -> None:
    """A save killed mid-write (SIGKILL, power loss) leaves its temporary file; the next load or save of
    the same checkpoint removes it. One stage version has one writer (its work dir), so none is live."""
    for tmp in _tmp_files(path):
        try:
            tmp.unlink()
            log.warning("removed %s, left by a checkpoint save of %s that was interrupted", tmp, path)
        except FileNotFoundError:
            pass


def save_checkpoint(path: Path, **state) -> None:
    """Write `state` (tensors and plain values only) to `path` atomically; keep the previous one as `<name>.prev`.

    On any failure (a full disk included) the temporary file is removed and the error names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    prev = _prev(path)
    if path.is_file():  # the current checkpoint stays the fallback while the new one is written: at most 2 on disk
        prev.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():  # the current one becomes .prev; `path` itself never goes missing
            try:
                prev.unlink(missing_ok=True)
                os.link(path, prev)
            except OSError:  # no hard links on this filesystem
                os.replace(path, prev)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # a filesystem that cannot sync directories still keeps the file
            fsync_path(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
            raise OSError(e.errno, f"could not save checkpoint {path}{hint}: {e.strerror or e}") from e
        if isinstance(e, Exception):
            raise RuntimeError(f"could not save checkpoint {path}: {type(e).__name__}: {e}") from e
        raise


def _why_unreadable(e: BaseException) -> str:
    # torch's own text advises retrying with weights_only=False; never pass that on, keep the cause only
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and "weights_only" not in l and "documentation" not in l]
    lines = [l.removeprefix("WeightsUnpickler error:").strip() for l in lines]
    refused = next((l for l in lines if "global" in l.lower()), "")
    if isinstance(e, pickle.UnpicklingError) and refused:  # weights_only refused a class or function
        return ("it holds objects other than tensors and plain values, which could run code when unpickled; "
                f"it was not loaded ({refused.split('. ')[0][:200]})")
    if isinstance(e, EOFError) or not lines:
        return "it is empty or truncated"
    return f"it is truncated or corrupt ({type(e).__name__}: {lines[0].split('. ')[0][:200]})"


def load_checkpoint(path: Path, required: Sequence[str] = ("step",), check: Callable[[dict], str | None] | None = None) -> dict | None:
    """The newest readable checkpoint at `path` (or its `.prev`), loaded with `weights_only=True`; None when
    there is none. An unreadable one (truncated, corrupt, not plain tensors, missing `required` keys, or what
    `check(state)` says is wrong with it) is moved aside to `<name>.corrupt` with a warning naming the file and
    why; it never stops the run."""
    path = Path(path)
    _remove_stale_tmp(path)
    for cand in (path, _prev(path)):
        if not cand.is_file():
            continue
        try:
            state = torch.load(cand, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise _Unusable(f"it holds a {type(state).__name__}, not a dict of training state")
            missing = [k for k in required if k not in state]
            if missing:
                raise _Unusable(f"it lacks {', '.join(missing)}")
            if "step" in required and (not isinstance(state["step"], int) or state["step"] < 0):
                raise _Unusable(f"its step is {state['step']!r}")
            if check is not None and (why := check(state)):
                raise _Unusable(why)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is set aside, never fatal
            why = str(e) if isinstance(e, _Unusable) else _why_unreadable(e)
            aside = cand.with_name(cand.name + ".corrupt")
            try:
                os.replace(cand, aside)
                moved = f"moved it to {aside}"
            except OSError as oe:
                cand.unlink(missing_ok=True)
                moved = f"deleted it (could not move it aside: {oe})"
            then = f"trying {_prev(path)}" if cand == path and _prev(path).is_file() else "training starts from step 0"
            log.warning("checkpoint %s is unusable: %s; %s; %s", cand, why, moved, then)
            continue
        if cand != path:
            log.warning("resuming from the previous checkpoint %s (step %s)", cand, state.get("step"))
        return state
    return None


# ---------------------------------------------------------------------------------------- training


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> dict:
    """The training peak: CUDA's allocator peak since `reset_peak_memory`, or on the CPU the process's
    peak resident memory (VmHWM, since the process started: data and imports included)."""
    if device == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 1024 ** 3, "peak_memory_source": "cuda_max_allocated"}
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return {"peak_memory_gib": kib / 1024 ** 2, "peak_memory_source": "process_vmhwm"}
    except (OSError, StopIteration):
        return {}


@torch.no_grad()
def evaluate_loss(model, rows: Sequence[PackedRow], micro_batch_size: int, device: str) -> float:
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), micro_batch_size):
        loss, n = token_loss_sum(model, collate(rows[i : i + micro_batch_size], device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(1, count)


def save_on_main(path: Path, **state) -> None:
    """save_checkpoint by rank 0 alone (every rank holds the same replicated state); the others wait for it."""
    if world().is_main:
        save_checkpoint(path, **state)
    barrier()


def load_on_main(path: Path, required: Sequence[str] = ("step",), check: Callable[[dict], str | None] | None = None) -> dict | None:
    """load_checkpoint decided by rank 0 (which may set an unreadable file aside), the same state on every rank."""
    return from_main(load_checkpoint(path, required=required, check=check) if world().is_main else None)


def _shards_dir(path: Path, step: int) -> Path:
    return path.with_name(f"{path.name}.step{step}.shards")


def _prune_shards(path: Path) -> None:
    """Remove the shard folders of `path` that neither it nor its `.prev` points to (older ones, and the
    temporary folders of saves that were killed)."""
    folders = [*path.parent.glob(f"{path.name}.step*.shards"), *path.parent.glob(f".{path.name}.step*.shards.partial")]
    if not folders:
        return
    keep = set()
    for cand in (path, _prev(path)):
        with contextlib.suppress(Exception):  # mmap: a full checkpoint's tensors are not read to learn its `shards`
            state = torch.load(cand, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("shards"), str):
                keep.add(state["shards"])
    for d in folders:
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def save_train_state(path: Path, sharded, sched, step: int) -> None:
    """A resume checkpoint. One process: full state dicts keyed by parameter name in `path`, which any number of
    processes resumes from. Several: each rank writes its own shard into a folder beside `path` (nothing is
    gathered: at 70B the full state would not fit one host), then rank 0 writes `path` pointing to it."""
    extras = dict(scheduler=sched.state_dict() if sched is not None else None, step=step, rng=torch.get_rng_state(),
                  format=CHECKPOINT_FORMAT)
    if not sharded.world.distributed:
        model_state, optim_state = sharded.state()
        save_on_main(path, model=model_state, optimizer=optim_state, **extras)
        return
    final = _shards_dir(path, step)
    tmp = final.with_name(f".{final.name}.partial")  # not `.tmp`: those are the files of an interrupted `save_checkpoint`
    if sharded.world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save killed mid-write
    barrier()
    sharded.save_shards(tmp)  # every rank writes its shard
    barrier()
    if sharded.world.is_main:  # complete: the folder takes its name, so a folder of that name is always whole
        shutil.rmtree(final, ignore_errors=True)  # not pointed to (a save killed between rename and pointer)
        os.replace(tmp, final)
        with contextlib.suppress(OSError):
            fsync_path(path.parent)
    save_on_main(path, shards=final.name, engine=sharded.engine, world_size=sharded.world.size, **extras)
    if sharded.world.is_main:
        _prune_shards(path)


def _readable_by(state: dict, sharded) -> str | None:
    """Why `sharded` cannot read the shards `state` points to (None: it can). torch.distributed.checkpoint shards
    (fsdp2) reshard to any number of processes; DeepSpeed's resume only with DeepSpeed and as many processes."""
    written, n = state.get("engine", "fsdp2"), state.get("world_size")
    if written == "deepspeed" and (sharded.engine != "deepspeed" or n != sharded.world.size):
        return (f"it was written by DeepSpeed ZeRO-3 in {n} processes, which resumes only with hardware.sharding=deepspeed "
                f"and --nproc {n}")
    if written != "deepspeed" and sharded.engine == "deepspeed":
        return f"it holds {written} (torch.distributed.checkpoint) shards, which DeepSpeed cannot read: resume with hardware.sharding={written}"
    return None


def load_train_state(path: Path, sharded, sched) -> int:
    """Load the checkpoint at `path` (or its `.prev`) into every rank; the step it was saved at, or 0."""
    def check(state: dict) -> str | None:
        if "shards" in state:
            if not (path.parent / str(state["shards"])).is_dir():
                return f"the shards it points to, {path.parent / str(state['shards'])}, are missing"
            return None
        missing = [k for k in ("model", "optimizer") if k not in state]
        return f"it lacks {', '.join(missing)}" if missing else None

    state = load_on_main(path, required=("scheduler", "step", "format", "rng"), check=check)
    if world().is_main:
        _prune_shards(path)
    if state is None:
        return 0
    if "shards" in state:
        if why := _readable_by(state, sharded):
            raise StageFailed(f"cannot resume from {path}: {why} (or delete {path} and its shards to start over)")
        sharded.load_shards(path.parent / state["shards"])
    else:
        if sharded.engine == "deepspeed":  # DeepSpeed reads no full state dicts; it starts from the same weights
            raise StageFailed(f"cannot resume from {path}: it holds full state dicts (one process wrote it), which "
                              "DeepSpeed cannot read: resume with hardware.sharding=fsdp2 (or delete it to start over)")
        sharded.load_state(state["model"], state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"]


def train_causal_lm(model, train_rows: Sequence[PackedRow], eval_rows: Sequence[PackedRow], tc: TrainConfig, ctx, seed: int,
                    ckpt_name: str = "train_state.pt") -> dict:
    """Train `model` in place on packed rows; resumable. Returns summary metrics.

    In several processes (pipeline/distributed.py) the model is sharded with FSDP2 while it trains, each
    rank takes its share of every step's rows, and `model` holds the trained weights on every rank after."""
    device = ctx.device
    if not world().distributed:  # several processes: the engine puts each rank's shard on the device (`Sharded`)
        model.to(device)
    model.train()
    reset_peak_memory(device)
    if tc.gradient_checkpointing:  # exact: the same losses, activations recomputed layer by layer (pipeline/plan.py)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n = len(train_rows)
    if n == 0:
        raise StageFailed(f"{ctx.stage}: no training examples with answer tokens")
    check_divisible(tc.batch_size, f"{ctx.stage}.batch_size")
    train_rows, eval_rows = from_main((train_rows, eval_rows))
    steps_per_epoch = max(1, math.ceil(n / tc.batch_size))
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total_steps * tc.batch_size:
        order += torch.randperm(n, generator=g).tolist()

    per_rank = tc.batch_size // max(1, world().size)
    sharded = Sharded(model, device, lambda m: make_optimizer(m, tc.learning_rate, tc.weight_decay), engine=ctx.config.hardware.sharding,
                      micro_batches=math.ceil(per_rank / tc.micro_batch_size), max_grad_norm=tc.max_grad_norm, compile=tc.compile)
    net = sharded.module
    warmup = int(tc.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(sharded.optimizer, cosine_lambda(total_steps, warmup, tc.min_lr_ratio))
    ckpt_path = ctx.work_dir / ckpt_name
    start_step = resumed_from = load_train_state(ckpt_path, sharded, sched)
    ctx.resume_metrics(start_step)  # steps from here on are logged again: each step once in metrics.jsonl

    tokens = 0
    t0 = time.time()
    last_loss = float("nan")
    bar = ctx.progress(total_steps, "train", unit="step")
    bar.update(start_step)
    for step in range(start_step, total_steps):
        idx = order[step * tc.batch_size : (step + 1) * tc.batch_size]
        batch_rows = [train_rows[i] for i in idx]
        n_label = sum(sum(1 for l in r.labels[1:] if l != IGNORE) for r in batch_rows)  # over all ranks' rows
        loss_total = 0.0
        tokens += sum(r.length for r in batch_rows)
        mine = share(batch_rows, sharded.world)
        for j in range(0, len(mine), tc.micro_batch_size):
            batch = collate(mine[j : j + tc.micro_batch_size], device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=tc.bf16):
                loss_sum, _ = token_loss_sum(net, batch)
            sharded.backward(loss_sum / max(1, n_label) * sharded.grad_scale)
            loss_total += float(loss_sum.detach())
        grad_norm = sharded.step(sched)  # clip, optimiser and scheduler step
        last_loss = all_sum(loss_total) / max(1, n_label)
        if not math.isfinite(last_loss):
            raise StageFailed(f"{ctx.stage}: training loss became {last_loss} at step {step}")
        ctx.log({"loss": last_loss, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}")
        if (step + 1) % tc.checkpoint_every == 0 and step + 1 < total_steps:
            save_train_state(ckpt_path, sharded, sched, step + 1)
    bar.close()
    peak = peak_memory_gib(device)
    elapsed = time.time() - t0
    eval_loss = evaluate_loss(net, eval_rows, tc.micro_batch_size, device)  # still sharded: every rank the same rows
    model = sharded.unshard(load_device(ctx.config, device))  # with hardware.shard_inference, into host memory
    world_size, sharding = sharded.world.size, sharded.engine
    del net, sharded, sched  # the scheduler holds the optimiser, which holds the shards and Adam moments
    free_memory(device)
    if tc.gradient_checkpointing:
        model.activation_checkpointing_disable()  # the stage samples with the trained model next: use the KV cache again
    return {
        "train_loss": last_loss,
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50)) if math.isfinite(eval_loss) else None,
        "steps": total_steps,
        "resumed_from_step": resumed_from,
        "tokens_per_s": tokens / max(1e-9, elapsed),
        "train_rows": n,
        "seconds": elapsed,
        "world_size": world_size,
        "sharding": sharding,
        **peak,
    }
