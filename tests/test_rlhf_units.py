"""Unit checks of the RLHF stages' own logic on tiny real models: the PPO reference policy, Ghost
Attention's data and loss mask, evaluate's win rate, LoRA and QLoRA handling."""
import random

import pytest
import torch

from pipeline.chat import IGNORE, encode_dialogue
from pipeline.config import LoraConfig
from pipeline.context import StageFailed
from tests.helpers import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ppo_batch(tok, n=4):
    from policies.ppo import build_batch

    rng = random.Random(0)
    prompts = [[rng.randrange(5, len(tok)) for _ in range(rng.randint(3, 8))] for _ in range(n)]
    responses = [[rng.randrange(5, len(tok)) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    return build_batch(prompts, responses, tok.pad_token_id)


@pytest.mark.parametrize("lora", [True, False])
def test_reference_logprobs_do_not_move_during_ppo(tok, lora):
    import copy

    from policies.ppo import ValueHead, forward_policy
    from policies.ppo_math import ppo_clip_loss
    from policies.trainer import apply_lora

    policy = tiny_llama(tok)
    ref = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
    policy = apply_lora(policy, LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0), "cpu")
    head = ValueHead(policy.config.hidden_size)
    batch = _ppo_batch(tok)

    def ref_logp():
        with torch.no_grad():
            if ref is not None:
                return forward_policy(ref, None, None, batch, with_values=False)[0]
            with policy.disable_adapter():
                return forward_policy(policy, None, None, batch, with_values=False)[0]

    before_ref = ref_logp()
    with torch.no_grad():
        before_pol = forward_policy(policy, head, None, batch)[0]
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logp, _, _ = forward_policy(policy, head, None, batch)
        loss, _, _ = ppo_clip_loss(logp, before_pol, torch.ones_like(logp), batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after_pol = forward_policy(policy, head, None, batch)[0]
    assert torch.equal(ref_logp(), before_ref)  # pi_0 is untouched
    assert not torch.allclose(after_pol, before_pol)  # while the policy moved


def test_ppo_policy_has_no_dropout_so_the_first_ratio_is_one(tok):
    """Issue 17: PPO turns every dropout off, LoRA's included. Else the update's log-probs use other dropout masks
    than the rollout's old log-probs (ratio != 1 before any step), and each LoRA dropout keeps a copy of its input."""
    from policies.ppo import ValueHead, forward_policy, prepare_policy
    from policies.ppo_math import ppo_clip_loss
    from policies.trainer import apply_lora

    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.5)
    batch = _ppo_batch(tok)

    def trained(model):  # lora_B starts at zero (dropout then changes nothing): as after some PPO steps
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        return model.train()

    plain = trained(apply_lora(tiny_llama(tok), lora, "cpu"))
    with torch.no_grad():  # the hazard is real: with LoRA dropout on, two passes disagree
        assert not torch.equal(forward_policy(plain, None, None, batch, False)[0], forward_policy(plain, None, None, batch, False)[0])

    policy = trained(prepare_policy(tiny_llama(tok), lora, "cpu"))
    head = ValueHead(policy.config.hidden_size)
    with torch.no_grad():
        old_logp = forward_policy(policy, head, None, batch)[0]
    logp, ent, values = forward_policy(policy, head, None, batch)
    _, clip_frac, approx_kl = ppo_clip_loss(logp, old_logp, torch.ones_like(logp), batch["mask"])
    assert torch.equal(logp.detach(), old_logp) and float(clip_frac) == 0.0 and float(approx_kl) == 0.0
    assert logp.requires_grad and values.requires_grad
    assert not ent.requires_grad  # a statistic: kept out of the autograd graph (memory)


def test_gatt_training_dialogue_keeps_instruction_in_first_turn_and_trains_last_turn(tok):
    from data_specs.demo.world import DemoWorld
    from policies.ghost_attention import system_message, training_dialogue, with_instruction

    world = DemoWorld(0)
    ins = [i for i in world.gatt_instructions("train") if i.category == "public_figure"][:1]
    users = ["What is 7 plus 5?", "What is 3 plus 4?", "What is 9 minus 2?"]
    replies = [world.apply_all(ins, r) for r in ("7 plus 5 is 12.", "3 plus 4 is 7.", "9 minus 2 is 7.")]
    assert all(ins[0].text in with_instruction(u, ins) for u in users)  # synthesis time: attached to every user turn
    msgs = training_dialogue(system_message(ins, short=True), users, replies)
    assert msgs[0] == {"role": "system", "content": ins[0].short}
    assert not any(ins[0].text in m["content"] or ins[0].short in m["content"] for m in msgs[1:] if m["role"] == "user")
    ids, labels = encode_dialogue(tok, msgs, train_on="last")
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert trained.strip() == replies[-1] + " </s>"  # only the last assistant turn, earlier turns masked
    first = next(j for j, l in enumerate(labels) if l != IGNORE)
    assert all(l == IGNORE for l in labels[:first])


def test_gatt_combines_and_shortens_instructions():
    from data_specs.demo.world import DemoWorld
    from policies.ghost_attention import combine_instructions, system_message

    pool = DemoWorld(0).gatt_instructions("train")
    rng = random.Random(0)
    combos = [combine_instructions(pool, 2, rng) for _ in range(200)]
    assert all(len({i.category for i in c}) == len(c) for c in combos)  # never two of one category
    assert {len(c) for c in combos} == {1, 2}
    c = next(c for c in combos if any(i.category == "public_figure" for i in c))
    fig = next(i for i in c if i.category == "public_figure")
    assert f"Figure: {fig.value}." in system_message(c, short=True) and "Always act as" in system_message(c, short=False)


def test_win_rate_of_a_policy_against_itself_is_half(tok):
    from policies.evaluate import win_rate
    from policies.generation import SamplingParams, generate
    from reward_models.model import score

    r = torch.randn(500)
    assert win_rate(r, r) == 0.5
    assert win_rate(r + 1, r) == 1.0 and win_rate(r - 1, r) == 0.0
    # two independent samples of one policy, scored by one reward model: about half
    from transformers import LlamaConfig, LlamaForSequenceClassification

    policy = tiny_llama(tok, seed=1)
    torch.manual_seed(2)
    rm = LlamaForSequenceClassification(LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1}))
    prompts = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a in range(1, 21) for b in range(1, 11)]
    from pipeline.chat import encode_prompt

    ids = [encode_prompt(tok, p) for p in prompts]
    outs = [generate(policy, ids, SamplingParams(max_new_tokens=8, temperature=1.0, seed=s), pad_token_id=tok.pad_token_id)
            for s in (10, 11)]
    texts = [[tok.decode(o[0], skip_special_tokens=True) or "x" for o in out] for out in outs]
    a, b = (score(rm, tok, prompts, t, 64) for t in texts)
    assert abs(win_rate(a, b) - 0.5) < 0.1


def test_qlora_on_cpu_is_a_clear_error(tok, tmp_path):
    from pipeline.models import save_policy
    from policies.trainer import apply_lora, load_trainable

    qlora = LoraConfig(enabled=True, quantize_4bit=True)
    with pytest.raises(StageFailed, match="QLoRA.*CUDA"):
        apply_lora(tiny_llama(tok), qlora, "cpu")
    save_policy(tiny_llama(tok), tok, tmp_path)
    with pytest.raises(StageFailed, match="QLoRA.*CUDA GPU; this run is on the CPU"):
        load_trainable(tmp_path, qlora, "cpu")
    model, _ = load_trainable(tmp_path, LoraConfig(enabled=True), "cpu")  # plain LoRA loads as before
    assert model.dtype == torch.float32


def test_qlora_is_refused_where_it_is_not_implemented():
    from pipeline.config import ConfigError, load_config

    for key in ("ppo.lora", "reward_model_helpful.lora"):
        with pytest.raises(ConfigError, match="quantize_4bit"):
            load_config("tiny", [f"{key}.enabled=true", f"{key}.quantize_4bit=true"])
    assert load_config("tiny", ["sft.lora.enabled=true", "sft.lora.quantize_4bit=true"], check_device=False).sft.lora.quantize_4bit


def test_lora_training_merges_into_a_plain_model(tok):
    from policies.trainer import apply_lora, merge_lora

    model = tiny_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), "cpu")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, labels = encode_dialogue(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    after = merged.state_dict()
    assert set(after) == set(before)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])


def test_rm_holdout_splits_by_prompt_and_is_stable_across_rounds():
    """Issue 12 item 4: no prompt has comparisons on both sides of the RM's held-out split, and a prompt
    held out in round 1 is held out in round 2 too (the split depends on seed and prompt text only)."""
    from data_specs.schemas import Comparison, Message
    from reward_models.data import holdout, prompt_key

    def comps(rnd):
        return [Comparison(prompt=[Message(role="user", content=f"question {i}?")], chosen=f"a{j}", rejected=f"b{j}", round=rnd)
                for i in range(200) for j in range(3)]

    train1, held1 = holdout(comps(1), 0.2, seed=0)
    train2, held2 = holdout(comps(2), 0.2, seed=0)
    k = lambda cs: {prompt_key(c) for c in cs}  # noqa: E731
    assert not k(train1) & k(held1) and 20 <= len(k(held1)) <= 60
    assert k(held1) == k(held2)
    assert all(sum(prompt_key(c) == p for c in held1) == 3 for p in list(k(held1))[:5])
    assert k(holdout(comps(1), 0.2, seed=1)[1]) != k(held1)


def test_gatt_filter_defaults_to_none_and_never_uses_the_grader(monkeypatch):
    """Issue 12 item 6: no filter by default (the paper has none), the paper's synthesis by default; a
    filter must be a named, user-supplied checker, never the gold oracle that grades adherence."""
    from pipeline.config import GhostAttentionConfig, load_config
    from policies.ghost_attention import get_filter

    for preset in ("tiny", "demo", "llama2-7b"):
        g = load_config(preset, check_device=False).ghost_attention
        assert g.filter == "none" and g.synthesis == "attach_to_user" and get_filter(g) is None, preset
    with pytest.raises(Exception, match="filter_checker"):
        GhostAttentionConfig(filter="checker")
    g = GhostAttentionConfig(filter="checker", filter_checker="tests.test_rlhf_units:_ends_with_done")
    assert get_filter(g) is _ends_with_done
    with pytest.raises(Exception):
        GhostAttentionConfig(filter_samples=True)  # the old gold-filter switch is gone


def _ends_with_done(instructions, reply):
    return reply.rstrip(".").endswith("Done")


def test_ppo_logprobs_are_taken_at_the_rollout_temperature(tok):
    """Issue 12.7: with rollouts sampled at T != 1 the PPO log-probs are those of softmax(logits / T)."""
    from policies.ppo import forward_policy

    policy = tiny_llama(tok).eval()
    batch = _ppo_batch(tok)
    with torch.no_grad():
        lp1 = forward_policy(policy, None, None, batch, with_values=False)[0]
        lp2 = forward_policy(policy, None, None, batch, with_values=False, temperature=2.0)[0]
        logits = policy.lm_head(policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state)
        idx = batch["response_index"].unsqueeze(-1).expand(-1, -1, logits.size(-1))
        want = torch.log_softmax(logits.gather(1, idx).float() / 2.0, -1).gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp2, want, atol=1e-5) and not torch.allclose(lp1, lp2)


def test_truncated_rollouts_are_penalised_not_scored_as_finished():
    """Issue 12.7: a rollout with no end of turn within max_new_tokens loses missing_eos_penalty."""
    from policies.ppo import EarlyStop, finished, held_out_split, penalise_truncated

    done = finished([[5, 6, 2], [5, 6, 7], [], [2]], stops=(2,))
    assert done.tolist() == [True, False, False, True]
    assert penalise_truncated(torch.tensor([0.5, 0.5, 0.0, -1.0]), done, 1.0).tolist() == [0.5, -0.5, -1.0, -1.0]
    assert penalise_truncated(torch.tensor([0.5, 0.5]), done[:2], 0.0).tolist() == [0.5, 0.5]
    es = EarlyStop(2)
    assert es.update(0.1, 1) == (True, False) and es.update(0.05, 2) == (False, False) and es.update(0.2, 3) == (True, False)
    assert es.update(0.2, 4) == (False, False) and es.update(0.1, 5) == (False, True) and es.best_step == 3
    assert held_out_split(list(range(10)), 3, True) == (list(range(7)), [7, 8, 9])
    assert held_out_split(list(range(10)), 3, False) == (list(range(10)), [])


def test_rejection_sampling_keeps_the_best_of_all_rounds_by_the_current_rms():
    """Issue 12.7: earlier rounds' best samples are re-scored by this round's RMs; per prompt the best of
    all iterations is kept (not every earlier sample as it was scored then)."""
    from policies.rejection_sampling import best_of_all_rounds

    cur = [{"prompt_id": "a", "response": "a3", "reward_raw": 1.0, "round": 3},
           {"prompt_id": "b", "response": "b3", "reward_raw": 2.0, "round": 3}]
    old = [{"prompt_id": "a", "response": "a1", "reward": 9.0, "round": 1},  # stale high score from round 1's RMs
           {"prompt_id": "a", "response": "a2", "reward": 0.0, "round": 2},
           {"prompt_id": "b", "response": "b1", "reward": 0.0, "round": 1},
           {"prompt_id": "c", "response": "c1", "reward": 0.0, "round": 1},
           {"prompt_id": "c", "response": "c2", "reward": 0.0, "round": 2}]
    out = sorted(best_of_all_rounds(cur, old, [0.5, 1.5, 2.0, -1.0, -0.5]), key=lambda s: s["prompt_id"])
    assert [(s["prompt_id"], s["response"]) for s in out] == [("a", "a2"), ("b", "b3"), ("c", "c2")]  # b: tie keeps this round
    assert [s["reward_current_rms"] for s in out] == [1.5, 2.0, -0.5]
