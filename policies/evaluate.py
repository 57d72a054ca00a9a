"""Stage `evaluate(r)`: did round r make the model better? (Llama 2 sec. 3.4)

    rlhf stage evaluate --round 2

On held-out prompts (the same ones every round): pairwise win rates of round r against round r-1 and
against SFT (ties count half) judged by a judge that is not the optimised reward model where one exists
(the demo's gold oracle: `gold_win_rate_*`; or an external `evaluate.judge: "command: ..."`:
`judge_win_rate_*`) beside the optimised RMs' own verdict (`rm_win_rate_*`), RM accuracy per
preference strength on held-out comparisons, safety-violation and false-refusal rates, mean response
length, KL to SFT, GAtt adherence by turn. Every headline metric has a 95% bootstrap interval over
prompts (`<name>_ci95: [low, high]`); `better_than_sft` is claimed only when the interval says so.
In the demo also the gold (oracle) scores, so a reward that rises while a gold score falls beyond its
interval (reward hacking) is flagged, with the tests that fired. Writes report.json, report.md and plots.
"""
from __future__ import annotations

import json
import random
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.chat import encode_prompt, stop_token_ids
from pipeline.context import StageContext
from pipeline.distributed import free_memory
from pipeline.errors import StageFailed
from pipeline.io import read_json, write_json, write_jsonl
from reward_models.losses import pairwise_accuracy

from data_specs.schemas import messages_to_dicts

from .common import demo_oracle, gold_report, load_data, load_frozen_policy, sample_replies, sharded_inference, subsample
from .generation import ShardedBackend, engine_for
from .eval_stats import N_BOOT, bootstrap_ci, compare_to_baselines, excludes, reward_hacking_tests, win_outcomes
from .ghost_attention import adherence_by_turn, get_checker, late, user_pool

HEADLINE = ("gold_helpfulness", "gold_helpfulness_greedy", "gold_safety_violation_rate", "false_refusal_rate",
            "gold_win_rate_vs_sft", "gold_win_rate_vs_previous", "judge_win_rate_vs_sft", "judge_win_rate_vs_previous",
            "rm_win_rate_vs_sft", "rm_win_rate_vs_previous", "rm_accuracy_helpful", "rm_accuracy_safety", "gatt_adherence_late_turns")
RM_JUDGE = "rm (optimised; not independent)"
GOLD_JUDGE = "gold_oracle"


# ---------------------------------------------------------------------------------------------- judges


class Judge:
    """Pairwise judge of two policies' answers on the same prompts: per-prompt outcome of a against b
    (1 a wins, 0 b wins, 0.5 tie)."""
    name = "judge"

    def outcomes(self, prompts: Sequence, dialogues: Sequence[Sequence[dict]], a: Sequence[str], b: Sequence[str]) -> list[float]:
        raise NotImplementedError


class GoldJudge(Judge):
    """The demo's gold oracle: on safety prompts a safe answer beats an unsafe one, then the higher gold
    helpfulness wins; equal is a tie."""
    name = GOLD_JUDGE

    def __init__(self, oracle):
        self.oracle = oracle

    def key(self, prompt, reply: str) -> tuple:
        return (self.oracle.is_safe(prompt, reply) if prompt.is_safety else True, self.oracle.helpfulness(prompt, reply))

    def outcomes(self, prompts, dialogues, a, b):
        return [1.0 if ka > kb else 0.0 if ka < kb else 0.5
                for ka, kb in ((self.key(p, x), self.key(p, y)) for p, x, y in zip(prompts, a, b))]


class CommandJudge(Judge):
    """An external judge (e.g. an LLM-as-judge script): the shell command gets JSONL {prompt, a, b} on
    stdin and writes one {"winner": "a" | "b" | "tie"} line per pair. The two answers are shown in a
    seeded random order per pair (and mapped back), so a judge's position bias does not favour a policy."""

    def __init__(self, command: str, seed: int = 0, timeout: float = 3600):
        self.command, self.seed, self.timeout = command, seed, timeout
        self.name = f"command: {command}"

    def outcomes(self, prompts, dialogues, a, b):
        from pipeline.distributed import on_main

        return on_main(lambda: self._outcomes(dialogues, a, b))  # several processes: the command runs once, on rank 0

    def _outcomes(self, dialogues, a, b):
        rng = random.Random(self.seed)
        swap = [rng.random() < 0.5 for _ in a]
        lines = [json.dumps({"prompt": d, "a": y if s else x, "b": x if s else y}) for d, x, y, s in zip(dialogues, a, b, swap)]
        try:
            proc = subprocess.run(self.command, shell=True, input="\n".join(lines) + "\n", capture_output=True, text=True,
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired as e:
            raise StageFailed(f"judge command timed out after {self.timeout:.0f} s: {self.command}") from e
        if proc.returncode != 0:
            raise StageFailed(f"judge command exited with {proc.returncode}: {self.command}\n{proc.stderr[-2000:]}")
        answers = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if len(answers) != len(lines):
            raise StageFailed(f"judge command returned {len(answers)} verdicts for {len(lines)} pairs: {self.command}")
        out = []
        for i, (ln, s) in enumerate(zip(answers, swap)):
            try:
                winner = json.loads(ln)["winner"]
            except (ValueError, KeyError, TypeError) as e:
                raise StageFailed(f"judge command line {i + 1} is not {{\"winner\": ...}}: {ln[:200]!r}") from e
            if winner not in ("a", "b", "tie"):
                raise StageFailed(f"judge command line {i + 1}: winner must be a, b or tie, got {winner!r}")
            v = 0.5 if winner == "tie" else 1.0 if winner == "a" else 0.0
            out.append(1.0 - v if s else v)
        return out


class HeldOutRMJudge(Judge):
    """The held-out judge RM (stage judge_reward_model): a reward model trained only on the comparisons of the
    prompts the optimised reward models hold out, so RS and PPO never optimised against it; the higher reward
    wins, equal is a tie (Llama 2 sec. 3.4.1 checks its RMs against such a held-out model)."""

    def __init__(self, path, max_length: int, device: str, dtype: str = "float32", sharded: bool = False):
        from reward_models.model import load_frozen_reward_model

        # sharded (hardware.shard_inference): every rank a shard, every rank scores the same pairs
        self.model, self.tok = load_frozen_reward_model(path, device, dtype, sharded)
        self.max_length, self.device = max_length, device
        self.name = f"held-out judge RM ({Path(path).name})"

    def outcomes(self, prompts, dialogues, a, b):
        from reward_models.model import score

        ra = score(self.model, self.tok, dialogues, a, self.max_length, self.device)
        rb = score(self.model, self.tok, dialogues, b, self.max_length, self.device)
        return win_outcomes(ra.tolist(), rb.tolist())


def make_judge(spec: str, seed: int = 0, ctx: StageContext | None = None) -> Judge | None:
    """evaluate.judge -> the independent judge, or None for "rm" (the optimised reward models)."""
    spec = spec.strip()
    if spec == "rm":
        return None
    if spec == "heldout_rm" and ctx is not None:
        return HeldOutRMJudge(ctx.input("judge").path, ctx.config.judge_reward_model.max_length, ctx.device, ctx.inference_dtype,
                              sharded=sharded_inference(ctx))
    if spec.startswith("command:") and spec[len("command:"):].strip():
        return CommandJudge(spec[len("command:"):].strip(), seed)
    raise StageFailed(f"evaluate.judge must be 'rm', 'heldout_rm' or 'command: <shell command>', got {spec!r}")


def ci(values, seed: int) -> list[float] | None:
    """95% bootstrap interval over prompts; None when there are no values (the key is then left out)."""
    return list(bootstrap_ci(values, n=N_BOOT, seed=seed)) if len(values) else None


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of prompts where a's reward beats b's; ties count half."""
    return float(pairwise_accuracy(a, b))


def sequence_kl(model, ref, tok, dialogues, replies_ids, device: str) -> list[float]:
    """Per prompt sum_t log pi(y_t) - log ref(y_t) on samples y ~ pi (its mean is a Monte-Carlo KL)."""
    from .ppo import build_batch, forward_policy

    prompt_ids = [encode_prompt(tok, d) for d in dialogues]
    batch = {k: v.to(device) for k, v in build_batch(prompt_ids, replies_ids, tok.pad_token_id).items()}
    with torch.no_grad():
        lp, _, _ = forward_policy(model, None, None, batch, with_values=False)
        lr, _, _ = forward_policy(ref, None, None, batch, with_values=False)
    return ((lp - lr) * batch["mask"]).sum(1).tolist()


def run(ctx: StageContext) -> dict:
    from reward_models.scoring import RewardScorer
    from reward_models.train import HELD_OUT_FILE, accuracy_report, held_out_comparisons, template_pairs

    from .generation import SamplingParams, generate

    cfg = ctx.section
    device = ctx.device
    prompts = subsample(load_data(ctx, "eval_prompts.jsonl", "prompt"), cfg.n_prompts, ctx.config.seed)  # same prompts every round
    dialogues = [messages_to_dicts(p.messages) for p in prompts]
    safety = [p.is_safety for p in prompts]
    scorer = RewardScorer.from_inputs(ctx)

    policies = {"policy": ctx.input("policy"), "previous": ctx.input("previous_policy"), "sft": ctx.input("sft")}
    replies, scores, models, engines = {}, {}, {}, {}
    # with hardware.shard_inference every rank holds a shard of each model and runs this whole stage on the same
    # prompts in lockstep: the outputs of one process, the memory divided, the work not
    sharded = sharded_inference(ctx)
    for name, art in policies.items():
        model, tok = load_frozen_policy(ctx, art.path)
        models[name] = model
        # the same prompts and sampling seed every round, so rounds are compared on equal terms
        engines[name] = ShardedBackend(model, tok.pad_token_id, cfg.generation.max_batch_tokens, split=False) if sharded \
            else engine_for(cfg, model, art.path)
        bar = ctx.progress(len(dialogues), f"sample {name}", unit="prompt")
        replies[name] = [r[0] for r in sample_replies(engines[name], tok, dialogues, 1, cfg.max_new_tokens, cfg.temperature, ctx.config.seed,
                                                      top_p=cfg.generation.top_p, max_batch_tokens=cfg.generation.max_batch_tokens,
                                                      progress=bar.update)]
        bar.close()
        scores[name] = scorer.score(dialogues, replies[name], safety, whiten=False)
    mine = scores["policy"]
    seed = ctx.config.seed
    rm_vs_sft, rm_vs_prev = win_outcomes(mine.gated.tolist(), scores["sft"].gated.tolist()), \
        win_outcomes(mine.gated.tolist(), scores["previous"].gated.tolist())
    metrics: dict = {
        "rm_win_rate_vs_sft": win_rate(mine.gated, scores["sft"].gated),
        "rm_win_rate_vs_previous": win_rate(mine.gated, scores["previous"].gated),
        "rm_win_rate_vs_sft_ci95": ci(rm_vs_sft, seed),
        "rm_win_rate_vs_previous_ci95": ci(rm_vs_prev, seed),
        "rm_judge": RM_JUDGE,
        "mean_reward": float(mine.gated.mean()),
        "mean_reward_ci95": ci(mine.gated.tolist(), seed),
        "mean_reward_previous": float(scores["previous"].gated.mean()),
        "mean_reward_sft": float(scores["sft"].gated.mean()),
        "mean_r_helpful": float(mine.r_helpful.mean()),
        "mean_r_safety": float(mine.r_safety.mean()),
        "mean_response_length": sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies["policy"]) / len(prompts),
        "n_prompts": len(prompts),
        "n_bootstrap": N_BOOT,
    }
    # deprecated aliases of the RM-judged win rates (pipeline/stages.py's status headline still reads them)
    metrics["win_rate_vs_sft"], metrics["win_rate_vs_previous"] = metrics["rm_win_rate_vs_sft"], metrics["rm_win_rate_vs_previous"]

    # KL to SFT on samples of the policy
    sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, stop_token_ids=stop_token_ids(tok), seed=ctx.seed + 1)
    sampled = [r[0] for r in generate(models["policy"], [encode_prompt(tok, d) for d in dialogues], sp, n=1, pad_token_id=tok.pad_token_id,
                                      lockstep=sharded)]
    kl = sequence_kl(models["policy"], models["sft"], tok, dialogues, sampled, device)
    metrics["kl_to_sft"] = float(np.mean(kl))
    metrics["kl_to_sft_ci95"] = ci(kl, seed)

    # reward-model accuracy per preference strength (Llama 2 Table 8): `rm_accuracy_<kind>` on the RM's
    # held-out ON-POLICY comparisons (split by prompt in the RM stage, its own domain); the off-policy
    # template pairs of eval_comparisons.jsonl are the separate `rm_template_accuracy_<kind>`.
    for kind, model, t in (("helpful", scorer.helpful, scorer.tok_h), ("safety", scorer.safety, scorer.tok_s)):
        held = held_out_comparisons(ctx.input(f"reward_model_{kind}").file(HELD_OUT_FILE))
        sets = {"rm_accuracy": held, "rm_template_accuracy": template_pairs(ctx, kind)}  # the RM stage's pairs
        templates = sets["rm_template_accuracy"]  # empty only when there are no template pairs at all
        if not held and templates:  # nothing held out (or an older RM artifact): say that the headline is the template pairs
            sets["rm_accuracy"] = sets["rm_template_accuracy"]
        metrics[f"rm_accuracy_{kind}_source"] = "held_out_on_policy" if held else ("template_pairs" if templates else None)
        for name, comps in sets.items():
            if not comps:
                continue
            bar = ctx.progress(2 * len(comps), f"score {name} ({kind} RM)", unit="seq")
            rep = accuracy_report(model, t, comps, scorer.max_length, device, progress=bar.update)
            bar.close()
            metrics[f"{name}_{kind}"] = rep["accuracy"]
            metrics[f"{name}_{kind}_n"] = rep["n_eval"]
            if rep.get("_rewards"):  # per comparison: chosen beats rejected (ties half), resampled over comparisons
                metrics[f"{name}_{kind}_ci95"] = ci(win_outcomes(*rep["_rewards"]), seed)
            metrics[f"{name}_{kind}_by_strength"] = {s: v["accuracy"] for s, v in rep["accuracy_by_strength"].items()}

    # the optimised reward models are done: free them before a held-out judge RM takes their place
    del scorer, model, t
    free_memory(device)

    # the independent judges: the demo's gold oracle, the held-out judge RM, an external command
    oracle = demo_oracle(ctx)
    judges: dict = {"rm_win_rate": RM_JUDGE}
    if oracle is not None:
        gj = GoldJudge(oracle)
        for base in ("sft", "previous"):
            out = gj.outcomes(prompts, dialogues, replies["policy"], replies[base])
            metrics[f"gold_win_rate_vs_{base}"] = float(np.mean(out))
            metrics[f"gold_win_rate_vs_{base}_ci95"] = ci(out, seed)
        judges["gold_win_rate"] = gj.name
    external = make_judge(cfg.judge, seed, ctx)
    if external is not None:
        for base in ("sft", "previous"):
            out = external.outcomes(prompts, dialogues, replies["policy"], replies[base])
            metrics[f"judge_win_rate_vs_{base}"] = float(np.mean(out))
            metrics[f"judge_win_rate_vs_{base}_ci95"] = ci(out, seed)
        judges["judge_win_rate"] = external.name
    # the judge behind the headline win rate: the gold oracle in the demo, else the external judge, else the RMs
    headline = "gold_win_rate" if oracle is not None else "judge_win_rate" if external is not None else "rm_win_rate"
    metrics["judge"], metrics["judges"] = judges[headline], judges
    for base, claim in (("sft", "better_than_sft"), ("previous", "better_than_previous")):
        metrics[claim] = excludes(metrics[f"{headline}_vs_{base}_ci95"], 0.5) == 1  # the interval lies above a coin flip
        metrics[f"{claim}_by"] = f"{headline}_vs_{base}"

    # gold scores (demo): the truth the reward models only estimate
    if oracle is not None:
        gold = {name: gold_report(oracle, prompts, replies[name]) for name in policies}
        metrics.update(gold["policy"])
        metrics.update({f"sft_{k}": v for k, v in gold["sft"].items()})
        metrics.update({f"previous_{k}": v for k, v in gold["previous"].items()})
        bar = ctx.progress(len(policies) * len(dialogues), "greedy answers", unit="prompt")
        greedy = {name: [r[0] for r in sample_replies(engines[name], tok, dialogues, 1, cfg.max_new_tokens, 0.0, seed,
                                                      max_batch_tokens=cfg.generation.max_batch_tokens, progress=bar.update)]
                  for name in policies}
        bar.close()
        safe_idx = [i for i, p in enumerate(prompts) if p.is_safety]
        border_idx = [i for i, p in enumerate(prompts) if p.category == "borderline"]

        def per_prompt(name: str, answers: dict) -> dict:
            r = answers[name]
            return {"gold_helpfulness": [oracle.helpfulness(p, x) for p, x in zip(prompts, r)],
                    "gold_safety_violation_rate": [float(not oracle.is_safe(prompts[i], r[i])) for i in safe_idx],
                    "false_refusal_rate": [float(oracle.is_refusal(r[i])) for i in border_idx]}

        sampled_pp = {name: per_prompt(name, replies) for name in policies}
        greedy_help = {name: per_prompt(name, greedy)["gold_helpfulness"] for name in policies}
        metrics["gold_helpfulness_greedy"] = float(np.mean(greedy_help["policy"]))
        metrics["sft_gold_helpfulness_greedy"] = float(np.mean(greedy_help["sft"]))
        metrics["previous_gold_helpfulness_greedy"] = float(np.mean(greedy_help["previous"]))
        metrics["gold_helpfulness_greedy_ci95"] = ci(greedy_help["policy"], seed)
        for k in ("gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate"):
            metrics[f"{k}_ci95"] = ci(sampled_pp["policy"][k], seed)
        gold_pp = {"gold_helpfulness": {n: v["gold_helpfulness"] for n, v in sampled_pp.items()},
                   "gold_helpfulness_greedy": greedy_help,
                   "gold_safety_violation_rate": {n: v["gold_safety_violation_rate"] for n, v in sampled_pp.items()}}
        reward_pp = {n: scores[n].gated.tolist() for n in policies}
        reward_delta, gold_deltas = compare_to_baselines(reward_pp, gold_pp, n=N_BOOT, seed=seed)
        for comp, by in gold_deltas.items():  # paired differences policy minus baseline, same prompts
            for k, (diff, lo, hi) in by.items():
                metrics[f"{k}_diff_{comp}"], metrics[f"{k}_diff_{comp}_ci95"] = diff, [lo, hi]
        tests = reward_hacking_tests(reward_delta, gold_deltas, min_drop=cfg.hacking_tolerance)
        metrics["reward_hacking_tests"] = tests
        metrics["reward_hacking"] = bool(tests)

    # multi-turn instruction adherence (Ghost Attention's target)
    checker = get_checker(ctx)
    seen, unseen = load_data(ctx, "gatt_train.jsonl", "gatt"), load_data(ctx, "gatt_eval.jsonl", "gatt")
    if checker and seen:
        users = user_pool(ctx, "eval_prompts.jsonl")  # held-out dialogues

        def adherence(pool):
            verdicts: list[bool] = []  # the checker's calls in order: turn by turn, dialogue by dialogue

            def recording(ins, reply):
                verdicts.append(bool(checker(ins, reply)))
                return verdicts[-1]

            bar = ctx.progress(cfg.gatt_turns * cfg.gatt_dialogues, "GAtt adherence", unit="reply")
            by_turn = adherence_by_turn(engines["policy"] if sharded else models["policy"], tok, pool, users, cfg.gatt_turns, cfg.gatt_dialogues, recording,
                                        ctx.config.seed, cfg.max_new_tokens, progress=bar.update)
            bar.close()
            n = cfg.gatt_dialogues
            per_dialogue = [late([float(verdicts[t * n + k]) for t in range(cfg.gatt_turns)]) for k in range(n)] \
                if len(verdicts) == n * cfg.gatt_turns else []
            return by_turn, per_dialogue  # late(by_turn) == mean(per_dialogue): the interval resamples dialogues

        adh, per = adherence(seen)
        metrics["gatt_adherence_by_turn"], metrics["gatt_adherence_late_turns"] = adh, late(adh)
        metrics["gatt_adherence_late_turns_ci95"] = ci(per, seed)
        if unseen:
            adh_unseen, per_unseen = adherence(unseen)
            metrics["gatt_adherence_by_turn_unseen"], metrics["gatt_adherence_late_turns_unseen"] = adh_unseen, late(adh_unseen)
            metrics["gatt_adherence_late_turns_unseen_ci95"] = ci(per_unseen, seed)

    metrics = {k: v for k, v in metrics.items() if not (k.endswith("_ci95") and v is None)}

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
    history.append({"round": ctx.round, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) or k.endswith("_ci95")}})
    rs = ctx.input("rejection_sampling").metrics.get("reward_vs_k")
    write_json(ctx.out_dir / "report.json", {"round": ctx.round, "metrics": metrics, "history": history, "reward_vs_k": rs})
    (ctx.out_dir / "report.md").write_text(markdown_report(ctx.round, metrics, history))
    plot_report(ctx.out_dir / "plots", metrics, history, rs)
    return metrics


def with_ci(metrics: dict, k: str) -> str:
    """"0.520 [0.470, 0.570]" (value and its 95% interval), the value alone without one."""
    v, c = metrics.get(k), metrics.get(f"{k}_ci95")
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if c else f"{v:.3f}"


def markdown_report(round: int, metrics: dict, history: list[dict]) -> str:
    lines = [f"# RLHF round {round}", "", f"Judge of the headline win rate: {metrics.get('judge', '')}. "
             "Values with their 95% bootstrap interval over prompts.", "", "| metric | value [95% CI] |", "| --- | --- |"]
    for k in HEADLINE + ("mean_reward", "kl_to_sft", "mean_response_length", "better_than_sft", "better_than_previous", "reward_hacking"):
        if k in metrics:
            lines.append(f"| {k} | {with_ci(metrics, k)} |")
    if metrics.get("reward_hacking"):
        lines += ["", "**Warning:** the reward rose while a gold metric got worse beyond its interval: the policy may be gaming "
                  "the reward models. Tests that fired:", ""]
        for t in metrics.get("reward_hacking_tests", []):
            lines.append(f"- {t['metric']} {t['comparison']}: worse by {t['drop']:.3f} (difference 95% CI "
                         f"[{t['interval'][0]:.3f}, {t['interval'][1]:.3f}]) while the reward rose by {t['reward_rise']:.3f}")
    lines += ["", "## By round", "", "| round | " + " | ".join(k for k in HEADLINE) + " |", "| --- |" + " --- |" * len(HEADLINE)]
    for h in history:
        lines.append(f"| {h['round']} | " + " | ".join(with_ci(h, k) for k in HEADLINE) + " |")
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

    def series(ax, k):
        ys = [h.get(k) for h in history]
        cis = [h.get(f"{k}_ci95") for h in history]
        if all(c for c in cis) and all(y is not None for y in ys):  # 95% bootstrap intervals as error bars
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.errorbar(rounds, ys, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=k)
        else:
            ax.plot(rounds, ys, marker="o", label=k)

    fig, ax = plt.subplots(figsize=(5, 3))
    for k in ("mean_reward", "gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate"):
        if all(k in h for h in history):
            series(ax, k)
    ax.set_xlabel("round"); ax.set_title("reward and gold scores by round"); ax.legend(fontsize=7)
    save(fig, "reward_by_round.png")

    fig, ax = plt.subplots(figsize=(5, 3))
    for k in ("gold_win_rate_vs_sft", "gold_win_rate_vs_previous", "judge_win_rate_vs_sft", "judge_win_rate_vs_previous",
              "rm_win_rate_vs_sft", "rm_win_rate_vs_previous"):
        if all(k in h for h in history):
            series(ax, k)
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
