"""Stage `ghost_attention(r)`: Ghost Attention multi-turn data synthesis (Llama 2 sec. 3.3).

    rlhf stage ghost_attention --round 3

1. Synthetic instructions (hobby, language, public figure, style), randomly combined.
2. Multi-turn dialogues: the instruction is attached to EVERY user message and the assistant turns
   are sampled from the latest RLHF policy (`synthesis: attach_to_user`, the paper's default).
   `synthesis: fresh_context` instead samples each reply in a one-turn context with the instruction
   as its system message: single-turn distillation of system-message obedience, not the paper's method.
   Nothing is filtered by default (the paper filters nothing); `filter: checker` keeps the dialogues
   whose last reply passes `filter_checker`, a user-supplied rule, never the adherence grader.
3. Training data: the instruction is kept only in the first turn, as the system message (half the
   time in its short form, "Figure: Napoleon."); the loss is zero on every earlier turn, assistant
   messages included, so only the last assistant turn is trained on.
4. Adherence per turn, before and after, on held-out dialogues: with the training instruction
   values, and with held-out values (`*_unseen`).
"""
from __future__ import annotations

import importlib
import random
from typing import Callable, Sequence

from pipeline.chat import encode_dialogue
from pipeline.context import StageContext, StageFailed
from pipeline.distributed import load_device
from pipeline.io import write_json, write_jsonl
from pipeline.models import save_policy

from data_specs.schemas import GattInstruction

from .common import demo_oracle, load_data, policy_sampler, sample_replies, sharded_inference, trained_sampler
from .generation import engine_for
from .trainer import apply_lora, load_trainable, merge_lora, pack_examples, train_causal_lm

Checker = Callable[[Sequence[GattInstruction], str], bool]


def combine_instructions(pool: Sequence[GattInstruction], max_n: int, rng: random.Random) -> list[GattInstruction]:
    """1..max_n instructions from different categories, randomly combined (sec. 3.3)."""
    by_cat: dict[str, list[GattInstruction]] = {}
    for ins in pool:
        by_cat.setdefault(ins.category, []).append(ins)
    cats = rng.sample(sorted(by_cat), k=min(len(by_cat), rng.randint(1, max_n)))
    return [rng.choice(by_cat[c]) for c in cats]


def system_message(instructions: Sequence[GattInstruction], short: bool) -> str:
    return " ".join((i.short or i.text) if short else i.text for i in instructions)


def with_instruction(user: str, instructions: Sequence[GattInstruction]) -> str:
    """The synthesis-time user message: the instruction attached to it."""
    return f"{' '.join(i.text for i in instructions)} {user}"


def synthesis_context(instructions, users: Sequence[str], replies: Sequence[str], mode: str) -> list[dict]:
    """What the model sees when it writes the reply to users[-1] at synthesis time.

    attach_to_user (the paper): the whole dialogue so far, the instruction attached to every user
    message. fresh_context: the instruction as the system message of a one-turn context, for
    models that only learned to obey a system message (the demo's tiny Llama, see the README)."""
    if mode == "fresh_context":
        return [{"role": "system", "content": system_message(instructions, short=False)}, {"role": "user", "content": users[-1]}]
    msgs = []
    for u, a in zip(users[:-1], replies):
        msgs += [{"role": "user", "content": with_instruction(u, instructions)}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": with_instruction(users[-1], instructions)}]


def training_dialogue(system: str, users: Sequence[str], replies: Sequence[str]) -> list[dict]:
    """Instruction only in the first turn (system message); plain user turns after it."""
    msgs = [{"role": "system", "content": system}]
    for u, a in zip(users, replies):
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


def load_checker(spec: str) -> Checker:
    """A 'module:function' checker."""
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def get_filter(cfg) -> Checker | None:
    """The training-data filter named in the config (`filter: checker` + `filter_checker`), or None.
    Deliberately never the gold oracle: the grader of adherence must not choose the training data."""
    if cfg.filter == "none":
        return None
    if not cfg.filter_checker:
        raise StageFailed("ghost_attention.filter: checker needs ghost_attention.filter_checker")
    return load_checker(cfg.filter_checker)


def get_checker(ctx: StageContext) -> Checker | None:
    """The adherence GRADER (before/after metrics, evaluate): `checker`, else the demo's gold oracle."""
    spec = ctx.config.ghost_attention.checker
    if spec:
        return load_checker(spec)
    oracle = demo_oracle(ctx)
    if oracle is None:
        return None
    return lambda instructions, reply: all(oracle.obeys(i, reply) for i in instructions)


def user_pool(ctx: StageContext, name: str = "prompts.jsonl") -> list[str]:
    """Single-turn helpful user messages to build dialogues from (eval_prompts.jsonl for held-out dialogues)."""
    users = [p.messages[0].content for p in load_data(ctx, name, "prompt") if not p.is_safety and len(p.messages) == 1]
    if not users:
        raise StageFailed(f"ghost_attention needs single-turn, non-safety prompts in {name}")
    return users


def adherence_by_turn(model, tok, instructions_pool, users: Sequence[str], turns: int, n_dialogues: int, checker: Checker, seed: int,
                      max_new_tokens: int, progress=None) -> list[float]:
    """Share of replies obeying the system instruction at each turn 1..turns (greedy replies;
    the instruction is only in the system message, as at deployment). progress(k): k dialogues answered."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n_dialogues):
        ins = combine_instructions(instructions_pool, 1, rng)
        convs.append((ins, [{"role": "system", "content": system_message(ins, short=False)}]))
    picked = [rng.choice(users) for _ in range(n_dialogues * turns)]
    obeyed = [0] * turns
    for t in range(turns):
        for k, (_, msgs) in enumerate(convs):
            msgs.append({"role": "user", "content": picked[k * turns + t]})
        replies = sample_replies(model, tok, [m for _, m in convs], 1, max_new_tokens, 0.0, seed + t, progress=progress)
        for (ins, msgs), r in zip(convs, replies):
            msgs.append({"role": "assistant", "content": r[0] or "..."})
            obeyed[t] += checker(ins, r[0])
    return [o / max(1, n_dialogues) for o in obeyed]


def late(adherence: Sequence[float], from_turn: int = 5) -> float:
    """Mean adherence at turns >= from_turn (or the later half when the dialogue is shorter)."""
    tail = adherence[from_turn - 1 :] if len(adherence) >= from_turn else adherence[len(adherence) // 2 :]
    return sum(tail) / max(1, len(tail))


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    rng = random.Random(ctx.seed)
    pool = [i for i in load_data(ctx, "gatt_train.jsonl", "gatt") if i.category in cfg.categories]
    eval_pool = [i for i in load_data(ctx, "gatt_eval.jsonl", "gatt") if i.category in cfg.categories] or pool
    if not pool:
        raise StageFailed(f"no GAtt instructions in categories {cfg.categories}")
    checker = get_checker(ctx)
    keep = get_filter(cfg)
    # the policy samples first; with hardware.shard_inference from a copy sharded over the ranks, and the model to
    # fine-tune is loaded only once that copy is freed
    sharded = sharded_inference(ctx)
    model, tok = policy_sampler(ctx, cfg, ctx.input("policy").path) if sharded else load_trainable(ctx.input("policy").path, cfg.lora, ctx.device)

    users = user_pool(ctx)
    held_out_users = user_pool(ctx, "eval_prompts.jsonl")

    def adherence(m, instructions, what):  # held-out dialogues, greedy replies, instruction only in the system message
        if not checker:
            return []
        bar = ctx.progress((cfg.turns + 2) * cfg.eval_dialogues, f"adherence {what}", unit="reply")
        try:
            return adherence_by_turn(m, tok, instructions, held_out_users, cfg.turns + 2, cfg.eval_dialogues, checker, ctx.seed + 1,
                                     cfg.max_new_tokens, progress=bar.update)
        finally:
            bar.close()

    before, before_unseen = adherence(model, pool, "before"), adherence(model, eval_pool, "before, unseen values")

    # synthesis: instruction attached to every user message, replies sampled turn by turn, batched
    dialogs = []
    for _ in range(cfg.n_dialogues):
        ins = combine_instructions(pool, cfg.max_instructions, rng)
        n_turns = rng.randint(2, cfg.turns)
        dialogs.append({"instructions": ins, "users": [rng.choice(users) for _ in range(n_turns)], "replies": [],
                        "short": rng.random() < cfg.shorten_prob})
    sampler = model if sharded else engine_for(cfg, model, ctx.input("policy").path)  # sharded: already the engine
    bar = ctx.progress(cfg.turns, "synthesize turns", unit="turn")
    for t in range(cfg.turns):
        active = [d for d in dialogs if len(d["users"]) > t]
        convs = [synthesis_context(d["instructions"], d["users"][: t + 1], d["replies"], cfg.synthesis) for d in active]
        replies = sample_replies(sampler, tok, convs, 1, cfg.max_new_tokens, cfg.temperature, ctx.seed + 100 + t,
                                 top_p=cfg.generation.top_p, max_batch_tokens=cfg.generation.max_batch_tokens)
        for d, r in zip(active, replies):
            d["replies"].append(r[0] or "...")
        bar.update(1)
    bar.close()

    records, kept = [], []
    for d in dialogs:
        obeys = checker(d["instructions"], d["replies"][-1]) if checker else None  # measured only, never a filter
        passes = keep(d["instructions"], d["replies"][-1]) if keep else None
        msgs = training_dialogue(system_message(d["instructions"], d["short"]), d["users"], d["replies"])
        records.append({"messages": msgs, "instructions": [i.model_dump() for i in d["instructions"]], "last_reply_obeys": obeys,
                        "passes_filter": passes})
        if passes is not False:
            kept.append(msgs)
    write_jsonl(ctx.out_dir / "gatt_dialogues.jsonl", records)
    filter_fallback = not kept
    if filter_fallback:  # a model too weak to obey even with the instruction in every turn: train on all, and say so
        kept = [r["messages"] for r in records]
    examples = [encode_dialogue(tok, m, train_on="last") for m in kept]  # loss only on the last assistant turn
    rows = pack_examples(examples, cfg.seq_len, tok.pad_token_id)
    if sharded:
        del sampler, model
        model, tok = load_trainable(ctx.input("policy").path, cfg.lora, load_device(ctx.config, ctx.device))
    model = apply_lora(model, cfg.lora, ctx.device)
    train = train_causal_lm(model, rows, [], cfg, ctx, seed=ctx.seed)
    model = merge_lora(model).eval()
    save_policy(model, tok, ctx.out_dir, dtype=ctx.artifact_dtype)

    trained = trained_sampler(ctx, model) if checker else model  # too big for one device: a sharded copy of the saved one
    after, after_unseen = adherence(trained, pool, "after"), adherence(trained, eval_pool, "after, unseen values")
    metrics = {
        "n_dialogues": len(dialogs),
        "n_trained": len(kept),
        "filter": cfg.filter if cfg.filter == "none" else f"checker:{cfg.filter_checker}",
        "synthesis": cfg.synthesis,
        "filter_fallback": filter_fallback,
        "share_obeying_samples": sum(r["last_reply_obeys"] is True for r in records) / len(records),  # by the grader
        "train_loss": train["train_loss"],
        "resumed_from_step": train["resumed_from_step"],
    }
    if checker:
        metrics.update({"adherence_by_turn_before": before, "adherence_by_turn_after": after,
                        "adherence_late_before": late(before), "adherence_late_after": late(after),
                        "adherence_by_turn_unseen_before": before_unseen, "adherence_by_turn_unseen_after": after_unseen,
                        "adherence_late_unseen_before": late(before_unseen), "adherence_late_unseen_after": late(after_unseen)})
    write_json(ctx.out_dir / "adherence.json", {k: v for k, v in metrics.items() if k.startswith("adherence")})
    return metrics
