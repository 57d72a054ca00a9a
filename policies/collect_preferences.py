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

import random
from collections import Counter
from pathlib import Path

from pipeline.context import StageContext, StageFailed
from pipeline.io import write_jsonl

from data_specs.schemas import Comparison, Message, Prompt, messages_to_dicts

from .common import demo_oracle, load_data, policy_sampler, sample_replies, subsample


def sample_pairs(ctx: StageContext) -> list[dict]:
    """Unlabeled pairs: {prompt_id, prompt, is_safety_prompt, response_a, response_b, temperatures}."""
    cfg = ctx.section
    prompts = subsample(load_data(ctx, "prompts.jsonl", "prompt"), cfg.prompts_per_round, ctx.seed)
    model, tok = policy_sampler(ctx, cfg, ctx.input("policy").path)
    dialogues = [messages_to_dicts(p.messages) for p in prompts]
    temps = [cfg.temperatures[i % len(cfg.temperatures)] for i in range(cfg.responses_per_prompt)]
    sources = [(model, t, "policy") for t in sorted(set(temps))]
    if cfg.base_responses:  # a different model variant, as the paper's annotators compared (sec. 3.2.1)
        sources.append((policy_sampler(ctx, cfg, ctx.input("pretrained").path)[0], max(cfg.temperatures), "pretrained"))
    responses: list[list[tuple[str, float, str]]] = [[] for _ in prompts]
    bar = ctx.progress(len(prompts) * len(sources), "sample", unit="prompt")
    for k, (m, t, name) in enumerate(sources):
        n = temps.count(t) if name == "policy" else cfg.base_responses
        replies = sample_replies(m, tok, dialogues, n, cfg.max_new_tokens, t, ctx.seed + 1000 * k, top_p=cfg.generation.top_p,
                                 progress=bar.update, max_batch_tokens=cfg.generation.max_batch_tokens)
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


# an exported line (sample_pairs) and the labels a person adds to it
EXPORT_FIELDS = ("prompt_id", "prompt", "is_safety_prompt", "category", "response_a", "response_b", "temperatures", "models")
LABEL_FIELDS = ("choice", "strength", "a_safe", "b_safe")


def _is_export_row(row) -> bool:
    return isinstance(row, dict) and any(k in row for k in ("response_a", "response_b", "choice"))


def _labeled_row(row: dict, file: str, line: int, round: int, source: str):
    """A Comparison from a labeled export line, or every problem of the line (RecordIssue, in the file's field names)."""
    import difflib

    from pydantic import ValidationError

    from data_specs.loaders import RecordIssue, _pydantic_issues
    from data_specs.schemas import STRENGTHS

    issues = []
    allowed = EXPORT_FIELDS + LABEL_FIELDS
    for k in row:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; a labeled line is the exported line plus {', '.join(LABEL_FIELDS)}"
            issues.append(RecordIssue(file, line, str(k), "unknown field" + hint))
    choice = row.get("choice")
    if "choice" not in row:
        issues.append(RecordIssue(file, line, "choice", 'missing field (label each line with "choice": "a" or "b")'))
    elif choice not in ("a", "b"):
        issues.append(RecordIssue(file, line, "choice", f"must be 'a' or 'b', got {choice!r}"))
    win, lose = ("b", "a") if choice == "b" else ("a", "b")
    theirs = {"prompt": "prompt", "chosen": f"response_{win}", "rejected": f"response_{lose}", "strength": "strength",
              "is_safety_prompt": "is_safety_prompt", "chosen_safe": f"{win}_safe", "rejected_safe": f"{lose}_safe"}
    d = {ours: row[col] for ours, col in theirs.items() if col in row}
    strength = d.get("strength")
    if strength is not None and strength not in [x.value for x in STRENGTHS]:
        levels = ", ".join(x.value for x in STRENGTHS)
        issues.append(RecordIssue(file, line, "strength", f"unknown strength {strength!r} (expected one of: {levels}, or null)"))
        d.pop("strength")
    try:
        record = Comparison.model_validate({**d, "round": round, "source": source})
    except ValidationError as e:
        for i in _pydantic_issues(e, "preference", file, line):
            head, dot, rest = i.field.partition(".")
            issues.append(i._replace(field=theirs.get(head, head) + dot + rest))
        return issues
    return issues or record


def parse_labeled(path: Path, fmt: str, round: int) -> tuple[list[Comparison], list]:
    """(comparisons, issues) of a labeled file: exported lines with choice/strength/a_safe/b_safe, or comparisons
    in any format the loaders read. Every problem of every line is an issue `file:line: field: reason` (bad
    UTF-8 and malformed JSON per line; types are strict: "yes" is not true, "3" is not 3)."""
    from data_specs.loaders import RecordIssue, parse_record, read_rows

    label, rows = read_rows(path)
    records, issues = [], []
    for line, row in rows:
        if isinstance(row, RecordIssue):
            issues.append(row)
            continue
        if _is_export_row(row):
            out = _labeled_row(row, label, line, round, f"labeled:{path.name}")
        else:
            out = parse_record(row, "preference", fmt, None, label, line)
            if not isinstance(out, list):
                out = out.model_copy(update={"round": round})
        if isinstance(out, list):
            issues.extend(out)
        else:
            records.append(out)
    return records, issues


def import_labeled(path: Path, fmt: str, round: int) -> list[Comparison]:
    """A labeled export (choice/strength/a_safe/b_safe) or any comparison file the loaders read;
    DataValidationError listing every problem when any line is bad."""
    from data_specs.loaders import DataValidationError

    records, issues = parse_labeled(path, fmt, round)
    if issues:
        raise DataValidationError(issues, n_valid=len(records))
    return records


def check(cfg, round: int) -> None:
    """The runner calls this before anything is written: the round's labeled file, when `source` is a path and
    the file exists, must be readable and every line valid and non-empty (StageFailed naming file:line: field).
    A missing file is not an error here: the stage then exports the unlabeled pairs and says what to do."""
    import logging

    from data_specs.loaders import DataValidationError, duplicate_count

    src = cfg.collect_preferences.source
    if src == "demo":
        return
    path = Path(src.format(round=round))
    if not path.exists():
        return
    where = f"collect_preferences.source {src!r}, round {round}"
    records, issues = parse_labeled(path, cfg.collect_preferences.format, round)
    if issues:
        raise StageFailed(f"bad labeled comparisons in {path} ({where}), nothing was written:\n"
                          f"{DataValidationError(issues, n_valid=len(records))}")
    if not records:
        raise StageFailed(f"{path}:0: -: no labeled comparisons (empty file or only blank lines) ({where}); nothing was written")
    dups = duplicate_count(records)
    if dups:
        logging.getLogger("rlhf.data").warning("warning: %s: %d duplicate comparison(s) of %d (identical to an earlier line); "
                                               "they are kept", path, dups, len(records))


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
