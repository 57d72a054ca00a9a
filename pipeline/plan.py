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

from .config import RunConfig, TrainConfig, round_stages

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


def train_step(params: int, trainable: int, activations: int, logits: int, world: int = 1, layer_params: int = 0) -> dict[str, int]:
    """Terms of one training step of a float32 model with AdamW; `peak` is the larger of its two phases.

    With `world` > 1 processes (FSDP2, pipeline/distributed.py) weights, gradients and Adam moments are sharded
    `world` ways, and each process also holds two decoder blocks gathered whole (the one computing and the next)."""
    weights, grads, adam = params * FP32 // world, trainable * FP32 // world, 2 * trainable * FP32 // world
    gathered = 2 * layer_params * FP32 if world > 1 else 0
    terms = {"weights": weights, "gradients": grads, "optimizer": adam, "activations": activations, "logits": logits,
             "peak": max(weights + adam + gathered + activations + logits, weights + grads + adam + gathered)}
    if gathered:
        terms["gathered_layers"] = gathered
    return terms


def sampling(shape: Shape, resident_params: int, rows_tokens: int = GEN_BATCH_TOKENS, bytes_per: int = FP32,
             world: int = 1) -> dict[str, int]:
    """Sampling with `resident_params` of models (`bytes_per` bytes each) in memory and a KV cache of `rows_tokens` tokens.
    world > 1: the models sharded over that many processes (`hardware.shard_inference`, `load_sharded`)."""
    weights, kv = frozen_bytes(shape, resident_params, bytes_per, world), kv_cache_bytes(shape, rows_tokens, bytes_per)
    return {"weights": weights, "kv_cache": kv, "peak": weights + kv}


def frozen_bytes(shape: Shape, params: int, bytes_per: int, world: int = 1) -> int:
    """Memory on one device of models of `params` parameters that only run forward: whole, or with `world` > 1 sharded
    (`pipeline.distributed.load_sharded`): a shard, the root's own weights kept gathered (embeddings, heads) and two
    decoder blocks gathered at a time (the one computing and the next)."""
    if world <= 1:
        return params * bytes_per
    root = shape.vocab * shape.hidden + shape.lm_head
    return (params // world + root + 2 * _layer_params(shape)) * bytes_per


@dataclass(frozen=True)
class Setup:
    """What the plan is for: processes per stage that shards (`world` = GPUs per node x nodes), whether the devices are
    GPUs, and the bytes per weight of the models loaded to sample and score (the config's `dtype`)."""

    world: int = 1
    gpu: bool = False
    inference_bytes: int = FP32
    shard_inference: bool = False  # hardware.shard_inference: the models that sample and score are sharded over `world`
    host_training: bool = False  # ... and, with FSDP2, the trained models load and unshard in host memory
    deepspeed: bool = False  # hardware.sharding=deepspeed: it moves the whole model to each device before partitioning it

    @classmethod
    def of(cls, cfg: RunConfig, gpus: int | None = None, nodes: int | None = None, gpu: bool = False) -> "Setup":
        world = (gpus or cfg.hardware.gpus) * (nodes or cfg.hardware.nodes)
        half = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and gpu)
        sharded = cfg.hardware.shard_inference and world > 1
        ds = cfg.hardware.sharding == "deepspeed" and world > 1
        return cls(world, gpu, 2 if half else FP32, sharded, sharded and not ds, ds)

    @property
    def inference_world(self) -> int:
        """How many ways the models that only sample and score are split."""
        return self.world if self.shard_inference else 1


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


def _layer_params(shape: Shape) -> int:
    return (shape.params - shape.vocab * shape.hidden - shape.lm_head) // max(1, shape.layers)


def _sharded_training(shape: Shape, params: int, trainable: int, activations: int, logits: int, setup: Setup) -> dict[str, int]:
    """A training step of a stage that shards (sft, reward models, RS and GAtt fine-tunes), with the phases around it
    in several processes: the whole float32 model is loaded on each before it is sharded, and gathered whole again
    at the end (`Sharded.unshard`) while the shards still exist."""
    t = train_step(params, trainable, activations, logits, setup.world, _layer_params(shape))
    if setup.world > 1 and not setup.host_training:  # (hardware.shard_inference: loaded and gathered in host memory)
        t["unshard"] = t["weights"] + t["gradients"] + t["optimizer"] + params * FP32
        t["peak"] = max(t["peak"], t["unshard"])
    if setup.deepspeed:  # `deepspeed.initialize` moves the module whole to the device, then partitions it
        t["load"] = params * FP32
        t["peak"] = max(t["peak"], t["load"])
    return t


def _sft_like(name: str, shape: Shape, tc: TrainConfig, setup: Setup, scoring_params: int = 0, note: str = "") -> StagePlan:
    tokens = tc.micro_batch_size * tc.seq_len
    terms = _sharded_training(shape, shape.params, _trainable(shape, tc.lora, shape.params),
                              activation_bytes(shape, tokens, tc.gradient_checkpointing), logits_bytes(shape, tokens), setup)
    if setup.shard_inference:  # it samples from a sharded copy in the inference dtype, freed before it trains
        gen = sampling(shape, shape.params, bytes_per=setup.inference_bytes, world=setup.world)
    else:  # the stage's policy samples in float32 (it trains next), whole on every process
        gen = sampling(shape, shape.params)
    peak = max(terms["peak"], gen["peak"])
    if scoring_params:  # RS: on a GPU the policy waits on the CPU while both reward models score
        rm = frozen_bytes(shape, scoring_params, setup.inference_bytes, setup.inference_world)
        scoring = rm + (0 if setup.gpu or setup.shard_inference else shape.params * FP32)
        terms["reward_models"] = rm
        peak = max(peak, scoring)
    terms["kv_cache"] = gen["kv_cache"]
    terms["sampling_weights"] = gen["weights"]
    return StagePlan(name, peak, terms, (note or f"micro-batch {tc.micro_batch_size} x {tc.seq_len} tokens"
                     + (", LoRA" if tc.lora.enabled else ", full fine-tuning") + (", gradient checkpointing" if tc.gradient_checkpointing else "")
                     + (f", sharded over {setup.world} processes" if setup.world > 1 else "")) + _sharded_note(setup))


def _sharded_note(setup: Setup) -> str:
    if not setup.shard_inference:
        return ""
    return "; samples and scores with models sharded over the processes" + (
        ", loads and gathers the trained model in host memory" if setup.host_training else "")


def _reward_model(name: str, shape: Shape, rc, setup: Setup) -> StagePlan:
    tokens = rc.micro_batch_size * 2 * rc.max_length  # chosen and rejected in one forward
    p = shape.reward_model_params
    trainable = lora_params(shape, rc.lora.r, rc.lora.target_modules) + shape.hidden if rc.lora.enabled else p
    terms = _sharded_training(shape, p, trainable, activation_bytes(shape, tokens, rc.gradient_checkpointing), 0, setup)
    return StagePlan(name, terms["peak"], terms, f"micro-batch {rc.micro_batch_size} pairs x {rc.max_length} tokens, "
                     + ("LoRA" if rc.lora.enabled else "full fine-tuning") + (", gradient checkpointing" if rc.gradient_checkpointing else "")
                     + (f", sharded over {setup.world} processes" if setup.world > 1 else "") + _sharded_note(setup))


def stage_plans(cfg: RunConfig, shape: Shape, stages: list[str] | None = None, setup: Setup | None = None) -> list[StagePlan]:
    """Estimated peak memory per device of every stage of the recipe."""
    setup = setup or Setup.of(cfg)
    rms = 2 * shape.reward_model_params
    ib = setup.inference_bytes
    plans: list[StagePlan] = []
    if cfg.pretrained.model == "demo":
        d = cfg.pretrained.demo
        tokens = d.pretrain_batch_size * d.pretrain_seq_len
        t = train_step(shape.params, shape.params, activation_bytes(shape, tokens), logits_bytes(shape, tokens))
        plans.append(StagePlan("pretrained", t["peak"], t, f"demo pretraining, batch {d.pretrain_batch_size} x {d.pretrain_seq_len}"))
    elif setup.gpu:  # `pretrained` loads and saves on the CPU (policies/pretrained.py): no GPU memory
        plans.append(StagePlan("pretrained", 0, {"host_memory": shape.params * FP32}, "load and register, in host memory"))
    else:
        plans.append(StagePlan("pretrained", shape.params * FP32, {"weights": shape.params * FP32}, "load and register"))
    plans.append(_sft_like("sft", shape, cfg.sft, setup))
    cp = cfg.collect_preferences
    plans.append(StagePlan("collect_preferences", **_peak(sampling(shape, shape.params * (2 if cp.base_responses else 1), bytes_per=ib,
                                                                   world=setup.inference_world)),
                           note="policy" + (" and the pretrained model" if cp.base_responses else "") + " resident"
                           + (f", sharded over {setup.world} processes" if setup.shard_inference else "")))
    plans.append(_reward_model("reward_model_helpful", shape, cfg.reward_model_helpful, setup))
    plans.append(_reward_model("reward_model_safety", shape, cfg.reward_model_safety, setup))
    judge = "judge_reward_model" in round_stages(cfg, 1)
    if judge:
        plans.append(_reward_model("judge_reward_model", shape, cfg.judge_reward_model, setup))
    plans.append(_sft_like("rejection_sampling", shape, cfg.rejection_sampling, setup, scoring_params=rms,
                           note="sample with the policy, score with both reward models, then fine-tune"
                           + (f" (sharded over {setup.world} processes)" if setup.world > 1 else "")))
    plans.append(_ppo(cfg, shape, rms, setup))
    plans.append(_sft_like("ghost_attention", shape, cfg.ghost_attention, setup))
    # the held-out judge RM loads after both RMs are freed
    ev = sampling(shape, 3 * shape.params + rms, bytes_per=ib, world=setup.inference_world)
    plans.append(StagePlan("evaluate", ev["peak"], {**ev, "reward_models": frozen_bytes(shape, rms, ib, setup.inference_world)},
                           "policy, previous policy, SFT and both reward models resident"
                           + ("; the judge RM replaces the two once they are freed" if judge else "")
                           + (f"; every model sharded over {setup.world} processes" if setup.shard_inference else "")))
    return [p for p in plans if stages is None or p.stage in stages]


def _peak(terms: dict[str, int]) -> dict[str, Any]:
    return {"peak_bytes": terms["peak"], "terms": terms}


def _ppo(cfg: RunConfig, shape: Shape, rms: int, setup: Setup) -> StagePlan:
    """PPO keeps its reference and reward models whole in every process; its policy (with the value head) is
    replicated, or with `ppo.shard_policy` sharded like a training stage and gathered whole on each process to sample."""
    pc = cfg.ppo
    seq = PROMPT_TOKENS + pc.max_new_tokens
    micro = pc.micro_batch_size or pc.mini_batch_size
    trainable = _trainable(shape, pc.lora, shape.params) + shape.hidden + 1  # + value head
    reference = 0 if pc.lora.enabled else shape.params  # LoRA: the reference is the base with adapters off
    tokens = micro * seq
    rm_bytes = frozen_bytes(shape, rms, setup.inference_bytes, setup.inference_world)
    sharded = pc.shard_policy and setup.world > 1
    whole_to_sample = sharded and not setup.shard_inference  # with it, the blocks are gathered one at a time to sample
    activations = activation_bytes(shape, tokens, pc.gradient_checkpointing)
    logits = logits_bytes(shape, micro * pc.max_new_tokens)
    if sharded:  # the frozen reference is sharded too
        reference //= setup.world
        t = _sharded_training(shape, shape.params, trainable, activations, logits, setup)
        t["peak"] += (reference * FP32) + rm_bytes
        policy_weights = t["weights"]  # its shard, between rollouts
    else:
        t = train_step(shape.params + reference, trainable, activations, logits)
        t["peak"] += rm_bytes
        policy_weights = shape.params * FP32
    rollout_logits = (pc.micro_batch_size or pc.batch_size) * pc.max_new_tokens * shape.vocab * FP32  # no-grad log-probs, a piece at a time
    kv = kv_cache_bytes(shape, GEN_BATCH_TOKENS)
    resident = policy_weights + reference * FP32 + rm_bytes
    # sampling: the whole policy on every process (a sharded one is gathered whole for the rollouts, or with
    # hardware.shard_inference its root's weights and a block at a time)
    gathered = shape.params * FP32 if whole_to_sample else (frozen_bytes(shape, 0, FP32, setup.world) if sharded else 0)
    sample = resident + gathered + kv
    peak = max(t["peak"], resident + rollout_logits + (2 * _layer_params(shape) * FP32 if sharded else 0), sample)
    terms = {**t, "reference": reference * FP32, "reward_models": rm_bytes, "rollout_logits": rollout_logits, "kv_cache": kv}
    if sharded:
        terms["sampling_weights"] = gathered
    return StagePlan("ppo", peak, terms, f"micro-batch {micro} x {seq} tokens, "
                     + ("LoRA (reference = adapters off)" if pc.lora.enabled else "full fine-tuning with a frozen reference copy")
                     + (", gradient checkpointing" if pc.gradient_checkpointing else "")
                     + f"; log-probs of {pc.micro_batch_size or pc.batch_size} rollouts at once; "
                     + (f"policy sharded over {setup.world} processes, gathered whole to sample" if whole_to_sample
                        else f"policy sharded over {setup.world} processes, sampled a block at a time" if sharded
                        else "replicated in every process (not sharded)")
                     + ("; reward models sharded" if setup.shard_inference else ""))


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
            hints.append("use GPUs with more memory or a smaller model: the float32 weights and resident models alone exceed one device")
        from .stages import STAGES

        if plan.stage == "ppo" and not sec.shard_policy:
            hints.append("shard PPO's policy over the GPUs (--set ppo.shard_policy=true, with hardware.gpus > 1)")
        if plan.stage in STAGES and STAGES[plan.stage].distributed:
            hints.append("shard over more GPUs (--gpus N / hardware.gpus, --nodes M / hardware.nodes: weights, gradients and Adam "
                         "moments are split N x M ways)")
    if t.get("load", 0) > budget:
        hints.append("DeepSpeed moves the whole float32 model to each GPU before it partitions it: use --set hardware.sharding=fsdp2")
    if t.get("sampling_weights", 0) + t.get("kv_cache", 0) > budget or t.get("unshard", 0) > budget:
        hints.append("this stage samples with (or gathers) the whole float32 policy on every GPU: shard the models that sample "
                     "and score too (--set hardware.shard_inference=true, with FSDP2), or use GPUs with more memory")
    if sec is not None and plan.peak_bytes - static > 0.25 * budget:
        if hasattr(sec, "gradient_checkpointing") and not sec.gradient_checkpointing:
            hints.append(f"turn on gradient checkpointing (--set {plan.stage}.gradient_checkpointing=true)")
        if plan.stage == "ppo" and not sec.micro_batch_size:
            hints.append("set ppo.micro_batch_size (e.g. 4: the rollout log-probs and each mini-batch's gradient are computed "
                         "that many rollouts at a time; same results)")
        elif (getattr(sec, "micro_batch_size", 1) or 1) > 1:
            hints.append(f"lower {plan.stage}.micro_batch_size (now {sec.micro_batch_size}; the optimiser batch stays the same)")
        for key in ("seq_len", "max_length"):
            if hasattr(sec, key):
                hints.append(f"or a shorter {plan.stage}.{key} (now {getattr(sec, key)})")
    return "; ".join(hints) or "use a device with more memory"


def make_plan(cfg: RunConfig, shape: Shape, gpu_memory_gb: float | None = None, stages: list[str] | None = None,
              headroom: float = 0.9, gpus: int | None = None, nodes: int | None = None) -> tuple[list[StagePlan], float, str]:
    """Plans of the stages with `fits` and `fix` set against `headroom` x the device budget."""
    budget, what = device_budget(cfg, gpu_memory_gb)
    setup = Setup.of(cfg, gpus, nodes, gpu="GPU" in what or gpu_memory_gb is not None or cfg.device == "cuda")
    if setup.world > 1:
        what += f", {setup.world} processes ({gpus or cfg.hardware.gpus} per node x {nodes or cfg.hardware.nodes} nodes)"
    usable = budget * headroom
    plans = stage_plans(cfg, shape, stages, setup)
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
