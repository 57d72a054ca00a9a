"""Stage `data` (round 0): every dataset the pipeline reads, as files in our own format.

    rlhf stage data

With `data.source: demo` it writes the embedded demo world (the generator is seeded, so the same
seed gives byte-identical files). With `data.source: files` it loads each configured file through
the same loaders `rlhf data validate` uses, fails on any bad record (file, line, field, reason)
before anything is written, and stores the validated records. Later stages read only this artifact.
"""
from __future__ import annotations

import shutil

from pipeline.context import StageContext, StageFailed
from pipeline.io import write_json

from .loaders import DataValidationError, load_records, summarize, write_records

# artifact file -> (config field under `data`, record kind)
FILES = {
    "sft.jsonl": ("sft", "sft"),
    "prompts.jsonl": ("prompts", "prompt"),
    "eval_prompts.jsonl": ("eval_prompts", "prompt"),
    "eval_comparisons.jsonl": ("eval_comparisons", "preference"),
    "gatt_train.jsonl": ("gatt_instructions", "gatt"),
}


def run(ctx: StageContext) -> dict:
    data = ctx.config.data
    if data.source == "demo":
        from .demo.generate import write_demo_data

        write_demo_data(ctx.out_dir, seed=ctx.config.seed, n_sft=data.demo_n_sft, n_train_prompts=data.demo_n_train_prompts,
                        n_eval_prompts=data.demo_n_eval_prompts, n_pretrain_docs=data.demo_n_pretrain_docs,
                        sft_ramble_frac=data.demo_sft_ramble_frac)
    else:
        loaded = {}
        problems = []
        for name, (field, kind) in FILES.items():
            src = getattr(data, field)
            if src is None:
                if field in ("sft", "prompts", "eval_prompts"):
                    problems.append(f"data.{field} is required when data.source is 'files'")
                continue
            try:
                loaded[name] = load_records(src.path, kind, format=src.format, field_map=src.field_map or None, split=src.split)
            except DataValidationError as e:
                problems.append(f"data.{field} ({src.path}):\n{e}")
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
    metrics["n_sft"] = metrics.get("n_sft", 0)
    metrics["n_prompts"] = metrics.get("n_prompts", 0)
    metrics["source"] = data.source
    return metrics
