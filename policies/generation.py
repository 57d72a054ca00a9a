"""One generation engine for every stage that samples (collect_preferences, rejection_sampling,
ppo rollouts, ghost_attention, evaluate).

Why not `model.generate(num_return_sequences=K)`: on small models padding and the K-fold
expansion of the prompt dominate. Here:
* prompts are sorted by length and batched, so little left padding is needed;
* each prompt is prefilled ONCE; its KV cache is then repeated K times for the K samples;
* decoding uses the KV cache, and rows that emitted a stop token leave the batch at once, so
  finished sequences cost nothing;
* sampling (temperature, top-p, greedy at temperature 0) uses its own seeded generator.

The Hugging Face backend always works; `backend="vllm"` uses vLLM when it is installed (GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # a row stops after emitting one; the stop token is returned
    seed: int | None = None


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering with the semantics of transformers' TopPLogitsWarper: drop the
    lowest-probability tokens whose cumulative mass is <= 1 - top_p, always keep the top one.
    (R, V) -> (R, V) with -inf on dropped tokens."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    mask = remove.scatter(1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(R, V) next-token logits -> (R,) token ids."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(logits.float() / params.temperature, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _batches(order: list[int], lengths: list[int], n: int, max_new: int, max_batch_tokens: int) -> list[list[int]]:
    """Consecutive prompts (sorted by length) while rows * (length + max_new) fits the budget."""
    out, cur = [], []
    for i in order:
        width = lengths[i] + max_new
        if cur and (len(cur) + 1) * n * width > max_batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.inference_mode()
def _generate_batch(model, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams, pad_id: int, device,
                    generator: torch.Generator | None) -> list[list[list[int]]]:
    B = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    next_pos = pos[:, -1] + 1
    if n > 1:  # the prompt was prefilled once; its cache now serves all n samples
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        next_pos = next_pos.repeat_interleave(n, dim=0)
    rows = torch.arange(B * n)  # which output each live row writes to
    results: list[list[int]] = [[] for _ in range(B * n)]
    stops = torch.tensor(sorted(params.stop_token_ids), dtype=torch.long, device=device) if params.stop_token_ids else None
    for step in range(params.max_new_tokens):
        tok = sample_next(logits, params, generator)
        for r, t in zip(rows.tolist(), tok.tolist()):
            results[r].append(t)
        done = torch.isin(tok, stops) if stops is not None else torch.zeros_like(tok, dtype=torch.bool)
        if step + 1 == params.max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):  # finished rows leave the batch: they cost nothing from here on
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            tok, mask, next_pos, rows = tok[keep], mask[keep], next_pos[keep], rows[keep.cpu()]
        mask = torch.cat([mask, torch.ones((mask.size(0), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1), past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return [results[i * n:(i + 1) * n] for i in range(B)]


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1, pad_token_id: int = 0,
             max_batch_tokens: int = 16384, progress: Callable[[int], None] | None = None,
             backend: str = "hf") -> list[list[list[int]]]:
    """For each prompt, n sampled continuations (new token ids only). Deterministic given params.seed."""
    if backend == "vllm":
        return VLLMBackend.generate(model, prompts, params, n)
    if backend != "hf":
        raise ValueError(f"generation backend must be 'hf' or 'vllm', got {backend!r}")
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    results: list[list[list[int]] | None] = [None] * len(prompts)
    try:
        for batch in _batches(order, lengths, n, params.max_new_tokens, max_batch_tokens):
            outs = _generate_batch(model, [prompts[i] for i in batch], n, params, pad_token_id, device, generator)
            for i, o in zip(batch, outs):
                results[i] = o
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


@dataclass
class VLLMBackend:
    """vLLM for generation on a GPU, when installed. The model must be saved on disk (a policy
    artifact): vLLM loads it by path."""

    cache: dict = field(default_factory=dict)

    @staticmethod
    def generate(model_path, prompts, params: SamplingParams, n: int):
        try:
            from vllm import LLM, SamplingParams as VSP
        except ImportError as e:
            raise RuntimeError("generation backend 'vllm' was requested but vllm is not installed (pip install vllm, GPU only); "
                               "use backend: hf") from e
        if not isinstance(model_path, (str,)):
            raise RuntimeError("the vllm backend needs the policy's checkpoint path, not an in-memory model")
        llm = LLM(model=model_path, seed=params.seed or 0)
        sp = VSP(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                 stop_token_ids=list(params.stop_token_ids), seed=params.seed)
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]
