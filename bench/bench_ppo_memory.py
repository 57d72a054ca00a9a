"""Peak memory of one PPO step, in model copies: LoRA (reference = adapters off, value head on the
shared trunk, dropout off as the stage runs it: `policies.ppo.prepare_policy`) against full fine-tuning
with a frozen reference copy, and LoRA with gradient checkpointing.

    python bench/bench_ppo_memory.py [--hidden 1024 --layers 8]

Runs in a fresh process per variant; measures peak allocated memory (CUDA) or, on the CPU, the
largest resident memory sampled after the forward, backward and optimiser step, above the baseline
before the model is built, divided by the size of one copy of the weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    """Current resident memory (Linux). Sampled at the points of a step where memory peaks: the
    high-water mark (ru_maxrss) would also count the temporaries of building the model."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_step(hidden: int, layers: int, lora: bool, batch: int, prompt_len: int, resp_len: int, checkpointing: bool = False) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import LoraConfig
    from policies.ppo import ValueHead, advantages, build_batch, forward_policy, prepare_policy
    from policies.ppo_math import ppo_clip_loss, value_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = rss_bytes() if device == "cpu" else 0
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=1024)
    policy = LlamaForCausalLM(cfg).to(device)
    copy_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    ref = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
    policy = prepare_policy(policy, LoraConfig(enabled=lora), device)
    head = ValueHead(hidden).to(device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    prompts = [torch.randint(0, 8192, (prompt_len,)).tolist() for _ in range(batch)]
    responses = [torch.randint(0, 8192, (resp_len,)).tolist() for _ in range(batch)]
    b = {k: v.to(device) for k, v in build_batch(prompts, responses, 0).items()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(2):  # the second step has optimiser state
        old_logp, old_v, _, adv, ret = advantages(policy, head, None, ref, b, torch.randn(batch, device=device), 0.01)
        if checkpointing:  # the stage turns it on for the updates only (ppo.gradient_checkpointing)
            (policy.get_base_model() if lora else policy).activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        logp, _, v = forward_policy(policy, head, None, b)
        loss = ppo_clip_loss(logp, old_logp, adv, b["mask"])[0] + 0.1 * value_loss(v, old_v, ret, b["mask"])[0]
        samples.append(rss_bytes())  # activations alive
        opt.zero_grad()
        loss.backward()
        samples.append(rss_bytes())  # gradients
        opt.step()
        samples.append(rss_bytes())  # optimiser state
        if checkpointing:
            (policy.get_base_model() if lora else policy).activation_checkpointing_disable()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else max(samples) - base
    return {"device": device, "lora": lora, "gradient_checkpointing": checkpointing, "params_M": round(copy_bytes / 4e6, 1), "peak_model_copies": round(peak / copy_bytes, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--resp-len", type=int, default=64)
    ap.add_argument("--variant", choices=["lora", "full", "lora_checkpointing"], help="run one variant in this process (internal)")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one_step(args.hidden, args.layers, args.variant != "full", args.batch, args.prompt_len, args.resp_len,
                                  args.variant == "lora_checkpointing")))
        return
    out = []
    for variant in ("lora", "lora_checkpointing", "full"):  # a fresh process each, so peaks do not mix
        cmd = [sys.executable, __file__, "--variant", variant, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--resp-len", str(args.resp_len)]
        # a fixed mmap threshold makes glibc hand freed tensors back to the OS, so resident memory
        # follows live tensors instead of the allocator's high-water mark
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
