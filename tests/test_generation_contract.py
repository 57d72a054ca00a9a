"""One contract for every generation engine (policies/generation.py): the Hugging Face engine runs here; the vLLM
engine runs the same checks where vllm and a CUDA GPU are present (skipped otherwise, and said so)."""
from __future__ import annotations

import pytest
import torch

from policies.generation import SamplingParams, generate
from tests.helpers import tiny_llama, tiny_tokenizer


def _vllm_ready() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed (pip install -e '.[vllm]')"
    if not torch.cuda.is_available():
        return "vllm needs a CUDA GPU"
    return None


ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(_vllm_ready() is not None, reason=str(_vllm_ready())))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved on disk (vLLM loads by path); the HF engine gets the same weights in memory."""
    from pipeline.models import save_policy

    tok = tiny_tokenizer()
    model = tiny_llama(tok, hidden=64, layers=2, seed=3).eval()
    path = tmp_path_factory.mktemp("ckpt")
    save_policy(model, tok, path)
    prompts = [tok("[INST] What is the capital of Zarnia? [/INST]")["input_ids"], tok("[INST] Hi [/INST]")["input_ids"],
               tok("The capital of Belora is")["input_ids"]]
    return model, path, prompts, tok


def _engine(backend: str, checkpoint):
    model, path, _, _ = checkpoint
    if backend == "hf":
        return model
    from policies.generation import VLLMBackend

    return VLLMBackend.load(path, gpu_memory_utilization=0.3)


@pytest.mark.parametrize("backend", ENGINES)
def test_contract_shapes_lengths_and_stop_tokens(backend, checkpoint):
    _, _, prompts, tok = checkpoint
    engine = _engine(backend, checkpoint)
    stop = (tok.eos_token_id, 7, 11, 13)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=stop, seed=5)
    outs = generate(engine, prompts, params, n=4, pad_token_id=tok.pad_token_id, backend=backend)
    assert len(outs) == len(prompts) and all(len(o) == 4 for o in outs)
    for per_prompt in outs:
        for ids in per_prompt:
            assert 0 < len(ids) <= 12
            # a row ends at its FIRST stop token, which is returned; a row without one ran the full length
            firsts = [j for j, t in enumerate(ids) if t in stop]
            assert firsts == [len(ids) - 1] or (not firsts and len(ids) == 12)


@pytest.mark.parametrize("backend", ENGINES)
def test_contract_same_seed_same_samples(backend, checkpoint):
    _, _, prompts, tok = checkpoint
    engine = _engine(backend, checkpoint)
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    a = generate(engine, prompts, p, n=3, pad_token_id=tok.pad_token_id, backend=backend)
    b = generate(engine, prompts, p, n=3, pad_token_id=tok.pad_token_id, backend=backend)
    c = generate(engine, prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=12), n=3,
                 pad_token_id=tok.pad_token_id, backend=backend)
    assert a == b and a != c


@pytest.mark.parametrize("backend", ENGINES)
def test_contract_greedy_is_the_reference_greedy(backend, checkpoint):
    """Greedy decoding agrees with the HF engine, the reference for correctness (token for token)."""
    model, _, prompts, tok = checkpoint
    p = SamplingParams(max_new_tokens=10, temperature=0.0)
    ref = generate(model, prompts, p, n=1, pad_token_id=tok.pad_token_id, backend="hf")
    got = generate(_engine(backend, checkpoint), prompts, p, n=2, pad_token_id=tok.pad_token_id, backend=backend)
    for r, g in zip(ref, got):
        assert g == [r[0], r[0]]


# ---------------------------------------------------------------------------------------------- the stages' `generation`


def test_vllm_where_it_cannot_run_is_refused_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    if _vllm_ready() is None:
        pytest.skip("vllm can run here")
    run = tmp_path / "run"
    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--run-dir", str(run), "--set", "rejection_sampling.generation.backend=vllm",
                                   "--set", "evaluate.generation.backend=vllm"])
    assert out.exit_code == 2
    assert "rejection_sampling.generation.backend, evaluate.generation.backend: 'vllm' cannot run here" in out.output
    assert "pip install -e '.[vllm]'" in out.output and not run.exists()
    # PPO samples from the policy it trains: vLLM is refused for it everywhere, with the reason
    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--run-dir", str(run), "--set", "ppo.generation.backend=vllm"])
    assert out.exit_code == 2 and "PPO samples from the policy it is training" in out.output and not run.exists()


@pytest.mark.parametrize("stage", ["collect_preferences", "rejection_sampling"])
def test_a_stage_samples_with_its_generation_settings(stage, tiny_run, tmp_path, monkeypatch):
    """A stage's `generation` section reaches the engine: the real `generate`, spied on, receives the section's top_p
    and max_batch_tokens; and the settings are part of the stage's version."""
    import shutil
    from pathlib import Path

    import policies.generation as gen
    from pipeline.runner import Runner

    cfg, arts = tiny_run
    run = tmp_path / "run"
    for s in ("data", "pretrained", "sft", "collect_preferences", "reward_model_helpful", "reward_model_safety"):
        if s != stage:
            shutil.copytree(Path(cfg.run_dir) / "artifacts" / s, run / "artifacts" / s)
    tuned = cfg.model_copy(update={"run_dir": str(run)}, deep=True)
    getattr(tuned, stage).generation.top_p = 0.85
    getattr(tuned, stage).generation.max_batch_tokens = 512
    seen = []
    real = gen.generate

    def spy(model, prompts, params, *a, **kw):
        seen.append((params.top_p, kw.get("max_batch_tokens")))
        return real(model, prompts, params, *a, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    art = Runner(tuned, echo=None, show_progress=False).run_stage(stage, 1).artifact
    assert art.version != arts[(stage, 1)].version
    assert seen and all(s == (0.85, 512) for s in seen[: 1 + (stage == "collect_preferences")])


def test_engine_for_gives_the_model_for_hf_and_the_vllm_engine_has_the_contracts_generate(checkpoint):
    """`generate` hands a VLLMBackend to its own `generate` method; that method must exist even where vllm
    cannot run here (it once ended up nested, unreachable, under `engine_for`)."""
    import inspect

    from pipeline.config import EngineConfig
    from policies.generation import VLLMBackend, engine_for

    model, path, _, _ = checkpoint
    assert engine_for(type("S", (), {"generation": EngineConfig()})(), model, path) is model
    assert list(inspect.signature(VLLMBackend.generate).parameters) == ["self", "prompts", "params", "n"]
