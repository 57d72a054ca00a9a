"""Stage `data` (round 0): every dataset the pipeline reads, as files in our own format.

    rlhf stage data

With `data.source: demo` it writes the embedded demo world (the generator is seeded, so the same
seed gives byte-identical files). With `data.source: files` it loads each configured file through
the same loaders `rlhf data validate` uses, fails on any bad record (file, line, field, reason), on a
missing required source and on a source with no records, before anything is written (`check`, which the
runner calls before it creates any directory), warns about duplicate records by count, and stores the
validated records. Later stages read only this artifact.

Static preference sets (`data.preferences`, with either source) are validated the same way and stored in
`preferences_static.jsonl`, one comparison a line with its resolved `domain` (helpfulness|safety), the set's
`weight` and index; the reward-model stages mix them in by domain (reward_models/data.py).
"""
from __future__ import annotations

import logging
import shutil

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageFailed
from pipeline.io import write_json

from .loaders import duplicate_count, load_records, summarize, write_records
from .validate import format_issues

log = logging.getLogger("rlhf.data")

# artifact file -> (config field under `data`, record kind)
FILES = {
    "sft.jsonl": ("sft", "sft"),
    "prompts.jsonl": ("prompts", "prompt"),
    "eval_prompts.jsonl": ("eval_prompts", "prompt"),
    "eval_comparisons.jsonl": ("eval_comparisons", "preference"),
    "gatt_train.jsonl": ("gatt_instructions", "gatt"),
}
REQUIRED = ("sft", "prompts", "eval_prompts")
# static preference sets (`data.preferences`, either source): one comparison a line plus its resolved
# `domain` (helpfulness|safety), the set's `weight` and `set` (its index in data.preferences)
STATIC_PREFERENCES = "preferences_static.jsonl"
_STATIC_KEYS = ("domain", "weight", "set")


def resolve_domain(record, domain: str):
    """(record, 'helpfulness'|'safety'). An explicit domain is the config's word: it also sets the record's
    is_safety_prompt (an HH-RLHF harmless-base file has no such flag, and the default is False); 'auto' keeps
    each record's own flag."""
    if domain == "auto":
        return record, "safety" if record.is_safety_prompt else "helpfulness"
    return record.model_copy(update={"is_safety_prompt": domain == "safety"}), domain


def load_static_preferences(cfg: RunConfig) -> tuple[list[dict], list[str], list[str]]:
    """(rows for STATIC_PREFERENCES, problems, warnings) of every `data.preferences` set."""
    rows: list[dict] = []
    problems: list[str] = []
    warnings: list[str] = []
    for i, src in enumerate(cfg.data.preferences):
        try:
            records, issues = load_records(src.path, "preference", format=src.format, field_map=src.field_map or None,
                                           split=src.split, strict=False)
        except ValueError as e:
            problems.append(f"data.preferences.{i}.format: {e}")
            continue
        if issues:
            n_bad = len({(x.file, x.line) for x in issues})
            problems.append(f"data.preferences.{i} ({src.path}): {n_bad} bad record(s), {len(records)} valid:\n{format_issues(issues)}")
            continue
        if not records:
            problems.append(f"data.preferences.{i}: {src.path}:0: -: no records (empty file or only blank lines)")
            continue
        dups = duplicate_count(records)
        if dups:
            warnings.append(f"data.preferences.{i} ({src.path}): {dups} duplicate record(s) of {len(records)} "
                            "(identical to an earlier record); they are kept")
        for r in records:
            r, domain = resolve_domain(r, src.domain)
            rows.append({**r.model_dump(mode="json"), "domain": domain, "weight": src.weight, "set": i})
    return rows, problems, warnings


def read_static_preferences(path) -> list[tuple]:
    """[(Comparison, domain, weight, set index), ...] of a STATIC_PREFERENCES file ([] when absent)."""
    import json
    from pathlib import Path

    from .schemas import Comparison

    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            meta = [row.pop(k) for k in _STATIC_KEYS]
            out.append((Comparison.model_validate(row), *meta))
    return out


def domain_mix(rows: list[dict]) -> dict:
    """Per set and overall: records by domain, and the weighted sizes the reward models' pools get."""
    from collections import defaultdict

    sets: dict = defaultdict(lambda: {"helpfulness": 0, "safety": 0})
    weighted = {"helpfulness": 0.0, "safety": 0.0}
    for r in rows:
        sets[r["set"]][r["domain"]] += 1
        weighted[r["domain"]] += r["weight"]
    total = {d: sum(s[d] for s in sets.values()) for d in ("helpfulness", "safety")}
    return {"records": total, "weighted": {k: round(v, 3) for k, v in weighted.items()},
            "by_set": {str(k): v for k, v in sorted(sets.items())}}


def load_sources(cfg: RunConfig) -> tuple[dict[str, list], list[str], list[str]]:
    """(artifact file -> records, problems, warnings) of every configured user data source.

    A problem is anything that must stop the stage: a required source not configured, a source that cannot
    be read, any bad record (file:line: field: reason, every problem of every record), or a source with no
    records. Duplicate records are a warning, by count."""
    data = cfg.data
    loaded: dict[str, list] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for name, (field, kind) in FILES.items():
        src = getattr(data, field)
        if src is None:
            if field in REQUIRED:
                problems.append(f"data.{field}: required when data.source is 'files' (set data.{field}.path)")
            continue
        try:
            records, issues = load_records(src.path, kind, format=src.format, field_map=src.field_map or None,
                                           split=src.split, strict=False)
        except ValueError as e:  # a bad format / field_map combination
            problems.append(f"data.{field}.format: {e}")
            continue
        if issues:
            n_bad = len({(i.file, i.line) for i in issues})
            problems.append(f"data.{field} ({src.path}): {n_bad} bad record(s), {len(records)} valid:\n{format_issues(issues)}")
        elif not records:
            problems.append(f"data.{field}: {src.path}:0: -: no records (empty file or only blank lines)")
        else:
            loaded[name] = records
            dups = duplicate_count(records)
            if dups:
                warnings.append(f"data.{field} ({src.path}): {dups} duplicate record(s) of {len(records)} "
                                "(identical to an earlier record); they are kept")
    return loaded, problems, warnings


def check(cfg: RunConfig, round: int) -> None:
    """The runner calls this before anything is written: with `data.source: files`, every configured file
    is loaded and validated; any problem stops the stage (StageFailed naming file:line: field: reason)."""
    _, problems, warnings = load_sources(cfg) if cfg.data.source == "files" else ({}, [], [])
    _, p2, w2 = load_static_preferences(cfg)
    problems, warnings = problems + p2, warnings + w2
    for w in warnings:
        log.warning("warning: %s", w)
    if problems:
        raise StageFailed("invalid datasets, nothing was written:\n" + "\n".join(problems))


def run(ctx: StageContext) -> dict:
    data = ctx.config.data
    static, problems, _ = load_static_preferences(ctx.config)  # validated by check(); the files may have changed since
    if problems:
        raise StageFailed("invalid datasets, nothing was written:\n" + "\n".join(problems))
    if data.source == "demo":
        from .demo.generate import write_demo_data

        write_demo_data(ctx.out_dir, seed=ctx.config.seed, n_sft=data.demo_n_sft, n_train_prompts=data.demo_n_train_prompts,
                        n_eval_prompts=data.demo_n_eval_prompts, n_pretrain_docs=data.demo_n_pretrain_docs,
                        sft_ramble_frac=data.demo_sft_ramble_frac)
    else:
        loaded, problems, _ = load_sources(ctx.config)  # check() has validated already; the files may have changed since
        if problems:
            raise StageFailed("invalid datasets, nothing was written:\n" + "\n".join(problems))
        for name, records in loaded.items():
            write_records(ctx.out_dir / name, records)
        if "gatt_train.jsonl" in loaded:
            shutil.copy2(ctx.out_dir / "gatt_train.jsonl", ctx.out_dir / "gatt_eval.jsonl")
        write_json(ctx.out_dir / "world.json", {"source": "files"})
    metrics = {}
    for name, (field, kind) in FILES.items():
        if (ctx.out_dir / name).exists():
            records = load_records(ctx.out_dir / name, kind, format="own")
            metrics[f"n_{field}"] = len(records)
            metrics[f"summary_{field}"] = summarize(records, kind)
            if data.source == "files":
                metrics[f"n_duplicates_{field}"] = duplicate_count(records)
    if static:
        from pipeline.io import write_jsonl

        write_jsonl(ctx.out_dir / STATIC_PREFERENCES, static)
        metrics["n_preferences_static"] = len(static)
        metrics["preferences_static_domains"] = domain_mix(static)
    metrics["n_sft"] = metrics.get("n_sft", 0)
    metrics["n_prompts"] = metrics.get("n_prompts", 0)
    metrics["source"] = data.source
    return metrics
