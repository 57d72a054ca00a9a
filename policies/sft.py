"""Stage `sft`: supervised fine-tuning of the round-0 checkpoint (Llama 2 sec. 3.1).

    rlhf stage sft [--set sft.learning_rate=2e-5]

Prompt and answer are formatted with the chat template; the loss is on answer tokens only;
examples are packed to `seq_len` with EOS separators and attention kept inside each example;
cosine schedule, weight decay; full fine-tuning or LoRA. Resumes from its last checkpoint.
"""
from __future__ import annotations

from pipeline.chat import encode_dialogue
from pipeline.context import StageContext
from pipeline.distributed import load_device
from pipeline.models import save_policy

from data_specs.schemas import messages_to_dicts

from .common import demo_oracle, dialogues, gold_report, load_data, sample_replies, subsample, trained_sampler
from .trainer import apply_lora, load_trainable, merge_lora, pack_examples, train_causal_lm


def build_rows(tok, examples, seq_len: int, eval_fraction: float, seed: int):
    """Encode dialogues (answer-only labels) and pack them; a seeded slice is held out."""
    import random

    encoded = [encode_dialogue(tok, messages_to_dicts(e.messages), train_on="last") for e in examples]
    random.Random(seed).shuffle(encoded)
    n_eval = int(len(encoded) * eval_fraction)
    return pack_examples(encoded[n_eval:], seq_len, tok.pad_token_id), pack_examples(encoded[:n_eval], seq_len, tok.pad_token_id)


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    model, tok = load_trainable(ctx.input("base").path, cfg.lora, load_device(ctx.config, ctx.device))  # big: host, then sharded
    examples = load_data(ctx, "sft.jsonl", "sft")
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    train_rows, eval_rows = build_rows(tok, examples, cfg.seq_len, cfg.eval_fraction, ctx.seed)
    model = apply_lora(model, cfg.lora, ctx.device)
    metrics = train_causal_lm(model, train_rows, eval_rows, cfg, ctx, seed=ctx.seed)
    model = merge_lora(model).eval()
    save_policy(model, tok, ctx.out_dir, dtype=ctx.artifact_dtype)
    metrics.update({"n_examples": len(examples), "packed_rows": len(train_rows)})
    metrics.update(gold_metrics(ctx, model, tok))
    return metrics


def gold_metrics(ctx: StageContext, model, tok, n: int | None = None) -> dict:
    """Demo only: gold scores on held-out prompts, sampled the way `evaluate` samples (so the SFT
    row of the report is comparable), and of greedy answers."""
    oracle = demo_oracle(ctx)
    if oracle is None:
        return {}
    model = trained_sampler(ctx, model)  # a model too big for one device: a sharded copy of the saved one
    ev = ctx.config.evaluate
    prompts = subsample(load_data(ctx, "eval_prompts.jsonl", "prompt"), n or ev.n_prompts, ctx.config.seed)
    replies = [r[0] for r in sample_replies(model, tok, dialogues(prompts), 1, ev.max_new_tokens, ev.temperature, ctx.config.seed)]
    greedy = [r[0] for r in sample_replies(model, tok, dialogues(prompts), 1, ev.max_new_tokens, 0.0, ctx.config.seed)]
    return {**gold_report(oracle, prompts, replies), "gold_helpfulness_greedy": gold_report(oracle, prompts, greedy)["gold_helpfulness"]}
