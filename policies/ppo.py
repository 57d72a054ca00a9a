"""Stage `ppo(r)`: PPO on top of the rejection-sampling checkpoint (Llama 2 sec. 3.2.3).

    rlhf stage ppo --round 2

Objective: maximise R(g|p) = R~_c(g|p) - beta * KL(pi(g|p) || pi_0(g|p)), with R~_c the whitened
logit of the safety-gated combined reward and pi_0 the round's starting policy. Each iteration:
sample `batch_size` rollouts, score them, compute per-token rewards (KL on every token, the score
on the last), GAE, then one gradient step per mini-batch with the clipped policy and value losses.

Memory: the value head sits on the policy trunk (one forward gives logits and values); with LoRA
the reference policy is the same weights with adapters disabled, so no second copy is held.
Guards stop the stage, keeping the last good checkpoint, when KL exceeds `kl_bound`, a reward is not
finite, or the response length collapses or explodes; the reason is in the manifest. A non-finite
training loss fails the stage (StageFailed): the update that produced it cannot be trusted.

Log-probs (policy, old and reference) are taken at the rollout temperature (logits / T), so the PPO
ratio and the KL are those of the distribution the rollouts were sampled from. A rollout that did not
end within `max_new_tokens` loses `missing_eos_penalty` from its whitened reward (the RM template
appends an end of turn, so it would otherwise be scored as a finished reply). With
`early_stop_patience > 0`, the mean unwhitened combined reward of greedy replies to
`early_stop_prompts` prompts held out of PPO training is measured every `early_stop_every`
iterations; the stage stops after `early_stop_patience` evaluations without a new best and keeps the
best policy (sec. 3.2.3: "evaluations on held-out prompts for early stopping").
"""
from __future__ import annotations

import json
import math

import copy
import time
import torch

from pipeline.chat import encode_prompt, stop_token_ids
from pipeline.context import StageContext, StageFailed
from pipeline.distributed import Sharded, all_sum, check_divisible, from_main, gather, load_device, shard_frozen, share
from pipeline.io import write_json
from pipeline.models import holds_weights, load_policy, save_policy, unwrap_peft

from data_specs.schemas import messages_to_dicts

from .common import demo_oracle, load_data, subsample
from .generation import SamplingParams, generate
from .ppo_math import entropy_from_logits, gae, kl_penalty, logprobs_from_logits, masked_mean, masked_whiten, per_token_rewards, ppo_clip_loss, value_loss
from .trainer import apply_lora, load_on_main, load_train_state, merge_lora, save_on_main, save_train_state


class ValueHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.v = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.v.weight)
        torch.nn.init.zeros_(self.v.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.v(h).squeeze(-1).float()


VALUE_HEAD_FILE = "value_head.safetensors"


def save_value_head(head: ValueHead, out_dir) -> None:
    """The value head as safetensors, like every other weight in an artifact (never a pickle)."""
    from safetensors.torch import save_file

    if not holds_weights(head):  # a rank other than 0 of a model too big for one device: rank 0 saves it
        return
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(out_dir / VALUE_HEAD_FILE))


def load_value_head(art_dir, device: str = "cpu") -> ValueHead:
    """The value head a `ppo` artifact saved (`value_head.safetensors`)."""
    from safetensors.torch import load_file

    state = load_file(str(art_dir / VALUE_HEAD_FILE), device=device)
    head = ValueHead(state["v.weight"].shape[1]).to(device)
    head.load_state_dict(state)
    return head


def prepare_policy(policy, lora, device: str):
    """The policy PPO trains: LoRA applied (when enabled) and every dropout off, LoRA's included. With dropout
    on, the update's log-probs are drawn with other masks than the rollout's old log-probs, so the first
    mini-batch's ratio pi/pi_old is not 1 and clips at random; and each LoRA dropout keeps a copy of its
    module's input for the backward pass (0.6 model copies of a step's resident memory, bench/bench_ppo_memory.py).
    The loop is TRL's `disable_dropout_in_model`, written out: importing trl costs 4 s for three lines."""
    policy = apply_lora(policy, lora, device)
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return policy


class PolicyValue(torch.nn.Module):
    """What PPO trains, as one module: the policy, its value head and, when configured, a separate critic trunk.
    Its forward is `forward_policy`'s, so that sharded (FSDP2) it is the root whose forward gathers the embeddings,
    final norm and heads; one optimiser and one state dict cover all of it."""

    def __init__(self, policy, head: ValueHead | None, critic=None):
        super().__init__()
        self.policy, self.head, self.critic = policy, head, critic

    def forward(self, batch: dict, with_values: bool = True, temperature: float = 1.0):
        return _forward_policy(self.policy, self.head, self.critic, batch, with_values, temperature)

    def disable_adapter(self):
        """The reference policy pi_0 under LoRA: the same weights with the adapters off."""
        return self.policy.disable_adapter()

    def tie_weights(self):
        """Tie the policy's embeddings and LM head again (after its weights were loaded into fresh storage)."""
        inner = unwrap_peft(self.policy)
        if hasattr(inner, "tie_weights"):
            inner.tie_weights()


def forward_policy(model, head, critic, batch: dict, with_values: bool = True, temperature: float = 1.0):
    """Per-response-token (logprobs, entropy, values), each (B, A). Logits and values come from one
    pass through the shared trunk (or a separate critic trunk when configured). Log-probs and entropy
    are those of softmax(logits / temperature), the distribution the rollouts were sampled from.
    `model` is a policy (with `head` and `critic`), or a PolicyValue holding all three (head and critic ignored)."""
    if isinstance(model, PolicyValue):
        return model(batch, with_values=with_values, temperature=temperature)
    return _forward_policy(model, head, critic, batch, with_values, temperature)


def _forward_policy(model, head, critic, batch: dict, with_values: bool, temperature: float):
    ids, attn, index, resp = batch["input_ids"], batch["attention_mask"], batch["response_index"], batch["response_ids"]
    lm = unwrap_peft(model)  # with LoRA the adapters live inside these modules, so this pass uses them
    hidden = lm.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, H)
    gather = index.unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    h = hidden.gather(1, gather)  # (B, A, H): the states that predict each response token
    logits = lm.lm_head(h).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits, resp)
    with torch.no_grad():  # a statistic, never differentiated: in the graph it would keep 3 more (B, A, V) tensors
        ent = entropy_from_logits(logits)
    values = None
    if with_values:
        if critic is not None:
            ch = critic(input_ids=ids, attention_mask=attn).last_hidden_state.gather(1, gather)
            values = head(ch)
        else:
            values = head(h)
    return logp, ent, values


def build_batch(prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """One PPO batch of B rollouts; T = prompt + response tokens, A = longest response.

    input_ids (B, T): prompt then response, right-padded; attention_mask (B, T);
    response_index (B, A): position in T of the logit that predicts response token a;
    response_ids (B, A): response tokens, pad after the end; mask (B, A): 1 on real response tokens."""
    B = len(prompt_ids)
    A = max(1, max(len(r) for r in responses))
    T = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    index = torch.zeros((B, A), dtype=torch.long)
    resp = torch.full((B, A), pad_id, dtype=torch.long)
    mask = torch.zeros((B, A))
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        n = len(r)
        index[i] = torch.clamp(torch.arange(A) + len(p) - 1, max=T - 1)
        if n:
            resp[i, :n] = torch.tensor(r)
            mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_index": index, "response_ids": resp, "mask": mask}


def _chunks(batch: dict, size: int | None):
    """The batch in consecutive pieces of at most `size` rollouts (all of it when size is None)."""
    n = batch["input_ids"].shape[0]
    size = size or n
    for i in range(0, n, size):
        yield {k: v[i : i + size] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _cat(parts: list):
    return None if parts[0] is None else torch.cat(parts)


def forward_in_chunks(model, head, critic, batch: dict, size: int | None, with_values: bool = True, temperature: float = 1.0):
    """forward_policy over the batch `size` rollouts at a time: the (size, A, vocab) logits of one chunk are the
    largest temporary, not those of the whole rollout batch (which at 512 x 1024 x 32k float32 is 67 GB)."""
    outs = [forward_policy(model, head, critic, c, with_values=with_values, temperature=temperature) for c in _chunks(batch, size)]
    return tuple(_cat([o[i] for o in outs]) for i in range(3))


@torch.no_grad()
def advantages(policy, head, critic, ref, batch: dict, scores: torch.Tensor, beta: float, gamma: float = 1.0, lam: float = 0.95,
               temperature: float = 1.0, micro_batch_size: int | None = None):
    """The no-grad half of a PPO iteration: old log-probs and values, KL to pi_0 (a frozen `ref`, or
    the policy with its adapters disabled when `ref` is None), per-token rewards, GAE, whitened
    advantages, the forward passes `micro_batch_size` rollouts at a time. Returns (old_logp, old_values,
    kl, advantages, returns), each (B, A)."""
    mask = batch["mask"]
    old_logp, _, old_values = forward_in_chunks(policy, head, critic, batch, micro_batch_size, temperature=temperature)
    if ref is not None:
        ref_logp, _, _ = forward_in_chunks(ref, None, None, batch, micro_batch_size, with_values=False, temperature=temperature)
    else:
        with policy.disable_adapter():
            ref_logp, _, _ = forward_in_chunks(policy, None, None, batch, micro_batch_size, with_values=False, temperature=temperature)
    kl = kl_penalty(old_logp, ref_logp, "k1")
    rewards = per_token_rewards(scores, kl, mask, beta)
    adv, returns = gae(rewards, old_values * mask, mask, gamma, lam)
    return old_logp, old_values, kl, masked_whiten(adv, mask), returns


def minibatch_gradients(policy, head, critic, batch: dict, idx: torch.Tensor, old_logp, old_values, adv, returns, cfg,
                        n_tokens: torch.Tensor | None = None, loss_scale: float = 1.0) -> dict:
    """Backward of one PPO mini-batch (rollouts `idx`): clipped policy loss plus `vf_coef` x value loss, accumulated
    over pieces of `cfg.micro_batch_size` rollouts. Each piece's masked means, weighted by its share of the
    mini-batch's response tokens, add up to the mini-batch's: the gradient does not depend on the piece size.
    `n_tokens`: the response tokens of the whole mini-batch when `idx` is one rank's share of it (default: idx's own).
    `loss_scale` multiplies what is differentiated (a sharded model averages gradients over ranks: the process count).
    Returns the mini-batch's losses and statistics (floats); the caller steps the optimiser."""
    mask = batch["mask"]
    if n_tokens is None:
        n_tokens = mask[idx].sum().clamp(min=1)
    size = cfg.micro_batch_size or len(idx)
    stats = dict.fromkeys(("loss", "policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy"), 0.0)
    for j in range(0, len(idx), size):
        sub = idx[j : j + size]
        mb = _select(batch, sub)
        w = mb["mask"].sum() / n_tokens
        logp, ent, values = forward_policy(policy, head, critic, mb, temperature=cfg.temperature)
        pl, clip_frac, approx_kl = ppo_clip_loss(logp, old_logp[sub], adv[sub], mb["mask"], cfg.clip)
        vl, _ = value_loss(values, old_values[sub], returns[sub], mb["mask"], cfg.value_clip)
        loss = pl + cfg.vf_coef * vl
        # a non-finite loss is not cut short here: with a sharded policy every rank must run the same passes. It
        # reaches the statistics, and the caller fails the stage on every rank before any optimiser step.
        (loss * w * loss_scale).backward()
        for k, v in (("loss", loss), ("policy_loss", pl), ("value_loss", vl), ("clip_frac", clip_frac), ("approx_kl", approx_kl),
                     ("entropy", masked_mean(ent.detach(), mb["mask"]))):
            stats[k] += float(v.detach() * w)
    return stats


def score_rollouts(scorer, dialogues, texts, is_safety) -> "Scores":
    """Each rank scores its share of the rollouts; every rank gets the whole batch's scores, the combined reward
    whitened over the whole batch (in one process: `scorer.score` itself)."""
    from reward_models.combine import whiten
    from reward_models.scoring import Scores

    mine = scorer.score(share(dialogues), share(texts), share(is_safety), whiten=False, own=True)
    cols = {k: torch.tensor(gather(getattr(mine, k).tolist()), dtype=torch.float32)
            for k in ("r_helpful", "r_safety", "gated", "gated_logit")}
    z = cols["gated_logit"]
    return Scores(cols["r_helpful"], cols["r_safety"], cols["gated"], whiten(z) if z.numel() >= 2 else z, z)


def finished(responses: list[list[int]], stops) -> torch.Tensor:
    """(B,) bool: the rollout ended with a stop token (generate returns it) within max_new_tokens."""
    stops = set(int(t) for t in stops)
    return torch.tensor([bool(r) and int(r[-1]) in stops for r in responses], dtype=torch.bool)


def penalise_truncated(scores: torch.Tensor, done: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores minus `penalty` where the rollout was cut off at max_new_tokens (no end of turn)."""
    return scores - penalty * (~done.to(scores.device)).to(scores.dtype)


def held_out_split(prompts: list, n: int, enabled: bool) -> tuple[list, list]:
    """(train prompts, early-stop prompts): the last n prompts are held out of PPO when enabled."""
    if not enabled or len(prompts) <= n:
        return prompts, []
    return prompts[:-n], prompts[-n:]


class EarlyStop:
    """Stop after `patience` evaluations without a new best held-out reward; remembers the best step."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_step, self.bad = patience, float("-inf"), None, 0

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """(improved, stop)."""
        if value > self.best:
            self.best, self.best_step, self.bad = value, step, 0
            return True, False
        self.bad += 1
        return False, self.patience > 0 and self.bad >= self.patience


def _select(batch: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run(ctx: StageContext) -> dict:
    from reward_models.scoring import RewardScorer

    cfg = ctx.section
    device = ctx.device
    home = load_device(ctx.config, device) if cfg.shard_policy else device  # too big for one device: host, then sharded
    policy, tok = load_policy(ctx.input("policy").path, home)
    hidden = policy.config.hidden_size
    ref = None
    if not cfg.lora.enabled:  # pi_0 as a frozen copy; with LoRA it is the same weights with adapters off
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        if cfg.shard_policy:  # sharded like the policy: its forward passes go through one root
            ref = shard_frozen(PolicyValue(ref, None), device)
    policy = prepare_policy(policy, cfg.lora, device)
    critic = None
    if not cfg.share_value_trunk:
        critic = copy.deepcopy(unwrap_peft(policy).model).train()
    # several processes: the policy (with head and critic) is replicated, gradients summed over ranks, or sharded
    # with FSDP2 (ppo.shard_policy) and gathered whole only to sample (pipeline/distributed.py `Sharded`)
    pv = Sharded(PolicyValue(policy, ValueHead(hidden).to(device), critic), device,
                 lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay),
                 engine="fsdp2" if cfg.shard_policy else "replicated", max_grad_norm=cfg.max_grad_norm)
    model = pv.module  # every forward pass goes through it
    del policy, critic
    sharded_sampling = pv.engine == "fsdp2" and ctx.config.hardware.shard_inference  # never gathered whole (70B)
    if pv.engine == "fsdp2":  # every forward and backward is a collective: every rank must take as many pieces
        check_divisible(cfg.mini_batch_size, "ppo.mini_batch_size")
        if cfg.batch_size % cfg.mini_batch_size:
            raise StageFailed(f"ppo.batch_size={cfg.batch_size} is not a multiple of ppo.mini_batch_size={cfg.mini_batch_size}: "
                              "with ppo.shard_policy every mini-batch must split evenly over the processes")
    scorer = RewardScorer.from_inputs(ctx, cfg.safety_threshold)
    prompts_all, early_prompts = held_out_split(load_data(ctx, "prompts.jsonl", "prompt"), cfg.early_stop_prompts,
                                                cfg.early_stop_patience > 0)
    oracle = demo_oracle(ctx)
    stops = stop_token_ids(tok)
    early = EarlyStop(cfg.early_stop_patience)
    best_ckpt = ctx.work_dir / "ppo_best.pt"

    def held_out_reward() -> float:
        """Mean unwhitened combined reward of greedy replies to the early-stop prompts."""
        dl = [messages_to_dicts(p.messages) for p in early_prompts]
        sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stops, seed=ctx.seed)
        with pv.gathered(whole=not sharded_sampling) as m:  # every rank the same prompts (in lockstep when sharded)
            outs = [r[0] for r in generate(m.policy, [encode_prompt(tok, d) for d in dl], sp, n=1, pad_token_id=tok.pad_token_id,
                                           lockstep=sharded_sampling)]
        txt = [tok.decode(r, skip_special_tokens=True).strip() for r in outs]
        s = scorer.score(dl, txt, [p.is_safety for p in early_prompts], whiten=False).combined
        return float(penalise_truncated(s, finished(outs, stops), cfg.missing_eos_penalty).mean())

    ckpt = ctx.work_dir / "ppo_state.pt"
    start = resumed = load_train_state(ckpt, pv, None)  # several processes: each rank reads its own shard
    ctx.resume_metrics(start)  # steps from here on are logged again: each step once in metrics.jsonl
    good = {"step": start}

    def save(step: int) -> None:
        save_train_state(ckpt, pv, None, step)  # several processes: each rank writes its own shard
        good["step"] = step

    # the steps done before a resume are in the (cut back) metrics history: the summary covers every step
    stop_reason, history = "completed", _earlier_steps(ctx.work_dir / "metrics.jsonl")
    bar = ctx.progress(cfg.steps, "PPO", unit="iter")
    bar.update(start)
    for step in range(start, cfg.steps):
        t0 = time.time()
        prompts = subsample(prompts_all, cfg.batch_size, ctx.seed * 7919 + step)
        dialogues = [messages_to_dicts(p.messages) for p in prompts]
        prompt_ids = [encode_prompt(tok, d) for d in dialogues]
        sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_token_ids=stops, seed=ctx.seed + step)
        # several processes: each samples and scores its share of the prompts; every rank then holds the whole batch
        with pv.gathered(whole=not sharded_sampling) as m:  # too big for one device: blocks gathered one at a time, in lockstep
            responses = gather([r[0] for r in generate(m.policy, share(prompt_ids), sp, n=1, pad_token_id=tok.pad_token_id,
                                                       lockstep=sharded_sampling)])
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
        sc = score_rollouts(scorer, dialogues, texts, [p.is_safety for p in prompts])
        done = finished(responses, stops)
        batch = {k: v.to(device) for k, v in build_batch(prompt_ids, responses, tok.pad_token_id).items()}
        mask = batch["mask"]
        rewards_in = penalise_truncated(sc.combined.to(device), done, cfg.missing_eos_penalty)

        old_logp, old_values, kl, adv, returns = advantages(model, None, None, ref, batch, rewards_in, cfg.beta, cfg.gamma,
                                                            cfg.lam, temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size)

        stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "entropy": 0.0, "approx_kl": 0.0}
        n_updates = 0
        g = torch.Generator().manual_seed(ctx.seed + step)
        if cfg.gradient_checkpointing:  # the updates only: rollouts sample with the KV cache
            unwrap_peft(model.policy).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(prompts), generator=g)
            for i in range(0, len(prompts), cfg.mini_batch_size):
                idx = perm[i : i + cfg.mini_batch_size].to(device)
                # several processes: each takes its share of the mini-batch; the gradients are summed over ranks
                mine = idx[share(range(len(idx)))]
                mb_stats = minibatch_gradients(model, None, None, batch, mine, old_logp, old_values, adv, returns, cfg,
                                               n_tokens=mask[idx].sum().clamp(min=1), loss_scale=pv.grad_scale)
                mb_stats = {k: all_sum(v) for k, v in mb_stats.items()}
                if not math.isfinite(mb_stats["loss"]):  # fail the stage, not just this mini-batch loop (issue 12.7)
                    raise StageFailed(f"ppo: non-finite loss ({mb_stats['loss']}) at step {step} (policy {mb_stats['policy_loss']}, "
                                      f"value {mb_stats['value_loss']}); the last good checkpoint is step {good['step']} in {ckpt}")
                for k in stats:
                    stats[k] += mb_stats[k]
                pv.step(None)  # the gradients summed over ranks, clipped, one optimiser step
                n_updates += 1
        if cfg.gradient_checkpointing:
            unwrap_peft(model.policy).activation_checkpointing_disable()
        stats = {k: v / max(1, n_updates) for k, v in stats.items()}
        lengths = mask.sum(1)
        row = {
            "reward": float(sc.gated.mean()),
            "reward_logit": float(sc.gated_logit.mean()),
            "truncated_frac": float((~done).float().mean()),
            "reward_whitened": float(sc.combined.mean()),
            "r_helpful": float(sc.r_helpful.mean()),
            "r_safety": float(sc.r_safety.mean()),
            "kl": float((kl * mask).sum(1).mean()),
            "response_length": float(lengths.mean()),
            "hit_max_frac": float((lengths >= cfg.max_new_tokens).float().mean()),
            "tokens_per_s": float(lengths.sum()) / max(1e-9, time.time() - t0),
            **stats,
        }
        if oracle is not None:
            row["gold_helpfulness"] = sum(oracle.helpfulness(p, t) for p, t in zip(prompts, texts)) / len(prompts)
            row["gold_safety_violation_rate"] = sum(not oracle.is_safe(p, t) for p, t in zip(prompts, texts) if p.is_safety) / max(1, sum(p.is_safety for p in prompts))
        history.append(row)
        ctx.log(row, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}")
        if stop_reason == "completed":
            stop_reason = guard(row, cfg)
        if stop_reason != "completed":
            break
        if (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1)
        if early_prompts and ((step + 1) % cfg.early_stop_every == 0 or step + 1 == cfg.steps):
            value = held_out_reward()
            improved, stop = early.update(from_main(value), step + 1)  # every rank takes rank 0's decision
            ctx.log({"held_out_reward": value}, step=step)
            if improved:
                save_on_main(best_ckpt, model=pv.model_state(), step=step + 1)
            if stop:
                stop_reason = (f"early stop: held-out reward {value:.3f} not above the best {early.best:.3f} (step {early.best_step}) "
                               f"for {cfg.early_stop_patience} evaluations")
                break
    bar.close()

    best_state = load_on_main(best_ckpt, required=("model", "step")) if early_prompts else None
    start_over = False
    if best_state is not None and (stop_reason != "completed" or early.best_step != len(history)):
        pv.load_model_state(best_state["model"])  # keep the best held-out policy
        good["step"] = best_state["step"]
        stop_reason = stop_reason if stop_reason != "completed" else "completed (kept the best held-out step)"
    elif stop_reason != "completed":  # roll back to the last good checkpoint (or the starting policy)
        kept = load_train_state(ckpt, pv, None)  # its weights (and optimiser state, unused from here), every rank
        if kept:
            good["step"] = kept
        else:
            start_over = True
    sharding = pv.engine
    del scorer  # the reward models are done: their memory is free for the gathered policy
    trained = pv.unshard(home)  # the plain PolicyValue with the kept weights, on every rank
    policy, head = trained.policy, trained.head
    if start_over:
        policy, tok = load_policy(ctx.input("policy").path, home)
    policy = merge_lora(policy).eval()
    save_policy(policy, tok, ctx.out_dir, dtype=ctx.artifact_dtype)
    save_value_head(head, ctx.out_dir)
    first, last = history[0] if history else {}, history[-1] if history else {}
    summary = {
        "stop_reason": stop_reason,
        "steps_done": len(history),
        "kept_step": good["step"] if stop_reason != "completed" else len(history),
        "best_held_out_reward": early.best if early_prompts and early.best_step is not None else None,
        "truncated_frac": last.get("truncated_frac"),
        "resumed_from_step": resumed,
        "reward": last.get("reward"),
        "reward_first": first.get("reward"),
        "kl": last.get("kl"),
        "entropy": last.get("entropy"),
        "response_length": last.get("response_length"),
        "sharding": sharding,
    }
    if oracle is not None and history:
        summary["gold_helpfulness_first"] = first.get("gold_helpfulness")
        summary["gold_helpfulness"] = last.get("gold_helpfulness")
    write_json(ctx.out_dir / "ppo_summary.json", summary)
    if stop_reason != "completed":
        ctx.log({"stopped": stop_reason}, step=len(history))
    _plot(ctx, history)
    return summary


def _earlier_steps(path) -> list[dict]:
    """The per-step rows logged before a resume (metrics.jsonl is cut back to the checkpoint's step)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "policy_loss" in r and "reward" in r]


def guard(row: dict, cfg) -> str:
    """'completed' while the step looks healthy, else the reason to stop."""
    for k in ("reward", "kl", "policy_loss", "value_loss"):
        if not torch.isfinite(torch.tensor(row[k])):
            return f"{k} is {row[k]}"
    if row["kl"] > cfg.kl_bound:
        return f"KL to pi_0 {row['kl']:.3f} exceeds kl_bound {cfg.kl_bound}"
    if row["response_length"] < cfg.min_response_tokens:
        return f"response length collapsed to {row['response_length']:.2f} tokens"
    if row["hit_max_frac"] > cfg.max_response_frac:
        return f"response length exploded: {row['hit_max_frac']:.0%} of rollouts hit max_new_tokens"
    return "completed"


def _plot(ctx: StageContext, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["reward", "kl", "entropy", "clip_frac", "response_length", "gold_helpfulness"]
    keys = [k for k in keys if k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6))
    for ax, k in zip(axes, keys):
        ax.plot([h[k] for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(f"PPO round {ctx.round}")
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "ppo_curves.png", dpi=90)
    plt.close(fig)


