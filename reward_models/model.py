"""The reward model: the policy's transformer with its next-token head replaced by a scalar head
(Llama 2 sec. 3.2.2), and batched scoring of (prompt, response) pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pipeline.chat import IGNORE, encode_dialogue


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer). From a causal-LM checkpoint the LM head is dropped and a fresh scalar
    regression head is added; from a reward-model checkpoint everything is loaded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, use_safetensors=True,
                                                               dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(str(path))
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok


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
    """(input_ids, attention_mask) -> (N,) scalar rewards read at each sequence's last real token.

    One module around the reward model, so that the trainer can shard it as one FSDP2 root
    (pipeline/distributed.py): its forward is the only entry, and every weight it uses is gathered there."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # under LoRA: the adapted model
        hidden = inner.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, H)
        last = mask.sum(1) - 1
        return inner.score(hidden[torch.arange(len(ids), device=hidden.device), last]).squeeze(-1).float()


def forward_rewards(model, seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> torch.Tensor:
    """(N,) scalar rewards, read at each sequence's last real token (`model`: a reward model or its RewardForward)."""
    ids, mask = pad_right(seqs, pad_id, device)
    net = model if isinstance(model, RewardForward) else RewardForward(model)
    return net(ids, mask)


@torch.no_grad()
def score(model, tok, prompts: Sequence[Sequence[dict]], responses: Sequence[str], max_length: int, device: str = "cpu",
          batch_size: int = 64, progress=None) -> torch.Tensor:
    """(N,) raw rewards of responses to prompts; batches sorted by length to avoid padding. progress(k) after each batch."""
    seqs = [encode_pair(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    was_training = model.training
    model.eval()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        out[idx] = forward_rewards(model, [seqs[j] for j in idx], tok.pad_token_id, device).cpu()
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    return out


__all__ = ["IGNORE", "load_reward_model", "encode_pair", "forward_rewards", "score"]
