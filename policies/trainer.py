"""The supervised training loop shared by sft, rejection_sampling and ghost_attention.

* Examples are (input_ids, labels) with labels = -100 on prompt tokens (Llama 2 sec. 3.1: loss on
  answer tokens only).
* Packing: examples are packed first-fit-decreasing into rows of `seq_len`; position ids restart
  at every example, which makes transformers build a block-diagonal causal mask, so attention
  never crosses an example boundary. No padding is wasted beyond each row's tail.
* Cosine schedule with warm-up, AdamW with weight decay on matrices only, gradient accumulation.
* Checkpoints (model, optimiser, scheduler, step, RNG) in the stage's work dir; a rerun resumes.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.chat import IGNORE
from pipeline.config import LoraConfig, TrainConfig
from pipeline.context import StageFailed

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


def apply_lora(model, lora: LoraConfig, device: str):
    if not lora.enabled:
        return model
    if lora.quantize_4bit and device != "cuda":
        raise StageFailed("QLoRA (lora.quantize_4bit) needs bitsandbytes and a CUDA GPU; this run is on the CPU. "
                          "Set lora.quantize_4bit=false (plain LoRA works on the CPU).")
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def merge_lora(model):
    """A plain transformers model again (adapters merged), so downstream stages load it as usual."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, **state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_checkpoint


# ---------------------------------------------------------------------------------------- training


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


def train_causal_lm(model, train_rows: Sequence[PackedRow], eval_rows: Sequence[PackedRow], tc: TrainConfig, ctx, seed: int,
                    ckpt_name: str = "train_state.pt") -> dict:
    """Train `model` in place on packed rows; resumable. Returns summary metrics."""
    device = ctx.device
    model.to(device).train()
    n = len(train_rows)
    if n == 0:
        raise StageFailed(f"{ctx.stage}: no training examples with answer tokens")
    steps_per_epoch = max(1, math.ceil(n / tc.batch_size))
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total_steps * tc.batch_size:
        order += torch.randperm(n, generator=g).tolist()

    opt = make_optimizer(model, tc.learning_rate, tc.weight_decay)
    warmup = int(tc.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total_steps, warmup, tc.min_lr_ratio))
    ckpt_path = ctx.work_dir / ckpt_name
    start_step, resumed_from = 0, 0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step = resumed_from = state["step"]

    tokens = 0
    t0 = time.time()
    last_loss = float("nan")
    bar = ctx.progress(total_steps, "train", unit="step")
    bar.update(start_step)
    for step in range(start_step, total_steps):
        idx = order[step * tc.batch_size : (step + 1) * tc.batch_size]
        batch_rows = [train_rows[i] for i in idx]
        n_label = sum(sum(1 for l in r.labels[1:] if l != IGNORE) for r in batch_rows)
        opt.zero_grad(set_to_none=True)
        loss_total = 0.0
        tokens += sum(r.length for r in batch_rows)
        for j in range(0, len(batch_rows), tc.micro_batch_size):
            batch = collate(batch_rows[j : j + tc.micro_batch_size], device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=tc.bf16):
                loss_sum, _ = token_loss_sum(model, batch)
            (loss_sum / max(1, n_label)).backward()
            loss_total += float(loss_sum.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        opt.step()
        sched.step()
        last_loss = loss_total / max(1, n_label)
        if not math.isfinite(last_loss):
            raise StageFailed(f"{ctx.stage}: training loss became {last_loss} at step {step}")
        ctx.log({"loss": last_loss, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm)}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}")
        if (step + 1) % tc.checkpoint_every == 0 and step + 1 < total_steps:
            save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                            step=step + 1, rng=torch.get_rng_state())
    bar.close()
    elapsed = time.time() - t0
    eval_loss = evaluate_loss(model, eval_rows, tc.micro_batch_size, device)
    return {
        "train_loss": last_loss,
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50)) if math.isfinite(eval_loss) else None,
        "steps": total_steps,
        "resumed_from_step": resumed_from,
        "tokens_per_s": tokens / max(1e-9, elapsed),
        "train_rows": n,
        "seconds": elapsed,
    }
