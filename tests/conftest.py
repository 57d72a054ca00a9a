"""Shared fixtures. Everything runs offline: W&B offline, Prefect analytics off."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted round of the whole recipe on the `tiny` preset (about 10 s), shared by the
    stage tests, the stage invariants and the fault-injection reference: (cfg, {(stage, round): Artifact})."""
    from pipeline.config import load_config
    from pipeline.runner import Runner

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", "tracking.mode=disabled"])
    results = Runner(cfg, echo=None, show_progress=False).run_all()
    return cfg, {(r.artifact.stage, r.artifact.round): r.artifact for r in results}
