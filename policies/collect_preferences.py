"""Stage `collect_preferences(r)`: a new batch of comparisons on samples of the latest policy
(Llama 2 sec. 3.2.1: weekly batches sampled from the latest model keep the RMs on-distribution).

    rlhf stage collect_preferences --round 1

Several responses per prompt are sampled from the latest policy at different temperatures, plus
(optionally) from the pretrained checkpoint as a second model variant; distinct responses are paired.
* demo (`collect_preferences.source: demo`): the simulated annotator labels each pair.
* real data (`source: data/prefs_r{round}.jsonl`): the labeled file of the round is validated and
  imported. If it does not exist yet, the unlabeled pairs are exported to
  `<run_dir>/exports/unlabeled_r<round>.jsonl` for people to label, and the stage stops saying so.

Labeling the export: add `"choice": "a"` or `"b"`, `"strength"` (significantly_better, better,
slightly_better, negligibly_better_or_unsure) and optionally `"a_safe"`, `"b_safe"` to each line,
and save it where `source` points. Files in our own comparison format are accepted too.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from pipeline.context import StageContext, StageFailed
from pipeline.io import write_jsonl
from pipeline.models import load_policy

from data_specs.schemas import Comparison, Message, Prompt, messages_to_dicts

from .common import demo_oracle, load_data, sample_replies, subsample


def sample_pairs(ctx: StageContext) -> list[dict]:
    """Unlabeled pairs: {prompt_id, prompt, is_safety_prompt, response_a, response_b, temperatures}."""
    cfg = ctx.section
    prompts = subsample(load_data(ctx, "prompts.jsonl", "prompt"), cfg.prompts_per_round, ctx.seed)
    model, tok = load_policy(ctx.input("policy").path, ctx.device)
    dialogues = [messages_to_dicts(p.messages) for p in prompts]
    temps = [cfg.temperatures[i % len(cfg.temperatures)] for i in range(cfg.responses_per_prompt)]
    sources = [(model, t, "policy") for t in sorted(set(temps))]
    if cfg.base_responses:  # a different model variant, as the paper's annotators compared (sec. 3.2.1)
        base, _ = load_policy(ctx.input("pretrained").path, ctx.device)
        sources.append((base, max(cfg.temperatures), "pretrained"))
    responses: list[list[tuple[str, float, str]]] = [[] for _ in prompts]
    bar = ctx.progress(len(prompts) * len(sources), "sample", unit="prompt")
    for k, (m, t, name) in enumerate(sources):
        n = temps.count(t) if name == "policy" else cfg.base_responses
        replies = sample_replies(m, tok, dialogues, n, cfg.max_new_tokens, t, ctx.seed + 1000 * k, progress=bar.update)
        for i, rs in enumerate(replies):
            responses[i] += [(r, t, name) for r in rs]
    bar.close()
    pairs = []
    for i, p in enumerate(prompts):
        distinct = list({r[0]: r for r in responses[i] if r[0].strip()}.values())  # identical samples say nothing
        for (a, ta, ma), (b, tb, mb) in zip(distinct, distinct[1:]):
            pairs.append({"prompt_id": p.id, "prompt": dialogues[i], "is_safety_prompt": p.is_safety, "category": p.category,
                          "response_a": a, "response_b": b, "temperatures": [ta, tb], "models": [ma, mb]})
    return pairs


def label_with_annotator(ctx: StageContext, pairs: list[dict]) -> list[Comparison]:
    from data_specs.demo.annotator import SimulatedAnnotator

    oracle = demo_oracle(ctx)
    if oracle is None:
        raise StageFailed("collect_preferences.source is 'demo' but the data is not the demo world; point source at labeled files")
    annotator = SimulatedAnnotator(oracle, noise=ctx.section.annotator_noise, seed=ctx.seed)
    rng = random.Random(ctx.seed)
    out = []
    for pair in pairs:
        prompt = Prompt(messages=[Message(**m) for m in pair["prompt"]], is_safety=pair["is_safety_prompt"], id=pair["prompt_id"],
                        category=pair.get("category", ""))
        if not pair["response_a"].strip() or not pair["response_b"].strip():
            continue  # an empty sample cannot be compared
        c = annotator.compare(prompt, pair["response_a"], pair["response_b"], ctx.round, rng)
        if c is not None:
            out.append(c)
    return out


def import_labeled(path: Path, fmt: str, round: int) -> list[Comparison]:
    """A labeled export (choice/strength/a_safe/b_safe) or any comparison file the loaders read."""
    from data_specs.loaders import DataValidationError, RecordIssue, load_records

    first = path.open(encoding="utf-8", errors="replace").readline() if path.suffix == ".jsonl" else ""
    if '"response_a"' not in first:
        return [c.model_copy(update={"round": round}) for c in load_records(path, "preference", format=fmt)]
    out, issues = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choice = row["choice"]
            if choice not in ("a", "b"):
                raise ValueError(f"choice must be 'a' or 'b', got {choice!r}")
            win, lose = ("a", "b") if choice == "a" else ("b", "a")
            out.append(Comparison(prompt=row["prompt"], chosen=row[f"response_{win}"], rejected=row[f"response_{lose}"],
                                  strength=row.get("strength"), is_safety_prompt=row.get("is_safety_prompt", False),
                                  chosen_safe=row.get(f"{win}_safe"), rejected_safe=row.get(f"{lose}_safe"), round=round,
                                  source=f"labeled:{path.name}"))
        except KeyError as e:
            issues.append(RecordIssue(str(path), n, str(e.args[0]), "missing field"))
        except (ValueError, TypeError) as e:
            issues.append(RecordIssue(str(path), n, "-", str(e).splitlines()[0][:200]))
    if issues:
        raise DataValidationError(issues, n_valid=len(out))
    return out


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    pairs = sample_pairs(ctx)
    if cfg.export_unlabeled:
        write_jsonl(ctx.out_dir / "unlabeled.jsonl", pairs)
    if cfg.source == "demo":
        comparisons = label_with_annotator(ctx, pairs)
    else:
        labeled = Path(cfg.source.format(round=ctx.round))
        if not labeled.exists():
            export = Path(ctx.config.run_dir) / "exports" / f"unlabeled_r{ctx.round}.jsonl"
            write_jsonl(export, pairs)
            raise StageFailed(f"no labeled comparisons for round {ctx.round} at {labeled}. {len(pairs)} unlabeled pairs were "
                              f"exported to {export}: label them (choice, strength, a_safe, b_safe), save as {labeled}, and rerun.")
        from data_specs.loaders import DataValidationError

        try:
            comparisons = import_labeled(labeled, cfg.format, ctx.round)
        except DataValidationError as e:
            raise StageFailed(f"bad labeled comparisons in {labeled}:\n{e}") from None
    if not comparisons:
        raise StageFailed(f"round {ctx.round}: no usable comparisons (sampled {len(pairs)} pairs)")
    write_jsonl(ctx.out_dir / "comparisons.jsonl", comparisons)
    strengths = Counter(c.strength.value if c.strength else "none" for c in comparisons)
    bins = Counter(c.safety_bin or "unlabeled" for c in comparisons)
    return {
        "n_comparisons": len(comparisons),
        "n_pairs_sampled": len(pairs),
        "share_safety": sum(c.is_safety_prompt for c in comparisons) / len(comparisons),
        "strength_hist": dict(strengths),
        "safety_bin_hist": dict(bins),
        "mean_response_chars": sum(len(c.chosen) + len(c.rejected) for c in comparisons) / (2 * len(comparisons)),
    }
