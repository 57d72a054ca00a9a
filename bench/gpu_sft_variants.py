"""Where an SFT step's GPU time goes: the `sft` training step of `policies/trainer.py`, timed in variants.

    python bench/gpu_sft_variants.py --shape llama-1b          # on a machine with a CUDA GPU
    python bench/gpu_sft_variants.py --shape tiny --device cpu --steps 2 --variants base fused   # checks it runs

The step is the stage's own (packed rows of `pack_examples`, `collate`, `token_loss_sum` under bf16 autocast,
`Sharded.backward`/`step`), on a random-weight Llama of a `bench/gpu_smoke.py` shape and synthetic examples of
60-400 tokens packed to 2048. Variants change one thing each:

* `base`: what the stage does today (float32 weights, bf16 autocast, SDPA with the packed block-diagonal mask,
  AdamW's default for-each kernels);
* `fused`: AdamW with `fused=True`;
* `compile`: each decoder block compiled (`sft.compile`, `pipeline.distributed.compile_layers`);
* `compile_fused`: both;
* `compile_flex`: compiled blocks and flex attention (not yet measured: the next GPU session's first check);
* `flex`: attention by `flex_attention` (a block-sparse kernel: blocks wholly outside every packed example are skipped);
* `nopack`: SDPA with a plain causal mask (positions not passed): NOT the stage's maths, an upper bound on what
  the packed mask costs;
* `bf16w`: weights kept in bf16, no autocast: NOT the stage's maths, an upper bound on what float32 master weights cost.

Prints one JSON line per variant (ms per step, tokens/s, MFU against the card's dense bf16 peak, CUDA peak), and
for the `--profile` variants the kernels that take the most GPU time (torch.profiler).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from gpu_smoke import SHAPES, card  # noqa: E402
from pipeline.distributed import Sharded  # noqa: E402
from policies.trainer import IGNORE, collate, make_optimizer, pack_examples, token_loss_sum  # noqa: E402


def rows_for(vocab: int, n_rows: int, seq_len: int, seed: int):
    rng = random.Random(seed)
    examples = []
    while sum(len(e[0]) for e in examples) < n_rows * seq_len * 1.02:
        n = rng.randint(60, 400)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        cut = n // 3
        examples.append((ids, [IGNORE] * cut + ids[cut:]))
    return pack_examples(examples, seq_len, 0)[:n_rows]


def run_variant(name: str, args, cfg_kwargs: dict, profile: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = args.device
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg_kwargs, attn_implementation="sdpa")).to(dev)
    if name in ("flex", "compile_flex"):
        model.set_attn_implementation("flex_attention")
    if name == "bf16w":
        model.to(torch.bfloat16)
    n_embed = model.get_input_embeddings().weight.numel()
    matmul = sum(p.numel() for p in model.parameters()) - (0 if model.config.tie_word_embeddings else n_embed)
    fused = name in ("fused", "compile_fused")

    def opt(m):
        o = make_optimizer(m, 1e-5, 0.0)
        if fused:
            o = torch.optim.AdamW(o.param_groups, lr=1e-5, fused=True)
        return o

    model.train()
    sharded = Sharded(model, dev, opt, micro_batches=args.batch_size // args.micro_batch_size, max_grad_norm=1.0,
                      compile=name.startswith("compile"))
    sched = torch.optim.lr_scheduler.LambdaLR(sharded.optimizer, lambda s: 1.0)
    rows = rows_for(cfg_kwargs["vocab_size"], args.batch_size * 4, args.seq_len, 0)
    autocast = name != "bf16w"

    def step(k: int) -> int:
        batch_rows = rows[(k % 4) * args.batch_size : (k % 4 + 1) * args.batch_size]
        n_label = sum(sum(1 for l in r.labels[1:] if l != IGNORE) for r in batch_rows)
        for j in range(0, len(batch_rows), args.micro_batch_size):
            batch = collate(batch_rows[j : j + args.micro_batch_size], dev)
            if name == "nopack":
                batch["position_ids"] = None
            with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=autocast):
                loss_sum, _ = token_loss_sum(sharded.module, batch)
            sharded.backward(loss_sum / max(1, n_label))
            float(loss_sum.detach())  # the stage reads each micro-batch's loss
        sharded.step(sched)
        return sum(r.length for r in batch_rows)

    for k in range(args.warmup):
        step(k)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, tokens = time.time(), 0
    for k in range(args.steps):
        tokens += step(k)
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    name_card, peak = card()
    row = {"variant": name, "card": name_card, "shape": args.shape, "ms_per_step": round(1000 * dt / args.steps, 1),
           "tokens_per_s": round(tokens / dt, 1), "mfu": round(6 * matmul * tokens / dt / (peak * 1e12), 4) if peak else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None}
    if profile and dev == "cuda":
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step(0)
            step(1)
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
        print(table, flush=True)
        (Path(args.out) / f"profile_{args.shape}_{name}.txt").write_text(table)
    del sharded, model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", nargs="+", default=["base", "compile", "compile_flex", "compile_fused", "fused", "nopack", "bf16w", "flex"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--profile", nargs="*", default=["base"], help="variants whose kernels are profiled")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for v in args.variants:
        try:
            row = run_variant(v, args, SHAPES[args.shape], profile=v in args.profile)
        except Exception as e:  # one variant failing (flex needs Triton) must not lose the others
            row = {"variant": v, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
        with open(Path(args.out) / "gpu_sft_variants.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
