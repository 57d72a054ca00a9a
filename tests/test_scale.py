"""Memory discipline at scale, checked on tiny real models: PPO's micro-batched passes give the same numbers as
whole batches, reward models train with LoRA, and models loaded to sample and score take the config's dtype."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.config import load_config
from tests.helpers import tiny_llama, tiny_tokenizer
from tests.test_wiring import DIALOGUES, _art, _rollouts, _toy_preferences, _write_jsonl


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ppo_setup(tok):
    from policies.ppo import ValueHead, build_batch

    torch.manual_seed(3)
    policy, ref = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1).eval()
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.v.weight, std=0.5)
    prompts, responses = _rollouts(tok)
    prompts, responses = prompts * 2, responses * 2 + []  # 6 rollouts, one of them empty twice
    responses[3] = responses[3] + [7, 8, 9]  # rows of different lengths within a chunk
    return policy, ref, head, build_batch(prompts, responses, tok.pad_token_id)


def test_ppo_rollout_passes_in_micro_batches_equal_one_pass(tok):
    from policies.ppo import advantages

    policy, ref, head, batch = _ppo_setup(tok)
    scores = torch.tensor([1.0, -0.5, 0.2, 0.7, -1.2, 0.4])
    whole = advantages(policy, head, None, ref, batch, scores, 0.1, 1.0, 0.95)
    for size in (1, 4):
        parts = advantages(policy, head, None, ref, batch, scores, 0.1, 1.0, 0.95, micro_batch_size=size)
        for a, b in zip(whole, parts):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), size


def test_ppo_minibatch_gradient_does_not_depend_on_the_micro_batch_size(tok):
    from policies.ppo import advantages, minibatch_gradients

    policy, ref, head, batch = _ppo_setup(tok)
    scores = torch.tensor([1.0, -0.5, 0.2, 0.7, -1.2, 0.4])
    old_logp, old_values, _, adv, returns = advantages(policy, head, None, ref, batch, scores, 0.1, 1.0, 0.95)
    # pretend the policy moved since the rollouts, so ratios differ from 1 and clipping is live
    old_logp = old_logp + 0.3 * torch.randn_like(old_logp) * batch["mask"]
    idx = torch.tensor([5, 0, 3, 2, 4])  # a mini-batch of 5 rollouts of different lengths
    params = list(policy.parameters()) + list(head.parameters())
    grads, stats = {}, {}
    for size in (None, 1, 2):
        cfg = SimpleNamespace(micro_batch_size=size, temperature=1.0, clip=0.2, value_clip=0.2, vf_coef=0.1)
        for p in params:
            p.grad = None
        stats[size] = minibatch_gradients(policy, head, None, batch, idx, old_logp, old_values, adv, returns, cfg)
        grads[size] = [p.grad.clone() for p in params if p.grad is not None]
    assert any(float(g.abs().sum()) > 0 for g in grads[None])
    for size in (1, 2):
        assert len(grads[size]) == len(grads[None])
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads[None], grads[size])), size
        for k in ("loss", "policy_loss", "value_loss", "clip_frac", "entropy"):
            assert stats[size][k] == pytest.approx(stats[None][k], rel=1e-4, abs=1e-6), (size, k)


def test_a_reward_model_trains_with_lora_and_saves_a_merged_model(tok, tmp_path):
    from pipeline.context import StageContext
    from pipeline.models import save_policy
    from reward_models.model import load_reward_model, score
    from reward_models.train import train_reward_model

    policy, data, prefs = tmp_path / "policy", tmp_path / "data", tmp_path / "prefs"
    for d in (policy, data, prefs):
        d.mkdir()
    base = tiny_llama(tok, seed=2)
    save_policy(base, tok, policy)
    _write_jsonl(prefs / "comparisons.jsonl", _toy_preferences(120, 0))
    _write_jsonl(data / "eval_comparisons.jsonl", _toy_preferences(40, 1))
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "tracking.mode=disabled", "reward_model_helpful.epochs=4",
                               "reward_model_helpful.learning_rate=3e-3", "reward_model_helpful.eval_fraction=0.0",
                               "reward_model_helpful.lora.enabled=true", "reward_model_helpful.lora.r=8"])
    ctx = StageContext("reward_model_helpful", 1, "test", cfg, {"policy": _art(policy), "data": _art(data), "preferences_r1": _art(prefs, 1)},
                       tmp_path / "out", tmp_path / "work", registry=None, show_progress=False)
    ctx.out_dir.mkdir()
    metrics = train_reward_model(ctx, "helpful")
    assert metrics["accuracy"] > 0.9 and metrics["mean_margin"] > 0
    rm, t = load_reward_model(ctx.out_dir)
    names = [n for n, _ in rm.named_parameters()]
    assert not any("lora" in n for n in names)  # merged: a plain sequence-classification model
    # LoRA trained the adapted projections (merged into them) and the head, and left everything else alone
    assert torch.equal(rm.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(rm.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)
    assert not torch.equal(rm.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    held = _toy_preferences(30, 7)
    prompts = [c["prompt"] for c in held]
    rc = score(rm, t, prompts, [c["chosen"] for c in held], 96)
    rr = score(rm, t, prompts, [c["rejected"] for c in held], 96)
    assert float((rc > rr).float().mean()) > 0.9


def test_models_loaded_to_score_take_the_inference_dtype(tok, tmp_path):
    from pipeline.context import StageContext
    from pipeline.models import save_policy
    from reward_models.scoring import RewardScorer

    for name in ("h", "s"):
        save_policy(tiny_llama(tok, seed=5), tok, tmp_path / name)
    prompts = [d for d in DIALOGUES]
    replies = ["The capital of Zarnia is Velmor.", "12.", "I can't help with that."]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config("tiny", [f"run_dir={tmp_path}", f"dtype={dtype}"])
        ctx = StageContext("evaluate", 1, "v", cfg, {"reward_model_helpful": _art(tmp_path / "h"), "reward_model_safety": _art(tmp_path / "s")},
                           tmp_path / "o", tmp_path / "w", registry=None)
        assert ctx.inference_dtype == dtype
        torch.manual_seed(0)  # the causal-LM checkpoints get a fresh scalar head: the same one for both dtypes
        scorer = RewardScorer.from_inputs(ctx)
        assert next(scorer.helpful.parameters()).dtype == getattr(torch, dtype)
        scores[dtype] = scorer.score(prompts, replies, [False, False, True], whiten=False)
    assert scores["bfloat16"].gated_logit.dtype == torch.float32
    assert torch.allclose(scores["bfloat16"].gated_logit, scores["float32"].gated_logit, atol=0.05)
    auto = StageContext("evaluate", 1, "v", load_config("tiny", [f"run_dir={tmp_path}", "dtype=auto"]), {}, tmp_path, tmp_path, registry=None)
    assert auto.inference_dtype == "float32"  # auto on the CPU: float32 (bf16 only on a GPU)


def test_ppo_gradient_split_over_ranks_sums_to_the_whole_minibatch(tok):
    """What `rlhf stage ppo --nproc N` does: each rank backpropagates its `share` of the mini-batch with the whole
    mini-batch's token count, `all_reduce_grads` sums; the sum must be the one-process gradient."""
    from pipeline.distributed import World, share
    from policies.ppo import advantages, minibatch_gradients

    policy, ref, head, batch = _ppo_setup(tok)
    scores = torch.tensor([1.0, -0.5, 0.2, 0.7, -1.2, 0.4])
    old_logp, old_values, _, adv, returns = advantages(policy, head, None, ref, batch, scores, 0.1, 1.0, 0.95)
    old_logp = old_logp + 0.3 * torch.randn_like(old_logp) * batch["mask"]
    idx = torch.tensor([5, 0, 3, 2, 4])
    n_tokens = batch["mask"][idx].sum()
    params = list(policy.parameters()) + list(head.parameters())
    cfg = SimpleNamespace(micro_batch_size=1, temperature=1.0, clip=0.2, value_clip=0.2, vf_coef=0.1)

    def grads(sub, n=None):
        for p in params:
            p.grad = None
        stats = minibatch_gradients(policy, head, None, batch, sub, old_logp, old_values, adv, returns, cfg, n_tokens=n)
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], stats

    whole, whole_stats = grads(idx)
    parts = [grads(idx[share(range(len(idx)), World(r, 2))], n_tokens) for r in range(2)]
    for a, b, c in zip(whole, parts[0][0], parts[1][0]):
        assert torch.allclose(a, b + c, atol=1e-6, rtol=1e-4)
    assert parts[0][1]["loss"] + parts[1][1]["loss"] == pytest.approx(whole_stats["loss"], rel=1e-5)
    # without the whole mini-batch's token count each rank would average its own share: a different gradient
    wrong = [grads(idx[share(range(len(idx)), World(r, 2))])[0] for r in range(2)]
    assert not all(torch.allclose(a, b + c, atol=1e-6, rtol=1e-4) for a, b, c in zip(whole, *wrong))


def test_artifacts_are_saved_in_the_artifact_dtype_and_train_as_float32(tok, tmp_path):
    import json

    from safetensors import safe_open

    from pipeline.context import StageContext
    from pipeline.models import load_policy, save_policy

    model = tiny_llama(tok, seed=4)
    save_policy(model, tok, tmp_path / "bf16", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.float32  # the model in memory is left alone
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again, _ = load_policy(tmp_path / "bf16")  # a stage that trains loads float32 master weights
    w, w2 = model.model.layers[0].mlp.up_proj.weight, again.model.layers[0].mlp.up_proj.weight
    assert w2.dtype == torch.float32 and torch.equal(w2, w.to(torch.bfloat16).float()) and not torch.equal(w2, w)
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    assert StageContext("sft", 0, "v", cfg, {}, tmp_path, tmp_path, registry=None).artifact_dtype == "float32"  # auto on the CPU


def test_the_rm_stage_and_evaluate_score_the_same_capped_template_pairs(tiny_run, tmp_path):
    from pipeline.context import StageContext
    from reward_models.train import template_pairs

    cfg, arts = tiny_run
    capped = cfg.model_copy(deep=True)
    capped.reward_model_safety.template_pairs = 3
    data = {"data": arts[("data", 0)]}
    rm = StageContext("reward_model_safety", 1, "v", capped, data, tmp_path, tmp_path, registry=None)
    ev = StageContext("evaluate", 2, "v", capped, data, tmp_path, tmp_path, registry=None)
    pairs = template_pairs(rm, "safety")
    assert len(pairs) == 3 and all(c.is_safety_prompt for c in pairs)
    assert [c.model_dump() for c in pairs] == [c.model_dump() for c in template_pairs(ev, "safety")]
    full = template_pairs(rm, "helpful")  # no cap: every helpfulness pair
    assert len(full) > 3 and not any(c.is_safety_prompt for c in full)
