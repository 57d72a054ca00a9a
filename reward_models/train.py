"""Stages `reward_model_helpful` and `reward_model_safety` (Llama 2 sec. 3.2.2).

    rlhf stage reward_model_helpful --round 1
    rlhf stage reward_model_safety --round 1

Each starts from the configured checkpoint (the round's starting policy by default), replaces the
LM head with a scalar head and trains one epoch on all comparisons collected so far, in the
paper's data mix, with the margin ranking loss -log sigmoid(r_c - r_r - m(strength)).
Chosen and rejected go through the model in one forward pass, sharing one row and one computation of
their prompt (`forward_pair_rewards`). Resumes from its checkpoint.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from pipeline.context import StageContext, StageFailed
from pipeline.io import write_json, write_jsonl
from pipeline.models import save_policy

from data_specs.schemas import STRENGTHS, Comparison, messages_to_dicts

from .data import StaticSet, holdout, mix_for, prompt_key, static_sets
from .losses import margin_for, pairwise_accuracy, ranking_loss
from .model import RewardForward, encode_pair, forward_pair_rewards, load_frozen_reward_model, load_reward_model, score


HELD_OUT_FILE = "held_out_comparisons.jsonl"  # the RM's own-domain held-out on-policy comparisons (evaluate reads it)


def run_helpful(ctx: StageContext) -> dict:
    return train_reward_model(ctx, "helpful")


def run_safety(ctx: StageContext) -> dict:
    return train_reward_model(ctx, "safety")


def run_judge(ctx: StageContext) -> dict:
    """The held-out judge RM (evaluate.judge: heldout_rm): trained on what the optimised RMs hold out."""
    return train_reward_model(ctx, "helpful", judge=True)


def _init_path(ctx: StageContext):
    cfg = ctx.section
    if cfg.init_from == "previous" and "previous" in ctx.inputs:
        return ctx.input("previous").path
    if cfg.init_from == "pretrained":
        return ctx.input("pretrained").path
    return ctx.input("policy").path


def _load_comparisons(ctx: StageContext) -> list[Comparison]:
    from data_specs.loaders import load_records

    out = []
    for art in ctx.inputs_like("preferences_r"):
        out += load_records(art.file("comparisons.jsonl"), "preference", format="own")
    return out


def _load_static(ctx: StageContext) -> list[StaticSet]:
    """The `data` artifact's static preference sets (`data.preferences`), by set and domain."""
    from data_specs.prepare import STATIC_PREFERENCES, read_static_preferences

    return static_sets(read_static_preferences(ctx.input("data").file(STATIC_PREFERENCES)))


def train_reward_model(ctx: StageContext, kind: str, judge: bool = False) -> dict:
    """A reward model of `kind` on the round's comparisons (split by prompt: the held-out prompts' comparisons
    measure it). judge=True: the held-out judge RM, trained on exactly those held-out comparisons (both domains,
    no static sets), so it has seen nothing the optimised RMs trained on; it is measured on the template pairs."""
    from pipeline.distributed import Sharded, all_sum, big_model, check_divisible, free_memory, from_main, load_device, share, world
    from policies.trainer import apply_lora, cosine_lambda, load_train_state, make_optimizer, merge_lora, save_train_state

    cfg = ctx.section
    device = ctx.device
    comparisons = _load_comparisons(ctx)
    train_all, held = holdout(comparisons, cfg.eval_fraction, ctx.config.seed)
    if judge:
        train_all, held = held, []
        rms = [ctx.config.reward_model_helpful, ctx.config.reward_model_safety]
        if any(r.eval_fraction != cfg.eval_fraction for r in rms):
            raise StageFailed(f"{ctx.stage}.eval_fraction ({cfg.eval_fraction}) must equal the reward models' "
                              f"({', '.join(str(r.eval_fraction) for r in rms)}): the judge trains on what they hold out")
    static = [] if judge else _load_static(ctx)
    train = train_all if judge else mix_for(kind, train_all, cfg.mix_other_ratio, cfg.helpful_share, ctx.seed, static=static)
    static_ids = {id(c) for s in static for c in s.records}
    if not train:
        raise StageFailed(f"{ctx.stage}: no {'held-out' if judge else kind} comparisons to train on (collected: {len(comparisons)}"
                          + (f", held out: eval_fraction={cfg.eval_fraction}" if judge else "") + ")")
    model, tok = load_reward_model(_init_path(ctx), load_device(ctx.config, device))  # big models: host memory, then sharded
    if cfg.gradient_checkpointing:  # exact: the same losses, activations recomputed layer by layer
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.lora, device, task_type="SEQ_CLS")  # the scalar head trains in full (peft modules_to_save)
    model.train()
    check_divisible(cfg.batch_size, f"{ctx.stage}.batch_size")

    def pair_ids(c: Comparison):
        prompt = messages_to_dicts(c.prompt)
        return encode_pair(tok, prompt, c.chosen, cfg.max_length), encode_pair(tok, prompt, c.rejected, cfg.max_length)

    encoded = [pair_ids(c) for c in train]
    margins = torch.tensor([margin_for(c.strength.value if c.strength else None, cfg.margin) for c in train])
    safe_labels = [(c.chosen_safe, c.rejected_safe) for c in train]

    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = max(cfg.min_warmup_steps if total > cfg.min_warmup_steps * 2 else 0, int(cfg.warmup_ratio * total))
    per_rank = cfg.batch_size // world().size
    sharded = Sharded(RewardForward(model), device,  # several processes: sharded while it trains (FSDP2 or DeepSpeed ZeRO-3)
                      lambda m: make_optimizer(m, cfg.learning_rate, cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps),
                      engine=ctx.config.hardware.sharding, micro_batches=math.ceil(per_rank / cfg.micro_batch_size),
                      max_grad_norm=cfg.max_grad_norm, compile=cfg.compile)
    net = sharded.module
    sched = torch.optim.lr_scheduler.LambdaLR(sharded.optimizer, cosine_lambda(total, warmup, cfg.min_lr_ratio))
    g = torch.Generator().manual_seed(ctx.seed)
    order: list[int] = []
    while len(order) < total * cfg.batch_size:
        order += torch.randperm(len(train), generator=g).tolist()
    ckpt = ctx.work_dir / "rm_state.pt"
    start = resumed = load_train_state(ckpt, sharded, sched)
    ctx.resume_metrics(start)  # steps from here on are logged again: each step once in metrics.jsonl

    t0, pairs_done = time.time(), 0
    bar = ctx.progress(total, f"train {kind} RM", unit="step")
    bar.update(start)
    for step in range(start, total):
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        mine = share(idx, sharded.world)  # this rank's pairs of the step
        loss_total, correct = 0.0, 0.0
        for j in range(0, len(mine), cfg.micro_batch_size):
            mb = mine[j : j + cfg.micro_batch_size]
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.bf16):  # a pair per row, prompt once
                rc, rr = forward_pair_rewards(net, [encoded[i] for i in mb], tok.pad_token_id, device)
            loss = ranking_loss(rc, rr, margins[mb].to(device))
            if cfg.aux_safety_weight > 0:
                loss = loss + cfg.aux_safety_weight * aux_safety_loss(rc, rr, [safe_labels[i] for i in mb])
            sharded.backward(loss * len(mb) / len(idx) * sharded.grad_scale)
            loss_total += float(loss.detach()) * len(mb)
            correct += float((rc > rr).float().sum())
        grad_norm = sharded.step(sched)  # clip, optimiser and scheduler step
        pairs_done += len(idx)
        step_loss = all_sum(loss_total) / len(idx)
        if not math.isfinite(step_loss):
            raise StageFailed(f"{ctx.stage}: loss became {step_loss} at step {step}")
        ctx.log({"loss": step_loss, "accuracy": all_sum(correct) / len(idx), "lr": sched.get_last_lr()[0], "grad_norm": grad_norm}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", pairs_s=f"{pairs_done / max(1e-9, time.time() - t0):.1f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            save_train_state(ckpt, sharded, sched, step + 1)
    model = merge_lora(sharded.unshard(load_device(ctx.config, device)).model)
    world_size, sharding = sharded.world.size, sharded.engine
    del net, sharded, sched  # the scheduler holds the optimiser, which holds the shards and Adam moments
    free_memory(device)
    bar.close()
    elapsed = time.time() - t0
    model.eval()
    save_policy(model, tok, ctx.out_dir, dtype=ctx.artifact_dtype)
    if big_model(ctx.config):  # too big for one device: score with a copy sharded over the ranks, read back from the artifact
        saved = from_main(str(ctx.out_dir))  # rank 0's folder (the others wrote a scratch copy)
        del model
        model, _ = load_frozen_reward_model(saved, device, ctx.inference_dtype, sharded=True)

    metrics = {"n_train": len(train), "n_collected": len(comparisons), "steps": total, "resumed_from_step": resumed,
               "world_size": world_size, "sharding": sharding,
               "pairs_per_s": pairs_done / max(1e-9, elapsed), "train_loss": step_loss,
               "n_train_safety": sum(c.is_safety_prompt for c in train), "n_train_static": sum(id(c) in static_ids for c in train)}
    templates = template_pairs(ctx, kind)

    def report(comps, what):  # scoring a 135M model's held-out pairs on a CPU takes minutes: show it
        bar = ctx.progress(2 * len(comps), f"score {what}", unit="seq")
        try:
            return accuracy_report(model, tok, comps, cfg.max_length, device, progress=bar.update)
        finally:
            bar.close()

    # `accuracy` (Llama 2 Table 8): held-out ON-POLICY comparisons (sampled from the round's policies by
    # collect_preferences, split by prompt), in this RM's own domain; the off-policy template pairs of
    # eval_comparisons.jsonl are a separate metric, `template_accuracy*`. Only when nothing was held out
    # does `accuracy` fall back to the template pairs, and `accuracy_source` says so.
    held_own = [c for c in held if c.is_safety_prompt == (kind == "safety")]
    source = "held_out_on_policy"
    if held and not held_own:  # none of this RM's domain was held out: the other domain's, named as such
        held_own, source = list(held), "held_out_on_policy_other_domain"
    write_jsonl(ctx.out_dir / HELD_OUT_FILE, held_own)
    metrics["n_held_out_prompts"] = len({prompt_key(c) for c in held})
    if held_own:
        metrics.update(report(held_own, "held-out pairs"))
        metrics["accuracy_source"] = source
    if templates:
        rep = report(templates, "template pairs")
        metrics.update({f"template_{k}": v for k, v in rep.items() if not isinstance(v, tuple) and k != "reward_histogram"})
        if not held_own:
            metrics.update(rep)
            metrics["accuracy_source"] = "template_pairs"
    rewards = metrics.pop("_rewards", None)
    write_json(ctx.out_dir / "reward_model.json", {"kind": kind, "margin": cfg.margin, "max_length": cfg.max_length,
                                                   "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)}})
    _plot_histograms(ctx, rewards, kind)
    return metrics


def template_pairs(ctx: StageContext, kind: str) -> list[Comparison]:
    """The off-policy template pairs (eval_comparisons.jsonl) a `kind` reward model is scored on: those of its own
    domain (all when it has none), a seeded subset of `reward_model_<kind>.template_pairs` of them when set (the CPU
    budget). The run's seed picks it, so the RM stage and evaluate score the same pairs."""
    from policies.common import load_data, subsample

    comps = load_data(ctx, "eval_comparisons.jsonl", "preference")
    own = [c for c in comps if c.is_safety_prompt == (kind == "safety")] or comps
    cap = getattr(ctx.config, f"reward_model_{kind}").template_pairs
    return own if cap is None else subsample(own, cap, ctx.config.seed)


def held_out_comparisons(path) -> list[Comparison]:
    """An RM artifact's held-out on-policy comparisons ([] for artifacts written before they were kept)."""
    from data_specs.loaders import load_records

    return load_records(path, "preference", format="own") if path.exists() and path.stat().st_size else []


def aux_safety_loss(rc: torch.Tensor, rr: torch.Tensor, labels: list[tuple[bool | None, bool | None]]) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(r) against each response's safety label (unlabeled skipped)."""
    r = torch.cat([rc, rr])
    y = [a for a, _ in labels] + [b for _, b in labels]
    keep = [i for i, v in enumerate(y) if v is not None]
    if not keep:
        return r.sum() * 0.0
    target = torch.tensor([float(y[i]) for i in keep], device=r.device)
    return F.binary_cross_entropy_with_logits(r[keep], target)


def accuracy_report(model, tok, comparisons: list[Comparison], max_length: int, device: str, progress=None) -> dict:
    """Held-out accuracy overall and per preference strength (Llama 2 Table 8 shape), mean margin.
    progress(k) as sequences are scored (2 per comparison)."""
    if not comparisons:
        return {}
    prompts = [messages_to_dicts(c.prompt) for c in comparisons]
    rc = score(model, tok, prompts, [c.chosen for c in comparisons], max_length, device, progress=progress)
    rr = score(model, tok, prompts, [c.rejected for c in comparisons], max_length, device, progress=progress)
    out = {"accuracy": float(pairwise_accuracy(rc, rr)), "mean_margin": float((rc - rr).mean()), "n_eval": len(comparisons)}
    by = {}
    for s in STRENGTHS:
        sel = [i for i, c in enumerate(comparisons) if (c.strength or STRENGTHS[-1]) == s]
        if sel:
            acc = float(pairwise_accuracy(rc[sel], rr[sel]))
            out[f"accuracy_{s.value}"] = acc
            by[s.value] = {"accuracy": acc, "n": len(sel)}
    out["accuracy_by_strength"] = by
    edges = torch.linspace(float(torch.minimum(rc.min(), rr.min())), float(torch.maximum(rc.max(), rr.max())) + 1e-6, 21)
    out["reward_histogram"] = {"edges": edges.tolist(), "chosen": torch.histogram(rc, edges).hist.tolist(),
                               "rejected": torch.histogram(rr, edges).hist.tolist()}
    out["_rewards"] = (rc.tolist(), rr.tolist())
    return out


def _plot_histograms(ctx: StageContext, rewards, kind: str) -> None:
    if not rewards:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc, rr = rewards
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(rc, bins=30, alpha=0.6, label="chosen")
    ax.hist(rr, bins=30, alpha=0.6, label="rejected")
    ax.set_title(f"{kind} RM, round {ctx.round}: held-out rewards")
    ax.set_xlabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "reward_histogram.png", dpi=100)
    plt.close(fig)
