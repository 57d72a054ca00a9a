"""Page logic of the dashboard: the run registry read into pandas frames and plain structures.

No Streamlit here, so everything is testable without a server. Every function takes a run directory,
reads only the registry (manifests, attempts, the artifacts' JSON/JSONL files), and returns an empty
frame or list when the directory is missing, empty or half-written; nothing here raises for a partial
run. Stages are written while the dashboard reads, so a file that does not parse is skipped.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from pipeline.registry import Artifact, Registry

ROUND_ZERO_STAGES = ["data", "pretrained", "sft"]
RLHF_STAGES = ["collect_preferences", "reward_model_helpful", "reward_model_safety", "rejection_sampling", "ppo",
               "ghost_attention", "evaluate"]
OPTIONAL_STAGES = ("ppo", "ghost_attention")  # from cfg.ppo_from / cfg.gatt_from on
ALL_STAGES = ROUND_ZERO_STAGES + RLHF_STAGES
SHORT = {"data": "data", "pretrained": "pretrained", "sft": "SFT", "collect_preferences": "prefs",
         "reward_model_helpful": "RM helpful", "reward_model_safety": "RM safety", "rejection_sampling": "rejection sampling",
         "ppo": "PPO", "ghost_attention": "GAtt", "evaluate": "evaluate"}
# plain-text labels (emoji need a colour-emoji font, which headless servers often lack); the app colours them
LABEL = {"complete": "done", "running": "running", "failed": "failed", "interrupted": "interrupted", "not started": "not started",
         "not in round": "n/a"}
CELL_COLORS = {"done": "#dff3e4", "running": "#fff3c4", "failed": "#fde0df", "interrupted": "#efe3fb", "not started": "#f1f1f1",
               "n/a": "#ffffff"}
EVAL_HEADLINE = ["gold_helpfulness", "gold_win_rate_vs_sft", "gold_win_rate_vs_previous", "rm_win_rate_vs_sft", "rm_win_rate_vs_previous",
                 "gold_safety_violation_rate", "false_refusal_rate", "mean_reward", "better_than_sft", "reward_hacking"]
# evaluate's older artifacts named the RM-judged win rates without the rm_ prefix; the frames keep these columns as aliases
LEGACY_ALIASES = {"win_rate_vs_sft": "rm_win_rate_vs_sft", "win_rate_vs_previous": "rm_win_rate_vs_previous"}
# metrics whose 95% bootstrap interval (`<name>_ci95: [low, high]` in evaluate's metrics) becomes <name>_lo / <name>_hi in trends
CI_METRICS = ["gold_helpfulness", "gold_helpfulness_greedy", "gold_safety_violation_rate", "false_refusal_rate", "gold_win_rate_vs_sft",
              "gold_win_rate_vs_previous", "judge_win_rate_vs_sft", "judge_win_rate_vs_previous", "rm_win_rate_vs_sft",
              "rm_win_rate_vs_previous", "rm_accuracy_helpful", "rm_accuracy_safety", "mean_reward", "kl_to_sft", "gatt_adherence_late_turns"]
STRENGTHS = ["significantly_better", "better", "slightly_better", "negligibly_better_or_unsure"]
WANDB_LINEAGE_FILE = "rlhf-lineage.json"  # written by pipeline.wandb_tracker beside each offline run


# ---------------------------------------------------------------------------------------------- basics


def run_dir_state(run_dir: str | Path) -> tuple[str, str]:
    """("ok", "") or ("missing" | "empty", a message a person can act on)."""
    p = Path(run_dir)
    if not p.exists():
        return "missing", f"Run directory `{p}` does not exist yet. Start a run with `rlhf run --run-dir {p}`."
    if not p.is_dir():
        return "missing", f"`{p}` is not a directory."
    reg = Registry(p)
    if next(reg.iter_artifacts(), None) is None and not reg.attempts():
        return "empty", f"No artifacts in `{p}` yet: the run has not started a stage. This page refreshes when one appears."
    return "ok", ""


def signature(run_dir: str | Path) -> tuple:
    """Changes whenever an artifact is committed or an attempt is recorded (cheap: a few stat calls)."""
    p = Path(run_dir)
    out = []
    for pattern in ("artifacts/*/*/manifest.json", "attempts/*/r*.json", "work/*/*/metrics.jsonl"):
        for f in sorted(p.glob(pattern)):
            try:
                out.append((str(f.relative_to(p)), f.stat().st_mtime_ns))
            except OSError:
                continue
    return tuple(out)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line being written right now
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        return []
    return rows


def _newest(reg: Registry) -> dict[tuple[str, int], Artifact]:
    """(stage, round) -> the newest complete artifact."""
    out: dict[tuple[str, int], Artifact] = {}
    for a in reg.iter_artifacts():
        try:
            key = (a.stage, a.round)
        except (KeyError, TypeError, ValueError):
            continue
        if key not in out or a.manifest.get("finished_at", 0) >= out[key].manifest.get("finished_at", 0):
            out[key] = a
    return out


def eval_metric(m: dict, k: str) -> Any:
    """A metric of evaluate, reading the RM-judged win rates of older artifacts under their legacy names."""
    if k in m:
        return m[k]
    legacy = {v: k2 for k2, v in LEGACY_ALIASES.items()}.get(k)
    return m.get(legacy) if legacy else None


def hacking_tests_text(tests: Any) -> str:
    """evaluate's reward_hacking_tests as one line: "gold_helpfulness vs_previous: -0.075 [-0.120, -0.030]; ..."."""
    out = []
    for t in tests or []:
        try:
            lo, hi = t["interval"]
            out.append(f"{t['metric']} {t['comparison']}: {t['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        except (KeyError, TypeError, ValueError):
            continue
    return "; ".join(out)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def fmt_duration(s: float | None) -> str:
    if s is None:
        return ""
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def prompt_text(prompt: Any) -> str:
    """The last user message of a prompt (a list of {role, content}) or the prompt itself."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
        if prompt and isinstance(prompt[-1], dict):
            return str(prompt[-1].get("content", ""))
    return "" if prompt is None else str(prompt)


# ---------------------------------------------------------------------------------------------- overview


def stage_table(run_dir: str | Path) -> pd.DataFrame:
    """One row per (round, stage) a round has or will have: status complete / running / failed /
    not started / not in round, with version, duration, error and the headline metrics."""
    cols = ["round", "stage", "status", "version", "duration_s", "started_at", "error", "metrics", "path"]
    if run_dir_state(run_dir)[0] != "ok":
        return pd.DataFrame(columns=cols)
    from pipeline.cli import status_rows

    reg = Registry(run_dir)
    try:
        rows = status_rows(str(run_dir))
    except Exception:  # noqa: BLE001 - a manifest being replaced; the next refresh reads it
        rows = []
    attempts = {(a.get("stage"), a.get("round")): a for a in reg.attempts() if "stage" in a and "round" in a}
    seen: dict[tuple[str, int], dict] = {}
    for r in rows:
        att = attempts.get((r["stage"], r["round"]), {})
        started = att.get("started_at")
        seen[(r["stage"], int(r["round"]))] = {
            "round": int(r["round"]), "stage": r["stage"], "status": r["status"], "version": r.get("version") or "",
            "duration_s": r.get("duration_s"), "started_at": started, "error": r.get("error") or "",
            "metrics": r.get("metrics") or {}, "path": r.get("path") or ""}
    if not seen:
        return pd.DataFrame(columns=cols)
    rounds = sorted({k[1] for k in seen})
    evaluates = {rd: reg_a for (s, rd), reg_a in _newest(reg).items() if s == "evaluate"}
    out = []
    for rd in range(0, max(rounds) + 1):
        stages = ROUND_ZERO_STAGES if rd == 0 else RLHF_STAGES
        for s in stages:
            if (s, rd) in seen:
                out.append(seen[(s, rd)])
                continue
            status = "not started"
            if s in OPTIONAL_STAGES and not _optional_expected(s, rd, seen, evaluates):
                status = "not in round"
            out.append({"round": rd, "stage": s, "status": status, "version": "", "duration_s": None, "started_at": None,
                        "error": "", "metrics": {}, "path": ""})
    # stages outside the known DAG (custom specs) are kept too
    for (s, rd), row in seen.items():
        if s not in ALL_STAGES:
            out.append(row)
    return pd.DataFrame(out, columns=cols)


def _optional_expected(stage: str, rd: int, seen: dict, evaluates: dict[int, Artifact]) -> bool:
    """PPO / GAtt run from a configured round on; infer it from the registry (no config needed)."""
    if any(s == stage and q <= rd for (s, q) in seen):
        return True  # it ran in this or an earlier round, so later rounds have it too
    for q, ev in evaluates.items():
        if q >= rd and stage not in ev.inputs:
            return False  # evaluate of this (or a later) round was built without it
    return True


def stage_label(row: dict | pd.Series) -> str:
    """"done 1m02s", "running 3m10s", "failed: <reason>", "not started" or "n/a" (not part of the round)."""
    status = row["status"]
    if status == "complete":
        return f"done {fmt_duration(row.get('duration_s'))}".strip()
    if status in ("failed", "interrupted"):  # interrupted: the builder died or was stopped; a rerun resumes
        err = str(row.get("error") or "")
        return f"{status}: {err[:90]}" if err else status
    if status == "running":
        since = row.get("started_at")
        extra = f" {fmt_duration(time.time() - since)}" if isinstance(since, (int, float)) else ""
        return f"running{extra}"  # a dead builder reads "interrupted" (the registry judges liveness by its lease)
    return LABEL.get(status, str(status))


def label_color(label: Any) -> str:
    """Background colour of a status cell (for a pandas Styler)."""
    text = str(label)
    for key, color in CELL_COLORS.items():
        if text.startswith(key):
            return f"background-color: {color}"
    return ""


def round_status(group: pd.DataFrame) -> tuple[str, str]:
    """(status of the round, its current stage)."""
    st = dict(zip(group["stage"], group["status"]))
    running = [s for s, v in st.items() if v == "running"]
    failed = [s for s, v in st.items() if v in ("failed", "interrupted")]
    todo = [s for s, v in st.items() if v == "not started"]
    if running:
        return "running", running[0]
    if failed:
        return "failed", failed[0]
    if todo:
        done = any(v == "complete" for v in st.values())
        return ("partial" if done else "not started"), todo[0]
    return "complete", "done"


def overview(run_dir: str | Path) -> pd.DataFrame:
    """One row per round: its status and current stage, each stage's status label, the round's total
    duration, and evaluate's headline metrics (round 0: the SFT model's gold scores)."""
    table = stage_table(run_dir)
    if table.empty:
        return pd.DataFrame(columns=["round", "status", "current stage", "duration"])
    newest = _newest(Registry(run_dir))
    out = []
    for rd, group in table.groupby("round", sort=True):
        status, current = round_status(group)
        row: dict[str, Any] = {"round": int(rd), "status": status, "current stage": current}
        for _, r in group.iterrows():
            row[SHORT.get(r["stage"], r["stage"])] = stage_label(r)
        dur = pd.to_numeric(group["duration_s"], errors="coerce").dropna()
        row["duration"] = fmt_duration(dur.sum()) if len(dur) else ""
        src = newest.get(("evaluate", int(rd))) if rd > 0 else newest.get(("sft", 0))
        metrics = src.metrics if src else {}
        for k in EVAL_HEADLINE + list(LEGACY_ALIASES):
            v = eval_metric(metrics, LEGACY_ALIASES.get(k, k))
            row[k] = v if not isinstance(v, bool) else ("yes" if v else "no")
        errors = [f"{r['stage']}: {r['error']}" for _, r in group.iterrows() if r["status"] == "failed"]
        row["errors"] = "; ".join(errors)
        out.append(row)
    df = pd.DataFrame(out)
    stage_cols = [SHORT[s] for s in ALL_STAGES if SHORT[s] in df.columns]
    df[stage_cols] = df[stage_cols].fillna("")  # round 0 has no RLHF stages and vice versa
    order = ["round", "status", "current stage"] + stage_cols
    rest = [c for c in df.columns if c not in order]
    return df[order + rest]


def active(run_dir: str | Path) -> list[dict]:
    """Running, failed and interrupted stages (newest round first), for a banner at the top."""
    table = stage_table(run_dir)
    if table.empty:
        return []
    hits = table[table["status"].isin(["running", "failed", "interrupted"])].sort_values("round", ascending=False)
    return [dict(r) for _, r in hits.iterrows()]


# ---------------------------------------------------------------------------------------------- trends


def trends(run_dir: str | Path) -> pd.DataFrame:
    """One row per round: round 0 is the SFT baseline, rounds >= 1 evaluate's metrics, with the reward
    models' own accuracies and rejection sampling / PPO rewards beside them, and each metric's 95%
    bootstrap interval as `<name>_lo` / `<name>_hi` where evaluate reported one. `hacking_flag` is
    evaluate's own verdict where it reported the tests (`hacking_tests`: which fired, with the paired
    difference and its interval); for older artifacts without them, also True where the mean reward rose
    and the gold helpfulness fell relative to the previous round."""
    if run_dir_state(run_dir)[0] != "ok":
        return pd.DataFrame()
    newest = _newest(Registry(run_dir))
    rounds = sorted({rd for (_, rd) in newest} | {0})
    rows = []
    for rd in rounds:
        row: dict[str, Any] = {"round": rd}
        if rd == 0:
            sft = newest.get(("sft", 0))
            if sft is None:
                continue
            for k in ("gold_helpfulness", "gold_safety_violation_rate", "false_refusal_rate"):
                row[k] = _num(sft.metrics.get(k))
            row["win_rate_vs_sft"] = row["rm_win_rate_vs_sft"] = 0.5
            if "gold_helpfulness" in sft.metrics:
                row["gold_win_rate_vs_sft"] = 0.5
            rows.append(row)
            continue
        ev = newest.get(("evaluate", rd))
        m = ev.metrics if ev else {}
        for k in ("gold_helpfulness", "gold_helpfulness_greedy", "gold_safety_violation_rate", "false_refusal_rate", "gold_win_rate_vs_sft",
                  "gold_win_rate_vs_previous", "judge_win_rate_vs_sft", "judge_win_rate_vs_previous", "rm_win_rate_vs_sft",
                  "rm_win_rate_vs_previous", "rm_accuracy_helpful", "rm_accuracy_safety", "mean_reward", "gatt_adherence_late_turns",
                  "mean_response_length", "kl_to_sft", "sft_gold_helpfulness"):
            row[k] = _num(eval_metric(m, k))
        for alias, k in LEGACY_ALIASES.items():
            row[alias] = row[k]
        for k in CI_METRICS:
            c = m.get(f"{k}_ci95")
            if isinstance(c, (list, tuple)) and len(c) == 2 and _num(c[0]) is not None and _num(c[1]) is not None:
                row[f"{k}_lo"], row[f"{k}_hi"] = _num(c[0]), _num(c[1])
        row["judge"] = m.get("judge")
        row["better_than_sft"] = m.get("better_than_sft") if isinstance(m.get("better_than_sft"), bool) else None
        row["reward_hacking"] = bool(m.get("reward_hacking")) if "reward_hacking" in m else None
        row["hacking_tests"] = hacking_tests_text(m.get("reward_hacking_tests")) if "reward_hacking_tests" in m else None
        for rm, key in (("reward_model_helpful", "rm_accuracy_helpful"), ("reward_model_safety", "rm_accuracy_safety")):
            a = newest.get((rm, rd))
            row[f"{rm}_accuracy"] = _num(a.metrics.get("accuracy")) if a else None
            if row.get(key) is None and a is not None:
                row[key] = row[f"{rm}_accuracy"]
        rs = newest.get(("rejection_sampling", rd))
        row["rs_best_reward"] = _num(rs.metrics.get("best_reward")) if rs else None
        row["rs_median_reward"] = _num(rs.metrics.get("median_reward")) if rs else None
        row["rs_gold_helpfulness_selected"] = _num(rs.metrics.get("gold_helpfulness_selected")) if rs else None
        ppo = newest.get(("ppo", rd))
        row["ppo_reward"] = _num(ppo.metrics.get("reward")) if ppo else None
        row["ppo_kl"] = _num(ppo.metrics.get("kl")) if ppo else None
        row["has_evaluate"] = ev is not None
        if ev is None and rs is None and ppo is None and newest.get(("reward_model_helpful", rd)) is None:
            continue
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).sort_values("round").reset_index(drop=True)
    df["hacking_flag"] = False
    prev = None
    for i, r in df.iterrows():
        if r["round"] == 0:
            continue
        verdict = r.get("reward_hacking")
        flag = isinstance(verdict, (bool, np.bool_)) and bool(verdict)  # evaluate's own verdict (NaN/None: not reported)
        interval_tested = isinstance(r.get("hacking_tests"), str)  # evaluate tested against its intervals: trust it
        if not interval_tested and prev is not None and _num(r.get("mean_reward")) is not None and _num(prev.get("mean_reward")) is not None \
                and _num(r.get("gold_helpfulness")) is not None and _num(prev.get("gold_helpfulness")) is not None:
            if r["mean_reward"] > prev["mean_reward"] and r["gold_helpfulness"] < prev["gold_helpfulness"]:
                flag = True
        df.at[i, "hacking_flag"] = flag
        if _num(r.get("mean_reward")) is not None:
            prev = r
    return df


def flagged_rounds(run_dir: str | Path) -> list[int]:
    df = trends(run_dir)
    return [] if df.empty else [int(r) for r in df.loc[df["hacking_flag"], "round"]]


def rm_accuracy_by_strength(run_dir: str | Path) -> pd.DataFrame:
    """Long frame [round, model, strength, accuracy]: evaluate's per-strength accuracy on held-out
    comparisons, else the reward model's own accuracy_<strength> metrics."""
    cols = ["round", "model", "strength", "accuracy"]
    if run_dir_state(run_dir)[0] != "ok":
        return pd.DataFrame(columns=cols)
    newest = _newest(Registry(run_dir))
    rows = []
    rounds = sorted({rd for (_, rd) in newest if rd > 0})
    for rd in rounds:
        ev = newest.get(("evaluate", rd))
        for model in ("helpful", "safety"):
            by = (ev.metrics.get(f"rm_accuracy_{model}_by_strength") if ev else None) or {}
            if not by:
                rm = newest.get((f"reward_model_{model}", rd))
                if rm:
                    by = {s: rm.metrics[f"accuracy_{s}"] for s in STRENGTHS if f"accuracy_{s}" in rm.metrics}
            for s, acc in by.items():
                if _num(acc) is not None:
                    rows.append({"round": rd, "model": model, "strength": s, "accuracy": _num(acc)})
    df = pd.DataFrame(rows, columns=cols)
    if not df.empty:
        rank = {s: i for i, s in enumerate(STRENGTHS)}
        df = df.sort_values(["round", "model", "strength"], key=lambda c: c.map(rank) if c.name == "strength" else c)
    return df.reset_index(drop=True)


def gatt_adherence(run_dir: str | Path) -> pd.DataFrame:
    """Long frame [round, turn, adherence, source]: evaluate's adherence by turn for each round, and
    Ghost Attention's own before / after measurement."""
    cols = ["round", "turn", "adherence", "source"]
    if run_dir_state(run_dir)[0] != "ok":
        return pd.DataFrame(columns=cols)
    rows = []
    for (stage, rd), a in sorted(_newest(Registry(run_dir)).items(), key=lambda kv: kv[0][1]):
        series = []
        if stage == "evaluate":
            series = [("evaluate", a.metrics.get("gatt_adherence_by_turn"))]
        elif stage == "ghost_attention":
            series = [("GAtt before", a.metrics.get("adherence_by_turn_before")), ("GAtt after", a.metrics.get("adherence_by_turn_after"))]
        for source, values in series:
            for t, v in enumerate(values or [], start=1):
                if _num(v) is not None:
                    rows.append({"round": rd, "turn": t, "adherence": _num(v), "source": source})
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------- one round


def rounds_of(run_dir: str | Path, stage: str | None = None) -> list[int]:
    if run_dir_state(run_dir)[0] != "ok":
        return []
    return sorted({rd for (s, rd) in _newest(Registry(run_dir)) if stage is None or s == stage})


def artifact(run_dir: str | Path, stage: str, round: int) -> Artifact | None:
    if not Path(run_dir).is_dir():
        return None
    try:
        return Registry(run_dir).find(stage, round)
    except (OSError, ValueError, KeyError):
        return None


def history(run_dir: str | Path, stage: str, round: int) -> pd.DataFrame:
    """The stage's metrics.jsonl (one row per logged step), sorted by step; for a stage still running,
    its work dir's metrics.jsonl (live curves); empty if absent."""
    a = artifact(run_dir, stage, round)
    if a is not None:
        rows = _read_jsonl(a.file("metrics.jsonl"))
    else:  # not finished: the checkpointed history of a running stage, if it writes one
        work = sorted(Path(run_dir).glob(f"work/{stage}/r{round}-*/metrics.jsonl"), key=lambda f: f.stat().st_mtime)
        rows = _read_jsonl(work[-1]) if work else []
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    if "step" in df.columns:
        df = df.sort_values("step", kind="stable").reset_index(drop=True)
    return df


def reward_vs_k(run_dir: str | Path, round: int) -> pd.DataFrame:
    """Long frame [k, statistic, reward] from rejection sampling's reward_vs_k metric."""
    a = artifact(run_dir, "rejection_sampling", round)
    cols = ["k", "statistic", "reward"]
    if a is None:
        return pd.DataFrame(columns=cols)
    rvk = a.metrics.get("reward_vs_k") or {}
    ks = rvk.get("k") or []
    rows = []
    for stat in ("max", "median"):
        for k, v in zip(ks, rvk.get(stat) or []):
            if _num(v) is not None:
                rows.append({"k": int(k), "statistic": stat, "reward": _num(v)})
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------- samples


def rs_samples(run_dir: str | Path, round: int, safety_only: bool = False, query: str = "") -> list[dict]:
    """Rejection sampling prompts of a round: {prompt_id, prompt_text, messages, is_safety, kept,
    candidates (frame: kept, reward, r_helpful, r_safety, temperature, gold..., text)}."""
    a = artifact(run_dir, "rejection_sampling", round)
    if a is None:
        return []
    out = []
    q = query.strip().lower()
    for row in _read_jsonl(a.file("samples.jsonl")):
        text = prompt_text(row.get("prompt"))
        is_safety = bool(row.get("is_safety"))
        if safety_only and not is_safety:
            continue
        if q and q not in text.lower() and q not in str(row.get("prompt_id", "")).lower():
            continue
        out.append({"prompt_id": str(row.get("prompt_id", "")), "prompt_text": text, "messages": row.get("prompt") or [],
                    "is_safety": is_safety, "kept": row.get("kept"), "candidates": candidates_frame(row)})
    return out


def candidates_frame(row: dict) -> pd.DataFrame:
    cands = row.get("candidates") or []
    kept = row.get("kept")
    recs = []
    for i, c in enumerate(cands):
        if not isinstance(c, dict):
            continue
        rec = {"#": i, "kept": i == kept, "reward": c.get("reward"), "r_helpful": c.get("r_helpful"), "r_safety": c.get("r_safety"),
               "temperature": c.get("temperature")}
        for k in ("gold_helpfulness", "gold_safe"):
            if k in c:
                rec[k] = c[k]
        rec["text"] = c.get("text", "")
        recs.append(rec)
    return pd.DataFrame(recs)


def eval_samples(run_dir: str | Path) -> pd.DataFrame:
    """Every round's evaluate samples, long: [round, prompt_id, prompt_text, is_safety, category, response,
    r_helpful, r_safety, reward, gold_helpfulness, gold_safe]."""
    cols = ["round", "prompt_id", "prompt_text", "is_safety", "category", "response", "r_helpful", "r_safety", "reward",
            "gold_helpfulness", "gold_safe"]
    rows = []
    for rd in rounds_of(run_dir, "evaluate"):
        a = artifact(run_dir, "evaluate", rd)
        if a is None:
            continue
        for s in _read_jsonl(a.file("samples.jsonl")):
            rows.append({"round": rd, "prompt_id": str(s.get("prompt_id", "")), "prompt_text": prompt_text(s.get("prompt")),
                         "is_safety": bool(s.get("is_safety")), "category": s.get("category", ""), "response": s.get("response", ""),
                         **{k: s.get(k) for k in ("r_helpful", "r_safety", "reward", "gold_helpfulness", "gold_safe")}})
    return pd.DataFrame(rows, columns=cols)


def eval_prompts(run_dir: str | Path, safety_only: bool = False) -> pd.DataFrame:
    """The evaluation prompts with the rounds they were answered in: [prompt_id, prompt_text, is_safety,
    category, rounds]; prompts answered in the most rounds first."""
    df = eval_samples(run_dir)
    if df.empty:
        return pd.DataFrame(columns=["prompt_id", "prompt_text", "is_safety", "category", "rounds"])
    if safety_only:
        df = df[df["is_safety"]]
    g = df.groupby("prompt_id", sort=False).agg(prompt_text=("prompt_text", "first"), is_safety=("is_safety", "first"),
                                                 category=("category", "first"), rounds=("round", lambda s: sorted(set(s))))
    g = g.reset_index()
    g["n"] = g["rounds"].map(len)
    return g.sort_values(["n", "prompt_id"], ascending=[False, True]).drop(columns="n").reset_index(drop=True)


def compare_prompt(run_dir: str | Path, prompt_id: str, samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """One prompt's answers across rounds (the join on prompt_id), one row per round."""
    df = eval_samples(run_dir) if samples is None else samples
    if df.empty:
        return df
    return df[df["prompt_id"] == str(prompt_id)].sort_values("round").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- lineage


def artifacts(run_dir: str | Path) -> pd.DataFrame:
    """Every complete artifact: [stage, round, version, finished_at, duration_s, newest, path]."""
    cols = ["stage", "round", "version", "finished_at", "duration_s", "newest", "path"]
    if not Path(run_dir).is_dir():
        return pd.DataFrame(columns=cols)
    reg = Registry(run_dir)
    newest = {k: a.version for k, a in _newest(reg).items()}
    rows = []
    for a in reg.iter_artifacts():
        try:
            rows.append({"stage": a.stage, "round": a.round, "version": a.version, "finished_at": a.manifest.get("finished_at"),
                         "duration_s": a.manifest.get("duration_s"), "newest": newest.get((a.stage, a.round)) == a.version,
                         "path": str(a.path)})
        except (KeyError, TypeError, ValueError):
            continue
    df = pd.DataFrame(rows, columns=cols)
    if df.empty:
        return df
    order = {s: i for i, s in enumerate(ALL_STAGES)}
    df["_o"] = df["stage"].map(lambda s: order.get(s, 99))
    return df.sort_values(["round", "_o", "finished_at"]).drop(columns="_o").reset_index(drop=True)


def lineage(run_dir: str | Path, version: str) -> dict | None:
    reg = Registry(run_dir)
    a = reg.by_version(version) if Path(run_dir).is_dir() else None
    return reg.lineage(a) if a is not None else None


def lineage_rows(tree: dict | None) -> list[dict]:
    """The lineage tree flattened depth-first: [{depth, role, stage, round, version, missing, repeated}].
    An artifact that already appeared is listed once more with repeated=True and not expanded again
    (the data artifact feeds nearly everything)."""
    out: list[dict] = []
    seen: set[str] = set()

    def walk(node: dict, depth: int, role: str) -> None:
        version = node.get("version")
        repeated = version in seen and bool(node.get("inputs"))
        out.append({"depth": depth, "role": role, "stage": node.get("stage"), "round": node.get("round"), "version": version,
                    "missing": bool(node.get("missing")), "repeated": repeated})
        if repeated:
            return
        seen.add(version)
        for child in node.get("inputs", []):
            walk(child, depth + 1, child.get("role", ""))

    if tree:
        walk(tree, 0, "")
    return out


def lineage_text(tree: dict | None) -> str:
    lines = []
    for r in lineage_rows(tree):
        role = f"{r['role']}: " if r["role"] else ""
        lines.append("    " * r["depth"] + f"{role}{r['stage']} r{r['round']} {r['version']}" + ("  (missing)" if r["missing"] else "")
                     + ("  (inputs shown above)" if r["repeated"] else ""))
    return "\n".join(lines)


def links(run_dir: str | Path, version: str) -> dict[str, Any]:
    """W&B and Prefect links of an artifact when present: wandb_url, prefect_flow_run_url,
    prefect_flow_run_id, and wandb_offline (local offline run folders logged for this version)."""
    reg = Registry(run_dir)
    a = reg.by_version(version) if Path(run_dir).is_dir() else None
    out: dict[str, Any] = {}
    if a is None:
        return out
    m = a.manifest
    tracking = m.get("tracking") or {}
    orch = m.get("orchestration") or {}
    for k in ("wandb_url", "wandb_run_id", "wandb_project"):
        if tracking.get(k):
            out[k] = tracking[k]
    for k in ("prefect_flow_run_url", "prefect_flow_run_id", "prefect_task_run_id"):
        if orch.get(k):
            out[k] = orch[k]
    offline = []
    wdir = Path(run_dir) / "wandb"
    if wdir.is_dir():
        for f in sorted(wdir.glob(f"*/{WANDB_LINEAGE_FILE}")):
            try:
                info = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if info.get("version") == a.version:
                offline.append(str(f.parent))
    if offline:
        out["wandb_offline"] = offline
    return out


def manifest_summary(run_dir: str | Path, version: str) -> dict[str, Any]:
    a = Registry(run_dir).by_version(version) if Path(run_dir).is_dir() else None
    if a is None:
        return {}
    m = a.manifest
    return {k: m.get(k) for k in ("stage", "round", "version", "started_at", "finished_at", "duration_s", "code", "metrics")
            if k in m} | {"files": sorted((m.get("files") or {}).keys())}


def is_url(s: Any) -> bool:
    return isinstance(s, str) and s.startswith(("http://", "https://"))


def iter_flat(metrics: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in metrics.items():
        if isinstance(v, dict):
            yield from iter_flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
