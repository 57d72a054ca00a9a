"""Stage `evaluate(r)`: did round r make the model better? (Llama 2 sec. 3.4)

    rlhf stage evaluate --round 2

On held-out prompts (the same ones every round): combined-reward win rate of round r against round
r-1 and against SFT (ties count half), RM accuracy per preference strength on held-out comparisons,
safety-violation and false-refusal rates, mean response length, KL to SFT, GAtt adherence by turn.
In the demo also the gold (oracle) scores, so a reward that rises while the gold score falls
(reward hacking) is visible and flagged. Writes report.json, report.md and plots.
"""
from __future__ import annotations

import torch

from pipeline.chat import encode_prompt, stop_token_ids
from pipeline.context import StageContext
from pipeline.io import read_json, write_json, write_jsonl
from pipeline.models import load_policy
from reward_models.losses import pairwise_accuracy

from data_specs.schemas import messages_to_dicts

from .common import demo_oracle, gold_report, load_data, sample_replies, subsample
from .ghost_attention import adherence_by_turn, get_checker, late, user_pool

HEADLINE = ("gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate", "win_rate_vs_sft", "win_rate_vs_previous",
            "rm_accuracy_helpful", "rm_accuracy_safety", "gatt_adherence_late_turns")


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of prompts where a's reward beats b's; ties count half."""
    return float(pairwise_accuracy(a, b))


def sequence_kl(model, ref, tok, dialogues, replies_ids, device: str) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log ref(y_t) on samples y ~ pi (a Monte-Carlo KL)."""
    from .ppo import build_batch, forward_policy

    prompt_ids = [encode_prompt(tok, d) for d in dialogues]
    batch = {k: v.to(device) for k, v in build_batch(prompt_ids, replies_ids, tok.pad_token_id).items()}
    with torch.no_grad():
        lp, _, _ = forward_policy(model, None, None, batch, with_values=False)
        lr, _, _ = forward_policy(ref, None, None, batch, with_values=False)
    return float(((lp - lr) * batch["mask"]).sum(1).mean())


def run(ctx: StageContext) -> dict:
    from reward_models.scoring import RewardScorer
    from reward_models.train import accuracy_report

    from .generation import SamplingParams, generate

    cfg = ctx.section
    device = ctx.device
    prompts = subsample(load_data(ctx, "eval_prompts.jsonl", "prompt"), cfg.n_prompts, ctx.config.seed)  # same prompts every round
    dialogues = [messages_to_dicts(p.messages) for p in prompts]
    safety = [p.is_safety for p in prompts]
    scorer = RewardScorer.from_inputs(ctx)

    policies = {"policy": ctx.input("policy"), "previous": ctx.input("previous_policy"), "sft": ctx.input("sft")}
    replies, scores, models = {}, {}, {}
    for name, art in policies.items():
        model, tok = load_policy(art.path, device)
        models[name] = model
        # the same prompts and sampling seed every round, so rounds are compared on equal terms
        replies[name] = [r[0] for r in sample_replies(model, tok, dialogues, 1, cfg.max_new_tokens, cfg.temperature, ctx.config.seed)]
        scores[name] = scorer.score(dialogues, replies[name], safety, whiten=False)
    mine = scores["policy"]
    metrics: dict = {
        "win_rate_vs_sft": win_rate(mine.gated, scores["sft"].gated),
        "win_rate_vs_previous": win_rate(mine.gated, scores["previous"].gated),
        "mean_reward": float(mine.gated.mean()),
        "mean_reward_previous": float(scores["previous"].gated.mean()),
        "mean_reward_sft": float(scores["sft"].gated.mean()),
        "mean_r_helpful": float(mine.r_helpful.mean()),
        "mean_r_safety": float(mine.r_safety.mean()),
        "mean_response_length": sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies["policy"]) / len(prompts),
        "n_prompts": len(prompts),
    }

    # KL to SFT on samples of the policy
    sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, stop_token_ids=stop_token_ids(tok), seed=ctx.seed + 1)
    sampled = [r[0] for r in generate(models["policy"], [encode_prompt(tok, d) for d in dialogues], sp, n=1, pad_token_id=tok.pad_token_id)]
    metrics["kl_to_sft"] = sequence_kl(models["policy"], models["sft"], tok, dialogues, sampled, device)

    # reward-model accuracy per preference strength on held-out comparisons
    held = load_data(ctx, "eval_comparisons.jsonl", "preference")
    if held:
        for kind, model, t in (("helpful", scorer.helpful, scorer.tok_h), ("safety", scorer.safety, scorer.tok_s)):
            domain = [c for c in held if c.is_safety_prompt == (kind == "safety")] or held
            rep = accuracy_report(model, t, domain, scorer.max_length, device)
            metrics[f"rm_accuracy_{kind}"] = rep["accuracy"]
            metrics[f"rm_accuracy_{kind}_by_strength"] = {s: v["accuracy"] for s, v in rep["accuracy_by_strength"].items()}

    # gold scores (demo): the truth the reward models only estimate
    oracle = demo_oracle(ctx)
    if oracle is not None:
        gold = {name: gold_report(oracle, prompts, replies[name]) for name in policies}
        metrics.update(gold["policy"])
        metrics.update({f"sft_{k}": v for k, v in gold["sft"].items()})
        metrics.update({f"previous_{k}": v for k, v in gold["previous"].items()})
        greedy = [r[0] for r in sample_replies(models["policy"], tok, dialogues, 1, cfg.max_new_tokens, 0.0, ctx.config.seed)]
        metrics["gold_helpfulness_greedy"] = gold_report(oracle, prompts, greedy)["gold_helpfulness"]
        reward_up = metrics["mean_reward"] > metrics["mean_reward_previous"]
        gold_down = gold["policy"]["gold_helpfulness"] < gold["previous"]["gold_helpfulness"] - cfg.hacking_tolerance
        metrics["reward_hacking"] = bool(reward_up and gold_down)

    # multi-turn instruction adherence (Ghost Attention's target)
    checker = get_checker(ctx)
    seen, unseen = load_data(ctx, "gatt_train.jsonl", "gatt"), load_data(ctx, "gatt_eval.jsonl", "gatt")
    if checker and seen:
        users = user_pool(ctx, "eval_prompts.jsonl")  # held-out dialogues

        def adherence(pool):
            return adherence_by_turn(models["policy"], tok, pool, users, cfg.gatt_turns, cfg.gatt_dialogues, checker,
                                     ctx.config.seed, cfg.max_new_tokens)

        metrics["gatt_adherence_by_turn"] = adh = adherence(seen)
        metrics["gatt_adherence_late_turns"] = late(adh)
        if unseen:
            metrics["gatt_adherence_by_turn_unseen"] = adh_unseen = adherence(unseen)
            metrics["gatt_adherence_late_turns_unseen"] = late(adh_unseen)

    # samples, report and plots
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt_id": p.id, "prompt": dialogues[i], "is_safety": p.is_safety, "category": p.category,
               "response": replies["policy"][i]}
        row.update({"r_helpful": float(mine.r_helpful[i]), "r_safety": float(mine.r_safety[i]), "reward": float(mine.gated[i]),
                    "sft_response": replies["sft"][i], "previous_response": replies["previous"][i]})
        if oracle is not None:
            row["gold_helpfulness"] = oracle.helpfulness(p, replies["policy"][i])
            row["gold_safe"] = oracle.is_safe(p, replies["policy"][i])
        rows.append(row)
    write_jsonl(ctx.out_dir / "samples.jsonl", rows)
    history = []
    if "previous_evaluate" in ctx.inputs:
        history = read_json(ctx.input("previous_evaluate").file("report.json")).get("history", [])
    history.append({"round": ctx.round, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}})
    rs = ctx.input("rejection_sampling").metrics.get("reward_vs_k")
    write_json(ctx.out_dir / "report.json", {"round": ctx.round, "metrics": metrics, "history": history, "reward_vs_k": rs})
    (ctx.out_dir / "report.md").write_text(markdown_report(ctx.round, metrics, history))
    plot_report(ctx.out_dir / "plots", metrics, history, rs)
    return metrics


def markdown_report(round: int, metrics: dict, history: list[dict]) -> str:
    lines = [f"# RLHF round {round}", "", "| metric | value |", "| --- | --- |"]
    for k in HEADLINE + ("mean_reward", "kl_to_sft", "mean_response_length", "reward_hacking"):
        if k in metrics:
            v = metrics[k]
            lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if metrics.get("reward_hacking"):
        lines += ["", "**Warning:** the reward rose while the gold helpfulness fell: the policy may be gaming the reward models."]
    lines += ["", "## By round", "", "| round | " + " | ".join(k for k in HEADLINE) + " |", "| --- |" + " --- |" * len(HEADLINE)]
    for h in history:
        lines.append(f"| {h['round']} | " + " | ".join(f"{h[k]:.3f}" if isinstance(h.get(k), float) else str(h.get(k, "")) for k in HEADLINE) + " |")
    lines += ["", "Plots: plots/reward_by_round.png, plots/win_rates.png, plots/reward_vs_k.png, plots/rm_accuracy.png, plots/adherence.png", ""]
    return "\n".join(lines)


def plot_report(out, metrics: dict, history: list[dict], reward_vs_k: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rounds = [h["round"] for h in history]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    for k in ("mean_reward", "gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate"):
        if all(k in h for h in history):
            ax.plot(rounds, [h[k] for h in history], marker="o", label=k)
    ax.set_xlabel("round"); ax.set_title("reward and gold scores by round"); ax.legend(fontsize=7)
    save(fig, "reward_by_round.png")

    fig, ax = plt.subplots(figsize=(5, 3))
    for k in ("win_rate_vs_sft", "win_rate_vs_previous"):
        ax.plot(rounds, [h.get(k) for h in history], marker="o", label=k)
    ax.axhline(0.5, color="grey", lw=0.5); ax.set_ylim(0, 1); ax.set_xlabel("round"); ax.legend(fontsize=7); ax.set_title("win rates")
    save(fig, "win_rates.png")

    if reward_vs_k:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(reward_vs_k["k"], reward_vs_k["max"], marker="o", label="max")
        ax.plot(reward_vs_k["k"], reward_vs_k["median"], marker="o", label="median")
        ax.set_xscale("log", base=2); ax.set_xlabel("K"); ax.legend(); ax.set_title("rejection sampling: max vs median reward")
        save(fig, "reward_vs_k.png")

    fig, ax = plt.subplots(figsize=(5, 3))
    for kind in ("helpful", "safety"):
        by = metrics.get(f"rm_accuracy_{kind}_by_strength") or {}
        ax.plot(list(by), list(by.values()), marker="o", label=f"{kind} RM")
    ax.set_ylim(0, 1); ax.tick_params(axis="x", labelsize=6); ax.legend(); ax.set_title("RM accuracy by preference strength")
    save(fig, "rm_accuracy.png")

    adh = metrics.get("gatt_adherence_by_turn")
    if adh:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(range(1, len(adh) + 1), adh, marker="o")
        ax.set_ylim(0, 1); ax.set_xlabel("turn"); ax.set_title("system-instruction adherence by turn")
        save(fig, "adherence.png")
