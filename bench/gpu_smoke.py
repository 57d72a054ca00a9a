"""GPU smoke test: the pipeline's `sft` stage in bf16 on a GPU, with MFU, tokens/s and peak memory against `rlhf plan`.

    bash bench/gpu_smoke.sh                         # on a machine with a CUDA GPU
    python bench/gpu_smoke.py --shape tiny --device cpu --steps 3   # the same script on this CPU (checks it runs)

What runs: `rlhf stage data`, `rlhf stage pretrained` and `rlhf stage sft` through the real CLI, on the demo
world's SFT pairs, with `pretrained.model` a checkpoint folder this script writes first: the architecture and
tokenizer of SmolLM2-135M-Instruct (`--shape smollm2`) or a Llama of about 1.2B parameters (`--shape llama-1b`),
with random weights. Random weights, because the GPU machines we are lent reach no network and carry at most
64 MiB, and SmolLM2's weights are a 98 MB GGUF file: throughput and memory do not depend on the weights' values.

Reported (one JSON line per shape): tokens/s of the sft stage (its `tokens_per_s` metric: real, unpadded tokens),
MFU = 6 x matmul parameters x tokens/s / peak bf16 FLOP/s of the card (attention scores not counted, so a lower
bound), the stage's measured peak memory (`peak_memory_gib`: CUDA allocator peak of the training loop) and the
training-step estimate of `rlhf plan` for the same config, with the relative error.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # SmolLM2-135M-Instruct's config (read from its GGUF by transformers)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192),
    # a Llama-3.2-1B-like shape with SmolLM2's vocabulary
    "llama-1b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=2048),
}
# dense bf16 peak of the card (NVIDIA data sheets, SXM parts, no sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def card() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, peak


def write_checkpoint(shape: str, tokenizer_dir: Path, out: Path) -> int:
    """A random-weight Llama of `shape` with the tokenizer of `tokenizer_dir`, as a checkpoint folder; returns its matmul parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    n_embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    # the input embedding is a lookup, not a matmul; a tied LM head is a matmul on the same weights
    return total - (0 if cfg.tie_word_embeddings else n_embed)


def rlhf(*args: str, env: dict) -> str:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["smollm2", "llama-1b"], choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", default=str(ROOT / ".gpu" / "smollm2"), help="a tokenizer folder (SmolLM2's, saved from its GGUF)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16, help="packed rows per step")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--n-sft", type=int, default=6000, help="demo SFT pairs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (e.g. sft.compile=true)")
    ap.add_argument("--work", default="/tmp/gpu_smoke")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where gpu_smoke.jsonl is written")
    args = ap.parse_args()
    name, peak_tflops = card()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "RLHF_PROGRESS": "lines",
           "DO_NOT_TRACK": "1", "WANDB_MODE": "offline"}
    results = []
    for shape in args.shape:
        work = Path(args.work) / shape
        ckpt = work / "checkpoint"
        t0 = time.time()
        matmul_params = write_checkpoint(shape, Path(args.tokenizer), ckpt)
        sets = [f"run_dir={work / 'run'}", f"device={args.device}", f"pretrained.model={ckpt}", "tracking.mode=disabled",
                f"data.demo_n_sft={args.n_sft}", "sft.bf16=true", f"sft.seq_len={args.seq_len}", f"sft.batch_size={args.batch_size}",
                f"sft.micro_batch_size={args.micro_batch_size}", f"sft.max_steps={args.steps}", "sft.learning_rate=1e-5",
                f"sft.checkpoint_every={args.steps + 1}", "evaluate.n_prompts=8", "hardware.check_plan=false", *args.set]
        flags = [x for s in sets for x in ("--set", s)]
        for stage in ("data", "pretrained", "sft"):
            rlhf("stage", stage, "--config", "tiny", *flags, env=env)
        from pipeline.registry import Registry

        art = Registry(work / "run").find("sft", 0)
        m = art.metrics
        plan = json.loads(rlhf("plan", "--config", "tiny", *flags, "--json", "--gpu-memory", "141", env=env))
        est = next(s for s in plan["stages"] if s["stage"] == "sft")
        train_est = est["terms_gib"]["peak"]
        tok_s = m["tokens_per_s"]
        row = {"card": name, "shape": shape, "matmul_params": matmul_params, "tokens_per_s": round(tok_s, 1),
               "mfu": round(6 * matmul_params * tok_s / (peak_tflops * 1e12), 4) if peak_tflops else None,
               "peak_bf16_tflops": peak_tflops, "steps": m["steps"], "train_loss": m["train_loss"],
               "peak_memory_gib": round(m.get("peak_memory_gib", float("nan")), 3), "peak_memory_source": m.get("peak_memory_source"),
               "plan_train_peak_gib": train_est, "plan_error": round(train_est / m["peak_memory_gib"] - 1, 3) if m.get("peak_memory_gib") else None,
               "plan_terms_gib": est["terms_gib"], "seq_len": args.seq_len, "batch_size": args.batch_size,
               "micro_batch_size": args.micro_batch_size, "overrides": args.set, "wall_s": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "gpu_smoke.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
