"""One generation engine for every stage that samples (collect_preferences, rejection_sampling,
ppo rollouts, ghost_attention, evaluate).

    outs = generate(model, prompt_ids, SamplingParams(max_new_tokens=64, temperature=1.0, stop_token_ids=(eos,), seed=0), n=8)
    outs[i][j]  # j-th sampled continuation of prompt i: new token ids only, ending with the stop token if one was emitted

Why not `model.generate(num_return_sequences=K)`: on small models padding and the K-fold
expansion of the prompt dominate. Here:
* prompts are sorted by length and batched, so little left padding is needed;
* each prompt is prefilled ONCE (logits for its last position only); its KV cache is then repeated
  n times for the n samples (`DynamicCache.batch_repeat_interleave`);
* decoding uses the KV cache under `torch.inference_mode()`, and rows that emitted a stop token
  leave the batch at once (`DynamicCache.batch_select_indices`), so finished sequences cost nothing;
* sampling (temperature, top-p with the semantics of transformers' `TopPLogitsWarper`, greedy at
  temperature 0) draws from a `torch.Generator` seeded from `params.seed`.

Determinism: the same model, prompts, params (seed included), n and max_batch_tokens give the same
outputs on the same device; the batch composition (max_batch_tokens) is part of the random stream.

The Hugging Face backend always works (LlamaForCausalLM, or a peft-wrapped one); `backend="vllm"`
uses vLLM when it is installed (GPU), loading a checkpoint saved on disk.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline.distributed import all_max, any_rank, gather, share, world
from pipeline.models import unwrap_peft


@dataclass
class SamplingParams:
    max_new_tokens: int = 64  # longest continuation, stop token included
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 => no filtering
    stop_token_ids: tuple[int, ...] = ()  # a row stops after emitting one; the stop token IS returned
    seed: int | None = None  # None => torch's global random state

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering with the semantics of transformers' TopPLogitsWarper (min_tokens_to_keep=1):
    sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always keep the
    most likely one. logits (R, V) -> (R, V) with -inf on dropped tokens."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    mask = remove.scatter(-1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens. logits (R, V) -> (R,) token ids. Greedy (argmax) at temperature 0, else a draw from
    softmax(top_p_filter(logits / T)) with `generator` (on the logits' device).

    Sampling is by inverse CDF: one uniform number per row, located in the row's cumulative
    distribution. torch.multinomial draws about V random numbers per row (about 20 ms for 128 x 4096
    on one CPU core, a large share of a small model's decode step); this takes well under 1 ms. The
    float32 cumulative sum moves a token's probability by at most ~6e-8 (one rounding of the running
    sum); filtered tokens (probability 0) are never drawn."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits.float() / params.temperature, params.top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # (R, V)
    total = cdf[:, -1:]  # (R, 1), 1 up to rounding
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: lands on a token of mass > 0
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first index with cdf > u


def _batches(order: Sequence[int], lengths: Sequence[int], n: int, max_new: int, max_batch_tokens: int) -> list[list[int]]:
    """Consecutive prompts of `order` (sorted by length, so the last one is the longest) while
    rows * (longest prompt + max_new) <= max_batch_tokens, rows = prompts * n. A prompt that alone
    exceeds the budget gets a batch of its own."""
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * n * (lengths[i] + max_new) > max_batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _accepts_logits_to_keep(model) -> bool:
    base = unwrap_peft(model)
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _generate_batch(model, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams, pad_id: int, device: torch.device,
                    generator: torch.Generator | None, keep_kw: dict, lockstep: bool = False) -> list[list[list[int]]]:
    """One bucket of prompts -> for each prompt, n continuations. `lockstep`: see `generate`."""
    B, T = len(prompts), params.max_new_tokens
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    # attention mask for the whole generation, allocated once and sliced per step: (B, L + T)
    full_mask = torch.ones((B, L + T), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        full_mask[i, :L - len(p)] = 0
    padded = any(len(p) < L for p in prompts)  # without padding the model's plain causal mask is enough
    ids, full_mask = ids.to(device), full_mask.to(device)
    pos = (full_mask[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L): real tokens at 0, 1, ...
    out = model(input_ids=ids, attention_mask=full_mask[:, :L] if padded else None, position_ids=pos, use_cache=True, **keep_kw)
    cache, logits = out.past_key_values, out.logits[:, -1, :]  # logits (B, V)
    next_pos = pos[:, -1] + 1  # (B,)
    if n > 1:  # the prompt was prefilled once; its cache now serves all n samples
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        full_mask = full_mask.repeat_interleave(n, dim=0)
        next_pos = next_pos.repeat_interleave(n, dim=0)
    R = B * n
    rows = torch.arange(R)  # (R_live,) which output each live row writes to
    tokens = torch.full((R, T), pad_id, dtype=torch.long)  # (R, T) sampled ids, on CPU
    lengths = torch.full((R,), T, dtype=torch.long)  # (R,) tokens produced per row
    stops = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device) if params.stop_token_ids else None
    for step in range(T):
        tok = sample_next(logits, params, generator)  # (R_live,)
        tokens[rows, step] = tok.cpu()
        if step + 1 == T:
            break
        if stops is not None:
            done = torch.isin(tok, stops)
            if bool(done.any()):  # finished rows leave the batch: from here on they cost nothing
                lengths[rows[done.cpu()]] = step + 1
                if bool(done.all()):
                    if lockstep:
                        _keep_pace(model, device, step, T)
                    break
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                tok, full_mask, next_pos, rows = tok[keep], full_mask[keep], next_pos[keep], rows[keep.cpu()]
        if lockstep and not any_rank(True):  # (always true here: it answers the finished ranks' question)
            break
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=full_mask[:, :L + step + 1] if padded else None,
                    position_ids=next_pos.unsqueeze(-1), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    res = [tokens[r, :lengths[r]].tolist() for r in range(R)]
    return [res[i * n:(i + 1) * n] for i in range(B)]


def _keep_pace(model, device, step: int, T: int) -> None:
    """A rank with nothing left to sample keeps calling a sharded model (one token, no cache) as long as another rank
    still decodes: each call gathers the blocks, a collective every rank must join. Mirrors the loop of
    `_generate_batch` from `step`: the others ask `any_rank` before each decoding call but the last."""
    dummy = torch.zeros((1, 1), dtype=torch.long, device=device)
    for _ in range(step, T - 1):
        if not any_rank(False):
            return
        model(input_ids=dummy, use_cache=False)


def _idle_batch(model, device, T: int) -> None:
    """A batch a rank joins with no prompts (it has fewer batches than another rank): the prefill's call, then pace."""
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    _keep_pace(model, device, 0, T)


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1, pad_token_id: int = 0,
             max_batch_tokens: int = 16384, progress: Callable[[int], None] | None = None,
             backend: str = "hf", lockstep: bool = False) -> list[list[list[int]]]:
    """For each prompt, n sampled continuations (new token ids only). Deterministic given params.seed.

    model: a causal LM (HF backend), or for backend="vllm" a checkpoint path or a `VLLMBackend`.
    prompts: token ids, each non-empty. max_batch_tokens bounds rows * (longest prompt + max_new_tokens)
    per batch (the KV-cache size). progress(k) is called after each batch with its number of prompts.
    Returns outs with len(outs) == len(prompts), len(outs[i]) == n, each continuation at most
    max_new_tokens long and ending at its first stop token. Training mode is restored afterwards.

    lockstep: `model` is sharded over the ranks (`pipeline.distributed.load_sharded`) and every rank calls this with its
    own prompts (any number, none included): each makes as many model calls as the busiest, idling through the calls
    it does not need (`_keep_pace`, `_idle_batch`), so that the gathers inside each call pair up. A rank's outputs are
    the same as without lockstep."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompt {next(i for i, p in enumerate(prompts) if len(p) == 0)} is empty; every prompt needs a token")
    if isinstance(model, ShardedBackend):
        return model.generate(prompts, params, n, progress)
    if backend == "vllm" or isinstance(model, VLLMBackend):
        engine = model if isinstance(model, VLLMBackend) else VLLMBackend.load(model)
        return engine.generate(prompts, params, n)
    if backend != "hf":
        raise ValueError(f"generation backend must be 'hf' or 'vllm', got {backend!r}")
    if not prompts and not lockstep:
        return []
    if params.max_new_tokens == 0:
        return [[[] for _ in range(n)] for _ in prompts]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    keep_kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}  # prefill: only the last position's logits
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    results: list[list[list[int]] | None] = [None] * len(prompts)
    # inference mode, except for a sharded model: FSDP2 would gather its blocks into inference tensors, which a later
    # call outside inference mode (a no-grad log-prob pass) cannot write into again
    try:
        with torch.no_grad() if lockstep else torch.inference_mode():
            batches = _batches(order, lengths, n, params.max_new_tokens, max_batch_tokens)
            for b in range(int(all_max(len(batches))) if lockstep else len(batches)):
                if b >= len(batches):
                    _idle_batch(model, device, params.max_new_tokens)
                    continue
                batch = batches[b]
                outs = _generate_batch(model, [prompts[i] for i in batch], n, params, pad_token_id, device, generator, keep_kw, lockstep)
                for i, o in zip(batch, outs):
                    results[i] = o
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


_VLLM_ENGINES: dict[str, "VLLMBackend"] = {}


class VLLMBackend:
    """vLLM on a GPU, when installed. vLLM loads weights by path, so the policy must be saved on disk
    (a policy artifact); engines are cached per path. Same semantics as the HF backend: only
    `stop_token_ids` stop a row (ignore_eos), and the stop token is returned."""

    def __init__(self, model_path: str | Path, **llm_kwargs) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("generation backend 'vllm' was requested but vllm is not installed "
                               "(pip install vllm; GPU only). Set generation.backend=hf to use the Hugging Face backend.") from e
        self.llm = LLM(model=str(model_path), **llm_kwargs)

    @classmethod
    def load(cls, model_path, **llm_kwargs) -> "VLLMBackend":
        """The engine of the checkpoint at `model_path` (cached per path and settings)."""
        if not isinstance(model_path, (str, Path)):
            raise TypeError("the vllm backend needs the policy's checkpoint path (str or Path), not an in-memory model")
        key = str(model_path) + repr(sorted(llm_kwargs.items()))
        if key not in _VLLM_ENGINES:
            _VLLM_ENGINES[key] = cls(str(model_path), **llm_kwargs)
        return _VLLM_ENGINES[key]


    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int) -> list[list[list[int]]]:
        from vllm import SamplingParams as VSP

        sp = VSP(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                 stop_token_ids=list(params.stop_token_ids), ignore_eos=True, seed=params.seed)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False)
        result = []
        for o in outs:
            per_prompt = []
            for c in o.outputs:
                ids = list(c.token_ids)
                if isinstance(c.stop_reason, int) and (not ids or ids[-1] != c.stop_reason):
                    ids.append(c.stop_reason)  # keep the stop token, as the HF backend does
                per_prompt.append(ids)
            result.append(per_prompt)
        return result


class ShardedBackend:
    """Sampling from a policy FSDP2-sharded over the ranks (`hardware.shard_inference`), for models no device holds
    whole (70B), sharded by `pipeline.distributed.load_sharded` (rank 0 reads the folder, every rank keeps its shard),
    each rank samples its share of the prompts (`share`) in lockstep (`generate(lockstep=True)`: every call of the
    model gathers one block at a time), and every rank gets all the outputs back (`gather`). The same outputs as our
    engine on each rank's share with the model whole, its seed offset by 1,000,003 x the rank (tested in 2 processes)."""

    def __init__(self, model, pad_token_id: int, max_batch_tokens: int = 16384, split: bool = True) -> None:
        """split=False: every rank samples every prompt with the same seed (the outputs of one process, whatever the
        number of ranks; the work is not divided), in lockstep all the same."""
        self.model, self.pad_token_id, self.max_batch_tokens, self.split = model, pad_token_id, max_batch_tokens, split

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int,
                 progress: Callable[[int], None] | None = None) -> list[list[list[int]]]:
        w = world()
        if not self.split:
            return generate(self.model, prompts, params, n, self.pad_token_id, self.max_batch_tokens, progress, lockstep=True)
        mine = share(list(prompts), w)
        seed = None if params.seed is None else params.seed + 1_000_003 * w.rank  # far apart: stages step seeds by 1 to 1000
        outs = generate(self.model, mine, SamplingParams(**{**vars(params), "seed": seed}), n, self.pad_token_id,
                        self.max_batch_tokens, None if progress is None else (lambda k: progress(k * w.size)), lockstep=True)
        return gather(outs, w)


def engine_for(section, model, path):
    """What a stage samples with, by its `generation` section: `model` itself (hf), or the vLLM engine of the
    checkpoint at `path` (the registry folder `model` was loaded from)."""
    g = section.generation
    if g.backend == "vllm":
        return VLLMBackend.load(path, tensor_parallel_size=g.tensor_parallel_size, gpu_memory_utilization=g.gpu_memory_utilization,
                                max_num_batched_tokens=g.max_batch_tokens)
    return model
