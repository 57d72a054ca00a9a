"""`rlhf plan`: memory estimates from the model config, checked against real measured peaks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.plan import GiB, PlanError, Shape, activation_bytes, lora_params, make_plan, model_shape, train_step

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_plan.py"


def _tiny_llama(h=64, layers=2, vocab=500, tied=False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)


def test_shape_counts_parameters_exactly_like_the_real_model():
    from transformers import LlamaForCausalLM

    for tied in (False, True):
        cfg = _tiny_llama(tied=tied)
        shape = Shape.from_config(cfg)
        assert shape.params == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        assert shape.kv_dim == 2 * 16 and shape.lm_head == (0 if tied else 500 * 64)


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = _tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    assert lora_params(Shape.from_config(cfg), 4, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_training_step_terms_and_phases():
    shape = Shape.from_config(_tiny_llama())
    t = train_step(1000, 10, activations=5000, logits=700)
    assert (t["weights"], t["gradients"], t["optimizer"]) == (4000, 40, 80)
    assert t["peak"] == 4000 + 80 + 5000 + 700  # backward start dominates
    assert train_step(1000, 1000, 10, 0)["peak"] == 4000 + 4000 + 8000  # the optimiser step dominates
    full, ckpt = activation_bytes(shape, 100), activation_bytes(shape, 100, checkpointing=True)
    per_layer = (10 * 64 + 2 * 32 + 4 * 192) * 4 * 100
    assert full == 2 * per_layer and ckpt == 2 * 64 * 4 * 100 + per_layer


@pytest.mark.parametrize("case", [(512, 6, 16000, 4, 256, "full"), (512, 6, 16000, 4, 256, "lora"), (512, 6, 16000, 4, 256, "generate")])
def test_estimates_within_25_percent_of_measured_cpu_peaks(case):
    out = subprocess.run([sys.executable, str(BENCH), "--measure", *map(str, case)], capture_output=True, text=True, timeout=300,
                         env={"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_plan import estimate
    finally:
        sys.path.remove(str(ROOT / "bench"))
    est = estimate(*case)
    assert abs(est / measured - 1) < 0.25, (case, measured / 2**20, est / 2**20)


def test_7b_full_fine_tune_on_one_24gb_gpu_is_refused_naming_stage_and_fix():
    out = CliRunner().invoke(app, ["plan", "--config", "llama2-7b", "--gpu-memory", "24"])
    assert out.exit_code == 1
    assert "sft: needs about" in out.output and "--set sft.lora.enabled=true" in out.output
    assert "lower sft.micro_batch_size (now 4" in out.output
    js = json.loads(CliRunner().invoke(app, ["plan", "--config", "llama2-7b", "--gpu-memory", "24", "--json"]).output)
    sft = next(s for s in js["stages"] if s["stage"] == "sft")
    assert js["params"] == 6_738_415_616 and not sft["fits"]  # the real Llama-2-7b parameter count
    assert sft["terms_gib"]["weights"] == pytest.approx(6_738_415_616 * 4 / GiB, rel=1e-3)


def test_demo_and_tiny_fit_this_machine():
    for name in ("demo", "tiny"):
        out = CliRunner().invoke(app, ["plan", "--config", name, "--json"])
        assert out.exit_code == 0, out.output
        assert all(s["fits"] for s in json.loads(out.output)["stages"])


def test_lora_shrinks_the_static_terms():
    cfg = load_config("llama2-7b", check_device=False)
    shape = model_shape(cfg)
    full = {p.stage: p for p in make_plan(cfg, shape, 80)[0]}
    lora = {p.stage: p for p in make_plan(load_config("llama2-7b", ["sft.lora.enabled=true"], check_device=False), shape, 80)[0]}
    assert lora["sft"].terms["optimizer"] < full["sft"].terms["optimizer"] / 50
    assert lora["sft"].terms["weights"] == full["sft"].terms["weights"]


def test_run_refuses_before_any_work_when_a_stage_will_not_fit(tmp_path):
    run_dir = tmp_path / "run"
    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--run-dir", str(run_dir), "--set", "tracking.mode=disabled",
                                   "--set", "hardware.gpu_memory_gb=0.001"])
    assert out.exit_code == 1 and "will not fit in" in out.output and "hardware.check_plan=false" in out.output
    assert not run_dir.exists()  # nothing written


def test_unknown_hub_model_is_a_clear_error():
    cfg = load_config("tiny", ["pretrained.model=some-org/never-downloaded"])
    with pytest.raises(PlanError, match="without downloading it"):
        model_shape(cfg)


def test_gradient_checkpointing_gives_the_same_training_and_a_smaller_plan(tmp_path):
    """The config key reaches the trainer (same losses: recomputation is exact) and the plan (fewer activations)."""
    from pipeline.context import StageContext
    from pipeline.registry import Registry
    from policies.trainer import pack_examples, train_causal_lm
    from tests.helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    examples = [([1] + list(range(5, 40 + i % 7)), [-100] * 10 + list(range(14, 40 + i % 7))) for i in range(24)]
    rows = pack_examples(examples, 64, tok.pad_token_id)
    losses = {}
    for ckpt in (False, True):
        cfg = load_config("tiny", [f"run_dir={tmp_path / str(ckpt)}", f"sft.gradient_checkpointing={str(ckpt).lower()}", "sft.max_steps=3",
                                   "sft.batch_size=4", "sft.micro_batch_size=2"])
        model = tiny_llama(tok)
        seen = []
        model.register_forward_hook(lambda m, a, out: seen.append(m.is_activation_checkpointing) if m.training else None)
        ctx = StageContext("sft", 0, "v", cfg, {}, tmp_path / f"out{ckpt}", tmp_path / f"work{ckpt}", Registry(tmp_path / "reg"),
                           show_progress=False)
        losses[ckpt] = [round(train_causal_lm(model, rows, [], cfg.sft, ctx, seed=0)["train_loss"], 5)]
        assert set(seen) == {ckpt} and not model.is_activation_checkpointing  # on while training only
    assert losses[True] == losses[False]
    shape = model_shape(load_config("tiny"))
    plain = {p.stage: p for p in make_plan(load_config("tiny"), shape)[0]}["sft"]
    ckpt = {p.stage: p for p in make_plan(load_config("tiny", ["sft.gradient_checkpointing=true"]), shape)[0]}["sft"]
    assert ckpt.terms["activations"] < plain.terms["activations"] and "gradient checkpointing" in ckpt.note
