"""The reward model: the policy's transformer with its next-token head replaced by a scalar head
(Llama 2 sec. 3.2.2), and batched scoring of (prompt, response) pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pipeline.chat import IGNORE, encode_dialogue
from pipeline.models import unwrap_peft


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer). From a causal-LM checkpoint the LM head is dropped and a fresh scalar
    regression head is added; from a reward-model checkpoint everything is loaded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.models import on_meta

    if device == "meta":  # a rank that holds no weights (`pipeline.distributed.load_device`): the modules alone
        model = on_meta(AutoModelForSequenceClassification, path, dtype, num_labels=1)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, use_safetensors=True,
                                                                   dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(str(path))
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok


def load_frozen_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32", sharded: bool = False):
    """(model, tokenizer) of a reward model that only scores: whole on the device, or with `sharded` (in several
    processes) FSDP2-sharded over the ranks as a `RewardForward` root, the forward that runs
    (`pipeline.distributed.load_sharded`: rank 0 reads it, every rank keeps a shard)."""
    from pipeline.distributed import load_sharded, world

    if not (sharded and world().distributed):
        return load_reward_model(path, device, dtype)
    from transformers import AutoTokenizer

    model = load_sharded(lambda where: load_reward_model(path, where, dtype)[0], device, wrap=RewardForward)
    return model, AutoTokenizer.from_pretrained(str(path))


def encode_pair(tok, prompt: Sequence[dict], response: str, max_length: int) -> list[int]:
    """Token ids of prompt + response + end of turn, truncated from the left to `max_length`."""
    ids, _ = encode_dialogue(tok, [*prompt, {"role": "assistant", "content": response}])
    return ids[-max_length:]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class RewardForward(torch.nn.Module):
    """(input_ids, attention_mask) -> (N,) scalar rewards read at each sequence's last real token; or, for rows
    packed by `pack_pairs` (a 4D mask, positions and the `ends` to read), the rewards at those positions.

    One module around the reward model, so that the trainer can shard it as one FSDP2 root
    (pipeline/distributed.py): its forward is the only entry, and every weight it uses is gathered there."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                ends: torch.Tensor | None = None) -> torch.Tensor:
        inner = unwrap_peft(self.model)  # under LoRA: the adapted model
        hidden = inner.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state  # (N, T, H)
        if ends is None:  # one sequence per row
            rows, ends = torch.arange(len(ids), device=hidden.device), mask.sum(1) - 1
        else:  # pack_pairs: row i's chosen end, then row i's rejected end
            rows = torch.arange(len(ids), device=hidden.device).repeat(len(ends) // len(ids))
        return inner.score(hidden[rows, ends]).squeeze(-1).float()


def _as_forward(model):
    """`model` as something called like RewardForward: itself when it is one (or a DeepSpeed engine around one)."""
    return model if isinstance(getattr(model, "module", model), RewardForward) else RewardForward(model)


def forward_rewards(model, seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> torch.Tensor:
    """(N,) scalar rewards, read at each sequence's last real token (`model`: a reward model or its RewardForward)."""
    ids, mask = pad_right(seqs, pad_id, device)
    return _as_forward(model)(ids, mask)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (the prompt both responses follow), leaving at least one
    token of each after it."""
    k, most = 0, min(len(a), len(b)) - 1
    while k < most and a[k] == b[k]:
        k += 1
    return k


def pack_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device: str = "cpu"):
    """(chosen, rejected) token lists -> one row per pair: the chosen sequence, then the rejected sequence's tokens
    after the prefix they share, so the prompt is computed once for both. Returns (ids (B, W), 4D boolean mask
    (B, 1, W, W), position_ids (B, W), ends (2B,): chosen ends, then rejected ends). The mask is causal, except that
    the rejected tokens do not see the chosen ones; the rejected tokens take the positions they have in their own
    sequence. So each reward equals the one of its sequence scored alone (tested); padding attends to position 0."""
    B = len(pairs)
    prefixes = [shared_prefix(c, r) for c, r in pairs]
    W = max(len(c) + len(r) - k for (c, r), k in zip(pairs, prefixes))
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    pos = torch.zeros((B, W), dtype=torch.long)
    mask = torch.zeros((B, 1, W, W), dtype=torch.bool)
    ends = torch.zeros(2 * B, dtype=torch.long)
    causal = torch.ones((W, W), dtype=torch.bool).tril()
    for i, ((c, r), k) in enumerate(zip(pairs, prefixes)):
        n = len(c) + len(r) - k
        ids[i, :n] = torch.tensor(list(c) + list(r[k:]))
        pos[i, :n] = torch.cat([torch.arange(len(c)), torch.arange(k, len(r))])
        mask[i, 0, :n, :n] = causal[:n, :n]
        mask[i, 0, len(c):n, k:len(c)] = False  # rejected tokens do not see the chosen response
        mask[i, 0, n:, 0] = True
        ends[i], ends[B + i] = len(c) - 1, n - 1
    return ids.to(device), mask.to(device), pos.to(device), ends.to(device)


def packs_pairs(model) -> bool:
    """Whether `model`'s attention takes the boolean 4D mask of `pack_pairs` (sdpa does; eager adds the mask to the
    scores and flash-attention takes no mask: those score each sequence on its own row)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the module
    inner = inner.model if isinstance(inner, RewardForward) else inner
    inner = unwrap_peft(inner)
    return getattr(inner.config, "_attn_implementation", None) == "sdpa"


def forward_pair_rewards(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                         device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards (B,), rejected rewards (B,)). With sdpa attention the pair shares one row and its prompt is
    computed once (`pack_pairs`): 1.3x the pairs/s of one row per sequence on the training benchmark (bench/
    bench_training.py, fp32 and bf16), where the prompt is 22% of the tokens; otherwise one row per sequence."""
    net = _as_forward(model)
    if packs_pairs(net):
        ids, mask, pos, ends = pack_pairs(pairs, pad_id, device)
        r = net(ids, mask, pos, ends)
    else:
        r = forward_rewards(net, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)
    return r[: len(pairs)], r[len(pairs):]


@torch.no_grad()
def score(model, tok, prompts: Sequence[Sequence[dict]], responses: Sequence[str], max_length: int, device: str = "cpu",
          batch_size: int = 64, progress=None, lockstep: bool = False) -> torch.Tensor:
    """(N,) raw rewards of responses to prompts; batches sorted by length to avoid padding. progress(k) after each batch.
    lockstep: `model` is sharded over the ranks, each scoring its own pairs (any number): every rank makes as many
    calls as the busiest (a one-token call for each batch it lacks), so that the gathers inside each call pair up."""
    from pipeline.distributed import all_max

    seqs = [encode_pair(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    was_training = model.training
    model.eval()
    starts = list(range(0, len(order), batch_size))
    for b in range(int(all_max(len(starts))) if lockstep else len(starts)):
        if b >= len(starts):
            forward_rewards(model, [[tok.pad_token_id]], tok.pad_token_id, device)  # keeps pace with the other ranks
            continue
        idx = order[starts[b] : starts[b] + batch_size]
        out[idx] = forward_rewards(model, [seqs[j] for j in idx], tok.pad_token_id, device).cpu()
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    return out


__all__ = ["IGNORE", "load_reward_model", "load_frozen_reward_model", "encode_pair", "forward_pair_rewards", "forward_rewards", "score"]
