"""The generation engine (policies/generation.py) against transformers' own greedy decoding and
sampling semantics, on a tiny random Llama."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from policies.generation import SamplingParams, generate, sample_next, top_p_filter

PAD = 0
VOCAB = 100


def _llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # a larger initializer_range than the default 0.02 spreads the logits, so greedy argmaxes are not
    # near-ties that float noise between padded and unpadded batches could flip
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _llama(VOCAB, seed=0)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in (5, 12, 3, 9, 12)]


def hf_greedy(model, prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
    """transformers' greedy decoding of one unpadded prompt: the new ids."""
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def hf_greedy_batch(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' greedy decoding of a left-padded batch: the new ids per prompt."""
    L = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, eos_token_id=None,
                         pad_token_id=PAD)
    return out[:, L:].tolist()


def test_greedy_matches_transformers_generate_on_padded_batches(model, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    # a small token budget forces several buckets; a large one puts all prompts (lengths 3..12) in one padded batch
    for budget in (40, 16384):
        ours = generate(model, prompts, params, n=1, pad_token_id=PAD, max_batch_tokens=budget)
        assert [o[0] for o in ours] == hf_greedy_batch(model, prompts, 10)
        assert [o[0] for o in ours] == [hf_greedy(model, p, 10) for p in prompts]


def test_greedy_with_n_samples_repeats_the_greedy_continuation(model, prompts):
    ours = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0.0), n=3, pad_token_id=PAD)
    for p, outs in zip(prompts, ours):
        assert len(outs) == 3
        assert outs == [hf_greedy(model, p, 8)] * 3


def test_stop_token_ends_a_row_and_the_others_continue(model, prompts):
    full = [hf_greedy(model, p, 12) for p in prompts]
    stop = full[0][2]  # prompt 0 stops after its third token; other rows may or may not meet it
    ours = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,)), n=2,
                    pad_token_id=PAD)
    assert ours[0] == [full[0][:3]] * 2
    for p, ref, outs in zip(prompts, full, ours):
        expected = ref[:ref.index(stop) + 1] if stop in ref else ref  # rows left in the batch are unaffected
        assert outs == [expected] * 2
        assert outs[0] == hf_greedy(model, p, 12, eos=stop)
    assert any(stop not in ref for ref in full), "test needs at least one row that runs to max_new_tokens"


def test_sampled_rows_respect_max_new_tokens_and_stop_tokens(model, prompts):
    stops = tuple(range(3, 8))  # 5% of the vocabulary: rows finish at varied steps
    ours = generate(model, prompts, SamplingParams(max_new_tokens=15, temperature=1.0, stop_token_ids=stops, seed=0), n=6,
                    pad_token_id=PAD)
    lengths = []
    for outs in ours:
        assert len(outs) == 6
        for ids in outs:
            assert 1 <= len(ids) <= 15
            assert all(t not in stops for t in ids[:-1])  # a stop token can only be the last id
            assert ids[-1] in stops or len(ids) == 15
            lengths.append(len(ids))
    assert min(lengths) < 15 and max(lengths) == 15
    no_stop = generate(model, prompts, SamplingParams(max_new_tokens=7, seed=0), n=2, pad_token_id=PAD)
    assert all(len(ids) == 7 for outs in no_stop for ids in outs)


def test_same_seed_same_samples_different_seed_different(model, prompts):
    def run(seed):
        return generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed), n=4,
                        pad_token_id=PAD)

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert any(len(set(map(tuple, outs))) > 1 for outs in a), "the n samples of a prompt should differ"


def test_top_p_filter_matches_transformers_warper():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        ref = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits.clone(), top_p), ref), top_p


def test_sample_next_never_draws_filtered_tokens_and_renormalises():
    # p = [0.5, 0.3, 0.15, 0.05], top_p 0.8: ascending cumulative mass 0.05, 0.2, 0.5, 1 -> the two tokens
    # with cumulative mass <= 0.2 go; the rest renormalise to 0.5 / 0.8 = 0.625 and 0.3 / 0.8 = 0.375
    N = 4000
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(N, 1)
    g = torch.Generator().manual_seed(0)
    tok = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
    counts = torch.bincount(tok, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / N - 0.625) < 4 * math.sqrt(0.625 * 0.375 / N)
    assert torch.equal(sample_next(logits[:3], SamplingParams(temperature=0.0), None), torch.zeros(3, dtype=torch.long))


def test_first_token_distribution_matches_softmax_at_temperature():
    small = _llama(vocab=10, seed=3)
    prompt, T, N = [4, 7], 0.7, 2000
    with torch.no_grad():
        probs = (small(torch.tensor([prompt])).logits[0, -1] / T).softmax(-1)
    outs = generate(small, [prompt], SamplingParams(max_new_tokens=1, temperature=T, seed=0), n=N)[0]
    counts = torch.bincount(torch.tensor([o[0] for o in outs]), minlength=10).double()
    expected = probs.double() * N
    assert expected.min() > 5, "chi-square needs expected counts above 5"
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, chi2  # chi-square, 9 degrees of freedom, p = 0.001
    # and temperature matters: the same counts are far from softmax(logits) at T = 1
    p1 = (probs.log() * T).softmax(-1).double() * N
    assert float(((counts - p1) ** 2 / p1).sum()) > chi2


def test_training_mode_restored_progress_reported_and_edge_cases(model, prompts):
    model.train()
    seen = []
    try:
        generate(model, prompts, SamplingParams(max_new_tokens=2, temperature=0.0), pad_token_id=PAD, max_batch_tokens=30,
                 progress=seen.append)
        assert model.training
    finally:
        model.eval()
    assert sum(seen) == len(prompts) and len(seen) > 1
    assert generate(model, [], SamplingParams()) == []
    assert generate(model, prompts[:2], SamplingParams(max_new_tokens=0), n=2) == [[[], []], [[], []]]
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[5], []], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="backend"):
        generate(model, prompts, SamplingParams(), backend="tgi")


def test_vllm_backend_requested_without_vllm_says_so(prompts):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="vllm is not installed"):
            generate("some/checkpoint", prompts, SamplingParams(), backend="vllm")
    else:
        pytest.skip("vllm is installed")


def test_peft_wrapped_model_generates_like_the_base(model, prompts):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(_llama(VOCAB, seed=0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    params = SamplingParams(max_new_tokens=6, temperature=0.0)  # LoRA B starts at zero: same function as the base
    assert generate(wrapped, prompts, params, pad_token_id=PAD) == generate(model, prompts, params, pad_token_id=PAD)
