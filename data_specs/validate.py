"""`rlhf data validate PATH --kind sft|preference|prompt|gatt [--format ...] [--domain auto|helpfulness|safety]`.

Loads the source non-strictly with the same loaders the `data` stage uses, prints the number of valid
records and their summary, and lists the bad records (file:line: field: reason). Exit code 1 when any
record is bad, the source cannot be read or holds no records, 2 for a bad argument, else 0. Duplicate
records are counted in a warning. For preference data it also shows the domain mix: how many records the
reward models would count as helpfulness and as safety data with `data.preferences: [{domain: ...}]`.
"""
from __future__ import annotations

from typing import Sequence

ISSUE_LIMIT = 20


def format_issues(issues: Sequence, limit: int = ISSUE_LIMIT) -> str:
    """At most `limit` issues as "file:line: field: reason", one a line, then "... and N more"."""
    issues = list(issues)
    lines = [f"{i.file}:{i.line}: {i.field}: {i.reason}" for i in issues[:limit]]
    if len(issues) > limit:
        lines.append(f"... and {len(issues) - limit} more")
    return "\n".join(lines)


def _tables(summary: dict):
    from rich.table import Table

    scalars = Table(title="summary", show_header=True)
    scalars.add_column("metric")
    scalars.add_column("value", justify="right")
    hists = []
    for key, value in summary.items():
        if key.endswith("_hist"):
            t = Table(title=key.removesuffix("_hist").replace("_", " "), show_header=True)
            t.add_column("value")
            t.add_column("count", justify="right")
            for k, v in value.items():
                t.add_row(str(k), str(v))
            hists.append(t)
        elif isinstance(value, dict):
            scalars.add_row(key.replace("_", " "), "  ".join(f"{k} {v}" for k, v in value.items()))
        else:
            scalars.add_row(key.replace("_", " "), str(value))
    return [scalars, *hists]


DOMAINS = ("auto", "helpfulness", "safety")


def _domain_table(records, domain: str):
    """How the reward models would count this set with `data.preferences: [{domain: ...}]`."""
    from rich.table import Table

    from .prepare import resolve_domain

    counts = {"helpfulness": 0, "safety": 0}
    for r in records:
        counts[resolve_domain(r, domain)[1]] += 1
    n = max(1, len(records))
    t = Table(title=f"domain mix (domain: {domain})", show_header=True)
    t.add_column("domain")
    t.add_column("records", justify="right")
    t.add_column("share %", justify="right")
    t.add_column("trains")
    t.add_row("helpfulness", str(counts["helpfulness"]), f"{100 * counts['helpfulness'] / n:.0f}",
              "all in the helpful RM; helpful_share of the safety RM")
    t.add_row("safety", str(counts["safety"]), f"{100 * counts['safety'] / n:.0f}",
              "all in the safety RM; mix_other_ratio part of the helpful RM")
    return t, counts


def main(path: str, kind: str, format: str = "auto", domain: str = "auto") -> int:
    from rich.console import Console

    from .loaders import duplicate_count, load_records, summarize

    if domain not in DOMAINS:
        Console().print(f"error: unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}", markup=False, highlight=False)
        return 2

    console = Console()
    try:
        records, issues = load_records(path, kind, format=format, strict=False)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    console.print(f"{len(records)} valid {kind} record(s) in {path}", markup=False, highlight=False, soft_wrap=True)
    if records:
        for table in _tables(summarize(records, kind)):
            console.print(table)
        if kind == "preference":
            table, counts = _domain_table(records, domain)
            console.print(table)
            if domain == "auto" and not counts["safety"]:
                console.print("note: no record has is_safety_prompt true, so with domain auto all count as helpfulness; "
                              "for a harmless set (e.g. HH-RLHF harmless-base) give --domain safety (data.preferences: "
                              "domain: safety)", markup=False, highlight=False, soft_wrap=True)
    dups = duplicate_count(records)
    if dups:
        console.print(f"warning: {path}: {dups} duplicate record(s) (identical to an earlier record)", markup=False,
                      highlight=False, soft_wrap=True)
    if not issues:
        if not records:
            console.print(f"error: {path}:0: -: no records (empty file or only blank lines)", markup=False, highlight=False,
                          soft_wrap=True)
            return 1
        return 0
    n_bad = len({(i.file, i.line) for i in issues})
    console.print(f"[red]{n_bad} bad record(s), {len(issues)} issue(s):[/red]")
    console.print(format_issues(issues), markup=False, highlight=False, soft_wrap=True)
    return 1
