"""`rlhf export` (a Hugging Face model folder with a model card), progress lines for logs, and `rlhf run`'s summary."""
import io

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import policy_stage
from pipeline.context import StageContext

cli = CliRunner()


def _final_policy(tiny_run):
    cfg, arts = tiny_run
    return cfg, arts[(policy_stage(cfg, cfg.rounds), cfg.rounds)], arts


def test_export_loads_with_from_pretrained_and_generates_with_the_chat_template(tiny_run, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, art, arts = _final_policy(tiny_run)
    assert art.stage == "ghost_attention"
    out = tmp_path / "export"
    res = cli.invoke(app, ["export", art.version[:8], "--out", str(out), "--run-dir", cfg.run_dir])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "[INST]" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # the same weights as the registered policy
    ref = load_file(str(art.file("model.safetensors")))
    got = model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front and "ghost-attention" in front
    assert "base model: demo" in body and "embedded demo world" in body
    for stage in ("pretrained", "sft", "collect_preferences", "reward_model_helpful", "reward_model_safety", "rejection_sampling",
                  "ppo", "ghost_attention"):
        a = arts[(stage, 0 if stage in ("pretrained", "sft") else 1)]
        assert f"| {stage} | `{a.version}` |" in body, stage
    assert "eval_loss=" in body  # sft's headline metric
    assert "## Evaluation (round 1)" in body and "gold_helpfulness" in body


def test_export_refusals_leave_nothing(tiny_run, tmp_path, monkeypatch):
    cfg, art, arts = _final_policy(tiny_run)
    rm = arts[("reward_model_safety", 1)]
    res = cli.invoke(app, ["export", rm.version, "--out", str(tmp_path / "rm"), "--run-dir", cfg.run_dir])
    assert res.exit_code == 1 and "not a policy" in res.output and not (tmp_path / "rm").exists()
    res = cli.invoke(app, ["export", "ffffffffffff", "--out", str(tmp_path / "x"), "--run-dir", cfg.run_dir])
    assert res.exit_code == 1 and "no artifact with version" in res.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = cli.invoke(app, ["export", art.version, "--out", str(busy), "--run-dir", cfg.run_dir])
    assert res.exit_code == 1 and "not empty" in res.output and [p.name for p in busy.iterdir()] == ["keep.txt"]
    # --push-to-hub without a token: the export is written, the push says what is missing
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    res = cli.invoke(app, ["export", art.version, "--out", str(tmp_path / "e"), "--run-dir", cfg.run_dir, "--push-to-hub", "me/tiny"])
    assert res.exit_code == 1 and "HF_TOKEN" in res.output and (tmp_path / "e" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- progress


def _ctx():
    return StageContext("sft", 0, "v", None, {}, None, None, None)


def test_progress_writes_plain_lines_at_most_every_interval_when_not_a_terminal():
    t = [0.0]
    buf = io.StringIO()  # not a TTY, like CI, a log file or Prefect's log capture
    bar = _ctx().progress(1000, "train", unit="step", stream=buf, clock=lambda: t[0])
    bar.update(0)
    for i in range(1000):
        t[0] += 0.1  # 10 steps/s for 100 s
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    bar.close()
    out = buf.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert 9 <= len(lines) <= 11  # one about every 10 s, plus the final one
    assert lines[0].startswith("sft r0: train 10") and "/1000 step (10%)" in lines[0]
    assert "10 step/s" in lines[0] and "ETA 1:30" in lines[0] and "loss=" in lines[0]
    assert lines[-1].startswith("sft r0: train 1000/1000 step (100%)") and "done in 1:40" in lines[-1]


def test_progress_resume_offset_and_unknown_total():
    t = [0.0]
    buf = io.StringIO()
    bar = _ctx().progress(100, "train", stream=buf, clock=lambda: t[0], interval=5)
    bar.update(50)  # resumed at step 50: not counted as speed
    for _ in range(10):
        t[0] += 1.0
        bar.update(1)
    assert "60/100 it (60%), 1 it/s, ETA 0:40" in buf.getvalue().splitlines()[-1]
    buf2 = io.StringIO()
    bar2 = _ctx().progress(None, "sample", unit="prompt", stream=buf2, clock=lambda: t[0])
    bar2.update(3)
    bar2.close()
    bar2.close()  # closing twice writes once
    assert buf2.getvalue().count("\n") == 1 and "sft r0: sample 3 prompt" in buf2.getvalue()


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    bar = _ctx().progress(10, "train", stream=buf)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" in buf.getvalue() and "train" in buf.getvalue()


# --------------------------------------------------------------------------------------------- run summary


def test_run_ends_with_a_summary_table_and_the_report_path(tiny_run):
    cfg, art, arts = _final_policy(tiny_run)
    res = cli.invoke(app, ["run", "--config", "tiny", "--run-dir", cfg.run_dir, "--set", "tracking.mode=disabled"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:5] == ["stage", "round", "result", "seconds", "headline"])
    rows = [l.split() for l in lines[head + 2: head + 2 + len(arts)]]
    assert [(r[0], int(r[1]), r[2]) for r in rows] == [(s, r, "cached") for (s, r) in arts]
    sft_row = next(l for l in lines if l.startswith("sft "))
    assert f"eval_loss={arts[('sft', 0)].metrics['eval_loss']:.4g}" in sft_row
    report = arts[("evaluate", 1)].file("report.md")
    assert lines[-1] == f"report: {report}" and report.is_file()


def test_model_card_front_matter_names_hub_base_model_and_datasets():
    from pipeline.export import _datasets, _hub_name

    hub, lines = _datasets({"source": "files", "sft": {"path": "hub:HuggingFaceH4/ultrachat_200k", "format": "trl"},
                            "prompts": {"path": "data/prompts.jsonl"},
                            "preferences": [{"path": "Anthropic/hh-rlhf:harmless-base", "format": "hh_rlhf", "domain": "safety", "weight": 1.0}]})
    assert hub == ["Anthropic/hh-rlhf", "HuggingFaceH4/ultrachat_200k"]
    assert any("data.preferences.0" in l and "domain safety" in l for l in lines) and any("data/prompts.jsonl" in l for l in lines)
    assert _hub_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf" and _hub_name("demo") is None


def test_export_merges_lora_adapters(tiny_run, tmp_path):
    """An artifact holding LoRA adapters (adapter_config.json) is exported as plain, merged weights."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.export import export_policy
    from pipeline.registry import Registry

    cfg, _, arts = _final_policy(tiny_run)
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run)  # copy2 keeps mtimes: the copy verifies
    sft = Registry(run).find("sft", 0, arts[("sft", 0)].version)
    base = AutoModelForCausalLM.from_pretrained(str(sft.path))
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(sft.path))  # adapter_config.json + adapter_model.safetensors beside the base weights
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    plain = AutoModelForCausalLM.from_pretrained(str(arts[("sft", 0)].path)).state_dict()
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])

    out = export_policy(run, sft.version, tmp_path / "export")
    assert not (out / "adapter_config.json").exists()
    got = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
