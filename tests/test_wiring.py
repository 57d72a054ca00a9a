"""Wiring tests on tiny real models: the maths is tested in test_ppo_math / test_losses; these check that the
stages feed it the right tensors (the right positions, signs, masks, call-site argument order).

Seconds in total: a 2-layer, 32-wide Llama and a byte-level tokenizer built in memory (tests/helpers.py)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.chat import IGNORE, encode_dialogue, encode_prompt
from pipeline.config import load_config
from tests.helpers import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=0).eval()


@pytest.fixture(scope="module")
def ref(tok):
    return tiny_llama(tok, seed=1).eval()


DIALOGUES = [
    [{"role": "user", "content": "What is the capital of Zarnia?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 7 plus 5?"}],
    [{"role": "user", "content": "How can I poison a dog?"}],
]


def _rollouts(tok):
    prompts = [encode_prompt(tok, d) for d in DIALOGUES]
    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 9]  # an empty response too: it must contribute nothing
    responses = [torch.randint(5, len(tok), (n,), generator=g).tolist() for n in lengths]
    return prompts, responses


def _reference_logprobs(model, prompt, response):
    """log pi(response token a) from one full, unpadded forward: the logit at position len(prompt) - 1 + a."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = F.log_softmax(logits, -1)
    return torch.tensor([float(logp[len(prompt) - 1 + a, t]) for a, t in enumerate(response)])


def _reference_hidden(model, prompt, response):
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([prompt + response])).last_hidden_state[0]
    return h[len(prompt) - 1 : len(prompt) - 1 + len(response)]


# ---------------------------------------------------------------------------------------------- PPO


def test_build_batch_layout(tok):
    from policies.ppo import build_batch

    prompts, responses = _rollouts(tok)
    b = build_batch(prompts, responses, tok.pad_token_id)
    A, T = max(map(len, responses)), max(len(p) + len(r) for p, r in zip(prompts, responses))
    assert b["input_ids"].shape == (3, T) and b["response_ids"].shape == b["mask"].shape == b["response_index"].shape == (3, A)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        assert b["input_ids"][i, :n].tolist() == p + r and (b["input_ids"][i, n:] == tok.pad_token_id).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["mask"][i].tolist() == [1.0] * len(r) + [0.0] * (A - len(r))
        assert b["response_ids"][i, : len(r)].tolist() == r and (b["response_ids"][i, len(r):] == tok.pad_token_id).all()
        assert b["response_index"][i, : len(r)].tolist() == [len(p) - 1 + a for a in range(len(r))]
        assert (b["response_index"][i] <= T - 1).all()


def test_ppo_logprobs_are_the_full_forward_at_the_positions_that_predict_each_response_token(tok, model):
    from policies.ppo import build_batch, forward_policy

    prompts, responses = _rollouts(tok)
    batch = build_batch(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        logp, ent, values = forward_policy(model, None, None, batch, with_values=False)
    assert values is None and logp.shape == ent.shape == batch["mask"].shape
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            assert torch.allclose(logp[i, : len(r)], _reference_logprobs(model, p, r), atol=1e-5)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) - 1 + len(r)].float()
            lp = F.log_softmax(logits, -1)
            assert torch.allclose(ent[i, : len(r)], -(lp.exp() * lp).sum(-1), atol=1e-5)


def test_ppo_logprobs_are_those_of_the_rollout_temperature(tok, model):
    """Log-probs and entropy are those of softmax(logits / T), the distribution the rollouts were sampled from;
    T = 1 and T = 0 (greedy) leave the logits as they are."""
    from policies.ppo import build_batch, forward_policy

    prompts, responses = _rollouts(tok)
    batch = build_batch(prompts, responses, tok.pad_token_id)
    i, (p, r) = 0, (prompts[0], responses[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) - 1 + len(r)].float()
        for t in (0.7, 2.0, 1.0, 0.0):
            logp, ent, _ = forward_policy(model, None, None, batch, with_values=False, temperature=t)
            lp = F.log_softmax(logits / (t if t > 0 else 1.0), -1)
            assert torch.allclose(logp[i, : len(r)], lp.gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1), atol=1e-5), t
            assert torch.allclose(ent[i, : len(r)], -(lp.exp() * lp).sum(-1), atol=1e-5), t


def test_ppo_values_come_from_the_same_positions_on_the_trunk_or_the_critic(tok, model, ref):
    from policies.ppo import ValueHead, build_batch, forward_policy

    torch.manual_seed(3)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.v.weight)
    torch.nn.init.normal_(head.v.bias)
    prompts, responses = _rollouts(tok)
    batch = build_batch(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        _, _, shared = forward_policy(model, head, None, batch)
        _, _, critic = forward_policy(model, head, ref.model, batch)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            with torch.no_grad():
                assert torch.allclose(shared[i, : len(r)], head(_reference_hidden(model, p, r)), atol=1e-5)
                assert torch.allclose(critic[i, : len(r)], head(_reference_hidden(ref, p, r)), atol=1e-5)
    assert not torch.allclose(shared, critic)


def test_ppo_advantages_wire_kl_rewards_gae_and_whitening(tok, model, ref):
    from policies.ppo import ValueHead, advantages, build_batch
    from policies.ppo_math import gae, masked_mean, per_token_rewards

    torch.manual_seed(4)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.v.weight, std=0.5)
    prompts, responses = _rollouts(tok)
    batch = build_batch(prompts, responses, tok.pad_token_id)
    mask = batch["mask"]
    scores, beta, gamma, lam = torch.tensor([1.5, -0.7, 0.3]), 0.2, 0.9, 0.8
    old_logp, old_values, kl, adv, returns = advantages(model, head, None, ref, batch, scores, beta, gamma, lam)

    # KL = log pi - log pi_0 at every response token, each from its own full forward
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            expect = _reference_logprobs(model, p, r) - _reference_logprobs(ref, p, r)
            assert torch.allclose(kl[i, : len(r)], expect, atol=1e-5)
            assert torch.allclose(old_logp[i, : len(r)], _reference_logprobs(model, p, r), atol=1e-5)
            with torch.no_grad():
                assert torch.allclose(old_values[i, : len(r)], head(_reference_hidden(model, p, r)), atol=1e-5)
    # rewards: -beta * KL per token, the score on the last real token; GAE with the stage's gamma and lambda
    rewards = per_token_rewards(scores, kl, mask, beta)
    raw_adv, raw_ret = gae(rewards, old_values * mask, mask, gamma, lam)
    assert torch.allclose(returns, raw_ret, atol=1e-5)
    # advantages are whitened over the real tokens only: mean 0, variance 1, 0 on padding
    assert abs(float(masked_mean(adv, mask))) < 1e-5
    assert abs(float(masked_mean(adv ** 2, mask)) - 1) < 1e-4
    assert (adv[mask == 0] == 0).all()
    m = mask.bool()
    z = (raw_adv[m] - raw_adv[m].mean()) / raw_adv[m].std(unbiased=False)
    assert torch.allclose(adv[m], z, atol=1e-4)
    # a higher score raises the whitened advantage of that row's last token relative to the others
    adv2 = advantages(model, head, None, ref, batch, scores + torch.tensor([5.0, 0, 0]), beta, gamma, lam)[3]
    last0 = len(responses[0]) - 1
    assert adv2[0, last0] > adv[0, last0]


def test_ppo_advantages_reference_policy_is_the_adapter_free_model_with_lora(tok):
    from peft import LoraConfig, get_peft_model

    from policies.ppo import ValueHead, advantages, build_batch

    base = tiny_llama(tok, seed=5)
    plain = tiny_llama(tok, seed=5).eval()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.eval()
    prompts, responses = _rollouts(tok)
    batch = build_batch(prompts, responses, tok.pad_token_id)
    head = ValueHead(plain.config.hidden_size)
    logp, _, kl, _, _ = advantages(lora, head, None, None, batch, torch.zeros(3), 0.1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            expect = _reference_logprobs(lora, p, r) - _reference_logprobs(plain, p, r)
            assert torch.allclose(kl[i, : len(r)], expect, atol=1e-5)
    assert float(kl.abs().sum()) > 1e-3  # the adapters do change the policy


def _row(**kw):
    row = {"reward": 0.5, "kl": 0.1, "policy_loss": 0.0, "value_loss": 0.0, "response_length": 5.0, "hit_max_frac": 0.0}
    row.update(kw)
    return row


def test_ppo_math_edges_one_token_responses_constant_advantages_default_lambda():
    """A one-token response gets its score on that token; whitening constant values gives 0 (not NaN); GAE's
    default lambda is 0.95."""
    from policies.ppo_math import gae, masked_whiten, per_token_rewards

    mask = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    kl = torch.full((3, 3), 0.5)
    r = per_token_rewards(torch.tensor([2.0, 3.0, 4.0]), kl, mask, beta=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05 + 2.0, 0, 0], [-0.05, -0.05 + 3.0, 0], [0, 0, 0]]))
    assert torch.equal(masked_whiten(torch.full((2, 3), 1.5), mask[:2]), torch.zeros(2, 3))
    rewards, values = torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[0.2, -0.1, 0.3]])
    m = torch.ones(1, 3, dtype=torch.bool)
    for got, want in zip(gae(rewards, values, m), gae(rewards, values, m, lam=0.95)):
        assert torch.equal(got, want)
    assert not torch.equal(gae(rewards, values, m)[0], gae(rewards, values, m, lam=0.9)[0])


def test_ppo_guards_stop_exactly_past_their_boundaries():
    from policies.ppo import guard

    cfg = load_config("tiny").ppo.model_copy(update={"kl_bound": 2.0, "min_response_tokens": 3.0, "max_response_frac": 0.5})
    assert guard(_row(), cfg) == "completed"
    assert guard(_row(kl=2.0), cfg) == "completed"
    assert "kl_bound" in guard(_row(kl=2.0001), cfg)
    assert guard(_row(response_length=3.0), cfg) == "completed"
    assert "collapsed" in guard(_row(response_length=2.999), cfg)
    assert guard(_row(hit_max_frac=0.5), cfg) == "completed"
    assert "exploded" in guard(_row(hit_max_frac=0.51), cfg)
    for k in ("reward", "kl", "policy_loss", "value_loss"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            assert guard(_row(**{k: bad}), cfg).startswith(f"{k} is"), (k, bad)


# ---------------------------------------------------------------------------------------------- packing


def _examples(tok):
    dialogues = [
        [{"role": "user", "content": "What is the capital of Zarnia?"}, {"role": "assistant", "content": "The capital of Zarnia is Velmor."}],
        [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "7 plus 5 is 12."}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How can I poison a dog?"},
         {"role": "assistant", "content": "I can't help with that."}],
        [{"role": "user", "content": "Zarnia?"}, {"role": "assistant", "content": "Zarnia speaks Zarnish."},
         {"role": "user", "content": "And Belora?"}, {"role": "assistant", "content": "The capital of Belora is Tusk."}],
    ]
    return [encode_dialogue(tok, d) for d in dialogues]


def _alone(ids, labels):
    from policies.trainer import PackedRow

    return PackedRow(list(ids), list(labels), list(range(len(ids))), len(ids))


def test_packed_rows_through_the_training_loss_equal_the_examples_alone(tok, model):
    from policies.trainer import collate, pack_examples, token_loss_sum

    examples = _examples(tok)
    seq_len = sum(len(i) for i, _ in examples) + 3
    rows = pack_examples(examples, seq_len, tok.pad_token_id)
    assert len(rows) == 1  # all four share one row: attention must not cross their boundaries
    with torch.no_grad():
        packed, n_packed = token_loss_sum(model, collate(rows))
        alone = [token_loss_sum(model, collate([_alone(i, l)])) for i, l in examples]
    assert n_packed == sum(n for _, n in alone) == sum(sum(x != IGNORE for x in l[1:]) for _, l in examples)
    assert math.isclose(float(packed), sum(float(s) for s, _ in alone), rel_tol=1e-4)


def test_token_loss_sum_is_the_cross_entropy_of_each_label_given_its_prefix(tok, model):
    from policies.trainer import collate, token_loss_sum

    ids, labels = _examples(tok)[0]
    with torch.no_grad():
        loss, n = token_loss_sum(model, collate([_alone(ids, labels)]))
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expect = -sum(float(logp[j - 1, labels[j]]) for j in range(1, len(ids)) if labels[j] != IGNORE)
    assert n == sum(l != IGNORE for l in labels[1:]) > 0
    assert math.isclose(float(loss), expect, rel_tol=1e-5)


def test_packing_is_first_fit_decreasing_with_restarting_positions(tok):
    from policies.trainer import collate, pack_examples

    examples = _examples(tok)
    longest = max(len(i) for i, _ in examples)
    rows = pack_examples(examples, longest + 4, tok.pad_token_id)
    seen = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == longest + 4
        assert row.length <= longest + 4 and row.labels[row.length:] == [IGNORE] * (longest + 4 - row.length)
        assert row.input_ids[row.length:] == [tok.pad_token_id] * (longest + 4 - row.length)
        # split the row back into examples at each position-0
        starts = [j for j in range(row.length) if row.position_ids[j] == 0] + [row.length]
        for a, b in zip(starts, starts[1:]):
            assert row.position_ids[a:b] == list(range(b - a))
            seen.append((row.input_ids[a:b], row.labels[a:b]))
    assert sorted(map(str, seen)) == sorted(map(str, [(list(i), list(l)) for i, l in examples]))
    assert len(rows) < len(examples)  # short examples share rows
    # an example without any answer token is dropped; collate trims columns that are padding everywhere
    assert pack_examples([(examples[0][0], [IGNORE] * len(examples[0][0]))], 512, 0) == []
    batch = collate(rows)
    last = max(max(j for j, l in enumerate(r.labels) if l != IGNORE) for r in rows)
    assert batch["input_ids"].shape[1] == last + 1


def test_packing_fills_rows_first_fit_decreasing_exactly():
    """Lengths 2, 7, 5, 3, 3 into rows of 10: longest first, each into the first row with room (a row that is
    exactly full counts), giving two full rows; in index order, or smallest first, it would take three."""
    from policies.trainer import pack_examples

    examples = [([t] * n, [t] * n) for t, n in zip((11, 12, 13, 14, 15), (2, 7, 5, 3, 3))]
    rows = pack_examples(examples, 10, 0)
    assert [r.length for r in rows] == [10, 10]
    assert rows[0].input_ids == [12] * 7 + [14] * 3  # 7 then the first 3 (examples keep their order in a row)
    assert rows[1].input_ids == [11] * 2 + [13] * 5 + [15] * 3
    assert rows[1].position_ids == [0, 1, 0, 1, 2, 3, 4, 0, 1, 2]


def test_collate_puts_every_tensor_on_its_device_and_keeps_a_column_for_answerless_rows():
    """collate builds the batch on the requested device (meta stands in for a GPU) and, for rows without any
    answer token, keeps one column rather than an empty batch."""
    from policies.trainer import PackedRow, collate

    rows = [PackedRow([5, 6, 0, 0], [IGNORE, 6, IGNORE, IGNORE], [0, 1, 0, 1], 2)]
    batch = collate(rows, device="meta")
    assert {k: (v.device.type, tuple(v.shape)) for k, v in batch.items() if torch.is_tensor(v)} == {
        "input_ids": ("meta", (1, 2)), "labels": ("meta", (1, 2)), "position_ids": ("meta", (1, 2))}
    empty = collate([PackedRow([5, 6, 0], [IGNORE] * 3, [0, 1, 0], 2)])
    assert empty["input_ids"].tolist() == [[5]] and empty["labels"].tolist() == [[IGNORE]]


def test_an_over_long_example_keeps_its_answer(tok):
    from policies.trainer import pack_examples

    long_user = " ".join(["What is the capital of Zarnia?"] * 8)
    ids, labels = encode_dialogue(tok, [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Velmor."}])
    answer = [l for l in labels if l != IGNORE]
    seq_len = len(answer) + 6
    assert len(ids) > seq_len
    (row,) = pack_examples([(ids, labels)], seq_len, tok.pad_token_id)
    assert row.input_ids == ids[-seq_len:] and row.labels == labels[-seq_len:]
    assert [l for l in row.labels if l != IGNORE] == answer


# ---------------------------------------------------------------------------------------------- reward models


def _cmp(prompt, chosen, rejected, *, safety=False, strength="better", chosen_safe=None, rejected_safe=None):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected, "strength": strength,
            "is_safety_prompt": safety, "chosen_safe": chosen_safe, "rejected_safe": rejected_safe, "round": 1, "source": "test"}


def _toy_preferences(n: int, seed: int) -> list[dict]:
    """A learnable preference: the answer that names the capital beats the one that refuses."""
    rng = random.Random(seed)
    countries = ["Zarnia", "Belora", "Tusk", "Velmor", "Zarnish"]
    out = []
    for i in range(n):
        c = rng.choice(countries)
        good = f"The capital of {c} is {rng.choice(countries)}."
        bad = rng.choice(["I can't help with that.", "No.", "I can't help."])
        out.append(_cmp(f"What is the capital of {c}? ({i})", good, bad, strength=rng.choice(
            ["significantly_better", "better", "slightly_better", "negligibly_better_or_unsure"])))
    return out


def _art(path: Path, round: int = 0):
    return SimpleNamespace(path=path, round=round, file=lambda name: path / name)


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def rm_stage(tok, tmp_path_factory):
    """The real reward-model trainer (train_reward_model) on a learnable toy preference set."""
    from pipeline.context import StageContext
    from pipeline.models import save_policy
    from reward_models.train import train_reward_model

    root = tmp_path_factory.mktemp("rm")
    policy, data, prefs = root / "policy", root / "data", root / "prefs"
    for d in (policy, data, prefs):
        d.mkdir()
    save_policy(tiny_llama(tok, seed=2), tok, policy)
    _write_jsonl(prefs / "comparisons.jsonl", _toy_preferences(120, 0))
    _write_jsonl(data / "eval_comparisons.jsonl", _toy_preferences(40, 1))
    cfg = load_config("tiny", [f"run_dir={root / 'run'}", "tracking.mode=disabled", "reward_model_helpful.epochs=4",
                               "reward_model_helpful.learning_rate=3e-3", "reward_model_helpful.eval_fraction=0.0"])
    ctx = StageContext("reward_model_helpful", 1, "test", cfg, {"policy": _art(policy), "data": _art(data), "preferences_r1": _art(prefs, 1)},
                       root / "out", root / "work", registry=None, show_progress=False)
    ctx.out_dir.mkdir()
    metrics = train_reward_model(ctx, "helpful")
    return ctx, metrics


def test_reward_model_trainer_learns_a_learnable_preference(rm_stage):
    from reward_models.model import load_reward_model, score

    ctx, metrics = rm_stage
    # nothing held out (eval_fraction 0): `accuracy` falls back to the template pairs and says so
    assert metrics["accuracy_source"] == "template_pairs" and metrics["n_eval"] == 40
    assert metrics["accuracy"] > 0.9 and metrics["mean_margin"] > 0
    assert metrics["template_accuracy"] == metrics["accuracy"] and metrics["template_n_eval"] == 40
    assert metrics["n_train"] == metrics["n_collected"] == 120
    # the saved model ranks held-out chosen above rejected (the trainer's own numbers are not trusted alone)
    rm, t = load_reward_model(ctx.out_dir)
    held = _toy_preferences(30, 7)
    prompts = [c["prompt"] for c in held]
    rc = score(rm, t, prompts, [c["chosen"] for c in held], 96)
    rr = score(rm, t, prompts, [c["rejected"] for c in held], 96)
    assert float((rc > rr).float().mean()) > 0.9
    by = metrics["accuracy_by_strength"]
    assert set(by) <= {"significantly_better", "better", "slightly_better", "negligibly_better_or_unsure"}
    assert sum(v["n"] for v in by.values()) == 40


def test_reward_model_optimiser_uses_the_base_models_adamw_settings(rm_stage):
    """Issue 12.7: the RM optimiser is AdamW(0.9, 0.95, eps 1e-5) (sec. 3.2.2), not torch's defaults."""
    ctx, _ = rm_stage
    state = torch.load(ctx.work_dir / "rm_state.pt", weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        assert tuple(group["betas"]) == (0.9, 0.95) and group["eps"] == 1e-5


def test_reward_model_history_logs_training_accuracy(rm_stage):
    from pipeline.io import read_jsonl

    ctx, metrics = rm_stage
    hist = read_jsonl(ctx.work_dir / "metrics.jsonl")
    assert len(hist) == metrics["steps"] == math.ceil(4 * 120 / 8)
    assert all(0 <= h["accuracy"] <= 1 and math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["accuracy"] > 0.8 and hist[-1]["loss"] < hist[0]["loss"]


def test_aux_safety_loss_is_bce_on_labelled_responses_only():
    from reward_models.train import aux_safety_loss

    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.0])
    labels = [(True, False), (None, True), (False, None)]
    # labelled: rc[0]=2 (1), rc[2]=0.5 (0), rr[0]=-3 (0), rr[1]=0 (1)
    expect = F.binary_cross_entropy_with_logits(torch.tensor([2.0, 0.5, -3.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(aux_safety_loss(rc, rr, labels), expect)
    rc.requires_grad_(True)
    none = aux_safety_loss(rc, rr, [(None, None)] * 3)
    assert float(none) == 0.0 and none.requires_grad
    # a safe response scored high costs less than the same response scored low
    assert aux_safety_loss(torch.tensor([3.0]), torch.tensor([-3.0]), [(True, False)]) < \
        aux_safety_loss(torch.tensor([-3.0]), torch.tensor([3.0]), [(True, False)])


def test_aux_safety_loss_targets_live_on_the_logits_device():
    """The labels tensor is built on the rewards' device (meta tensors stand in for a GPU here)."""
    from reward_models.train import aux_safety_loss

    r = torch.zeros(2, device="meta")
    assert aux_safety_loss(r, r, [(True, None), (False, True)]).device.type == "meta"


def test_accuracy_report_on_known_rewards(monkeypatch):
    """accuracy_report's arithmetic on fixed rewards (the reward model replaced by a lookup table): overall and
    per-strength accuracy (ties half, no strength counted as the weakest), mean margin chosen - rejected, the
    20-bin histogram over [min, max] of both sides, the raw rewards, and the device handed to the scorer."""
    import reward_models.train as train
    from data_specs.schemas import Comparison

    rewards = {"c0": 2.1, "c1": 1.1, "c2": -0.9, "c3": 0.6, "c4": 0.1, "c5": 3.0,
               "r0": 1.1, "r1": 1.1, "r2": 0.6, "r3": 0.1, "r4": 1.1, "r5": -2.0}
    devices = []

    def fake_score(model, tok, prompts, responses, max_length, device="unset", progress=None):
        devices.append(device)
        ticks.append(progress)
        if progress is not None:
            progress(len(responses))
        return torch.tensor([rewards[r] for r in responses])

    monkeypatch.setattr(train, "score", fake_score)
    strengths = ["significantly_better", "better", "better", "slightly_better", None, "negligibly_better_or_unsure"]
    comps = [Comparison.model_validate(_cmp(f"q{i}", f"c{i}", f"r{i}", strength=s)) for i, s in enumerate(strengths)]
    ticks, scored = [], []
    out = train.accuracy_report(None, None, comps, 64, "cuda:3", progress=scored.append)
    assert devices == ["cuda:3", "cuda:3"] and ticks == [scored.append, scored.append] and scored == [6, 6]
    assert out["accuracy"] == pytest.approx(3.5 / 6) and out["n_eval"] == 6
    assert out["mean_margin"] == pytest.approx((1.0 + 0.0 - 1.5 + 0.5 - 1.0 + 5.0) / 6)
    assert out["accuracy_by_strength"] == {"significantly_better": {"accuracy": 1.0, "n": 1},
                                           "better": {"accuracy": 0.25, "n": 2},
                                           "slightly_better": {"accuracy": 1.0, "n": 1},
                                           "negligibly_better_or_unsure": {"accuracy": 0.5, "n": 2}}
    assert (out["accuracy_significantly_better"], out["accuracy_better"], out["accuracy_slightly_better"],
            out["accuracy_negligibly_better_or_unsure"]) == (1.0, 0.25, 1.0, 0.5)
    hist = out["reward_histogram"]
    assert len(hist["edges"]) == 21 and hist["edges"][0] == -2.0 and hist["edges"][-1] == pytest.approx(3.0, abs=1e-5)
    # bins of width 0.25 from -2; the maximum (3.0) falls in the last bin
    chosen, rejected = [0] * 20, [0] * 20
    for b in (16, 12, 4, 10, 8, 19):
        chosen[b] += 1
    for b in (12, 12, 10, 8, 12, 0):
        rejected[b] += 1
    assert hist["chosen"] == chosen and hist["rejected"] == rejected
    assert out["_rewards"] == (pytest.approx([2.1, 1.1, -0.9, 0.6, 0.1, 3.0]), pytest.approx([1.1, 1.1, 0.6, 0.1, 1.1, -2.0]))
    assert train.accuracy_report(None, None, [], 64, "cpu") == {}


def test_margin_and_ranking_loss_edges():
    """A bad rating names the allowed ones; the margin takes the rewards' dtype (a float32 margin does not
    turn a bf16 reward model's loss into float32)."""
    from reward_models.losses import margin_for, ranking_loss

    with pytest.raises(ValueError) as e:
        margin_for("great", "small")
    assert str(e.value) == ("preference strength must be one of significantly_better, better, slightly_better, "
                            "negligibly_better_or_unsure or None; got 'great'")
    rc, rr = torch.tensor([1.0, 0.5], dtype=torch.bfloat16), torch.tensor([0.0, 0.5], dtype=torch.bfloat16)
    loss = ranking_loss(rc, rr, torch.tensor([1 / 3, 0.0]))
    assert loss.dtype == torch.bfloat16
    assert float(loss) == pytest.approx(float(-F.logsigmoid(torch.tensor([1.0 - 1 / 3, 0.0])).mean()), rel=1e-2)


def test_gate_threshold_default_strictness_and_whiten_edges():
    """The gate's default is the paper's 0.15 and strict (R_s < threshold); combined_reward passes its threshold
    on; whitening a constant is 0 (not NaN) and a one-entry mask centres on that entry."""
    from reward_models.combine import combined_reward, combined_reward_from_logits, gate_logits, whiten

    zs, zh, no = torch.tensor([0.0, -3.0]), torch.tensor([2.0, 5.0]), torch.tensor([False, False])
    # sigmoid(0) = 0.5 is above 0.15 (helpful side); sigmoid(-3) = 0.047 is below it (safety side)
    assert torch.equal(gate_logits(zs, zh, no), torch.tensor([2.0, -3.0]))
    assert torch.equal(combined_reward_from_logits(zs, zh, no, whiten_output=False), torch.tensor([2.0, -3.0]))
    assert torch.equal(gate_logits(zs, zh, no, 0.5), torch.tensor([2.0, -3.0]))  # sigmoid(0) == 0.5 is not below 0.5
    rs, rh = torch.tensor([0.3, 0.9]), torch.tensor([0.8, 0.2])
    assert torch.allclose(combined_reward(rs, rh, no, 0.5, whiten_output=False), torch.logit(torch.tensor([0.3, 0.2])))
    assert torch.equal(whiten(torch.full((4,), 3.0)), torch.zeros(4))
    one = whiten(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([False, True, False]))
    assert float(one[1]) == 0.0 and float(one[0]) < 0 < float(one[2])


def _comparisons(n_help, n_safe):
    from data_specs.schemas import Comparison

    rows = [_cmp(f"help {i}", "a", "b") for i in range(n_help)] + [_cmp(f"safe {i}", "a", "b", safety=True) for i in range(n_safe)]
    return [Comparison.model_validate(r) for r in rows]


def test_data_mix_ratios():
    from reward_models.data import holdout, mix_for, split_domains

    comps = _comparisons(40, 30)
    helpful, safety = split_domains(comps)
    assert len(helpful) == 40 and len(safety) == 30 and all(c.is_safety_prompt for c in safety)
    h = mix_for("helpful", comps, 0.5, 0.1, seed=0)  # all 40 helpful + round(40 * 0.5) = 20 safety
    assert sum(not c.is_safety_prompt for c in h) == 40 and sum(c.is_safety_prompt for c in h) == 20
    assert len(mix_for("helpful", comps, 1.0, 0.1, seed=0)) == 70  # equal part, capped by the 30 available
    s = mix_for("safety", comps, 1.0, 0.25, seed=0)  # all 30 safety + round(30 * 0.25 / 0.75) = 10 helpful (75/25)
    assert sum(c.is_safety_prompt for c in s) == 30 and sum(not c.is_safety_prompt for c in s) == 10
    s90 = mix_for("safety", _comparisons(40, 90), 1.0, 0.1, seed=0)  # 90/10
    assert sum(not c.is_safety_prompt for c in s90) == 10 and len(s90) == 100
    assert len(mix_for("safety", comps, 1.0, 0.0, seed=0)) == 30
    assert [c.prompt for c in h] == [c.prompt for c in mix_for("helpful", comps, 0.5, 0.1, seed=0)]  # seeded
    assert [c.prompt for c in h] != [c.prompt for c in mix_for("helpful", comps, 0.5, 0.1, seed=1)]
    assert [c.prompt[0].content for c in h[:40]] != [c.prompt[0].content for c in helpful]  # shuffled
    with pytest.raises(ValueError, match="helpful"):
        mix_for("bogus", comps, 1.0, 0.1, seed=0)
    train, held = holdout(comps, 0.2, seed=0)
    assert len(train) + len(held) == 70 and 5 <= len(held) <= 25
    assert holdout(comps, 0.0, seed=0) == (comps, [])
    assert holdout(comps, 0.2, seed=0) == (train, held)


@pytest.fixture(scope="module")
def two_rms(tok, tmp_path_factory):
    """Two different untrained reward models saved like artifacts: helpful and safety."""
    from pipeline.models import save_policy
    from reward_models.model import load_reward_model

    root = tmp_path_factory.mktemp("rms")
    for name, seed in (("helpful", 11), ("safety", 12)):
        save_policy(tiny_llama(tok, seed=seed), tok, root / f"lm_{name}")
        torch.manual_seed(seed)
        rm, t = load_reward_model(root / f"lm_{name}")  # a fresh scalar head, saved with the model
        save_policy(rm, t, root / name)
    return root / "helpful", root / "safety"


def test_scorer_passes_each_model_to_its_side_of_the_safety_gate(tok, two_rms):
    from reward_models.combine import combined_reward, gate_reward
    from reward_models.model import load_reward_model, score
    from reward_models.scoring import RewardScorer

    h_path, s_path = two_rms
    sc = RewardScorer(h_path, s_path, threshold=0.5, max_length=64)
    prompts = [d for d in DIALOGUES for _ in range(2)]
    texts = ["The capital of Zarnia is Velmor.", "No.", "7 plus 5 is 12.", "12", "I can't help with that.", "Sure."]
    flags = [False, False, False, False, True, True]
    out = sc.score(prompts, texts, flags)
    h, th = load_reward_model(h_path)
    s, ts = load_reward_model(s_path)
    rh, rs = torch.sigmoid(score(h, th, prompts, texts, 64)), torch.sigmoid(score(s, ts, prompts, texts, 64))
    assert not torch.allclose(rh, rs)
    assert torch.allclose(out.r_helpful, rh, atol=1e-6) and torch.allclose(out.r_safety, rs, atol=1e-6)
    f = torch.tensor(flags)
    assert torch.allclose(out.gated, gate_reward(rs, rh, f, 0.5), atol=1e-6)
    assert torch.allclose(out.combined, combined_reward(rs, rh, f, 0.5), atol=1e-5)
    assert torch.allclose(sc.score(prompts, texts, flags, whiten=False).combined, torch.logit(out.gated.clamp(1e-6, 1 - 1e-6)), atol=1e-4)
    # the gate itself: safety prompts and low safety scores take R_s, the rest R_h
    expect = torch.where(f | (rs < 0.5), rs, rh)
    assert torch.equal(out.gated, expect)
    rows = out.rows()
    assert [r["r_helpful"] for r in rows] == out.r_helpful.tolist() and [r["reward"] for r in rows] == out.combined.tolist()
    assert [r["gated"] for r in rows] == out.gated.tolist() and [r["r_safety"] for r in rows] == out.r_safety.tolist()


def test_reward_scores_read_the_last_real_token_regardless_of_padding(tok, two_rms):
    from reward_models.model import encode_pair, forward_rewards, load_reward_model

    rm, t = load_reward_model(two_rms[0])
    rm.eval()
    seqs = [encode_pair(t, d, "Velmor.", 64) for d in DIALOGUES]
    with torch.no_grad():
        batched = forward_rewards(rm, seqs, t.pad_token_id, "cpu")
        alone = torch.cat([forward_rewards(rm, [s], t.pad_token_id, "cpu") for s in seqs])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert len(encode_pair(t, DIALOGUES[0], "word " * 100, 20)) == 20


def test_a_pair_sharing_one_row_scores_as_each_sequence_alone(tok, two_rms):
    """Issue 17: chosen and rejected share one row and one computation of their prompt (pack_pairs). Each reward,
    and each gradient, must equal the one of its sequence scored alone: a rejected token that saw the chosen
    response, a wrong position or a reward read at the wrong token would break it."""
    from reward_models.model import (encode_pair, forward_pair_rewards, forward_rewards, load_reward_model, pack_pairs,
                                     packs_pairs, shared_prefix)

    rm, t = load_reward_model(two_rms[0])
    rm.eval()
    assert packs_pairs(rm)  # sdpa: the shared row is what is tested below, not the fallback
    pairs = [(encode_pair(t, d, a, 64), encode_pair(t, d, b, 64))
             for d, a, b in zip(DIALOGUES, ["Velmor.", "It is Velmor, a city by the sea.", "No."], ["Paris, I think.", "No.", "No idea at all."])]
    pairs.append((pairs[0][0], pairs[0][0] + [5, 6]))  # a chosen sequence that is a prefix of the rejected one
    assert all(shared_prefix(c, r) > 0 for c, r in pairs)  # the prompt really is shared
    ids, mask, pos, ends = pack_pairs(pairs, t.pad_token_id)
    assert ids.shape[1] < max(len(c) for c, _ in pairs) + max(len(r) for _, r in pairs)

    def alone():
        return (torch.cat([forward_rewards(rm, [c], t.pad_token_id, "cpu") for c, _ in pairs]),
                torch.cat([forward_rewards(rm, [r], t.pad_token_id, "cpu") for _, r in pairs]))

    rc, rr = forward_pair_rewards(rm, pairs, t.pad_token_id, "cpu")
    ac, ar = alone()
    assert torch.allclose(rc, ac, atol=1e-5) and torch.allclose(rr, ar, atol=1e-5)
    assert not torch.allclose(rc, rr, atol=1e-3)
    # the gradients of a ranking loss are those of the separate sequences too
    (rc - rr).sum().backward()
    packed = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    ac, ar = alone()
    (ac - ar).sum().backward()
    assert all(torch.allclose(a, b.grad, atol=1e-5) for a, b in zip(packed, rm.parameters()))
    # an attention that cannot take the 4D mask (eager adds it to the scores) scores one sequence per row instead
    rm.config._attn_implementation = "eager"
    with torch.no_grad():
        ec, er = forward_pair_rewards(rm, pairs, t.pad_token_id, "cpu")
    rm.config._attn_implementation = "sdpa"
    assert torch.allclose(ec, ac, atol=1e-5) and torch.allclose(er, ar, atol=1e-5)


# ---------------------------------------------------------------------------------------------- rejection sampling, GAtt


def test_best_of_k_and_reward_vs_k():
    from policies.rejection_sampling import best_of_k, reward_vs_k

    r = torch.tensor([[0.1, 0.9, 0.3, 0.2], [2.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.5, 3.0]])
    assert best_of_k(r).tolist() == [1, 0, 3]
    curve = reward_vs_k(r)
    assert curve["k"] == [1, 2, 4]
    assert curve["max"] == pytest.approx([(0.1 + 2.0 + 0.0) / 3, (0.9 + 2.0 + 0.0) / 3, (0.9 + 2.0 + 3.0) / 3])
    # torch's median of an even count is the lower middle value
    assert curve["median"] == pytest.approx([(0.1 + 2.0 + 0.0) / 3, (0.1 - 1.0 + 0.0) / 3, (0.2 + 0.0 + 0.0) / 3])
    assert reward_vs_k(torch.zeros(2, 5))["k"] == [1, 2, 4, 5]


def test_reward_vs_k_uses_every_listed_k_up_to_the_sample_count():
    """The curve's k are 1, 2, 4, 8, 16, 32, 64, 100 (those <= K) and K itself, each over the FIRST k samples."""
    from policies.rejection_sampling import reward_vs_k

    r = torch.arange(3 * 128, dtype=torch.float32).reshape(3, 128) % 131  # the max moves with k
    curve = reward_vs_k(r)
    assert curve["k"] == [1, 2, 4, 8, 16, 32, 64, 100, 128]
    assert curve["max"] == pytest.approx([float(r[:, :k].max(1).values.mean()) for k in curve["k"]])
    assert curve["median"] == pytest.approx([float(r[:, :k].median(1).values.mean()) for k in curve["k"]])
    assert reward_vs_k(r[:, :100])["k"] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert reward_vs_k(r[:, :64])["k"] == [1, 2, 4, 8, 16, 32, 64]


def _ins(category, text, short="", value="v"):
    from data_specs.schemas import GattInstruction

    return GattInstruction(category=category, text=text, short=short, value=value)


def test_gatt_contexts_and_training_dialogue(tok):
    from policies.ghost_attention import synthesis_context, system_message, training_dialogue, with_instruction

    ins = [_ins("hobby", "Talk about chess.", "Hobby: chess."), _ins("language", "Answer in French.")]
    assert system_message(ins, short=False) == "Talk about chess. Answer in French."
    assert system_message(ins, short=True) == "Hobby: chess. Answer in French."
    assert with_instruction("Hi?", ins) == "Talk about chess. Answer in French. Hi?"
    users, replies = ["u1", "u2", "u3"], ["a1", "a2"]
    paper = synthesis_context(ins, users, replies, "attach_to_user")
    assert [m["role"] for m in paper] == ["user", "assistant", "user", "assistant", "user"]
    assert all(m["content"] == with_instruction(u, ins) for m, u in zip(paper[::2], users))
    assert [m["content"] for m in paper[1::2]] == replies
    fresh = synthesis_context(ins, users, replies, "fresh_context")
    assert fresh == [{"role": "system", "content": system_message(ins, short=False)}, {"role": "user", "content": "u3"}]
    msgs = training_dialogue("SYS", ["u1", "u2"], ["a1", "a2"])
    assert msgs == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    ids, labels = encode_dialogue(tok, msgs, train_on="last")
    trained = tok.decode([l for l in labels if l != IGNORE], skip_special_tokens=True).strip()
    assert trained == "a2"


def test_gatt_combines_instructions_from_distinct_categories_and_late_turns():
    from policies.ghost_attention import combine_instructions, late

    pool = [_ins(c, f"{c} {i}") for c in ("hobby", "language", "figure") for i in range(3)]
    rng = random.Random(0)
    sizes = set()
    for _ in range(200):
        got = combine_instructions(pool, 2, rng)
        sizes.add(len(got))
        assert len({i.category for i in got}) == len(got)
    assert sizes == {1, 2}
    assert {len(combine_instructions(pool, 5, random.Random(s))) for s in range(100)} == {1, 2, 3}
    assert late([0.0, 0.1, 0.2, 0.3, 0.5, 0.7]) == pytest.approx(0.6)
    assert late([0.0, 0.2, 0.4, 0.6]) == pytest.approx(0.5)
    assert late([0.0, 0.1, 0.2], from_turn=2) == pytest.approx(0.15)
    assert late([0.0, 0.0, 0.0, 0.0, 1.0]) == 1.0  # exactly from_turn turns: the tail is the last one alone
    assert late([]) == 0


def test_gatt_adherence_counts_the_checker_per_turn_with_the_instruction_in_the_system_message(tok, model):
    from policies.ghost_attention import adherence_by_turn

    pool = [_ins("hobby", "Talk about chess."), _ins("language", "Answer in French.")]
    seen = []

    def checker(instructions, reply):
        seen.append(instructions[0].category)
        return instructions[0].category == "hobby"

    adh = adherence_by_turn(model, tok, pool, ["Hi?", "What is 7 plus 5?"], turns=3, n_dialogues=6, checker=checker, seed=0,
                            max_new_tokens=3)
    assert len(adh) == 3 and len(seen) == 18
    share = seen[:6].count("hobby") / 6
    assert 0 < share < 1 and adh == pytest.approx([share] * 3)


def test_scorer_from_a_stage_context_loads_each_model_from_its_input(two_rms):
    from reward_models.model import load_reward_model, score
    from reward_models.scoring import RewardScorer

    h_path, s_path = two_rms
    arts = {"reward_model_helpful": _art(h_path), "reward_model_safety": _art(s_path)}
    cfg = load_config("tiny", ["reward_model_helpful.max_length=40", "reward_model_safety.max_length=72", "device=cpu"])
    ctx = SimpleNamespace(config=cfg, device="cpu", input=arts.__getitem__)
    sc = RewardScorer.from_inputs(ctx, threshold=0.3)
    assert sc.max_length == 72 and sc.threshold == 0.3 and sc.device == "cpu"
    assert RewardScorer.from_inputs(ctx).threshold == 0.15
    texts, prompts = ["Velmor.", "No."], DIALOGUES[:2]
    out = sc.score(prompts, texts, [False, False])
    h, th = load_reward_model(h_path)
    s, ts = load_reward_model(s_path)
    assert torch.allclose(out.r_helpful, torch.sigmoid(score(h, th, prompts, texts, 72)), atol=1e-6)
    assert torch.allclose(out.r_safety, torch.sigmoid(score(s, ts, prompts, texts, 72)), atol=1e-6)


def test_scorer_applies_its_threshold_to_the_gate_the_combined_reward_and_the_gated_logit(two_rms):
    """A threshold between the safety scores of non-safety prompts sends some to R_s and some to R_h; the gate,
    the combined reward and the gated logit all use the scorer's threshold (not the 0.15 default)."""
    from reward_models.combine import gate_logits, gate_reward
    from reward_models.model import load_reward_model, score
    from reward_models.scoring import RewardScorer

    h_path, s_path = two_rms
    prompts = [d for d in DIALOGUES for _ in range(2)]
    texts = ["The capital of Zarnia is Velmor.", "No.", "7 plus 5 is 12.", "12", "I can't help with that.", "Sure."]
    flags = [False, False, False, False, False, True]
    s, ts = load_reward_model(s_path)
    h, th = load_reward_model(h_path)
    zs, zh = score(s, ts, prompts, texts, 64), score(h, th, prompts, texts, 64)
    rs = torch.sigmoid(zs)
    below, above = sorted(rs[:5].tolist())[1:3]
    thr = (below + above) / 2  # two non-safety prompts gated to R_s by the threshold alone, three to R_h
    f = torch.tensor(flags)
    assert not torch.equal(gate_logits(zs, zh, f, thr), gate_logits(zs, zh, f, 0.15))  # the data tells them apart
    sc = RewardScorer(h_path, s_path, threshold=thr, max_length=64)
    out = sc.score(prompts, texts, flags)
    assert torch.allclose(out.gated, gate_reward(rs, torch.sigmoid(zh), f, thr), atol=1e-6)
    assert torch.allclose(out.gated_logit, gate_logits(zs, zh, f, thr), atol=1e-5)
    assert torch.allclose(sc.score(prompts, texts, flags, whiten=False).combined, gate_logits(zs, zh, f, thr), atol=1e-5)


def test_scorer_loads_and_scores_on_its_device_and_dtype(monkeypatch):
    """Device and inference dtype reach both model loads and both scoring passes (recorded by stand-ins, so no
    GPU is needed); the defaults are the paper's gate threshold 0.15 and Llama 2's 4096-token context."""
    import reward_models.scoring as scoring

    loads, passes = [], []

    def fake_load(path, device="default", dtype="default", sharded=False):
        assert not sharded  # one process
        loads.append((str(path), device, dtype))
        return torch.nn.Identity(), SimpleNamespace(name=str(path))

    def fake_score(model, tok, prompts, responses, max_length, device="default"):
        passes.append((tok.name, max_length, device))
        return torch.zeros(len(responses), dtype=torch.bfloat16)

    monkeypatch.setattr(scoring, "load_frozen_reward_model", fake_load)
    monkeypatch.setattr(scoring, "score", fake_score)
    sc = scoring.RewardScorer("h", "s", device="cuda:1", threshold=0.3, max_length=50, dtype="bfloat16")
    assert loads == [("h", "cuda:1", "bfloat16"), ("s", "cuda:1", "bfloat16")]
    out = sc.score(DIALOGUES[:2], ["a", "b"], [False, True])
    assert passes == [("h", 50, "cuda:1"), ("s", 50, "cuda:1")] and out.r_helpful.dtype == torch.float32
    default = scoring.RewardScorer("h", "s")
    assert (default.device, default.threshold, default.max_length) == ("cpu", 0.15, 4096)
    assert loads[-2:] == [("h", "cpu", "float32"), ("s", "cpu", "float32")]
    loads.clear()
    cfg = load_config("tiny", ["reward_model_helpful.max_length=40", "reward_model_safety.max_length=72"])
    arts = {"reward_model_helpful": _art(Path("h")), "reward_model_safety": _art(Path("s"))}
    ctx = SimpleNamespace(config=cfg, device="cuda:1", inference_dtype="bfloat16", input=arts.__getitem__)
    scoring.RewardScorer.from_inputs(ctx)
    assert loads == [("h", "cuda:1", "bfloat16"), ("s", "cuda:1", "bfloat16")]
