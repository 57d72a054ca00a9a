"""Stage `rejection_sampling(r)`: best-of-K by the combined reward, then fine-tune (Llama 2 sec. 3.2.3).

    rlhf stage rejection_sampling --round 1

For each prompt, `k` samples from the latest policy at EACH configured temperature (so K = k x the
number of temperatures candidates per prompt; each prompt is prefilled once and its KV cache shared by
the samples), scored with the safety-gated combined reward; the best per prompt is kept. The training
set is the best of all iterations (the paper, from RLHF-V3 on): with `rescore_earlier` (default) the
earlier rounds' kept samples are re-scored by THIS round's reward models and, per prompt, only the
best of this round's and the earlier ones (by the unwhitened combined reward) is trained on; without
it every earlier best is kept as selected then. Fine-tuned with the SFT machinery (answer-only loss).
"""
from __future__ import annotations

import torch

from pipeline.chat import encode_dialogue
from pipeline.context import StageContext
from pipeline.distributed import load_device
from pipeline.io import read_jsonl, write_json, write_jsonl
from pipeline.models import save_policy

from data_specs.schemas import messages_to_dicts

from .common import demo_oracle, load_data, policy_sampler, sample_replies, sharded_inference, subsample
from .generation import engine_for
from .trainer import apply_lora, load_trainable, merge_lora, pack_examples, train_causal_lm


def best_of_k(rewards: torch.Tensor) -> torch.Tensor:
    """(P, K) combined rewards -> (P,) index of the kept sample (the argmax)."""
    return rewards.argmax(dim=1)


def reward_vs_k(rewards: torch.Tensor) -> dict[str, list[float]]:
    """Mean over prompts of the max and the median among the first k samples, k = 1, 2, 4, ..., K
    (the paper's Figure 7: the max-median gap is the gain rejection sampling can deliver)."""
    K = rewards.shape[1]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 100) if k <= K} | {K})
    return {
        "k": ks,
        "max": [float(rewards[:, :k].max(dim=1).values.mean()) for k in ks],
        "median": [float(rewards[:, :k].median(dim=1).values.mean()) for k in ks],
    }


def best_of_all_rounds(current: list[dict], earlier: list[dict], earlier_scores: list[float]) -> list[dict]:
    """Per prompt, the one sample with the highest current-RM score among this round's best (its
    "reward_raw") and the earlier rounds' bests (`earlier_scores`, re-scored by this round's RMs).
    Ties keep this round's sample. Prompts only seen earlier keep their best earlier sample."""
    best: dict[str, tuple[float, int, dict]] = {}
    for order, (s, score) in enumerate([(s, s["reward_raw"]) for s in current] + list(zip(earlier, earlier_scores))):
        s = {**s, "reward_current_rms": float(score)}
        if s["prompt_id"] not in best or score > best[s["prompt_id"]][0]:
            best[s["prompt_id"]] = (float(score), order, s)
    return [v[2] for v in sorted(best.values(), key=lambda v: v[1])]


def run(ctx: StageContext) -> dict:
    from reward_models.scoring import RewardScorer

    cfg = ctx.section
    prompts = subsample(load_data(ctx, "prompts.jsonl", "prompt"), cfg.prompts_per_round, ctx.seed)
    # with hardware.shard_inference the policy samples from a copy sharded over the ranks (each its share of the
    # prompts), and the model to fine-tune is loaded once that copy and the reward models are freed
    sharded = sharded_inference(ctx)
    if sharded:
        sampler, tok = policy_sampler(ctx, cfg, ctx.input("policy").path)
    else:
        model, tok = load_trainable(ctx.input("policy").path, cfg.lora, ctx.device)
        sampler = engine_for(cfg, model, ctx.input("policy").path)
    dialogues = [messages_to_dicts(p.messages) for p in prompts]

    # K samples per prompt at each temperature
    candidates: list[list[tuple[str, float]]] = [[] for _ in prompts]
    bar = ctx.progress(len(prompts) * len(cfg.temperatures), f"best-of-{cfg.k} sampling", unit="prompt")
    for t in cfg.temperatures:
        replies = sample_replies(sampler, tok, dialogues, cfg.k, cfg.max_new_tokens, t, ctx.seed + int(t * 1000), top_p=cfg.generation.top_p,
                                 progress=bar.update, max_batch_tokens=cfg.generation.max_batch_tokens)
        for i, rs in enumerate(replies):
            candidates[i] += [(r, t) for r in rs]
    bar.close()

    if ctx.device != "cpu" and not sharded:  # one model resident on the GPU at a time: the policy waits on the CPU while the RMs score
        model.to("cpu")
    scorer = RewardScorer.from_inputs(ctx, cfg.safety_threshold)
    flat_prompts = [d for d, c in zip(dialogues, candidates) for _ in c]
    flat_texts = [text for c in candidates for text, _ in c]
    flat_safety = [p.is_safety for p, c in zip(prompts, candidates) for _ in c]
    scores = scorer.score(flat_prompts, flat_texts, flat_safety)
    K = len(candidates[0])
    rewards = scores.combined.view(len(prompts), K)
    kept = best_of_k(rewards)

    oracle = demo_oracle(ctx)
    rows, selected = [], []
    flat_rows = scores.rows()
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        cand_rows = []
        for j, (text, t) in enumerate(cands):
            row = {"text": text, "temperature": t, **flat_rows[i * K + j]}
            if oracle is not None:
                row["gold_helpfulness"] = oracle.helpfulness(p, text)
                row["gold_safe"] = oracle.is_safe(p, text)
            cand_rows.append(row)
        best = int(kept[i])
        rows.append({"prompt_id": p.id, "prompt": dialogues[i], "is_safety": p.is_safety, "category": p.category,
                     "candidates": cand_rows, "kept": best})
        selected.append({"prompt_id": p.id, "prompt": dialogues[i], "response": cands[best][0], "reward": cand_rows[best]["reward"],
                         "reward_raw": float(scores.gated_logit[i * K + best]), "is_safety": p.is_safety, "round": ctx.round})
    gaps = rewards.max(dim=1).values - rewards.median(dim=1).values
    selected = [s for s, gap in zip(selected, gaps.tolist()) if gap >= cfg.min_reward_gap]
    write_jsonl(ctx.out_dir / "samples.jsonl", rows)
    write_jsonl(ctx.out_dir / "selected.jsonl", selected)

    # this round's best plus the best of all earlier rounds (deduplicated); re-scored by this round's RMs
    earlier = [s for art in ctx.inputs_like("earlier_r") for s in read_jsonl(art.file("selected.jsonl")) if s["response"].strip()]
    n_replaced = 0
    if earlier and cfg.rescore_earlier:
        flags = {p.id: p.is_safety for p in load_data(ctx, "prompts.jsonl", "prompt")}
        rescored = scorer.score([s["prompt"] for s in earlier], [s["response"] for s in earlier],
                                [s.get("is_safety", flags.get(s["prompt_id"], False)) for s in earlier], whiten=False).combined.tolist()
        train_set = best_of_all_rounds(selected, earlier, rescored)
        mine = {s["prompt_id"] for s in selected}
        n_replaced = sum(s["round"] != ctx.round and s["prompt_id"] in mine for s in train_set)
    else:
        train_set = list(selected) + earlier
    seen, unique = set(), []
    for s in train_set:
        key = (s["prompt_id"], s["response"])
        if key not in seen and s["response"].strip():
            seen.add(key)
            unique.append(s)
    del scorer  # the reward models are done: free them before the policy trains
    if sharded:
        del sampler
        model, _ = load_trainable(ctx.input("policy").path, cfg.lora, load_device(ctx.config, ctx.device))
    else:
        model.to(ctx.device)  # back from the host, where it waited while the reward models scored
    examples = [encode_dialogue(tok, [*s["prompt"], {"role": "assistant", "content": s["response"]}]) for s in unique]
    train_rows = pack_examples(examples, cfg.seq_len, tok.pad_token_id)
    model = apply_lora(model, cfg.lora, ctx.device)
    train_metrics = train_causal_lm(model, train_rows, [], cfg, ctx, seed=ctx.seed)
    model = merge_lora(model).eval()
    save_policy(model, tok, ctx.out_dir, dtype=ctx.artifact_dtype)

    curve = reward_vs_k(rewards)
    metrics = {
        "best_reward": float(rewards.max(dim=1).values.mean()),
        "median_reward": float(rewards.median(dim=1).values.mean()),
        "mean_reward": float(rewards.mean()),
        "reward_vs_k": curve,
        "share_safety": sum(p.is_safety for p in prompts) / len(prompts),
        "n_prompts": len(prompts),
        "k": K,
        "n_train_examples": len(unique),
        "n_kept_prompts": len(selected),
        "n_from_earlier_rounds": sum(s["round"] != ctx.round for s in unique),
        "n_earlier_candidates": len(earlier),
        "n_earlier_beat_this_round": n_replaced,  # prompts where an earlier round's best scores higher under this round's RMs
        "earlier_rescored": bool(earlier and cfg.rescore_earlier),
        "k_per_temperature": cfg.k,
        "train_loss": train_metrics["train_loss"],
        "tokens_per_s": train_metrics["tokens_per_s"],
        "resumed_from_step": train_metrics["resumed_from_step"],
    }
    if len(cfg.temperatures) > 1:
        temps = torch.tensor([t for c in candidates for _, t in c])
        metrics["reward_by_temperature"] = {str(t): float(scores.combined[temps == t].mean()) for t in cfg.temperatures}
    if oracle is not None:
        gold = torch.tensor([[c["gold_helpfulness"] for c in r["candidates"]] for r in rows])
        safe = torch.tensor([[float(c["gold_safe"]) for c in r["candidates"]] for r in rows])
        idx = kept.unsqueeze(1)
        metrics.update({
            "gold_helpfulness_selected": float(gold.gather(1, idx).mean()),
            "gold_helpfulness_all": float(gold.mean()),
            "gold_helpfulness_oracle_best": float(gold.max(dim=1).values.mean()),
            "gold_safety_violation_selected": float(1 - safe.gather(1, idx).mean()),
            "gold_safety_violation_all": float(1 - safe.mean()),
        })
    write_json(ctx.out_dir / "reward_vs_k.json", curve)
    _plot_curve(ctx, curve)
    return metrics


def _plot_curve(ctx: StageContext, curve: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(curve["k"], curve["max"], marker="o", label="max")
    ax.plot(curve["k"], curve["median"], marker="o", label="median")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per prompt (K)")
    ax.set_ylabel("combined reward")
    ax.set_title(f"Rejection sampling, round {ctx.round} (cf. Llama 2 Fig. 7)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "reward_vs_k.png", dpi=100)
    plt.close(fig)

