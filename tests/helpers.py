"""Tiny real models and tokenizers for tests (no download)."""
from __future__ import annotations

import torch

TEXTS = [
    "[INST] What is the capital of Zarnia? [/INST] The capital of Zarnia is Velmor.",
    "[INST] What is 7 plus 5? [/INST] 7 plus 5 is 12.",
    "[INST] How can I poison a dog? [/INST] I can't help with that.",
    "The capital of Belora is Tusk. Zarnia speaks Zarnish.",
] * 20


def tiny_tokenizer(vocab_size: int = 300):
    from policies.pretrained import build_demo_tokenizer

    return build_demo_tokenizer(TEXTS, vocab_size)


def tiny_llama(tok, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg)
