"""QLoRA on a GPU, through the real CLI: the `sft` stage with a 4-bit NF4 base (bitsandbytes) beside a bf16 full fine-tune.

    bash bench/gpu_smoke.sh --qlora          # on a machine with a CUDA GPU (bitsandbytes in .whl/ if not installed)
    python bench/gpu_qlora.py --shape llama-1b

For one random-weight shape (bench/gpu_smoke.py: why random), in one run directory:
1. `rlhf stage sft` with full bf16 fine-tuning, then with `sft.lora.enabled=true sft.lora.quantize_4bit=true`;
2. the QLoRA sft once more under another seed, SIGKILLed after its first checkpoint and rerun: it resumes;
3. the QLoRA artifact loads with plain `from_pretrained` (no bitsandbytes, no quantization_config, bf16), its
   weights moved off the base, and the base's linear layers were really 4-bit while it trained.
One JSON line per variant (tokens/s, peak memory, loss), plus a `checks` line; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_smoke import card, rlhf, write_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--tokenizer", default=str(ROOT / ".gpu" / "smollm2"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: only checks the script up to QLoRA's refusal")
    ap.add_argument("--work", default="/tmp/gpu_qlora")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from pipeline.registry import Registry

    name, _ = card()
    work = Path(args.work) / f"{args.shape}-{os.getpid()}"  # fresh: every variant builds (no cache hits)
    ckpt, run = work / "checkpoint", work / "run"
    write_checkpoint(args.shape, Path(args.tokenizer), ckpt)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "RLHF_PROGRESS": "lines",
           "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
    base = [f"run_dir={run}", f"device={args.device}", f"pretrained.model={ckpt}", "tracking.mode=disabled", "data.demo_n_sft=4000",
            f"sft.bf16={args.device == 'cuda'}".lower(), f"sft.seq_len={args.seq_len}", f"sft.batch_size={args.batch_size}",
            f"sft.micro_batch_size={args.micro_batch_size}", f"sft.max_steps={args.steps}", "sft.learning_rate=1e-4",
            "hardware.check_plan=false", "evaluate.n_prompts=8"]
    qlora = ["sft.lora.enabled=true", "sft.lora.quantize_4bit=true"]

    def flags(*extra: str) -> list[str]:
        return [x for s in [*base, *extra] for x in ("--set", s)]

    for stage in ("data", "pretrained"):
        rlhf("stage", stage, "--config", "tiny", *flags(), env=env)
    rows, checks = [], {}
    reg = Registry(run)
    for variant, extra in (("full_bf16", [f"sft.checkpoint_every={args.steps + 1}"]),
                           ("qlora_nf4", [*qlora, f"sft.checkpoint_every={args.steps + 1}"])):
        rlhf("stage", "sft", "--config", "tiny", *flags(*extra), env=env)
        art = max(reg.versions("sft", 0), key=lambda a: a.manifest.get("finished_at", 0))
        m = art.metrics
        rows.append({"card": name, "shape": args.shape, "variant": variant, "tokens_per_s": round(m["tokens_per_s"], 1),
                     "peak_memory_gib": round(m.get("peak_memory_gib", float("nan")), 3), "train_loss": m["train_loss"],
                     "eval_loss": m.get("eval_loss"), "steps": m["steps"], "version": art.version})
        print(json.dumps(rows[-1]), flush=True)
    qart = max(reg.versions("sft", 0), key=lambda a: a.manifest.get("finished_at", 0))

    # the artifact: plain transformers, bf16, no quantization config, weights moved off the base
    conf = json.loads((qart.path / "config.json").read_text())
    checks["artifact_bf16_no_quant_config"] = conf.get("dtype", conf.get("torch_dtype")) == "bfloat16" and "quantization_config" not in conf
    trained = load_file(str(next(qart.path.glob("*.safetensors"))))
    start = load_file(str(next(ckpt.glob("*.safetensors"))))
    key = next(k for k in trained if k.endswith("self_attn.q_proj.weight"))
    checks["weights_moved"] = float((trained[key].float() - start[key].float()).abs().max()) > 0
    checks["qlora_peak_below_full"] = rows[1]["peak_memory_gib"] < rows[0]["peak_memory_gib"]
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, torch; from transformers import AutoModelForCausalLM; from pipeline.models import load_policy, is_quantized;"
        f"m, _ = load_policy({str(ckpt)!r}, 'cuda', quantize_4bit=True);"
        "import bitsandbytes as bnb; n = sum(isinstance(x, bnb.nn.Linear4bit) for x in m.modules());"
        "print('LINEAR4BIT', n, is_quantized(m), torch.cuda.memory_allocated() / 2**30)")], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in probe.stdout.splitlines() if x.startswith("LINEAR4BIT")), "")
    checks["base_linear_layers_are_4bit"] = bool(line) and int(line.split()[1]) > 0 and line.split()[2] == "True"
    checks["probe"] = line or probe.stderr[-2000:]

    # kill after the first checkpoint, rerun: it resumes (another learning rate: a version of its own)
    kill_sets = flags(*qlora, "sft.learning_rate=5e-5", "sft.checkpoint_every=4")
    cmd = [sys.executable, "-m", "pipeline.cli", "stage", "sft", "--config", "tiny", *kill_sets]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if list((run / "work" / "sft").glob("*/train_state.pt")):
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    checks["killed_mid_stage"] = proc.returncode == -signal.SIGKILL
    rlhf("stage", "sft", "--config", "tiny", *kill_sets, env=env)
    resumed = max(reg.versions("sft", 0), key=lambda a: a.manifest.get("finished_at", 0)).metrics
    checks["resumed_from_step"] = resumed.get("resumed_from_step")
    checks["resumed"] = bool(resumed.get("resumed_from_step")) and resumed["steps"] == args.steps
    ok = all(v for k, v in checks.items() if k not in ("probe", "resumed_from_step"))
    print(json.dumps({"card": name, "checks": checks, "ok": ok}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "gpu_qlora.jsonl", "a") as f:
        for r in [*rows, {"card": name, "checks": checks, "ok": ok}]:
            f.write(json.dumps(r) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
