"""How close are `rlhf plan`'s memory estimates to measured peaks? Prints one JSON line per case.

Each case runs in a fresh process (one thread): a real LlamaForCausalLM of the given shape takes two
training steps (full fine-tuning or LoRA, AdamW, the float32 next-token loss; with or without
gradient checkpointing) or generates, and the process's peak resident memory above its baseline
(after imports, before the model) is compared with the estimate of `pipeline.plan` for the same
shape and batch.

    python bench/bench_plan.py                                  # every case below
    python bench/bench_plan.py --measure 512 6 16000 4 256 full  # one case (used by tests/test_plan.py)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CASES = [
    (256, 4, 8000, 4, 256, "full"),
    (512, 6, 16000, 4, 256, "full"),
    (768, 8, 32000, 2, 512, "full"),
    (768, 8, 32000, 2, 512, "lora"),
    (768, 8, 32000, 2, 512, "checkpointing"),
    (768, 8, 32000, 2, 512, "generate"),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(h: int, layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=max(64, int(h * 8 / 3) // 64 * 64), num_hidden_layers=layers,
                       num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128), max_position_embeddings=4096)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over an exec from
    the forking parent, so a child of a large process (pytest) would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(h: int, layers: int, vocab: int, b: int, s: int, mode: str) -> int:
    """Peak resident bytes above the baseline of two training steps (or one generation) in this process."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    import peft  # noqa: F401 - imported before the baseline, like torch

    base = _rss()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(h, layers, vocab))
    if mode == "generate":
        with torch.no_grad():
            model.generate(torch.randint(0, vocab, (b, 16)), max_new_tokens=s - 16, min_new_tokens=s - 16, do_sample=False,
                           pad_token_id=0)
    else:
        if mode == "checkpointing":
            model.gradient_checkpointing_enable()
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, vocab, (b, s))
        for _ in range(2):  # the second step has the Adam moments allocated
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
            del logits
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return _peak_rss() - base


def estimate(h: int, layers: int, vocab: int, b: int, s: int, mode: str) -> int:
    from pipeline.plan import Shape, activation_bytes, kv_cache_bytes, logits_bytes, lora_params, train_step

    shape = Shape.from_config(llama_config(h, layers, vocab))
    if mode == "generate":
        return shape.params * 4 + kv_cache_bytes(shape, b * s)
    tokens = b * s
    trainable = lora_params(shape, 16, TARGETS) if mode == "lora" else shape.params
    return train_step(shape.params, trainable, activation_bytes(shape, tokens, mode == "checkpointing"), logits_bytes(shape, tokens))["peak"]


def run_case(case: tuple) -> dict:
    """Measure in a fresh process (so earlier cases do not raise the peak), estimate here."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}  # big buffers go back to the OS when freed
    out = subprocess.run([sys.executable, __file__, "--measure", *map(str, case)], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    est = estimate(*case)
    h, layers, vocab, b, s, mode = case
    return {"hidden": h, "layers": layers, "vocab": vocab, "batch": b, "seq": s, "mode": mode, "measured_mb": round(measured / 2**20, 1),
            "estimated_mb": round(est / 2**20, 1), "error": round(est / measured - 1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", nargs=6, metavar=("HIDDEN", "LAYERS", "VOCAB", "BATCH", "SEQ", "MODE"))
    args = ap.parse_args()
    if args.measure:
        h, layers, vocab, b, s = map(int, args.measure[:5])
        print(json.dumps({"measured": measure(h, layers, vocab, b, s, args.measure[5])}))
        return
    rows = [run_case(c) for c in CASES]
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"cases": len(rows), "max_abs_error": max(abs(r["error"]) for r in rows)}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
