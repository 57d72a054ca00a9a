"""Generation throughput: stock `model.generate(num_return_sequences=K)` against our engine
(policies/generation.py) on a tiny random Llama, CPU. Prints one JSON line.

    python bench/bench_generation.py [--hidden 256 --layers 4 --prompts 32 --k 8 --new 64 --threads 2]

Three timings, all K samples per prompt, max_new_tokens=NEW:
* stock: left-padded batch, do_sample=True, num_return_sequences=K, min_new_tokens=NEW (no early stop);
* ours: same K and max_new_tokens, no stop token (every row runs NEW tokens: like for like);
* ours_stop: a stop-token set (--stop-tokens ids, about 1.5% chance per step on a random model) so rows
  finish at different steps; tokens/s counts the tokens actually produced, to show what dropping
  finished rows from the batch buys.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from policies.generation import SamplingParams, generate  # noqa: E402

PAD, BOS, EOS = 3, 1, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--stop-tokens", type=int, default=64, help="size of the stop-token set for the early-stop run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-stock", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    random.seed(0)
    torch.manual_seed(0)
    h = args.hidden
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=int(h * 2.6875), num_hidden_layers=args.layers,
                      num_attention_heads=max(4, h // 64), num_key_value_heads=max(2, h // 128), max_position_embeddings=512,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = LlamaForCausalLM(cfg).eval()
    prompts = [[BOS] + [random.randrange(4, args.vocab) for _ in range(random.randint(9, 59))] for _ in range(args.prompts)]
    out: dict = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "threads": torch.get_num_threads(),
                 "prompts": args.prompts, "k": args.k, "new": args.new}
    full = args.prompts * args.k * args.new

    if not args.skip_stock:
        L = max(map(len, prompts))
        ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            t = time.perf_counter()
            g = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=args.new, min_new_tokens=args.new, num_return_sequences=args.k, pad_token_id=PAD)
            dt = time.perf_counter() - t
        assert g.shape == (args.prompts * args.k, L + args.new)
        out["stock_tokens_per_s"] = round(full / dt)
        out["stock_s"] = round(dt, 2)

    t = time.perf_counter()
    res = generate(model, prompts, SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=0), n=args.k, pad_token_id=PAD)
    dt = time.perf_counter() - t
    assert sum(len(c) for r in res for c in r) == full
    out["ours_tokens_per_s"] = round(full / dt)
    out["ours_s"] = round(dt, 2)

    stops = tuple(range(4, 4 + args.stop_tokens))
    t = time.perf_counter()
    res = generate(model, prompts, SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=0, stop_token_ids=stops),
                   n=args.k, pad_token_id=PAD)
    dt = time.perf_counter() - t
    produced = sum(len(c) for r in res for c in r)
    out["ours_stop_tokens_per_s"] = round(produced / dt)
    out["ours_stop_s"] = round(dt, 2)
    out["ours_stop_mean_len"] = round(produced / (args.prompts * args.k), 1)
    # like-for-like speed-up of the early-stop run: the wall-clock of producing NEW tokens per row without stops
    # against producing the same samples with stops (cost saved by dropping finished rows)
    if "stock_tokens_per_s" in out:
        out["speedup_ours_vs_stock"] = round(out["ours_tokens_per_s"] / out["stock_tokens_per_s"], 2)
    out["stop_wallclock_saving"] = round(1 - out["ours_stop_s"] / out["ours_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
