"""`rlhf export VERSION --out DIR [--push-to-hub REPO]`: a policy artifact as a plain Hugging Face model folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``:
safetensors weights (LoRA adapters merged when the artifact holds any), the tokenizer with its chat template,
the generation config, and a model card (``README.md``) with Hugging Face front matter (base model, datasets,
tags) and the recipe: every stage the policy was built from, with its round, version and headline metrics,
and the round's evaluation when there is one.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import CorruptArtifact
from .registry import Artifact, Registry

POLICY_STAGES = ("pretrained", "sft", "rejection_sampling", "ppo", "ghost_attention")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


class ExportError(ValueError):
    """The export cannot be made: names what is wrong and what to do."""


def find_policy(registry: Registry, version: str) -> Artifact:
    art = registry.by_version(version)
    if art is None:
        raise ExportError(f"no artifact with version {version!r} in {registry.run_dir} (`rlhf status --run-dir "
                          f"{registry.run_dir}` lists them)")
    if art.stage not in POLICY_STAGES:
        raise ExportError(f"{art.stage} r{art.round} {art.version} is not a policy (a chat model); export one of: "
                          f"{', '.join(POLICY_STAGES)} (`rlhf status` lists their versions)")
    return art


def recipe(registry: Registry, art: Artifact) -> list[Artifact]:
    """Every artifact `art` was built from (itself included), in pipeline order: round, then stage order."""
    from .stages import STAGES

    seen: dict[str, Artifact] = {}

    def walk(a: Artifact) -> None:
        if a.version in seen:
            return
        seen[a.version] = a
        for ref in a.inputs.values():
            parent = registry.find(ref["stage"], ref["round"], ref["version"])
            if parent is not None:
                walk(parent)

    walk(art)
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(seen.values(), key=lambda a: (a.round, order.get(a.stage, 99)))


def _hub_name(path: str) -> str | None:
    """The hub id a data or model path names (as the loaders read it), else None."""
    forced = path.startswith("hub:")
    path = path.removeprefix("hub:").split(":", 1)[0]
    if not _HUB_ID.fullmatch(path):
        return None
    if forced:
        return path
    local = Path(path.split("/", 1)[0]).exists() or Path(path).suffix.lower() in (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".gguf")
    return None if local else path


def _datasets(data_cfg: dict) -> tuple[list[str], list[str]]:
    """(hub dataset ids for the front matter, a description line per dataset for the card)."""
    hub, lines = [], []
    if data_cfg.get("source", "demo") == "demo":
        lines.append("the embedded demo world (synthetic tasks, a gold oracle and a simulated annotator; `data_specs/demo`)")
    for key in ("sft", "prompts", "eval_prompts", "eval_comparisons", "gatt_instructions"):
        src = data_cfg.get(key)
        if src:
            name = _hub_name(src["path"])
            hub += [name] if name else []
            lines.append(f"`data.{key}`: {src['path']} (format {src.get('format', 'auto')})")
    for i, src in enumerate(data_cfg.get("preferences") or []):
        name = _hub_name(src["path"])
        hub += [name] if name else []
        lines.append(f"`data.preferences.{i}`: {src['path']} (format {src.get('format', 'auto')}, domain {src['domain']}, "
                     f"weight {src.get('weight', 1.0)})")
    return sorted(set(hub)), lines


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _yaml_list(key: str, items: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(x)}" for x in items] if items else []


def model_card(registry: Registry, art: Artifact, run_name: str) -> str:
    """README.md with Hugging Face front matter and the recipe's stages and metrics."""
    from .stages import STAGES

    stages = recipe(registry, art)
    pretrained = next((a for a in stages if a.stage == "pretrained"), None)
    base = str(pretrained.metrics.get("source", "")) if pretrained else ""
    base_hub = _hub_name(base.split(" (", 1)[0]) if base else None
    data_cfg = art.manifest.get("config", {}).get("data", {})
    hub_datasets, dataset_lines = _datasets(data_cfg)
    evaluation = registry.find("evaluate", art.round) if art.round > 0 else None
    if evaluation is not None and evaluation.inputs.get("policy", {}).get("version") != art.version:
        evaluation = None  # the round's evaluation judged another policy

    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if base_hub:
        front.append(f"base_model: {json.dumps(base_hub)}")
    front += _yaml_list("datasets", hub_datasets)
    front += _yaml_list("tags", ["rlhf", "llama-2-chat-recipe", "reward-model", "rejection-sampling",
                                 *(["ppo"] if any(a.stage == "ppo" for a in stages) else []),
                                 *(["ghost-attention"] if any(a.stage == "ghost_attention" for a in stages) else [])])
    front.append("---")

    body = [f"# {run_name}: {art.stage} round {art.round} ({art.version})", "",
            "A chat model aligned with the Llama 2-Chat recipe (Touvron et al. 2023, sec. 3) by the rlhf-llama2 pipeline. "
            "Load it with `AutoModelForCausalLM.from_pretrained` and prompt it through the tokenizer's chat template "
            "(`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`).", "",
            f"* base model: {base or 'unknown'}",
            f"* exported artifact: `{art.stage}` round {art.round}, version `{art.version}`", "", "## Data", ""]
    body += [f"* {line}" for line in dataset_lines] or ["* (not recorded)"]
    body += ["", "## Recipe", "", "| round | stage | version | what it does | headline metrics |", "| --- | --- | --- | --- | --- |"]
    for a in stages:
        spec = STAGES.get(a.stage)
        head = ", ".join(f"{k}={_fmt(a.metrics[k])}" for k in (spec.headline if spec else ()) if k in a.metrics)
        body.append(f"| {a.round} | {a.stage} | `{a.version}` | {spec.description if spec else ''} | {head} |")
    if evaluation is not None:
        body += ["", f"## Evaluation (round {art.round})", "", "| metric | value |", "| --- | --- |"]
        for k, v in sorted(evaluation.metrics.items()):
            if isinstance(v, (int, float, bool)) and not k.startswith("n_"):
                body.append(f"| {k} | {_fmt(v)} |")
    return "\n".join(front + [""] + body) + "\n"


def _merged(src: Path):
    """The base model with the LoRA adapters of `src` merged in. The base is the folder's own weights when it has a
    config.json (read without the adapter files, which transformers would otherwise attach itself), else the
    adapter config's base_model_name_or_path."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        if (src / "config.json").is_file():
            for f in src.iterdir():
                if f.is_file() and not f.name.startswith("adapter_"):
                    (Path(tmp) / f.name).symlink_to(f.resolve())
            base_path = tmp
        else:
            base_path = json.loads((src / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
            if not base_path:
                raise ExportError(f"{src} holds LoRA adapters without base weights or a base_model_name_or_path")
        base = AutoModelForCausalLM.from_pretrained(base_path, use_safetensors=True)
        return PeftModel.from_pretrained(base, str(src)).merge_and_unload()


def export_policy(run_dir: str | Path, version: str, out: str | Path, *, run_name: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write the policy artifact `version` of `run_dir` to `out` as a Hugging Face model folder; returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .chat import ensure_chat_template, ensure_pad_token

    hf_logging.disable_progress_bar()  # a few small files: no bars in the command's output

    registry = Registry(run_dir)
    art = find_policy(registry, version)
    try:
        registry.check(art)  # never export weights that no longer match their manifest
    except CorruptArtifact as e:  # the message names the files and the fix
        raise ExportError(str(e)) from e
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; give an empty or new folder (or --overwrite)")
        shutil.rmtree(out)
    src = art.path
    if (src / "adapter_config.json").is_file():  # LoRA adapters on a base: merge them into plain weights
        model = _merged(src)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(src))
    ensure_pad_token(tok)
    ensure_chat_template(tok)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(registry, art, run_name or art.manifest.get("run", "rlhf")), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def push_to_hub(folder: str | Path, repo: str, token: str | None = None, private: bool = True) -> str:
    """Upload an exported folder to the hub repo `repo` (created if missing); needs a token (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise ExportError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="rlhf export")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
