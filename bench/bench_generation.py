"""Generation throughput: stock `model.generate(num_return_sequences=K)` against our engine
(policies/generation.py) on a tiny random Llama, CPU. Prints one JSON line.

    python bench/bench_generation.py [--hidden 256 --layers 4 --prompts 32 --k 8 --new 128 --stop-tokens 128 --threads 1]

Four timings, all K samples per prompt, max_new_tokens=NEW, prompts of mixed length (10-60 tokens):
* like for like, no stop token (every row runs NEW tokens):
  * stock: left-padded batch, do_sample=True, num_return_sequences=K, min_new_tokens=NEW;
  * ours: same K and max_new_tokens;
* realistic lengths, a stop token: a set of --stop-tokens ids ends a row (on this random model each step
  draws one with about that many / vocab chance, so response lengths are geometric; the default gives a mean
  near a quarter of NEW, as in the paper's data: 234 tokens per response, Table 6, against the presets'
  max_new_tokens of 1024):
  * stock_stop: the same call with eos_token_id = the stop set (no min_new_tokens): a finished row is padded
    until every row of the batch has finished;
  * ours_stop: the same stop set: finished rows leave the batch.
  The ratio is wall-clock for the same job (K samples of every prompt); the mean lengths of both are printed.
Our engine gets the KV budget stock's one call holds (--max-batch-tokens), so both use the same memory.

The machine is shared: the load average at start and end is printed. Under oversubscription (load
above the core count) 2 intra-op threads can run many times slower than 1 (threads wait on each
other), so compare runs with similar load, or use --threads 1.
"""
from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--stop-tokens", type=int, default=128, help="size of the stop-token set of the realistic-length runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="our engine's KV budget (rows x (prompt + new) per batch); default: what stock's one call holds, prompts x k x (longest prompt + new)")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the best time of each is reported")
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

    L = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    stops = tuple(range(4, 4 + args.stop_tokens))
    stop_set = set(stops)

    def stock() -> int:
        with torch.inference_mode():
            g = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=args.new, min_new_tokens=args.new, num_return_sequences=args.k, pad_token_id=PAD)
        assert g.shape == (args.prompts * args.k, L + args.new)
        return full

    def stock_stop() -> int:
        with torch.inference_mode():
            g = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=args.new, num_return_sequences=args.k, pad_token_id=PAD, eos_token_id=list(stops))
        produced = 0
        for row in g[:, L:].tolist():  # the tokens up to and including the first stop token
            hit = next((j for j, t in enumerate(row) if t in stop_set), None)
            produced += len(row) if hit is None else hit + 1
        return produced

    budget = args.max_batch_tokens or args.prompts * args.k * (L + args.new)  # the same memory as stock's batch
    out["max_batch_tokens"] = budget

    def ours(stop_ids: tuple[int, ...]) -> int:
        res = generate(model, prompts, SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=0, stop_token_ids=stop_ids),
                       n=args.k, pad_token_id=PAD, max_batch_tokens=budget)
        return sum(len(c) for r in res for c in r)

    runs = {"ours": lambda: ours(()), "ours_stop": lambda: ours(stops)}
    if not args.skip_stock:
        runs = {"stock": stock, **runs, "stock_stop": stock_stop}
    # the machine is shared: the three runs are interleaved, --repeats times, and the best of each is reported
    timings: dict[str, list[float]] = {k: [] for k in runs}
    produced: dict[str, int] = {}
    out["loadavg_start"] = round(os.getloadavg()[0], 2)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            produced[name] = fn()
            timings[name].append(time.perf_counter() - t)
    out["loadavg_end"] = round(os.getloadavg()[0], 2)
    for name, ts in timings.items():
        out[f"{name}_tokens_per_s"] = round(produced[name] / min(ts))
        out[f"{name}_s"] = [round(x, 2) for x in ts]
    assert produced["ours"] == full
    out["ours_stop_mean_len"] = round(produced["ours_stop"] / (args.prompts * args.k), 1)
    if "stock" in runs:
        out["stock_stop_mean_len"] = round(produced["stock_stop"] / (args.prompts * args.k), 1)
        out["speedup_like_for_like"] = round(out["ours_tokens_per_s"] / out["stock_tokens_per_s"], 2)
        # the goal: wall-clock for the K samples of every prompt at realistic lengths, both with the stop token
        out["speedup_best_of_k_realistic"] = round(min(timings["stock_stop"]) / min(timings["ours_stop"]), 2)
    # what dropping finished rows buys: wall-clock saved by the early-stop run against the full-length one
    out["stop_wallclock_saving"] = round(1 - min(timings["ours_stop"]) / min(timings["ours"]), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
