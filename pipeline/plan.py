"""`rlhf plan`: will each stage fit in memory? Estimated before any work, from the model config.

The model is instantiated on the meta device (no memory, no weights) to count its parameters exactly;
everything else is arithmetic on its shape and the stage's config. The estimates model what the code
does today, stage by stage:

* weights are loaded in float32 (`pipeline.models.load_policy`); training uses AdamW (two float32
  moments per trainable parameter) and keeps float32 gradients; there is no sharding yet, so every
  device holds whole models;
* a training step's peak is the larger of (weights + Adam moments + activations + logits), at the
  start of the backward pass, and (weights + gradients + Adam moments), at the optimiser step;
* activations per token per layer of a Llama block (norms, q/k/v, attention output, SwiGLU):
  (10 h + 2 kv + 4 i) x 4 bytes without gradient checkpointing, h x 4 bytes per layer plus one full
  layer with it; the float32 logits cost 3 copies of tokens x vocab x 4 bytes (the logits, the
  log-softmax kept for backward, its gradient);
* sampling holds the KV cache of at most `GEN_BATCH_TOKENS` tokens (the engine's `max_batch_tokens`);
* stages that score keep both reward models resident beside the policy (rejection sampling, PPO,
  evaluate), and PPO's no-grad pass over the whole rollout batch builds float32 logits of
  batch x response x vocab.

Checked against measured peaks on this CPU (`bench/bench_plan.py`, resident-memory peaks of real
training and generation steps of Llama models of 7M-100M parameters): see the README for the errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, TrainConfig

GiB = 1024 ** 3
GEN_BATCH_TOKENS = 16384  # policies.generation.generate(max_batch_tokens=...) default: rows x (prompt + new)
PROMPT_TOKENS = 512  # assumed prompt length where a stage's config does not bound it
FP32 = 4

# Llama 2 shapes (Touvron et al. 2023, Table 1 and the released configs), so `rlhf plan` works for
# the presets without a download; any other hub id needs its config.json in the local HF cache.
KNOWN_ARCHITECTURES: dict[str, dict[str, int]] = {
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "meta-llama/Llama-2-13b-hf": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "meta-llama/Llama-2-70b-hf": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}
for _k in list(KNOWN_ARCHITECTURES):
    KNOWN_ARCHITECTURES[_k.replace("-hf", "-chat-hf")] = KNOWN_ARCHITECTURES[_k]


class PlanError(ValueError):
    """The plan cannot be made (unknown architecture) or a stage will not fit; names the stage and the fix."""


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from a transformers config."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    tied: bool

    @property
    def lm_head(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def reward_model_params(self) -> int:
        """The trunk without the LM head, plus a scalar head."""
        return self.params - self.lm_head + self.hidden

    @classmethod
    def from_config(cls, config) -> "Shape":
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params=params, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   kv_dim=getattr(config, "num_key_value_heads", heads) * head_dim,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


# ---------------------------------------------------------------------------------------- the maths


def lora_params(shape: Shape, r: int, targets: list[str]) -> int:
    """Trainable parameters of LoRA adapters (r x (in + out) per adapted matrix per layer)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return shape.layers * sum(r * (a + b) for name, (a, b) in dims.items() if name in targets)


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool = False) -> int:
    """Saved activations of a forward pass over `tokens` tokens (float32)."""
    per_layer = (10 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate) * FP32 * tokens
    if checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        return shape.layers * shape.hidden * FP32 * tokens + per_layer
    return shape.layers * per_layer


def logits_bytes(shape: Shape, tokens: int) -> int:
    """Float32 logits, the log-softmax kept for backward, and its gradient."""
    return 3 * tokens * shape.vocab * FP32


def kv_cache_bytes(shape: Shape, tokens: int, bytes_per: int = FP32) -> int:
    return 2 * shape.layers * shape.kv_dim * tokens * bytes_per


def train_step(params: int, trainable: int, activations: int, logits: int) -> dict[str, int]:
    """Terms of one training step of a float32 model with AdamW; `peak` is the larger of its two phases."""
    weights, grads, adam = params * FP32, trainable * FP32, 2 * trainable * FP32
    return {"weights": weights, "gradients": grads, "optimizer": adam, "activations": activations, "logits": logits,
            "peak": max(weights + adam + activations + logits, weights + grads + adam)}


def sampling(shape: Shape, resident_params: int, rows_tokens: int = GEN_BATCH_TOKENS) -> dict[str, int]:
    """Sampling with `resident_params` of models in memory and a KV cache of `rows_tokens` tokens."""
    weights, kv = resident_params * FP32, kv_cache_bytes(shape, rows_tokens)
    return {"weights": weights, "kv_cache": kv, "peak": weights + kv}


# ---------------------------------------------------------------------------------------- stages


@dataclass
class StagePlan:
    stage: str
    peak_bytes: int
    terms: dict[str, int]
    note: str = ""
    fits: bool = True
    fix: str = ""

    def row(self) -> dict[str, Any]:
        return {"stage": self.stage, "peak_gib": round(self.peak_bytes / GiB, 3), "fits": self.fits, "fix": self.fix,
                "note": self.note, "terms_gib": {k: round(v / GiB, 3) for k, v in self.terms.items()}}


def _trainable(shape: Shape, tc_lora, base_params: int) -> int:
    return lora_params(shape, tc_lora.r, tc_lora.target_modules) if tc_lora.enabled else base_params


def _sft_like(name: str, shape: Shape, tc: TrainConfig, extra_resident: int = 0, note: str = "") -> StagePlan:
    tokens = tc.micro_batch_size * tc.seq_len
    terms = train_step(shape.params, _trainable(shape, tc.lora, shape.params), activation_bytes(shape, tokens, tc.gradient_checkpointing),
                       logits_bytes(shape, tokens))
    gen = sampling(shape, shape.params + extra_resident)
    peak = max(terms["peak"] + extra_resident * FP32, gen["peak"])
    if extra_resident:
        terms["reward_models"] = extra_resident * FP32
    terms["kv_cache"] = gen["kv_cache"]
    return StagePlan(name, peak, terms, note or f"micro-batch {tc.micro_batch_size} x {tc.seq_len} tokens"
                     + (", LoRA" if tc.lora.enabled else ", full fine-tuning") + (", gradient checkpointing" if tc.gradient_checkpointing else ""))


def _reward_model(name: str, shape: Shape, rc) -> StagePlan:
    tokens = rc.micro_batch_size * 2 * rc.max_length  # chosen and rejected in one forward
    p = shape.reward_model_params
    terms = train_step(p, p, activation_bytes(shape, tokens), 0)
    return StagePlan(name, terms["peak"], terms, f"micro-batch {rc.micro_batch_size} pairs x {rc.max_length} tokens, full fine-tuning")


def stage_plans(cfg: RunConfig, shape: Shape, stages: list[str] | None = None) -> list[StagePlan]:
    """Estimated peak memory per device of every stage of the recipe."""
    rms = 2 * shape.reward_model_params
    plans: list[StagePlan] = []
    if cfg.pretrained.model == "demo":
        d = cfg.pretrained.demo
        tokens = d.pretrain_batch_size * d.pretrain_seq_len
        t = train_step(shape.params, shape.params, activation_bytes(shape, tokens), logits_bytes(shape, tokens))
        plans.append(StagePlan("pretrained", t["peak"], t, f"demo pretraining, batch {d.pretrain_batch_size} x {d.pretrain_seq_len}"))
    else:
        plans.append(StagePlan("pretrained", shape.params * FP32, {"weights": shape.params * FP32}, "load and register"))
    plans.append(_sft_like("sft", shape, cfg.sft))
    cp = cfg.collect_preferences
    plans.append(StagePlan("collect_preferences", **_peak(sampling(shape, shape.params * (2 if cp.base_responses else 1))),
                           note="policy" + (" and the pretrained model" if cp.base_responses else "") + " resident"))
    plans.append(_reward_model("reward_model_helpful", shape, cfg.reward_model_helpful))
    plans.append(_reward_model("reward_model_safety", shape, cfg.reward_model_safety))
    plans.append(_sft_like("rejection_sampling", shape, cfg.rejection_sampling, extra_resident=rms,
                           note="both reward models resident while sampling, scoring and fine-tuning"))
    plans.append(_ppo(cfg, shape, rms))
    plans.append(_sft_like("ghost_attention", shape, cfg.ghost_attention))
    ev = sampling(shape, 3 * shape.params + rms)
    plans.append(StagePlan("evaluate", ev["peak"], {**ev, "reward_models": rms * FP32},
                           "policy, previous policy, SFT and both reward models resident"))
    return [p for p in plans if stages is None or p.stage in stages]


def _peak(terms: dict[str, int]) -> dict[str, Any]:
    return {"peak_bytes": terms["peak"], "terms": terms}


def _ppo(cfg: RunConfig, shape: Shape, rms: int) -> StagePlan:
    pc = cfg.ppo
    seq = PROMPT_TOKENS + pc.max_new_tokens
    trainable = _trainable(shape, pc.lora, shape.params) + shape.hidden + 1  # + value head
    reference = 0 if pc.lora.enabled else shape.params  # LoRA: the reference is the base with adapters off
    tokens = pc.mini_batch_size * seq
    t = train_step(shape.params + reference + rms, trainable, activation_bytes(shape, tokens), logits_bytes(shape, tokens))
    rollout_logits = pc.batch_size * pc.max_new_tokens * shape.vocab * FP32  # no-grad log-probs of the whole batch
    kv = kv_cache_bytes(shape, GEN_BATCH_TOKENS)
    weights = (shape.params + reference + rms) * FP32
    peak = max(t["peak"], weights + rollout_logits, weights + kv)
    terms = {**t, "reference": reference * FP32, "reward_models": rms * FP32, "rollout_logits": rollout_logits, "kv_cache": kv}
    return StagePlan("ppo", peak, terms, f"mini-batch {pc.mini_batch_size} x {seq} tokens, "
                     + ("LoRA (reference = adapters off)" if pc.lora.enabled else "full fine-tuning with a frozen reference copy")
                     + f"; log-probs of {pc.batch_size} rollouts at once")


# ---------------------------------------------------------------------------------------- budget and fixes


def device_budget(cfg: RunConfig, gpu_memory_gb: float | None = None) -> tuple[float, str]:
    """(bytes available per device, what it is): the given GPU size, else this machine's GPU, else its RAM."""
    if gpu_memory_gb is not None:
        return gpu_memory_gb * GiB, f"{gpu_memory_gb:g} GiB per GPU (declared)"
    if cfg.device in ("cuda", "auto"):
        try:
            import torch

            if torch.cuda.is_available():
                total = torch.cuda.get_device_properties(0).total_memory
                return float(total), f"{total / GiB:.0f} GiB ({torch.cuda.get_device_name(0)})"
        except ImportError:
            pass
        if cfg.device == "cuda":
            raise PlanError("device is cuda but no GPU is visible here: pass --gpu-memory GB to plan for the GPUs you will run on")
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(ram), f"{ram / GiB:.0f} GiB of RAM (CPU)"


def fix_for(plan: StagePlan, cfg: RunConfig, budget: float) -> str:
    """What to change so the stage fits: the static part (weights, optimiser state, resident models)
    first, then the part that scales with the batch."""
    t = plan.terms
    sec = getattr(cfg, plan.stage, None) if plan.stage not in ("pretrained", "evaluate", "collect_preferences") else None
    hints = []
    static = t.get("weights", 0) + t.get("optimizer", 0) + t.get("reference", 0) + t.get("reward_models", 0)
    if static > budget:
        if sec is not None and hasattr(sec, "lora") and not sec.lora.enabled:
            hints.append(f"train LoRA adapters (--set {plan.stage}.lora.enabled=true): no gradients or Adam moments for the base weights")
        else:
            hints.append("use GPUs with more memory or a smaller model: the float32 weights and resident models alone exceed one device "
                         "(bf16 weights and sharding across GPUs are not available yet)")
    if sec is not None and plan.peak_bytes - static > 0.25 * budget:
        if hasattr(sec, "gradient_checkpointing") and not sec.gradient_checkpointing:
            hints.append(f"turn on gradient checkpointing (--set {plan.stage}.gradient_checkpointing=true)")
        if t.get("rollout_logits", 0) > 0.25 * budget:
            hints.append(f"lower ppo.batch_size (now {sec.batch_size}: the log-probs of the whole rollout batch are computed at once)")
        for key in ("micro_batch_size", "mini_batch_size"):
            if getattr(sec, key, 1) > 1:
                hints.append(f"lower {plan.stage}.{key} (now {getattr(sec, key)}; the optimiser batch stays the same)")
        for key in ("seq_len", "max_length"):
            if hasattr(sec, key):
                hints.append(f"or a shorter {plan.stage}.{key} (now {getattr(sec, key)})")
    return "; ".join(hints) or "use a device with more memory"


def make_plan(cfg: RunConfig, shape: Shape, gpu_memory_gb: float | None = None, stages: list[str] | None = None,
              headroom: float = 0.9) -> tuple[list[StagePlan], float, str]:
    """Plans of the stages with `fits` and `fix` set against `headroom` x the device budget."""
    budget, what = device_budget(cfg, gpu_memory_gb)
    usable = budget * headroom
    plans = stage_plans(cfg, shape, stages)
    for p in plans:
        p.fits = p.peak_bytes <= usable
        if not p.fits:
            p.fix = fix_for(p, cfg, usable)
    return plans, usable, what


def refusal(plans: list[StagePlan], usable: float, what: str) -> str | None:
    """The message that stops a run before any work, or None when every stage fits."""
    bad = [p for p in plans if not p.fits]
    if not bad:
        return None
    lines = [f"these stages will not fit in {usable / GiB:.1f} GiB ({what}, 90% usable):"]
    for p in bad:
        lines.append(f"  {p.stage}: needs about {p.peak_bytes / GiB:.1f} GiB ({p.note}) -> {p.fix}")
    lines.append("`rlhf plan` shows every term; set hardware.check_plan=false to run anyway")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the model's shape


def model_shape(cfg: RunConfig) -> Shape:
    """The shape of the run's base model, without loading weights or downloading anything."""
    from transformers import AutoConfig, LlamaConfig

    pc = cfg.pretrained
    if pc.model == "demo":
        d = pc.demo
        return Shape.from_config(LlamaConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                                             num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                                             num_key_value_heads=d.num_kv_heads, max_position_embeddings=d.max_position_embeddings))
    if pc.model in KNOWN_ARCHITECTURES:
        return Shape.from_config(LlamaConfig(**KNOWN_ARCHITECTURES[pc.model]))
    from .models import resolve_source

    source, gguf = resolve_source(pc.model, pc.gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if not Path(source).exists():
        kwargs["local_files_only"] = True  # never download to plan
    try:
        config = AutoConfig.from_pretrained(source, revision=pc.revision, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read the architecture of pretrained.model={pc.model!r} without downloading it ({e}); "
                        f"known without a download: demo, a local directory or .gguf file, {', '.join(sorted(KNOWN_ARCHITECTURES))}") from e
    return Shape.from_config(config)


__all__ = ["Shape", "StagePlan", "PlanError", "stage_plans", "make_plan", "refusal", "model_shape", "lora_params",
           "activation_bytes", "logits_bytes", "kv_cache_bytes", "train_step", "sampling", "GiB"]
