"""Loaders: user files and hub datasets -> validated records of `data_specs.schemas`.

    records = load_records("prefs.jsonl", "preference")                  # raises DataValidationError on any bad record
    records, issues = load_records("hub:Anthropic/hh-rlhf", "preference", format="hh_rlhf", split="test", strict=False)

Sources
-------
* a local ``.jsonl`` / ``.ndjson`` file (read as bytes, each line decoded on its own, so a bad line is
  reported with its line number instead of crashing the whole load),
* a local ``.json`` file holding a list of objects or ``{"data": [...]}`` (a ``.json`` file that is really
  JSON Lines is read as such),
* a local ``.parquet`` file (pyarrow), a local ``.csv`` file (``datasets.load_dataset("csv", data_files=...)``),
* a local directory: ``datasets.load_dataset(path, split=split)``,
* ``org/name`` that is not a local path (see :func:`looks_like_hub_id`), or a string starting with ``hub:``, is a
  hub dataset name: ``datasets.load_dataset(name, split=split)``; ``name:config`` selects a configuration.
  Anything else that does not exist (``data/mysft``, ``./x``, ``mysft``) is "file not found" at once.

Formats (``format="auto"`` detects the format of each record from its keys)
-------------------------------------------------------------------------
* ``own``: exactly the pydantic schemas (unknown keys are errors).
* ``trl``: TRL's standard dataset formats. sft: ``messages``, or ``prompt``/``completion`` (strings become
  a user and an assistant turn; conversational lists of messages are concatenated). prompt: ``prompt``
  (string or message list) or ``messages``. preference: ``prompt``/``chosen``/``rejected`` with strings or
  message lists (conversational ``chosen``/``rejected`` hold the assistant reply), or implicit prompt
  (only ``chosen``/``rejected`` as full conversations; their shared prefix is the prompt). TRL's optional
  ``margin`` column is *not* a preference strength (it is a free-form float with no mapping to the four
  Llama 2 levels) and is ignored, like any other column TRL records may carry. ``is_safety`` (or
  ``is_safety_prompt``), ``strength``, ``chosen_safe``, ``rejected_safe``, ``round``, ``source``, ``id`` and
  ``category`` are taken where the schema has them.
* ``hh_rlhf``: Anthropic HH-RLHF ``chosen``/``rejected`` transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...").
  All turns but the final assistant turn form the prompt (which must be the same in both); the final
  assistant turns are the responses; ``strength`` is None (margin 0). Turn texts are stripped of
  surrounding whitespace. For kind ``prompt`` the prompt part is used, for kind ``sft`` the chosen transcript.
* ``mapped``: ``field_map`` maps our field names to the file's column names; after renaming, each record
  is parsed as in ``auto`` (columns not named in the map are kept under their own names).

Every bad record becomes a :class:`RecordIssue` (file, 1-based line, field, reason). ``line`` is the JSONL
line, the JSON list index + 1 or the parquet/dataset row + 1; 0 means the whole source (unreadable file,
unknown hub dataset, ...). For a ``.json`` file that does not parse, ``line`` is the text line of the error.
``field`` is the dotted path in our schema (``prompt.0.content``) or in the file's record, or ``-`` for a
whole-line problem.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from pydantic import ValidationError

from pipeline.io import write_jsonl

from .schemas import RECORD_KINDS, STRENGTHS, Comparison, GattInstruction, Prompt, SFTExample
from .validate import format_issues

FORMATS = ("auto", "own", "trl", "hh_rlhf", "mapped")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
_FILE_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES


class RecordIssue(NamedTuple):
    """One problem with one record: ``file:line: field: reason``."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


class DataValidationError(ValueError):
    """Raised by strict loading when any record is bad; nothing is returned then."""

    def __init__(self, issues: Sequence[RecordIssue], n_valid: int = 0):
        self.issues: list[RecordIssue] = list(issues)
        self.n_valid = n_valid
        n_bad = len({(i.file, i.line) for i in self.issues})
        super().__init__(f"{n_bad} bad record(s), {n_valid} valid:\n{format_issues(self.issues)}")


class _Bad(Exception):
    """Adapter-level problem with a record: (field, reason)."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


# ----------------------------------------------------------------------------------------------------- reading


def _type_name(v: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _decode_error(e: UnicodeDecodeError, data: bytes) -> str:
    return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start + 1})"


def _read_jsonl_bytes(data: bytes, label: str) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((n, RecordIssue(label, n, "-", _decode_error(e, raw))))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append((n, RecordIssue(label, n, "-", f"malformed JSON at column {e.colno}: {e.msg}")))
            continue
        rows.append((n, obj))
    return rows


def _read_json_bytes(data: bytes, label: str) -> list[tuple[int, Any]]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        return [(line, RecordIssue(label, line, "-", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                                                     f"{e.start - line_start + 1})"))]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            return _read_jsonl_bytes(data, label)
        return [(e.lineno, RecordIssue(label, e.lineno, "-", f"malformed JSON at column {e.colno}: {e.msg}"))]
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        return [(0, RecordIssue(label, 0, "-", f'expected a JSON list of records or {{"data": [...]}}, got {_type_name(obj)}'))]
    return [(i, row) for i, row in enumerate(obj, 1)]


def _strip_none(v: Any) -> Any:
    """Columnar sources (parquet, datasets) fill absent keys with None: treat those as absent."""
    if isinstance(v, dict):
        return {k: _strip_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_strip_none(x) for x in v]
    return v


def _read_parquet(path: Path, label: str) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - any reader failure is a whole-file issue
        return [(0, RecordIssue(label, 0, "-", f"cannot read parquet file: {type(e).__name__}: {e}"))]
    return [(i, _strip_none(row)) for i, row in enumerate(rows, 1)]


def load_hub_rows(name: str, split: str = "train", config: str | None = None, data_files: Any = None) -> list[dict]:
    """Rows of a dataset through ``datasets.load_dataset`` (hub name, local directory, or a packaged
    builder such as ``"json"``/``"parquet"``/``"csv"`` with ``data_files``). None values are dropped."""
    import datasets

    kwargs: dict[str, Any] = {"split": split}
    if data_files is not None:
        kwargs["data_files"] = data_files
    ds = datasets.load_dataset(name, config, **kwargs) if config else datasets.load_dataset(name, **kwargs)
    return [_strip_none(dict(row)) for row in ds]


def _rows_from_datasets(label: str, name: str, split: str, config: str | None = None, data_files: Any = None) -> list[tuple[int, Any]]:
    try:
        rows = load_hub_rows(name, split=split, config=config, data_files=data_files)
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad split: a whole-source issue
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return [(0, RecordIssue(label, 0, "-", f"cannot load dataset: {type(e).__name__}: {msg}"))]
    return list(enumerate(rows, 1))


def read_rows(source: str | Path, split: str = "train") -> tuple[str, list[tuple[int, Any]]]:
    """(label, [(line, raw row or RecordIssue), ...]) of a source, without interpreting the rows."""
    text = str(source)
    if isinstance(source, str) and text.startswith("hub:"):
        name = text[len("hub:"):]
        return _hub(name, split)
    path = Path(text).expanduser()
    label = str(source)
    if path.is_dir():
        return label, _rows_from_datasets(label, str(path), split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            return label, _read_parquet(path, label)
        if suffix in CSV_SUFFIXES:
            return label, _rows_from_datasets(label, "csv", split="train", data_files=str(path))
        try:
            data = path.read_bytes()
        except OSError as e:
            return label, [(0, RecordIssue(label, 0, "-", f"cannot read file: {e}"))]
        if suffix in JSON_SUFFIXES:
            return label, _read_json_bytes(data, label)
        if suffix in JSONL_SUFFIXES:
            return label, _read_jsonl_bytes(data, label)
        return label, [(0, RecordIssue(label, 0, "-", f"unsupported file type {suffix or '(none)'!r}; use "
                                                      f"{', '.join(_FILE_SUFFIXES)}, a directory or a hub dataset"))]
    if isinstance(source, Path) or path.suffix.lower() in _FILE_SUFFIXES:
        return label, [(0, RecordIssue(label, 0, "-", "file not found"))]
    if not looks_like_hub_id(text):  # never wait on the hub for a path that is simply missing
        return label, [(0, RecordIssue(label, 0, "-", "file not found (a hub dataset is written org/name or hub:NAME)"))]
    return _hub(text, split)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?")


def looks_like_hub_id(text: str) -> bool:
    """True for ``org/name`` (optionally ``:config``) that is not a local path: one slash, no leading ``.``,
    ``/`` or ``~``, no ``\\``, and ``org`` is not a local folder (``data/mysft`` next to a ``data/`` folder is a
    missing file, not a dataset). Anything else that does not exist locally is a missing file; ``hub:`` forces the hub."""
    if not _HUB_ID.fullmatch(text) or "\\" in text or ".." in text:
        return False
    org = text.split("/", 1)[0]
    return not Path(org).exists()


def _hub(name: str, split: str) -> tuple[str, list[tuple[int, Any]]]:
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    label = f"hub:{name}{':' + config if config else ''}[{split}]"
    unreachable = _hub_unreachable()
    if unreachable:  # fail at once instead of retrying for ~25 s
        local = "" if Path(name).exists() else f"; {name!r} is not a local file or folder either"
        return label, [(0, RecordIssue(label, 0, "-", f"cannot reach the hub ({unreachable}){local}. "
                                                      "Set HF_HUB_OFFLINE=1 to use a cached copy"))]
    return label, _rows_from_datasets(label, name, split, config=config)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the hub's host accepts a connection (or HF_HUB_OFFLINE is set: datasets then reads its cache),
    else why not. One DNS lookup and TCP connect instead of the hub client's retries with backoff."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


# ----------------------------------------------------------------------------------------------------- adapters

_META_PREF = ("strength", "is_safety_prompt", "chosen_safe", "rejected_safe", "round", "source")
_META_PROMPT = ("is_safety", "id", "category")


def _fields(kind: str) -> set[str]:
    return set(RECORD_KINDS[kind].model_fields)


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise _Bad(key, "missing field")
    v = row[key]
    if not isinstance(v, str):
        raise _Bad(key, f"expected a string, got {_type_name(v)}")
    if not v.strip():
        raise _Bad(key, "must not be empty")
    return v


def _messages(row: dict, key: str) -> list:
    if key not in row:
        raise _Bad(key, "missing field")
    v = row[key]
    if not isinstance(v, list):
        raise _Bad(key, f"expected a list of messages, got {_type_name(v)}")
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _Bad(f"{key}.{i}", f"expected a message object with role and content, got {_type_name(m)}")
    return list(v)


def _turns(row: dict, key: str, role: str) -> list:
    """A string (one turn of `role`) or a conversational list of messages."""
    if key not in row:
        raise _Bad(key, "missing field")
    if isinstance(row[key], str):
        return [{"role": role, "content": _text(row, key)}]
    if isinstance(row[key], list):
        return _messages(row, key)
    raise _Bad(key, f"expected a string or a list of messages, got {_type_name(row[key])}")


def _split_conversations(c: list, r: list) -> tuple[list, str, str]:
    """Shared prefix of two conversations as the prompt; the single assistant replies after it."""
    if c == r:
        raise _Bad("rejected", "chosen and rejected responses are identical")
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    replies = []
    for key, conv in (("chosen", c), ("rejected", r)):
        rest = conv[k:]
        if not rest:
            raise _Bad(key, "ends where the other conversation goes on: no reply after the shared prompt")
        if len(rest) > 1:
            raise _Bad(key, f"has {len(rest)} messages after the shared prompt; only a single assistant reply can be compared")
        if rest[0].get("role") != "assistant":
            raise _Bad(key, f"the reply after the shared prompt must be an assistant message, got role {rest[0].get('role')!r}")
        replies.append(rest[0].get("content"))
    return c[:k], replies[0], replies[1]


def _split_texts(c: str, r: str) -> tuple[list, str, str]:
    """TRL's implicit-prompt *standard* preference (``{"chosen": "The sky is blue.", "rejected": "The sky is
    green."}``): the common prefix of the two texts is the prompt (one user turn), the rest of each the reply.
    The prefix is cut back to a word boundary (TRL cuts at the first differing character, so "The sky is b" /
    "lue." vs "rown."); surrounding whitespace is stripped from every part."""
    for key, v in (("chosen", c), ("rejected", r)):
        if not v.strip():
            raise _Bad(key, "must not be empty")
    if c == r:
        raise _Bad("rejected", "chosen and rejected responses are identical")
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    cut = k
    if not (k > 0 and c[k - 1].isspace()):  # inside a word (or at the end of one text): back to the last whitespace
        while cut > 0 and not c[cut - 1].isspace():
            cut -= 1
    prompt = c[:cut].strip()
    if not prompt:
        raise _Bad("chosen", "implicit-prompt preference without a shared prompt: chosen and rejected must begin with "
                             "the same prompt text (or give a separate 'prompt' field)")
    return [{"role": "user", "content": prompt}], c[cut:].strip(), r[cut:].strip()


_HH_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):")


def _looks_hh(v: Any) -> bool:
    """An HH-RLHF transcript: starts with "Human:" or has a "\n\nHuman:" / "\n\nAssistant:" turn."""
    return isinstance(v, str) and _HH_TURN.search(v.lstrip()) is not None


def parse_hh_transcript(text: str, field: str = "chosen") -> list[dict]:
    """"\\n\\nHuman: a\\n\\nAssistant: b ..." -> [{"role": "user", ...}, {"role": "assistant", ...}, ...]."""
    parts = _HH_TURN.split(text.lstrip())
    if parts[0].strip():
        raise _Bad(field, "unparseable HH-RLHF transcript: text before the first 'Human:' turn")
    if len(parts) < 3:
        raise _Bad(field, "unparseable HH-RLHF transcript: no 'Human:'/'Assistant:' turns")
    turns = []
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2])):
        want = "Human" if i % 2 == 0 else "Assistant"
        if speaker != want:
            raise _Bad(field, f"unparseable HH-RLHF transcript: turn {i + 1} is {speaker}, expected {want} (turns must alternate)")
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if turns[-1]["role"] != "assistant":
        raise _Bad(field, "unparseable HH-RLHF transcript: does not end with an 'Assistant:' turn")
    return turns


def _hh_pair(row: dict) -> tuple[list, list]:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _Bad(key, "missing field")
        if not isinstance(row[key], str):
            raise _Bad(key, f"expected an HH-RLHF transcript string, got {_type_name(row[key])}")
    c = parse_hh_transcript(row["chosen"], "chosen")
    r = parse_hh_transcript(row["rejected"], "rejected")
    if c[:-1] != r[:-1]:
        raise _Bad("rejected", "the prompt part of the transcript differs from chosen's")
    return c, r


def _pref_meta(row: dict) -> dict:
    meta = {k: row[k] for k in _META_PREF if k in row}
    if "is_safety" in row and "is_safety_prompt" not in row:
        meta["is_safety_prompt"] = row["is_safety"]
    return meta


def _prompt_meta(row: dict) -> dict:
    meta = {k: row[k] for k in _META_PROMPT if k in row}
    if "is_safety_prompt" in row and "is_safety" not in row:
        meta["is_safety"] = row["is_safety_prompt"]
    if isinstance(meta.get("id"), int) and not isinstance(meta.get("id"), bool):
        meta["id"] = str(meta["id"])
    return meta


def _source(row: dict) -> dict:
    return {"source": row["source"]} if "source" in row else {}


def _detect(row: dict, kind: str) -> str:
    keys = set(row)
    if kind == "gatt":
        return "own"
    if kind in ("sft", "prompt"):
        if "messages" in row and keys <= _fields(kind):
            return "own"
        if "messages" in row or "prompt" in row or "completion" in row or "text" in row:
            return "trl"
        if kind == "prompt" and "chosen" in row and isinstance(row["chosen"], str):
            return "hh_rlhf" if _looks_hh(row["chosen"]) else "trl"
        if kind == "prompt" and "chosen" in row:
            return "trl"
        return "unknown"
    # preference
    if "prompt" in row:
        if keys <= _fields(kind) and isinstance(row["prompt"], list) and not isinstance(row.get("chosen"), list) \
                and not isinstance(row.get("rejected"), list):
            return "own"
        return "trl"
    if "chosen" in row or "rejected" in row:
        if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
            return "trl"
        # strings: an HH-RLHF transcript ("\n\nHuman: ...") or TRL's implicit-prompt standard preference
        return "hh_rlhf" if _looks_hh(row.get("chosen")) or _looks_hh(row.get("rejected")) else "trl"
    if "completion" in row or "completions" in row:
        return "trl"  # unpaired or stepwise: _trl says why it is not a comparison
    return "unknown"


_UNPAIRED = "TRL unpaired preference records (prompt/completion/label) rate one completion, they do not compare two"
_STEPWISE = "TRL stepwise-supervision records (prompt/completions/labels) label reasoning steps"


def _trl(row: dict, kind: str) -> dict:
    if "completions" in row and "labels" in row and kind in ("sft", "preference"):
        raise _Bad("completions", f"{_STEPWISE}; not supported as {kind} data")
    if kind == "sft":
        if "label" in row and "completion" in row:
            raise _Bad("label", f"{_UNPAIRED}; a completion labeled bad is no SFT target (keep the label-true ones "
                                "as prompt/completion records)")
        if "messages" in row:
            return {"messages": _messages(row, "messages"), **_source(row)}
        if "prompt" in row or "completion" in row:
            return {"messages": _turns(row, "prompt", "user") + _turns(row, "completion", "assistant"), **_source(row)}
        if "text" in row:
            raise _Bad("text", "TRL language-modeling records ('text') have no dialogue; use prompt/completion or messages")
        raise _Bad("-", f"not a TRL SFT record: expected 'messages' or 'prompt'/'completion' (keys: {sorted(row)})")
    if kind == "prompt":
        if "messages" in row:
            return {"messages": _messages(row, "messages"), **_prompt_meta(row)}
        if "prompt" in row:
            return {"messages": _turns(row, "prompt", "user"), **_prompt_meta(row)}
        if "chosen" in row:  # implicit-prompt preference: the shared prefix
            if isinstance(row["chosen"], str):
                prompt, _, _ = _split_texts(_text(row, "chosen"), _text(row, "rejected"))
            else:
                prompt, _, _ = _split_conversations(_messages(row, "chosen"), _messages(row, "rejected"))
            return {"messages": prompt, **_prompt_meta(row)}
        raise _Bad("-", f"not a TRL prompt record: expected 'prompt' or 'messages' (keys: {sorted(row)})")
    if kind == "preference":
        if "completion" in row and "chosen" not in row:
            raise _Bad("completion", f"{_UNPAIRED}; a preference needs chosen and rejected")
        if "prompt" in row:
            p = _turns(row, "prompt", "user")
            c = _turns(row, "chosen", "assistant")
            r = _turns(row, "rejected", "assistant")
            prompt, chosen, rejected = _split_conversations(p + c, p + r)
        elif isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            prompt, chosen, rejected = _split_texts(row["chosen"], row["rejected"])  # implicit prompt, standard
        else:
            prompt, chosen, rejected = _split_conversations(_messages(row, "chosen"), _messages(row, "rejected"))
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_pref_meta(row)}
    raise ValueError(f"format 'trl' does not apply to kind {kind!r}")


def _hh(row: dict, kind: str) -> dict:
    if kind == "preference":
        c, r = _hh_pair(row)
        return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"], **_pref_meta(row)}
    if kind == "prompt":
        c, _ = _hh_pair(row) if "rejected" in row else (parse_hh_transcript(_text(row, "chosen"), "chosen"), None)
        return {"messages": c[:-1], **_prompt_meta(row)}
    if kind == "sft":
        return {"messages": parse_hh_transcript(_text(row, "chosen"), "chosen"), **_source(row)}
    raise ValueError(f"format 'hh_rlhf' does not apply to kind {kind!r}")


def _apply_map(row: dict, field_map: dict[str, str]) -> dict:
    theirs = set(field_map.values())
    out = {k: v for k, v in row.items() if k not in theirs and k not in field_map}
    for ours, col in field_map.items():
        if col not in row:
            raise _Bad(col, f"missing field (mapped to {ours!r})")
        out[ours] = row[col]
    return out


def _check_strength(d: dict, kind: str, file: str, line: int) -> tuple[dict, list[RecordIssue]]:
    """A clearer reason than pydantic's for an unknown strength; the rest of the record is still checked."""
    s = d.get("strength")
    if kind != "preference" or s is None or s in STRENGTHS:
        return d, []
    levels = ", ".join(x.value for x in STRENGTHS)
    return ({k: v for k, v in d.items() if k != "strength"},
            [RecordIssue(file, line, "strength", f"unknown strength {s!r} (expected one of: {levels}, or null)")])


# the field a model-level (whole-record) schema error is about: the dialogue's shape
_MODEL_LEVEL_FIELD = {"sft": "messages", "prompt": "messages", "preference": "prompt", "gatt": "-"}


def _pydantic_issues(e: ValidationError, kind: str, file: str, line: int) -> list[RecordIssue]:
    out = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "-"
        typ = err["type"]
        if field == "-":  # a model validator: name the field a user would fix
            field = "rejected" if "identical" in str(err["msg"]) else _MODEL_LEVEL_FIELD[kind]
        if typ == "missing":
            reason = "missing field"
        elif typ == "extra_forbidden":
            reason = "unknown field"
        elif typ == "value_error":
            reason = str(err["msg"]).removeprefix("Value error, ")
        elif typ.endswith("_type") or typ.endswith("_parsing"):
            got = err.get("input")
            shown = f" {got!r}" if isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 40 else ""
            reason = f"{err['msg']} (got {_type_name(got)}{shown})"
            if typ == "bool_type":
                reason += "; write true or false (no quotes)"
            elif typ == "int_type" and isinstance(got, str):
                reason += "; write the number without quotes"
        else:
            reason = str(err["msg"])
        out.append(RecordIssue(file, line, field, reason))
    return out


def _parse_row(row: Any, kind: str, fmt: str, field_map: dict[str, str] | None, file: str, line: int):
    """A record, or a list of issues."""
    model = RECORD_KINDS[kind]
    try:
        if not isinstance(row, dict):
            raise _Bad("-", f"expected a JSON object, got {_type_name(row)}")
        if field_map:
            row = _apply_map(row, field_map)
        f = _detect(row, kind) if fmt in ("auto", "mapped") else fmt
        if f == "own":
            d = row
        elif f == "trl":
            d = _trl(row, kind)
        elif f == "hh_rlhf":
            d = _hh(row, kind)
        else:
            raise _Bad("-", f"unrecognized {kind} record (keys: {sorted(row)}); see data_specs/loaders.py for the formats")
    except _Bad as b:
        return [RecordIssue(file, line, b.field, b.reason)]
    d, issues = _check_strength(d, kind, file, line)
    try:
        record = model.model_validate(d)
    except ValidationError as e:
        return issues + _pydantic_issues(e, kind, file, line)
    return issues or record


def parse_record(row: Any, kind: str, format: str = "auto", field_map: dict[str, str] | None = None, file: str = "<rows>",
                 line: int = 0):
    """One raw row -> a record of ``RECORD_KINDS[kind]``, or the list of every RecordIssue found in it."""
    return _parse_row(row, kind, format, field_map, file, line)


def duplicate_count(records: Sequence) -> int:
    """Records equal to an earlier one (same fields and values)."""
    seen: set[str] = set()
    n = 0
    for r in records:
        key = r.model_dump_json()
        n += key in seen
        seen.add(key)
    return n


def _check_args(kind: str, format: str, field_map: dict[str, str] | None) -> None:
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "mapped" and not field_map:
        raise ValueError("format 'mapped' needs a field_map (our field name -> the file's column name)")
    if kind == "gatt" and format in ("trl", "hh_rlhf"):
        raise ValueError(f"format {format!r} does not apply to kind 'gatt' (use own or mapped)")


def parse_rows(rows: Iterable[Any], kind: str, format: str = "auto", field_map: dict[str, str] | None = None,
               file: str = "<rows>", strict: bool = True):
    """Parse in-memory rows (dicts) like :func:`load_records` does; line numbers are 1-based positions."""
    _check_args(kind, format, field_map)
    return _finish([(i, r) for i, r in enumerate(rows, 1)], kind, format, field_map, file, strict)


def _finish(rows: list[tuple[int, Any]], kind: str, format: str, field_map, file: str, strict: bool):
    records, issues = [], []
    for line, row in rows:
        if isinstance(row, RecordIssue):
            issues.append(row)
            continue
        out = _parse_row(row, kind, format, field_map, file, line)
        if isinstance(out, list):
            issues.extend(out)
        else:
            records.append(out)
    if strict:
        if issues:
            raise DataValidationError(issues, n_valid=len(records))
        return records
    return records, issues


def load_records(source: str | Path, kind: str, format: str = "auto", field_map: dict[str, str] | None = None,
                 split: str = "train", strict: bool = True):
    """Records of ``RECORD_KINDS[kind]`` from a file, directory or hub dataset (see the module docstring).

    strict=True: a list of records, or DataValidationError (with every issue) if ANY record is bad.
    strict=False: ``(records, issues)`` with the valid records and a RecordIssue per problem.
    """
    _check_args(kind, format, field_map)
    label, rows = read_rows(source, split=split)
    return _finish(rows, kind, format, field_map, label, strict)


def write_records(path: str | Path, records: Iterable[Any]) -> Path:
    """Write records atomically as JSONL in our own format (readable with ``format="own"``)."""
    return write_jsonl(path, records)


# ----------------------------------------------------------------------------------------------------- summary


def _stats(values: list[float], with_min: bool = True) -> dict:
    if not values:
        return {"mean": 0.0, **({"min": 0} if with_min else {}), "max": 0}
    out = {"mean": round(sum(values) / len(values), 3)}
    if with_min:
        out["min"] = min(values)
    out["max"] = max(values)
    return out


def _chars(messages: Sequence) -> int:
    return sum(len(m.content) for m in messages)


def _turn_count(messages: Sequence) -> int:
    return sum(m.role != "system" for m in messages)


SAFETY_BINS = ("chosen_safe_only", "both_safe", "both_unsafe", "rejected_safe_only", "unlabeled")


def summarize(records: Sequence, kind: str) -> dict:
    """JSON-ready summary of records of one kind.

    count; for dialogue kinds ``turns`` (messages per dialogue, system messages not counted, the response
    counted for preference) as mean/min/max and ``prompt_chars`` / ``response_chars`` (characters, mean/max;
    for preference both chosen and rejected count as responses); for preference ``strength_hist`` (every
    level plus "none"), ``safety_bin_hist`` (Comparison.safety_bin, "unlabeled" when None) and
    ``share_safety``; for prompts ``share_safety``; for gatt ``category_hist`` and ``text_chars``.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    records = list(records)
    n = len(records)
    out: dict[str, Any] = {"count": n}
    if kind == "sft":
        out["turns"] = _stats([_turn_count(r.messages) for r in records])
        out["prompt_chars"] = _stats([_chars(r.prompt) for r in records], with_min=False)
        out["response_chars"] = _stats([len(r.answer) for r in records], with_min=False)
    elif kind == "prompt":
        out["turns"] = _stats([_turn_count(r.messages) for r in records])
        out["prompt_chars"] = _stats([_chars(r.messages) for r in records], with_min=False)
        out["share_safety"] = round(sum(r.is_safety for r in records) / n, 4) if n else 0.0
    elif kind == "preference":
        out["turns"] = _stats([_turn_count(r.prompt) + 1 for r in records])
        out["prompt_chars"] = _stats([_chars(r.prompt) for r in records], with_min=False)
        out["response_chars"] = _stats([len(x) for r in records for x in (r.chosen, r.rejected)], with_min=False)
        strengths = Counter(r.strength.value if r.strength is not None else "none" for r in records)
        out["strength_hist"] = {k: strengths.get(k, 0) for k in [s.value for s in STRENGTHS] + ["none"]}
        bins = Counter(r.safety_bin or "unlabeled" for r in records)
        out["safety_bin_hist"] = {k: bins.get(k, 0) for k in SAFETY_BINS}
        out["share_safety"] = round(sum(r.is_safety_prompt for r in records) / n, 4) if n else 0.0
    else:
        out["category_hist"] = dict(sorted(Counter(r.category for r in records).items()))
        out["text_chars"] = _stats([len(r.text) for r in records], with_min=False)
    return out


__all__ = ["FORMATS", "RecordIssue", "DataValidationError", "load_records", "parse_rows", "parse_record", "read_rows", "load_hub_rows",
           "looks_like_hub_id", "duplicate_count",
           "parse_hh_transcript", "write_records", "summarize", "SFTExample", "Prompt", "Comparison", "GattInstruction"]
