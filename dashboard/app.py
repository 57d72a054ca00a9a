"""Streamlit dashboard of an RLHF run: `rlhf dashboard --run-dir runs/demo`.

Reads the run registry only (manifests, attempts, artifact files): works offline, without W&B or
Prefect. The page logic lives in dashboard/data.py; this file only lays it out.

Run directory, first found: the sidebar field, ?run_dir=... in the URL, `-- --run-dir DIR` after the
script on the streamlit command line, $RLHF_RUN_DIR, runs/demo.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` from anywhere
    sys.path.insert(0, str(ROOT))

from dashboard import data as D  # noqa: E402

PLOTLY_CONFIG = {"displaylogo": False}
COLORS = {"helpful": "#1f77b4", "safety": "#d62728", "gold": "#2ca02c", "reward": "#ff7f0e"}
ROUND_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d"]


def _cli_run_dir() -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run-dir")
    try:
        args, _ = parser.parse_known_args(sys.argv[1:])
    except SystemExit:
        return None
    return args.run_dir


def default_run_dir() -> str:
    qp = st.query_params.get("run_dir")
    return qp or _cli_run_dir() or os.environ.get("RLHF_RUN_DIR") or "runs/demo"


def guarded(title: str):
    """Render a section; a file being rewritten mid-read shows a warning, never a traceback."""
    def deco(fn):
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if type(e).__name__ in ("RerunException", "StopException"):
                    raise
                st.warning(f"{title}: could not read this part of the run yet ({type(e).__name__}: {e}). It refreshes on the next change.")
        return wrapper
    return deco


@st.cache_data(show_spinner=False, max_entries=32)
def cached(name: str, run_dir: str, sig: tuple, *args):
    """data.<name>(run_dir, *args), recomputed when the registry signature changes."""
    return getattr(D, name)(run_dir, *args)


def chart(fig: go.Figure, key: str, height: int = 340) -> None:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.2))
    st.plotly_chart(fig, key=key, config=PLOTLY_CONFIG)


def line(df: pd.DataFrame, x: str, series: dict[str, str], title: str, yrange=None, dash: dict | None = None) -> go.Figure:
    """One line per column; error bars from <col>_lo / <col>_hi (evaluate's 95% bootstrap intervals) where present."""
    fig = go.Figure()
    for col, name in series.items():
        if col in df.columns and df[col].notna().any():
            d = df[[x, col]].dropna()
            err = None
            lo, hi = f"{col}_lo", f"{col}_hi"
            if lo in df.columns and hi in df.columns:
                b = df.loc[d.index, [lo, hi]]
                err = dict(type="data", symmetric=False, array=(b[hi] - d[col]).clip(lower=0).fillna(0),
                           arrayminus=(d[col] - b[lo]).clip(lower=0).fillna(0), visible=True)
            fig.add_trace(go.Scatter(x=d[x], y=d[col], mode="lines+markers", name=name, error_y=err,
                                     line=dict(dash=(dash or {}).get(col, "solid"))))
    fig.update_layout(title=title, xaxis_title=x)
    if yrange:
        fig.update_yaxes(range=yrange)
    if x == "round":
        fig.update_xaxes(dtick=1)
    return fig


# ---------------------------------------------------------------------------------------------- sidebar

st.set_page_config(page_title="RLHF dashboard", layout="wide")

with st.sidebar:
    st.header("RLHF run")
    run_dir = st.text_input("Run directory", value=default_run_dir(), key="run_dir",
                            help="A run directory written by `rlhf run` (artifacts/, attempts/).").strip()
    auto = st.toggle("Auto-refresh", value=True, key="auto_refresh", help="Re-read the registry when a stage starts, fails or finishes.")
    every = st.number_input("Check every (s)", min_value=2, max_value=300, value=5, step=1, key="refresh_s", disabled=not auto)
    if st.button("Reload now", key="reload"):
        cached.clear()
    st.caption(f"Read at {time.strftime('%H:%M:%S')}. Reads the registry only; works offline.")


@st.fragment(run_every=float(every) if auto else None)
def watch(run_dir: str) -> None:
    """Rerun the whole page when the registry changes (a stage started, logged, failed or finished)."""
    sig = D.signature(run_dir)
    key = f"sig::{run_dir}"
    if key not in st.session_state:
        st.session_state[key] = sig
    elif st.session_state[key] != sig:
        st.session_state[key] = sig
        st.rerun(scope="app")


st.title("RLHF rounds")
watch(run_dir)
state, message = D.run_dir_state(run_dir)
if state != "ok":
    st.info(message)
    st.caption("Pick another run directory in the sidebar, or start the dashboard with `rlhf dashboard --run-dir DIR`.")
    st.stop()

SIG = D.signature(run_dir)
st.caption(f"Run directory `{run_dir}`")

tab_overview, tab_trends, tab_round, tab_samples, tab_lineage = st.tabs(
    ["Overview", "Trends across rounds", "Within a round", "Samples", "Lineage"])


# ---------------------------------------------------------------------------------------------- overview


@guarded("Overview")
def render_overview() -> None:
    for r in D.active(run_dir):
        what = f"Round {r['round']}: **{r['stage']}**"
        if r["status"] == "running":
            since = f" for {D.fmt_duration(time.time() - r['started_at'])}" if isinstance(r["started_at"], (int, float)) else ""
            st.info(f"{what} is running{since} (version `{r['version']}`).")
        elif r["status"] == "interrupted":
            st.warning(f"{what} was interrupted: {r['error']}. Resume it with "
                       f"`rlhf stage {r['stage']} --round {r['round']} --run-dir {run_dir}`.")
        else:
            st.error(f"{what} failed: {r['error'] or 'no reason recorded'}. Rerun it with "
                     f"`rlhf stage {r['stage']} --round {r['round']} --run-dir {run_dir}`.")
    ov = D.overview(run_dir)
    tr = cached("trends", run_dir, SIG)
    evaluated = tr[tr["round"] > 0].dropna(subset=["gold_helpfulness"]) if not tr.empty and "gold_helpfulness" in tr else pd.DataFrame()
    if not evaluated.empty:
        last = evaluated.iloc[-1]
        prev = evaluated.iloc[-2] if len(evaluated) > 1 else None
        st.subheader(f"Round {int(last['round'])} evaluation")
        cols = st.columns(5)
        gold_judged = pd.notna(last.get("gold_win_rate_vs_sft", float("nan")))
        judge = "gold" if gold_judged else "RM, optimised"
        wr = "gold_win_rate" if gold_judged else "rm_win_rate"
        cards = [("Gold helpfulness", "gold_helpfulness", "normal"), (f"Win rate vs SFT ({judge})", f"{wr}_vs_sft", "normal"),
                 (f"Win rate vs previous ({judge})", f"{wr}_vs_previous", "normal"),
                 ("Safety violation rate", "gold_safety_violation_rate", "inverse"), ("False refusal rate", "false_refusal_rate", "inverse")]
        for col, (label, key, color) in zip(cols, cards):
            v = last.get(key)
            if v is None or pd.isna(v):
                col.metric(label, "—")
                continue
            delta = None
            if prev is not None and key in prev and pd.notna(prev[key]) and not key.endswith("_vs_previous"):
                delta = f"{v - prev[key]:+.3f} vs round {int(prev['round'])}"
            lo, hi = last.get(f"{key}_lo"), last.get(f"{key}_hi")
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi) else ""
            col.metric(label, f"{v:.3f}{ci}", delta, delta_color=color, help="value [95% bootstrap interval over prompts]")
        if isinstance(last.get("better_than_sft"), bool):
            st.caption(f"Better than SFT: {'yes' if last['better_than_sft'] else 'not shown'} "
                       f"(claimed only when the 95% interval of the {judge}-judged win rate vs SFT lies above 0.5).")
        if bool(last.get("hacking_flag")):
            fired = last.get("hacking_tests")
            fired = f" Tests that fired: {fired}." if isinstance(fired, str) and fired else ""
            st.warning(f"Round {int(last['round'])}: reward rose while the gold score fell — possible reward hacking (see Trends).{fired}")
    st.subheader("Rounds")
    status_cols = [c for c in ov.columns if c not in D.EVAL_HEADLINE and c not in D.LEGACY_ALIASES and c != "errors"]
    table = ov[status_cols].copy()
    table["round"] = table["round"].map(lambda r: f"Round {r}")
    stage_cols = [c for c in table.columns if c in D.SHORT.values()]
    st.table(table.set_index("round").style.map(D.label_color, subset=stage_cols))
    metric_cols = ["round"] + [c for c in D.EVAL_HEADLINE if c in ov.columns]
    metrics = ov[metric_cols].copy()
    st.markdown("**Headline metrics** (round 0: the SFT model; rounds ≥ 1: evaluate)")
    st.dataframe(metrics, hide_index=True, column_config={
        c: st.column_config.NumberColumn(c.replace("_", " "), format="%.3f") for c in metric_cols
        if c not in ("round", "reward_hacking", "better_than_sft")})
    st.caption("done (duration) · running (for how long) · failed (reason) · not started · n/a: not part of this round "
               "(PPO and Ghost Attention start from a later round)")


# ---------------------------------------------------------------------------------------------- trends


@guarded("Trends")
def render_trends() -> None:
    tr = cached("trends", run_dir, SIG)
    if tr.empty or not (tr["round"] > 0).any():
        st.info("No RLHF round has finished a stage yet; trends appear after round 1.")
        return
    flagged = tr[tr["hacking_flag"]]
    for _, r in flagged.iterrows():
        prev = tr[(tr["round"] < r["round"]) & tr.get("mean_reward", pd.Series(dtype=float)).notna()].tail(1)
        detail = ""
        fired = r.get("hacking_tests")
        if isinstance(fired, str) and fired:  # evaluate's interval-based tests: metric, baseline, paired difference [95% CI]
            detail = f": the reward rose while these gold metrics got worse beyond their 95% interval — {fired}"
        elif not prev.empty and pd.notna(r.get("mean_reward")):
            p = prev.iloc[0]
            detail = (f": mean reward {p['mean_reward']:.3f} → {r['mean_reward']:.3f} while gold helpfulness "
                      f"{p['gold_helpfulness']:.3f} → {r['gold_helpfulness']:.3f}")
        st.warning(f"Possible reward hacking in round {int(r['round'])}{detail}.")
    if flagged.empty:
        st.success("No round where the reward rose while the gold score fell.")
    st.caption("Error bars: 95% bootstrap intervals over the evaluation prompts.")

    c1, c2 = st.columns(2)
    with c1:
        fig = line(tr, "round", {"gold_win_rate_vs_sft": "vs SFT (gold judge)", "gold_win_rate_vs_previous": "vs previous (gold judge)",
                                 "judge_win_rate_vs_sft": "vs SFT (external judge)",
                                 "judge_win_rate_vs_previous": "vs previous (external judge)",
                                 "rm_win_rate_vs_sft": "vs SFT (RM, optimised)", "rm_win_rate_vs_previous": "vs previous (RM, optimised)"},
                   "Win rate", [0, 1], dash={"rm_win_rate_vs_sft": "dot", "rm_win_rate_vs_previous": "dot"})
        fig.add_hline(y=0.5, line_dash="dot", line_color="gray")
        chart(fig, "win_rate")
    with c2:
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        d = tr[tr["round"] > 0]
        for col, name, color, sec in (("gold_helpfulness", "gold helpfulness", COLORS["gold"], False),
                                      ("rs_gold_helpfulness_selected", "gold of RS-selected", "#98df8a", False),
                                      ("mean_reward", "reward model (mean reward)", COLORS["reward"], True),
                                      ("rs_best_reward", "RS best reward", "#ffbb78", True)):
            if col in d and d[col].notna().any():
                dd = d[["round", col]].dropna()
                err = None
                if f"{col}_lo" in d and f"{col}_hi" in d:  # 95% bootstrap interval
                    b = d.loc[dd.index]
                    err = dict(type="data", symmetric=False, array=(b[f"{col}_hi"] - dd[col]).clip(lower=0).fillna(0),
                               arrayminus=(dd[col] - b[f"{col}_lo"]).clip(lower=0).fillna(0), visible=True)
                fig.add_trace(go.Scatter(x=dd["round"], y=dd[col], name=name, mode="lines+markers", line=dict(color=color),
                                         error_y=err), secondary_y=sec)
        if "gold_helpfulness" in tr and tr.loc[tr["round"] == 0, "gold_helpfulness"].notna().any():
            fig.add_hline(y=float(tr.loc[tr["round"] == 0, "gold_helpfulness"].iloc[0]), line_dash="dot", line_color=COLORS["gold"],
                          annotation_text="SFT gold")
        for _, r in flagged.iterrows():
            fig.add_vrect(x0=r["round"] - 0.3, x1=r["round"] + 0.3, fillcolor="red", opacity=0.12, line_width=0,
                          annotation_text="reward up, gold down", annotation_position="top left")
        fig.update_layout(title="Gold score beside reward-model score")
        fig.update_xaxes(dtick=1, title="round")
        fig.update_yaxes(title_text="gold", secondary_y=False)
        fig.update_yaxes(title_text="reward", secondary_y=True)
        chart(fig, "gold_vs_reward")
    c3, c4 = st.columns(2)
    with c3:
        chart(line(tr, "round", {"gold_safety_violation_rate": "safety violation rate", "false_refusal_rate": "false refusal rate"},
                   "Safety: violations and false refusals (round 0 = SFT)", [0, None]), "safety")
    with c4:
        chart(line(tr, "round", {"rm_accuracy_helpful": "helpful RM", "rm_accuracy_safety": "safety RM",
                                 "reward_model_helpful_accuracy": "helpful RM (own eval)", "reward_model_safety_accuracy": "safety RM (own eval)"},
                   "Reward model accuracy", [0.4, 1],
                   dash={"reward_model_helpful_accuracy": "dot", "reward_model_safety_accuracy": "dot"}), "rm_acc")
    c5, c6 = st.columns(2)
    with c5:
        by = cached("rm_accuracy_by_strength", run_dir, SIG)
        if by.empty:
            st.info("No per-strength reward model accuracy yet.")
        else:
            fig = make_subplots(rows=1, cols=2, subplot_titles=("helpful RM", "safety RM"), shared_yaxes=True)
            for i, model in enumerate(("helpful", "safety"), start=1):
                for rd, g in by[by["model"] == model].groupby("round"):
                    fig.add_trace(go.Bar(x=g["strength"].str.replace("_", " "), y=g["accuracy"], name=f"round {rd}",
                                         marker_color=ROUND_COLORS[int(rd) % len(ROUND_COLORS)],
                                         legendgroup=f"r{rd}", showlegend=(i == 1)), row=1, col=i)
            fig.update_layout(title="RM accuracy by preference strength", barmode="group")
            fig.update_yaxes(range=[0.4, 1])
            chart(fig, "rm_strength")
    with c6:
        ga = cached("gatt_adherence", run_dir, SIG)
        if ga.empty:
            st.info("No Ghost Attention adherence measured yet.")
        else:
            fig = go.Figure()
            dashes = {"evaluate": "solid", "GAtt before": "dot", "GAtt after": "dash"}
            for (rd, source), g in ga.groupby(["round", "source"]):
                fig.add_trace(go.Scatter(x=g["turn"], y=g["adherence"], mode="lines+markers", name=f"round {rd} {source}",
                                         line=dict(dash=dashes.get(source, "dot"), color=ROUND_COLORS[int(rd) % len(ROUND_COLORS)])))
            fig.update_layout(title="System-instruction adherence by dialogue turn", xaxis_title="turn")
            fig.update_yaxes(range=[0, 1.05])
            fig.update_xaxes(dtick=1)
            chart(fig, "gatt")
    with st.expander("All trend metrics"):
        st.dataframe(tr, hide_index=True)


# ---------------------------------------------------------------------------------------------- one round


@guarded("Within a round")
def render_round() -> None:
    rounds = cached("rounds_of", run_dir, SIG)
    if not rounds:
        st.info("No finished stage yet.")
        return
    running = [r["round"] for r in D.active(run_dir) if r["status"] == "running"]
    rounds = sorted(set(rounds) | set(running))
    rd = st.selectbox("Round", rounds, index=len(rounds) - 1, format_func=lambda r: f"Round {r}", key="detail_round")
    shown = False
    if rd == 0:
        h = cached("history", run_dir, SIG, "sft", 0)
        if not h.empty and "loss" in h:
            shown = True
            fig = make_subplots(specs=[[{"secondary_y": True}]])
            fig.add_trace(go.Scatter(x=h["step"], y=h["loss"], name="loss"))
            if "lr" in h:
                fig.add_trace(go.Scatter(x=h["step"], y=h["lr"], name="learning rate", line=dict(dash="dot")), secondary_y=True)
            fig.update_layout(title="SFT training loss")
            chart(fig, "sft_loss")
    else:
        c1, c2 = st.columns(2)
        with c1:
            rvk = cached("reward_vs_k", run_dir, SIG, rd)
            if not rvk.empty:
                shown = True
                fig = go.Figure()
                for stat, g in rvk.groupby("statistic"):
                    fig.add_trace(go.Scatter(x=g["k"], y=g["reward"], mode="lines+markers", name=f"{stat} reward"))
                fig.update_layout(title=f"Rejection sampling: reward vs K (round {rd})", xaxis_title="K samples per prompt")
                fig.update_xaxes(type="log", tickvals=sorted(rvk["k"].unique()))
                chart(fig, "rvk")
        with c2:
            fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
            any_rm = False
            for rm, color in (("reward_model_helpful", COLORS["helpful"]), ("reward_model_safety", COLORS["safety"])):
                h = cached("history", run_dir, SIG, rm, rd)
                for i, col in enumerate(("loss", "accuracy"), start=1):
                    if not h.empty and col in h:
                        any_rm = True
                        fig.add_trace(go.Scatter(x=h["step"], y=h[col], name=rm.replace("reward_model_", "RM "), line=dict(color=color),
                                                 legendgroup=rm, showlegend=(i == 1)), row=1, col=i)
            if any_rm:
                shown = True
                fig.update_layout(title="Reward model training")
                chart(fig, "rm_curves")
        h = cached("history", run_dir, SIG, "ppo", rd)
        if not h.empty:
            shown = True
            panels = [c for c in ("reward", "kl", "entropy", "clip_frac", "response_length", "gold_helpfulness") if c in h]
            ncols = 3
            nrows = (len(panels) + ncols - 1) // ncols
            fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[p.replace("_", " ") for p in panels])
            for i, p in enumerate(panels):
                fig.add_trace(go.Scatter(x=h["step"], y=h[p], name=p, showlegend=False), row=i // ncols + 1, col=i % ncols + 1)
            live = D.artifact(run_dir, "ppo", rd) is None
            fig.update_layout(title=f"PPO per step (round {rd}){' — live, still running' if live else ''}")
            chart(fig, "ppo", height=260 * nrows)
            extra = [c for c in h.columns if c not in panels and c not in ("step", "time")]
            if extra:
                pick = st.multiselect("More PPO series", extra, key="ppo_extra")
                if pick:
                    chart(line(h, "step", {c: c for c in pick}, "PPO"), "ppo_extra_chart")
    table = D.stage_table(run_dir)
    rows = table[table["round"] == rd]
    st.markdown(f"**Stages of round {rd}**")
    for _, r in rows.iterrows():
        if r["status"] in ("not started", "not in round"):
            continue
        with st.expander(f"{r['stage']} — {D.stage_label(r)}", expanded=False):
            if r["error"]:
                st.error(r["error"])
            flat = [{"metric": k, "value": D.fmt(v)} for k, v in D.iter_flat(r["metrics"] or {})]
            if flat:
                st.table(pd.DataFrame(flat).set_index("metric"))
            if r["version"]:
                st.caption(f"version `{r['version']}` · {r['path']}")
    if not shown:
        st.info(f"No training curves for round {rd} yet.")


# ---------------------------------------------------------------------------------------------- samples


@guarded("Samples")
def render_samples() -> None:
    st.subheader("Rejection sampling: K candidates per prompt")
    rs_rounds = cached("rounds_of", run_dir, SIG, "rejection_sampling")
    if not rs_rounds:
        st.info("No rejection sampling round has finished yet.")
    else:
        c1, c2, c3 = st.columns([1, 1, 2])
        rd = c1.selectbox("Round", rs_rounds, index=len(rs_rounds) - 1, format_func=lambda r: f"Round {r}", key="rs_round")
        safety_only = c2.toggle("Safety prompts only", key="rs_safety")
        query = c3.text_input("Search prompts", key="rs_query")
        samples = cached("rs_samples", run_dir, SIG, rd, safety_only, query)
        if not samples:
            st.info("No prompt matches.")
        else:
            labels = [f"{s['prompt_id']}{' [safety]' if s['is_safety'] else ''} — {s['prompt_text'][:90]}" for s in samples]
            i = st.selectbox(f"Prompt ({len(samples)})", range(len(samples)), format_func=lambda j: labels[j], key="rs_prompt")
            s = samples[i]
            for m in s["messages"] if isinstance(s["messages"], list) else []:
                if isinstance(m, dict) and m.get("role") in ("system", "user"):
                    with st.chat_message("user" if m["role"] == "user" else "assistant", avatar=None):
                        st.markdown(f"*{m['role']}:* {m.get('content', '')}")
            cands = s["candidates"]
            if not cands.empty:
                st.dataframe(cands.drop(columns=["text"]), hide_index=True, column_config={
                    "kept": st.column_config.CheckboxColumn("kept"),
                    **{c: st.column_config.NumberColumn(c, format="%.3f") for c in ("reward", "r_helpful", "r_safety", "gold_helpfulness")}})
                for _, c in cands.iterrows():
                    head = ((f":green[**#{c['#']} — kept**]" if c["kept"] else f"**#{c['#']}**") + f" · reward {D.fmt(c['reward'])} · "
                            f"helpful {D.fmt(c['r_helpful'])} · safety {D.fmt(c['r_safety'])} · T={D.fmt(c['temperature'])}")
                    if "gold_helpfulness" in c:
                        head += f" · gold {D.fmt(c['gold_helpfulness'])}"
                    if "gold_safe" in c and pd.notna(c["gold_safe"]) and not bool(c["gold_safe"]):
                        head += " · gold: unsafe"
                    box = st.container(border=True)
                    box.markdown(head)
                    box.text(str(c["text"]))

    st.subheader("One prompt across rounds (evaluation samples)")
    samples = cached("eval_samples", run_dir, SIG)
    if samples.empty:
        st.info("No evaluation samples yet (evaluate runs at the end of each round).")
        return
    c1, c2 = st.columns([1, 3])
    safety_only = c1.toggle("Safety prompts only", key="ev_safety")
    prompts = D.eval_prompts(run_dir, safety_only) if safety_only else cached("eval_prompts", run_dir, SIG)
    if prompts.empty:
        st.info("No prompt matches.")
        return
    ids = list(prompts["prompt_id"])
    text = dict(zip(prompts["prompt_id"], prompts["prompt_text"]))
    rounds = dict(zip(prompts["prompt_id"], prompts["rounds"]))
    pid = c2.selectbox("Prompt", ids, key="ev_prompt",
                       format_func=lambda p: f"{p} — {text[p][:90]} (rounds {', '.join(map(str, rounds[p]))})")
    cmp_ = D.compare_prompt(run_dir, pid, samples)
    st.markdown(f"> {text[pid]}")
    if len(cmp_):
        st.dataframe(cmp_[["round", "category", "reward", "r_helpful", "r_safety", "gold_helpfulness", "gold_safe"]], hide_index=True)
    for _, r in cmp_.iterrows():
        box = st.container(border=True)
        box.markdown(f"**Round {r['round']}** · reward {D.fmt(r['reward'])} · helpful {D.fmt(r['r_helpful'])} · "
                     f"safety {D.fmt(r['r_safety'])} · gold {D.fmt(r['gold_helpfulness'])}"
                     + (" · gold: unsafe" if pd.notna(r["gold_safe"]) and not bool(r["gold_safe"]) else ""))
        box.text(str(r["response"]))


# ---------------------------------------------------------------------------------------------- lineage


@guarded("Lineage")
def render_lineage() -> None:
    arts = cached("artifacts", run_dir, SIG)
    if arts.empty:
        st.info("No complete artifact yet.")
        return
    only_newest = st.toggle("Newest version of each stage only", value=True, key="lin_newest")
    view = arts[arts["newest"]] if only_newest else arts
    options = list(view["version"])
    label = {r["version"]: f"{r['stage']} · round {r['round']} · {r['version']}" for _, r in view.iterrows()}
    default = len(options) - 1
    evals = [i for i, v in enumerate(options) if label[v].startswith("evaluate")]
    if evals:
        default = evals[-1]
    version = st.selectbox("Artifact", options, index=default, format_func=lambda v: label[v], key="lin_version")
    links = D.links(run_dir, version)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Tracking and orchestration**")
        if links.get("wandb_url"):
            st.markdown(f"W&B run: [{links['wandb_url']}]({links['wandb_url']})")
        if links.get("prefect_flow_run_url"):
            st.markdown(f"Prefect flow run: [{links['prefect_flow_run_url']}]({links['prefect_flow_run_url']})")
        elif links.get("prefect_flow_run_id"):
            st.markdown(f"Prefect flow run id: `{links['prefect_flow_run_id']}`")
        for d in links.get("wandb_offline", []):
            st.markdown(f"W&B offline run: `{d}` (upload with `rlhf sync --run-dir {run_dir}`)")
        if not links:
            st.caption("No W&B or Prefect link recorded for this artifact (tracking off or offline).")
    tree = D.lineage(run_dir, version)
    with c2:
        st.markdown("**Built from (direct inputs)**")
        direct = [{"role": c["role"], "stage": c["stage"], "round": c["round"], "version": c["version"],
                   "present": "missing" if c.get("missing") else "yes"} for c in (tree or {}).get("inputs", [])]
        if direct:
            st.dataframe(pd.DataFrame(direct), hide_index=True)
        else:
            st.caption("No inputs (a root artifact).")
    st.markdown("**Full lineage**")
    st.code(D.lineage_text(tree) or "(not found)", language=None)
    with st.expander("Manifest"):
        st.json(D.manifest_summary(run_dir, version), expanded=1)


with tab_overview:
    render_overview()
with tab_trends:
    render_trends()
with tab_round:
    render_round()
with tab_samples:
    render_samples()
with tab_lineage:
    render_lineage()
