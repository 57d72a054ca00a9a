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
    out = CliRunner().invoke(app, ["plan", "--config", "llama2-7b", "--gpu-memory", "24", "--gpus", "1"])
    assert out.exit_code == 1
    assert "sft: needs about" in out.output and "--set sft.lora.enabled=true" in out.output
    assert "lower sft.micro_batch_size (now 4" in out.output
    js = json.loads(CliRunner().invoke(app, ["plan", "--config", "llama2-7b", "--gpu-memory", "24", "--gpus", "1", "--json"]).output)
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


def test_compile_trains_compiled_blocks_to_the_same_losses_and_hands_back_an_eager_model(tmp_path):
    """`sft.compile` compiles each decoder block while it trains (Dynamo captures graphs), reaches the eager
    losses within float rounding, and the stage gets its model back eager (it samples with it next)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipeline.context import StageContext
    from pipeline.registry import Registry
    from policies.trainer import pack_examples, train_causal_lm
    from tests.helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    examples = [([1] + list(range(5, 40 + i % 7)), [-100] * 10 + list(range(14, 40 + i % 7))) for i in range(24)]
    rows = pack_examples(examples, 64, tok.pad_token_id)
    losses, graphs = {}, {}
    for on in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = load_config("tiny", [f"run_dir={tmp_path / str(on)}", f"sft.compile={str(on).lower()}", "sft.max_steps=3",
                                   "sft.batch_size=4", "sft.micro_batch_size=2"])
        model = tiny_llama(tok)
        ctx = StageContext("sft", 0, "v", cfg, {}, tmp_path / f"out{on}", tmp_path / f"work{on}", Registry(tmp_path / "reg"),
                           show_progress=False)
        losses[on] = train_causal_lm(model, rows, rows[:2], cfg.sft, ctx, seed=0)
        graphs[on] = counters["stats"]["unique_graphs"]
        assert not any("forward" in vars(m) for m in model.modules())  # eager again
    assert graphs[False] == 0 and graphs[True] >= 1
    assert losses[True]["train_loss"] == pytest.approx(losses[False]["train_loss"], rel=1e-4)
    assert losses[True]["eval_loss"] == pytest.approx(losses[False]["eval_loss"], rel=1e-4)


def test_7b_preset_fits_one_node_of_8_gpus_and_sharding_divides_the_training_state():
    out = CliRunner().invoke(app, ["plan", "--config", "llama2-7b", "--json"])  # hardware: 8 x 80 GB
    assert out.exit_code == 0, out.output
    js = json.loads(out.output)
    assert all(s["fits"] for s in js["stages"]) and "8 processes" in js["device"]
    cfg = load_config("llama2-7b", check_device=False)
    shape = model_shape(cfg)
    one = {p.stage: p for p in make_plan(cfg, shape, 80, gpus=1)[0]}
    eight = {p.stage: p for p in make_plan(cfg, shape, 80, gpus=8)[0]}
    for stage in ("sft", "reward_model_helpful", "rejection_sampling", "ghost_attention"):
        for term in ("weights", "gradients", "optimizer"):
            assert eight[stage].terms[term] == pytest.approx(one[stage].terms[term] / 8, rel=1e-6), (stage, term)
        # gathering the whole model back at the end of training is the sharded run's own phase
        assert eight[stage].terms["unshard"] >= shape.params * 4 and "unshard" not in one[stage].terms
    assert eight["ppo"].terms["weights"] == one["ppo"].terms["weights"]  # PPO runs in one process: not sharded
    assert not one["sft"].fits and eight["sft"].fits
    # models that only sample and score are planned in the preset's dtype (bf16): half of float32
    assert eight["evaluate"].terms["reward_models"] == 2 * shape.reward_model_params * 2


def test_sharding_ppo_policy_divides_its_training_state_and_adds_the_gather_to_sample():
    """ppo.shard_policy: full-parameter PPO at 7B on 8 GPUs. Replicated it is refused and the fix names the key;
    sharded, weights, gradients and AdamW moments are an eighth, and sampling holds the whole policy gathered."""
    cfg = load_config("llama2-7b", ["ppo.lora.enabled=false"], check_device=False)
    shape = model_shape(cfg)
    replicated = next(p for p in make_plan(cfg, shape, 80, gpus=8)[0] if p.stage == "ppo")
    assert not replicated.fits and "ppo.shard_policy=true" in replicated.fix
    cfg = load_config("llama2-7b", ["ppo.lora.enabled=false", "ppo.shard_policy=true"], check_device=False)
    sharded = next(p for p in make_plan(cfg, shape, 80, gpus=8)[0] if p.stage == "ppo")
    for term in ("gradients", "optimizer"):
        assert sharded.terms[term] == pytest.approx(replicated.terms[term] / 8, rel=1e-6), term
    assert sharded.terms["weights"] == pytest.approx(shape.params * 4 / 8, rel=1e-6)  # the reference is its own term
    assert sharded.terms["sampling_weights"] == shape.params * 4 and sharded.terms["reference"] == shape.params // 8 * 4
    assert sharded.peak_bytes < replicated.peak_bytes - 50 * GiB


def test_70b_preset_fits_8_nodes_with_every_model_sharded_and_not_without():
    """llama2-70b on 8 x 8 x 80 GB: with hardware.shard_inference every stage fits (models that sample and score are
    sharded 64 ways, the trained ones load and gather in host memory); without it the sampling stages are refused,
    naming the whole policy every GPU would hold."""
    out = CliRunner().invoke(app, ["plan", "--config", "llama2-70b", "--json"])
    assert out.exit_code == 0, out.output
    js = json.loads(out.output)
    assert all(s["fits"] for s in js["stages"]) and "64 processes" in js["device"]
    cfg = load_config("llama2-70b", check_device=False)
    assert cfg.reward_model_helpful.learning_rate == 5e-6 and cfg.ppo.beta == 0.005  # the paper's 70B numbers
    shape = model_shape(cfg)
    plans = {p.stage: p for p in make_plan(cfg, shape, 80)[0]}
    assert plans["sft"].terms["weights"] == pytest.approx(68_976_648_192 * 4 / 64, rel=1e-6)  # training state sharded 64 ways
    assert "unshard" not in plans["sft"].terms and plans["pretrained"].peak_bytes == 0  # host memory, not a GPU's
    # the policy collect_preferences samples from, in bf16: a 64th, plus the root (embeddings, head) and two blocks gathered
    root, block = shape.vocab * shape.hidden * 2, (shape.params - shape.vocab * shape.hidden * 2) // shape.layers
    assert plans["collect_preferences"].terms["weights"] == (shape.params // 64 + root + 2 * block) * 2
    assert plans["ppo"].terms["sampling_weights"] == (root + 2 * block) * 4  # never the whole float32 policy
    whole = load_config("llama2-70b", ["hardware.shard_inference=false"], check_device=False)
    out = CliRunner().invoke(app, ["plan", "--config", "llama2-70b", "--set", "hardware.shard_inference=false"])
    assert out.exit_code == 1 and "whole float32 policy on every GPU" in out.output
    refused = {p.stage for p in make_plan(whole, shape, 80)[0] if not p.fits}
    assert {"collect_preferences", "rejection_sampling", "ppo", "evaluate", "sft"} <= refused
    # DeepSpeed moves the whole model to each GPU before it partitions it: planned, and the fix names FSDP2
    ds = {p.stage: p for p in make_plan(load_config("llama2-70b", ["hardware.sharding=deepspeed"], check_device=False), shape, 80)[0]}
    assert ds["sft"].terms["load"] == shape.params * 4 and not ds["sft"].fits and "hardware.sharding=fsdp2" in ds["sft"].fix
    assert "load" not in plans["sft"].terms
