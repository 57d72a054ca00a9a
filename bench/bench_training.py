"""SFT and reward-model training speed: ours against the stock Hugging Face stack, side by side.

    python bench/bench_training.py [--hidden 256 --layers 4 --n 2000] [--baseline ../shared/bench/trl_baseline.py]

Runs ../shared/bench/trl_baseline.py (TRL SFTTrainer and RewardTrainer) in a subprocess at fp32 and at
bf16, then our packed answer-only SFT loop and our reward-model loop (chosen and rejected in one row, the prompt
computed once: `forward_pair_rewards`) on the
same tiny Llama, the same generated data and the same machine at both precisions. Prints one JSON line
per same-precision ratio, then one with every figure. Tokens/s counts real (prompt + completion) tokens,
as the baseline does.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data(n: int, seed: int = 0):
    """The baseline's generator: random words, the same seed, so both sides see the same data."""
    random.seed(seed)
    torch.manual_seed(seed)
    words = [f"w{i}" for i in range(1500)] + ["the", "a", "is", "of", "to", "and", "what", "how", "capital", "plus"]

    def sentence(lo, hi):
        return " ".join(random.choice(words) for _ in range(random.randint(lo, hi)))

    pairs = [(sentence(10, 50), sentence(10, 70)) for _ in range(n)]
    rejected = [sentence(10, 70) for _ in range(n)]
    return pairs, rejected


def build(pairs, hidden: int, layers: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([p + " " + c for p, c in pairs], trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 128), max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return tok, cfg


def ours_sft(tok, cfg, pairs, bf16: bool, batch_tokens: int = 4096, seq_len: int = 256) -> float:
    from transformers import LlamaForCausalLM

    from pipeline.chat import IGNORE
    from policies.trainer import collate, make_optimizer, pack_examples, token_loss_sum

    examples, ntok = [], 0
    for p, c in pairs:
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ci = tok(" " + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((pi + ci, [IGNORE] * len(pi) + ci))
        ntok += len(pi) + len(ci) - 1  # the baseline counts p + c without EOS
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    opt = make_optimizer(model, 1e-4, 0.0)
    t = time.perf_counter()
    rows = pack_examples(examples, seq_len, tok.pad_token_id)  # packing is part of the cost
    per_step = max(1, batch_tokens // seq_len)
    for i in range(0, len(rows), per_step):
        batch = collate(rows[i : i + per_step])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ntok / (time.perf_counter() - t)


def ours_rm(tok, cfg, pairs, rejected, bf16: bool, micro: int = 8) -> float:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from policies.trainer import make_optimizer
    from reward_models.losses import ranking_loss
    from reward_models.model import forward_pair_rewards

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})).train()
    opt = make_optimizer(rm, 1e-4, 0.0)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"][:256]  # noqa: E731
    t = time.perf_counter()
    data = [(enc(p + " " + c), enc(p + " " + r)) for (p, c), r in zip(pairs, rejected)]
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + len(data[i][1]))  # length-bucketed micro-batches
    batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    random.Random(0).shuffle(batches)
    for mb in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # a pair per row, its prompt computed once (the stage's path)
            rc, rr = forward_pair_rewards(rm, [data[i] for i in mb], tok.pad_token_id, "cpu")
        loss = ranking_loss(rc, rr, torch.ones(len(mb)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return len(data) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--baseline", default=str(ROOT.parent / "shared" / "bench" / "trl_baseline.py"))
    ap.add_argument("--skip-baseline", action="store_true", help="only our side (prints no ratios)")
    args = ap.parse_args()
    out: dict = {"threads": torch.get_num_threads()}
    if not args.skip_baseline:  # the stock side at both precisions: every ratio is like for like
        env = {**os.environ, "WANDB_MODE": "disabled"}
        out["stock"] = {}
        for precision in ("fp32", "bf16"):
            proc = subprocess.run([sys.executable, args.baseline, "--hidden", str(args.hidden), "--layers", str(args.layers),
                                   "--n", str(args.n), "--precision", precision], capture_output=True, text=True, env=env, check=True)
            out["stock"][precision] = json.loads(proc.stdout.strip().splitlines()[-1])
    pairs, rejected = make_data(args.n)
    tok, cfg = build(pairs, args.hidden, args.layers)
    ours = {}
    for bf16 in (False, True):
        ours[f"sft_tokens_per_s_bf16_{bf16}"] = round(ours_sft(tok, cfg, pairs, bf16))
        ours[f"rm_pairs_per_s_bf16_{bf16}"] = round(ours_rm(tok, cfg, pairs, rejected, bf16), 1)
    out["ours"] = ours
    if "stock" in out:
        out["ratios"] = {}
        for precision, bf16 in (("fp32", False), ("bf16", True)):
            st = out["stock"][precision]
            # the stock SFT figure is TRL's better one (padded; its packing=True is slower here)
            stock_sft = max(st["sft_tokens_per_s_packing_False"], st["sft_tokens_per_s_packing_True"])
            for name, stock, mine in ((f"sft_{precision}", stock_sft, ours[f"sft_tokens_per_s_bf16_{bf16}"]),
                                      (f"rm_{precision}", st["rm_pairs_per_s"], ours[f"rm_pairs_per_s_bf16_{bf16}"])):
                ratio = round(mine / stock, 2)
                out["ratios"][name] = ratio
                print(json.dumps({"ratio": name, "stock": stock, "ours": mine, "value": ratio, "goal": 2.0}))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
