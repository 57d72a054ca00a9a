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
from .model import load_reward_model, score


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
    def __init__(self, helpful_path: str | Path, safety_path: str | Path, device: str = "cpu", threshold: float = 0.15,
                 max_length: int = 4096, dtype: str = "float32"):
        self.helpful, self.tok_h = load_reward_model(helpful_path, device, dtype)
        self.safety, self.tok_s = load_reward_model(safety_path, device, dtype)
        self.helpful.eval()
        self.safety.eval()
        self.device, self.threshold, self.max_length = device, threshold, max_length

    @classmethod
    def from_inputs(cls, ctx, threshold: float = 0.15) -> "RewardScorer":
        max_len = max(ctx.config.reward_model_helpful.max_length, ctx.config.reward_model_safety.max_length)
        return cls(ctx.input("reward_model_helpful").path, ctx.input("reward_model_safety").path, ctx.device, threshold, max_len,
                   getattr(ctx, "inference_dtype", "float32"))

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], is_safety: Sequence[bool], whiten: bool = True) -> Scores:
        zh = score(self.helpful, self.tok_h, prompts, responses, self.max_length, self.device).float()
        zs = score(self.safety, self.tok_s, prompts, responses, self.max_length, self.device).float()
        rh, rs = torch.sigmoid(zh), torch.sigmoid(zs)
        flags = torch.tensor(list(is_safety), dtype=torch.bool)
        return Scores(rh, rs, gate_reward(rs, rh, flags, self.threshold),
                      combined_reward_from_logits(zs, zh, flags, self.threshold, whiten_output=whiten),
                      gate_logits(zs, zh, flags, self.threshold))
