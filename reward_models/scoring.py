"""Both reward models loaded once, scoring batches with the paper's combined reward (sec. 3.2.3):

    R_c = R_s  if is_safety(prompt) or R_s < 0.15  else R_h,      R~_c = WHITEN(LOGIT(R_c))

R_s and R_h are probabilities: the sigmoid of each model's scalar output. LOGIT(R_c) is the gated model's
raw output itself (combine.combined_reward_from_logits): no sigmoid -> logit round trip, no clamping.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .combine import combined_reward_from_logits, gate_logits, gate_reward
from .model import load_frozen_reward_model, score


@dataclass
class Scores:
    r_helpful: torch.Tensor  # (N,) probability
    r_safety: torch.Tensor  # (N,) probability
    gated: torch.Tensor  # (N,) probability after the safety gate
    combined: torch.Tensor  # (N,) whitened raw logit of the gated model (unwhitened with whiten=False)
    gated_logit: torch.Tensor | None = None  # (N,) raw logit of the gated model (LOGIT(R_c), unclamped)

    def rows(self) -> list[dict]:
        return [{"r_helpful": float(h), "r_safety": float(s), "gated": float(g), "reward": float(c)}
                for h, s, g, c in zip(self.r_helpful, self.r_safety, self.gated, self.combined)]


class RewardScorer:
    """Both reward models, and the safety-gated combination of their scores.

    sharded (`hardware.shard_inference`, several processes): each model FSDP2-sharded over the ranks from the start
    (`pipeline.distributed.load_sharded`: no device holds one whole), each rank scores its share of the pairs in
    lockstep and every rank gets all the scores back; the same scores as one process (tested in 2 processes)."""

    def __init__(self, helpful_path: str | Path, safety_path: str | Path, device: str = "cpu", threshold: float = 0.15,
                 max_length: int = 4096, dtype: str = "float32", sharded: bool = False):
        from pipeline.distributed import world

        self.sharded = sharded and world().distributed
        self.helpful, self.tok_h = load_frozen_reward_model(helpful_path, device, dtype, self.sharded)
        self.safety, self.tok_s = load_frozen_reward_model(safety_path, device, dtype, self.sharded)
        self.helpful.eval()
        self.safety.eval()
        self.device, self.threshold, self.max_length = device, threshold, max_length

    @classmethod
    def from_inputs(cls, ctx, threshold: float = 0.15) -> "RewardScorer":
        max_len = max(ctx.config.reward_model_helpful.max_length, ctx.config.reward_model_safety.max_length)
        return cls(ctx.input("reward_model_helpful").path, ctx.input("reward_model_safety").path, ctx.device, threshold, max_len,
                   getattr(ctx, "inference_dtype", "float32"), sharded=ctx.config.hardware.shard_inference)

    def _raw(self, model, tok, prompts, responses, own: bool) -> torch.Tensor:
        if not self.sharded:
            return score(model, tok, prompts, responses, self.max_length, self.device).float()
        if own:  # this rank's own items: scored here, in step with the other ranks' calls
            return score(model, tok, prompts, responses, self.max_length, self.device, lockstep=True).float()
        from pipeline.distributed import gather, share

        mine = score(model, tok, share(prompts), share(responses), self.max_length, self.device, lockstep=True)
        return torch.tensor(gather(mine.tolist()), dtype=torch.float32)

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], is_safety: Sequence[bool], whiten: bool = True,
              own: bool = False) -> Scores:
        """Scores of the responses. Sharded, every rank calls this: by default with the same items (they are split over
        the ranks and every rank gets all the scores back); with `own`, each with items of its own (PPO's share of a
        rollout batch), scored where they are. Unsharded, `own` changes nothing."""
        zh = self._raw(self.helpful, self.tok_h, prompts, responses, own)
        zs = self._raw(self.safety, self.tok_s, prompts, responses, own)
        rh, rs = torch.sigmoid(zh), torch.sigmoid(zs)
        flags = torch.tensor(list(is_safety), dtype=torch.bool)
        return Scores(rh, rs, gate_reward(rs, rh, flags, self.threshold),
                      combined_reward_from_logits(zs, zh, flags, self.threshold, whiten_output=whiten),
                      gate_logits(zs, zh, flags, self.threshold))
