"""Helpers the policy stages share: reading the data artifact, sampling replies, gold scoring."""
from __future__ import annotations

import random
from typing import Sequence

from pipeline.chat import decode_response, encode_prompt, stop_token_ids
from pipeline.context import StageContext
from pipeline.io import read_json

from data_specs.schemas import Prompt, messages_to_dicts


def load_data(ctx: StageContext, name: str, kind: str) -> list:
    """Records of one file of the `data` artifact (already validated by the `data` stage)."""
    from data_specs.loaders import load_records

    path = ctx.input("data").file(name)
    return load_records(path, kind, format="own") if path.exists() else []


def demo_oracle(ctx: StageContext):
    """The demo world's gold oracle, or None for user data."""
    info = ctx.input("data").file("world.json")
    if ctx.config.data.source != "demo" or not info.exists():
        return None
    from data_specs.demo.oracle import Oracle
    from data_specs.demo.world import DemoWorld

    return Oracle(DemoWorld(seed=read_json(info).get("seed", ctx.config.seed)))


def subsample(records: Sequence, n: int, seed: int) -> list:
    records = list(records)
    if n >= len(records):
        return records
    return random.Random(seed).sample(records, n)


def sharded_inference(ctx: StageContext) -> bool:
    """Whether this stage's frozen models are sharded over the ranks (`hardware.shard_inference`, several processes)."""
    from pipeline.distributed import world

    return ctx.config.hardware.shard_inference and world().distributed


def load_frozen_policy(ctx: StageContext, path):
    """(model, tokenizer) of a policy a stage only samples from or scores with, in the inference dtype: whole on the
    device, or with `hardware.shard_inference` FSDP2-sharded over the ranks (`pipeline.distributed.load_sharded`: rank 0
    reads it, every rank keeps a shard); every rank must then make the same calls with it (the same inputs, or
    `ShardedBackend` and the scorer's lockstep)."""
    from pipeline.models import load_policy

    if not sharded_inference(ctx):
        return load_policy(path, ctx.device, dtype=ctx.inference_dtype)
    from transformers import AutoTokenizer

    from pipeline.distributed import load_sharded

    model = load_sharded(lambda where: load_policy(path, where, dtype=ctx.inference_dtype)[0], ctx.device)
    return model, AutoTokenizer.from_pretrained(str(path))


def policy_sampler(ctx: StageContext, section, path):
    """(what to sample with, tokenizer) for a policy a stage only samples from: our engine on the whole model, vLLM
    (`generation.backend`), or with `hardware.shard_inference` the model sharded over the ranks, each sampling its share
    of the prompts (`ShardedBackend`)."""
    from .generation import ShardedBackend, engine_for

    model, tok = load_frozen_policy(ctx, path)
    if sharded_inference(ctx):
        return ShardedBackend(model, tok.pad_token_id, section.generation.max_batch_tokens), tok
    return engine_for(section, model, path), tok


def trained_sampler(ctx: StageContext, model):
    """What a stage samples with from the model it has just trained and saved in its output folder: the model itself;
    or, when it is too big for one device (`pipeline.distributed.big_model`: rank 0 holds it in host memory, the other
    ranks nothing), a copy read back from rank 0's folder, sharded over the ranks, every rank sampling the same prompts
    in lockstep (the outputs of one process)."""
    from pipeline.distributed import big_model, from_main

    if not big_model(ctx.config):
        return model
    from .generation import ShardedBackend

    model, tok = load_frozen_policy(ctx, from_main(str(ctx.out_dir)))
    return ShardedBackend(model, tok.pad_token_id, split=False)


def sample_replies(model, tok, dialogues: Sequence[Sequence[dict]], n: int, max_new_tokens: int, temperature: float, seed: int,
                   top_p: float = 1.0, progress=None, max_batch_tokens: int = 16384) -> list[list[str]]:
    """n replies per dialogue (lists of {"role", "content"}), through the one generation interface: `model` is a
    causal LM (our engine on transformers) or a VLLMBackend (`generation.engine_for`)."""
    from .generation import SamplingParams, generate

    prompts = [encode_prompt(tok, d) for d in dialogues]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop_token_ids=stop_token_ids(tok), seed=seed)
    outs = generate(model, prompts, params, n=n, pad_token_id=tok.pad_token_id, progress=progress, max_batch_tokens=max_batch_tokens)
    return [[decode_response(tok, ids) for ids in per_prompt] for per_prompt in outs]


def gold_report(oracle, prompts: Sequence[Prompt], replies: Sequence[str]) -> dict:
    """Gold helpfulness, safety-violation rate on safety prompts, false-refusal rate on borderline prompts."""
    helpful = [oracle.helpfulness(p, r) for p, r in zip(prompts, replies)]
    safety = [(p, r) for p, r in zip(prompts, replies) if p.is_safety]
    borderline = [(p, r) for p, r in zip(prompts, replies) if p.category == "borderline"]
    return {
        "gold_helpfulness": sum(helpful) / max(1, len(helpful)),
        "gold_safety_violation_rate": sum(not oracle.is_safe(p, r) for p, r in safety) / max(1, len(safety)),
        "false_refusal_rate": sum(oracle.is_refusal(r) for _, r in borderline) / max(1, len(borderline)),
    }


def dialogues(prompts: Sequence[Prompt]) -> list[list[dict]]:
    return [messages_to_dicts(p.messages) for p in prompts]
