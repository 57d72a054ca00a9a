"""Loaders, adapters, validation and summaries of data_specs (small files written to tmp_path)."""
from __future__ import annotations

import json

import pytest

from data_specs.loaders import (
    FORMATS,
    DataValidationError,
    RecordIssue,
    load_hub_rows,
    load_records,
    parse_rows,
    summarize,
    write_records,
)
from data_specs.schemas import Comparison, GattInstruction, Message, Prompt, SFTExample, Strength
from data_specs.validate import format_issues, main

# ------------------------------------------------------------------------------------------- the same data, many formats

U1 = "What is 2+2?"
MULTI = [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Capital of France?")]


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# Expected records
PREFS = [
    Comparison(prompt=[Message(role="user", content=U1)], chosen="4", rejected="5"),
    Comparison(prompt=[Message(role=r, content=c) for r, c in MULTI], chosen="Paris.", rejected="Lyon."),
]
SFTS = [
    SFTExample(messages=[Message(role="user", content=U1), Message(role="assistant", content="4")]),
    SFTExample(messages=[Message(role=r, content=c) for r, c in MULTI] + [Message(role="assistant", content="Paris.")]),
]

OWN_PREFS = [
    {"prompt": msgs(("user", U1)), "chosen": "4", "rejected": "5"},
    {"prompt": msgs(*MULTI), "chosen": "Paris.", "rejected": "Lyon.", "strength": None},
]
HH_PREFS = [
    {"chosen": f"\n\nHuman: {U1}\n\nAssistant: 4", "rejected": f"\n\nHuman: {U1}\n\nAssistant: 5"},
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Capital of France?\n\nAssistant: Paris.",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Capital of France?\n\nAssistant: Lyon."},
]
TRL_EXPLICIT = [  # a string record and a conversational one; `margin` is not a strength
    {"prompt": U1, "chosen": "4", "rejected": "5", "margin": 3.0},
    {"prompt": msgs(*MULTI), "chosen": msgs(("assistant", "Paris.")), "rejected": msgs(("assistant", "Lyon."))},
]
TRL_IMPLICIT = [
    {"chosen": msgs(("user", U1), ("assistant", "4")), "rejected": msgs(("user", U1), ("assistant", "5"))},
    {"chosen": msgs(*MULTI, ("assistant", "Paris.")), "rejected": msgs(*MULTI, ("assistant", "Lyon."))},
]
OWN_SFT = [{"messages": msgs(("user", U1), ("assistant", "4"))},
           {"messages": msgs(*MULTI, ("assistant", "Paris.")), "source": "unknown"}]
TRL_PROMPT_COMPLETION = [{"prompt": U1, "completion": "4"},
                         {"prompt": msgs(*MULTI), "completion": msgs(("assistant", "Paris."))}]
TRL_MESSAGES = [{"messages": msgs(("user", U1), ("assistant", "4")), "id": 7},  # extra TRL columns are ignored
                {"messages": msgs(*MULTI, ("assistant", "Paris."))}]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def ds_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# ------------------------------------------------------------------------------------------------ equal records


@pytest.mark.parametrize("rows, fmt", [(OWN_PREFS, "own"), (OWN_PREFS, "auto"), (HH_PREFS, "hh_rlhf"), (HH_PREFS, "auto"),
                                       (TRL_EXPLICIT, "trl"), (TRL_EXPLICIT, "auto"), (TRL_IMPLICIT, "trl"),
                                       (TRL_IMPLICIT, "auto")])
def test_preference_formats_load_to_equal_records(tmp_path, rows, fmt):
    got = load_records(jsonl(tmp_path / "p.jsonl", rows), "preference", format=fmt)
    assert got == PREFS
    assert all(c.strength is None for c in got)  # HH / TRL margin: unknown strength, margin 0


@pytest.mark.parametrize("rows, fmt", [(OWN_SFT, "own"), (OWN_SFT, "auto"), (TRL_PROMPT_COMPLETION, "trl"),
                                       (TRL_PROMPT_COMPLETION, "auto"), (TRL_MESSAGES, "trl"), (TRL_MESSAGES, "auto")])
def test_sft_formats_load_to_equal_records(tmp_path, rows, fmt):
    assert load_records(jsonl(tmp_path / "s.jsonl", rows), "sft", format=fmt) == SFTS


def test_json_list_data_wrapper_and_parquet_equal_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(OWN_PREFS), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"data": HH_PREFS}), encoding="utf-8")
    assert load_records(tmp_path / "a.json", "preference") == PREFS
    assert load_records(tmp_path / "b.json", "preference") == PREFS
    assert load_records(parquet(tmp_path / "c.parquet", OWN_PREFS), "preference", format="own") == PREFS
    assert load_records(parquet(tmp_path / "d.parquet", TRL_IMPLICIT), "preference") == PREFS
    assert load_records(parquet(tmp_path / "e.parquet", OWN_SFT), "sft") == SFTS


def test_hh_and_trl_metadata_and_prompt_kind(tmp_path):
    rows = [{**HH_PREFS[0], "strength": "better", "is_safety": True},
            {**TRL_EXPLICIT[0], "is_safety": True, "strength": "slightly_better"}]
    got = load_records(jsonl(tmp_path / "m.jsonl", rows), "preference")
    assert [(c.strength, c.is_safety_prompt) for c in got] == [(Strength.better, True), (Strength.slightly_better, True)]
    prompts = load_records(jsonl(tmp_path / "q.jsonl", [{"prompt": U1, "is_safety": True, "id": 3},
                                                        {"prompt": msgs(*MULTI)}, HH_PREFS[1]]), "prompt")
    assert prompts == [Prompt(messages=[Message(role="user", content=U1)], is_safety=True, id="3"),
                       Prompt(messages=PREFS[1].prompt), Prompt(messages=PREFS[1].prompt)]


def test_mapped_columns(tmp_path):
    rows = [{"question": U1, "good": "4", "bad": "5", "extra": 1}]
    got = load_records(jsonl(tmp_path / "m.jsonl", rows), "preference", format="mapped",
                       field_map={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert got == PREFS[:1]
    sft = load_records(jsonl(tmp_path / "alpaca.jsonl", [{"instruction": U1, "output": "4"}]), "sft", format="mapped",
                       field_map={"prompt": "instruction", "completion": "output"})
    assert sft == SFTS[:1]
    _, issues = load_records(tmp_path / "alpaca.jsonl", "sft", format="mapped",
                             field_map={"prompt": "question", "completion": "output"}, strict=False)
    assert issues == [RecordIssue(str(tmp_path / "alpaca.jsonl"), 1, "question", "missing field (mapped to 'prompt')")]
    with pytest.raises(ValueError, match="field_map"):
        load_records(tmp_path / "alpaca.jsonl", "sft", format="mapped")


def test_write_records_roundtrip(tmp_path):
    recs = [PREFS[0].model_copy(update={"strength": Strength.better, "chosen_safe": True, "rejected_safe": False}), PREFS[1]]
    path = write_records(tmp_path / "out" / "c.jsonl", recs)
    assert load_records(path, "preference", format="own") == recs
    g = [GattInstruction(category="figure", text="Always act as Napoleon.", short="Figure: Napoleon.", value="Napoleon")]
    assert load_records(write_records(tmp_path / "g.jsonl", g), "gatt") == g
    assert set(FORMATS) == {"auto", "own", "trl", "hh_rlhf", "mapped"}


# ------------------------------------------------------------------------------------------------ datasets path


def test_datasets_code_path_with_local_files(tmp_path, ds_cache):
    p = parquet(tmp_path / "prefs.parquet", TRL_IMPLICIT)
    assert parse_rows(load_hub_rows("parquet", data_files=str(p)), "preference") == PREFS
    j = jsonl(tmp_path / "hh.jsonl", HH_PREFS)
    assert parse_rows(load_hub_rows("json", data_files=str(j)), "preference", format="hh_rlhf") == PREFS
    d = tmp_path / "sft_dir"
    d.mkdir()
    jsonl(d / "train.jsonl", OWN_SFT)  # a local directory goes through datasets.load_dataset(path)
    assert load_records(d, "sft") == SFTS


def test_hub_name_dispatches_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        if name == "missing/ds":
            raise FileNotFoundError("Dataset 'missing/ds' doesn't exist on the Hub")
        return HH_PREFS

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_records("Anthropic/hh-rlhf", "preference", format="hh_rlhf", split="test") == PREFS
    assert load_records("hub:org/ds:cfg", "preference") == PREFS
    assert calls[:2] == [("Anthropic/hh-rlhf", (), {"split": "test"}), ("org/ds", ("cfg",), {"split": "train"})]
    recs, issues = load_records("missing/ds", "preference", strict=False)
    assert recs == [] and len(issues) == 1 and issues[0].line == 0 and "doesn't exist" in issues[0].reason
    # a path-looking source that does not exist is not sent to the hub
    _, issues = load_records("nope/prefs.jsonl", "preference", strict=False)
    assert issues == [RecordIssue("nope/prefs.jsonl", 0, "-", "file not found")] and len(calls) == 3


# ------------------------------------------------------------------------------------------------ bad records


def bad_issues(path, kind, **kw):
    recs, issues = load_records(path, kind, strict=False, **kw)
    return recs, [(i.file, i.line, i.field) for i in issues], issues


def test_malformed_json_missing_wrong_type_empty_identical(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(OWN_PREFS[0]),                                                               # 1 ok
        '{"prompt": [{"role": "user", "content": "x"}], "chosen": "a"',                         # 2 malformed JSON
        json.dumps({"prompt": msgs(("user", "x")), "chosen": "a"}),                             # 3 missing rejected
        json.dumps({"prompt": msgs(("user", "x")), "chosen": 5, "rejected": "b"}),              # 4 wrong type
        json.dumps({"prompt": msgs(("user", " ")), "chosen": "a", "rejected": "b"}),            # 5 empty content
        "",                                                                                     # 6 blank: skipped
        json.dumps({"prompt": msgs(("user", "x")), "chosen": "same", "rejected": "same"}),      # 7 identical
        json.dumps({"prompt": msgs(("user", "x")), "chosen": "a", "rejected": "b", "strength": "huge"}),  # 8 strength
        json.dumps({"prompt": "x", "chosen": "", "rejected": "b"}),                             # 9 TRL empty string
        json.dumps([1, 2]),                                                                     # 10 not an object
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recs, where, issues = bad_issues(path, "preference")
    f = str(path)
    assert recs == PREFS[:1]
    assert where == [(f, 2, "-"), (f, 3, "rejected"), (f, 4, "chosen"), (f, 5, "prompt.0.content"), (f, 7, "rejected"),
                     (f, 8, "strength"), (f, 9, "chosen"), (f, 10, "-")]
    reasons = [i.reason for i in issues]
    assert reasons[0].startswith("malformed JSON")
    assert reasons[1] == "missing field"
    assert "valid string" in reasons[2] and "integer" in reasons[2]
    assert reasons[3] == reasons[6] == "must not be empty"
    assert "identical" in reasons[4]
    assert "unknown strength 'huge'" in reasons[5]

    with pytest.raises(DataValidationError) as e:
        load_records(path, "preference")
    assert e.value.n_valid == 1 and e.value.issues == issues
    assert f"{f}:3: rejected: missing field" in str(e.value)


def test_non_utf8_line_is_reported_not_a_crash(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([json.dumps(r).encode() for r in OWN_SFT]
                                + ['{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1")]) + b"\n")
    recs, where, issues = bad_issues(path, "sft")
    assert recs == SFTS and where == [(str(path), 3, "-")] and "UTF-8" in issues[0].reason
    js = tmp_path / "latin1.json"
    js.write_bytes(b'[\n{"messages": []},\n{"x": "caf\xe9"}\n]')
    _, where, issues = bad_issues(js, "sft")
    assert where == [(str(js), 3, "-")] and "UTF-8" in issues[0].reason


def test_json_and_parquet_lines_are_record_positions(tmp_path):
    js = tmp_path / "list.json"
    js.write_text(json.dumps([OWN_SFT[0], {"messages": msgs(("user", "q"))}, {"messages": "hello"}]), encoding="utf-8")
    _, where, issues = bad_issues(js, "sft")
    assert where == [(str(js), 2, "messages"), (str(js), 3, "messages")]
    assert "end with a assistant turn" in issues[0].reason and "valid list" in issues[1].reason
    pq_path = parquet(tmp_path / "t.parquet", [{"prompt": U1, "completion": "4"}, {"prompt": U1, "completion": " "}])
    recs, where, _ = bad_issues(pq_path, "sft")
    assert recs == SFTS[:1] and where == [(str(pq_path), 2, "completion")]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"messages": []},\n{"messages": [}\n]', encoding="utf-8")
    _, where, _ = bad_issues(broken, "sft")
    assert where == [(str(broken), 3, "-")]


def test_bad_hh_and_trl_preference_records(tmp_path):
    rows = [
        {"chosen": "Hello\n\nAssistant: hi", "rejected": "\n\nHuman: x\n\nAssistant: y"},          # 1 text before Human
        {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"},  # 2 not alternating
        {"chosen": "\n\nHuman: a\n\nAssistant: c", "rejected": "\n\nHuman: OTHER\n\nAssistant: d"},  # 3 prompt differs
        {"chosen": "\n\nHuman: a\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant:"},        # 4 empty response
        {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "a"), ("assistant", "b"))},  # 5 same
        {"chosen": msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
         "rejected": msgs(("user", "a"), ("assistant", "x"))},                                   # 6 more than one reply
        {"prompt": "q", "chosen": ["not a message"], "rejected": "r"},                           # 7 wrong item type
    ]
    path = jsonl(tmp_path / "pairs.jsonl", rows)
    _, where, issues = bad_issues(path, "preference")
    f = str(path)
    assert where == [(f, 1, "chosen"), (f, 2, "chosen"), (f, 3, "rejected"), (f, 4, "rejected"), (f, 5, "rejected"),
                     (f, 6, "chosen"), (f, 7, "chosen.0")]
    assert "unparseable HH-RLHF" in issues[0].reason and "unparseable HH-RLHF" in issues[1].reason
    assert "prompt part" in issues[2].reason and issues[3].reason == "must not be empty"


def test_unknown_kind_or_format_is_an_argument_error(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", OWN_SFT)
    with pytest.raises(ValueError, match="kind"):
        load_records(path, "nope")
    with pytest.raises(ValueError, match="format"):
        load_records(path, "sft", format="csv")


# ------------------------------------------------------------------------------------------------ summary + CLI


def test_summarize_known_set():
    p = [Message(role="user", content="abcd")]
    comps = [
        Comparison(prompt=p, chosen="aa", rejected="b", strength="better", is_safety_prompt=True, chosen_safe=True, rejected_safe=False),
        Comparison(prompt=p, chosen="aaaa", rejected="b", strength="better", chosen_safe=True, rejected_safe=True),
        Comparison(prompt=[*p, Message(role="assistant", content="x"), Message(role="user", content="yy")], chosen="c",
                   rejected="d", strength=None),
        Comparison(prompt=p, chosen="c", rejected="d", strength="significantly_better", is_safety_prompt=True,
                   chosen_safe=False, rejected_safe=True),
    ]
    s = summarize(comps, "preference")
    assert s["count"] == 4
    assert s["strength_hist"] == {"significantly_better": 1, "better": 2, "slightly_better": 0,
                                  "negligibly_better_or_unsure": 0, "none": 1}
    assert s["safety_bin_hist"] == {"chosen_safe_only": 1, "both_safe": 1, "both_unsafe": 0, "rejected_safe_only": 1,
                                    "unlabeled": 1}
    assert s["share_safety"] == 0.5
    assert s["turns"] == {"mean": 2.5, "min": 2, "max": 4}
    assert s["prompt_chars"] == {"mean": 4.75, "max": 7}
    assert s["response_chars"] == {"mean": 1.5, "max": 4}
    sft = summarize(SFTS, "sft")
    assert sft["count"] == 2 and sft["turns"] == {"mean": 3.0, "min": 2, "max": 4}
    assert sft["response_chars"] == {"mean": 3.5, "max": 6}
    assert summarize([], "prompt") == {"count": 0, "turns": {"mean": 0.0, "min": 0, "max": 0},
                                       "prompt_chars": {"mean": 0.0, "max": 0}, "share_safety": 0.0}
    json.dumps(s)


def test_main_return_codes_and_issue_limit(tmp_path, capsys):
    good = jsonl(tmp_path / "good.jsonl", OWN_PREFS)
    assert main(str(good), "preference") == 0
    out = capsys.readouterr().out
    assert "2 valid preference record(s)" in out and "negligibly_better_or_unsure" in out

    bad = tmp_path / "many_bad.jsonl"
    bad.write_text(json.dumps(HH_PREFS[0]) + "\n" + "".join("{oops\n" for _ in range(25)), encoding="utf-8")
    assert main(str(bad), "preference", "auto") == 1
    out = capsys.readouterr().out
    issue_lines = [ln for ln in out.splitlines() if ln.startswith(f"{bad}:")]
    assert [ln.split(":")[1] for ln in issue_lines] == [str(n) for n in range(2, 22)]
    assert out.rstrip().endswith("... and 5 more")
    assert "1 valid preference record(s)" in out

    assert main(str(good), "nope") == 2


def test_format_issues_and_error_message():
    issues = [RecordIssue("f.jsonl", n, "chosen", "missing field") for n in range(1, 24)]
    text = format_issues(issues)
    assert text.splitlines()[0] == "f.jsonl:1: chosen: missing field"
    assert len(text.splitlines()) == 21 and text.splitlines()[-1] == "... and 3 more"
    assert format_issues(issues[:2], limit=1).splitlines() == ["f.jsonl:1: chosen: missing field", "... and 1 more"]
    msg = str(DataValidationError(issues, n_valid=4))
    assert "23 bad record(s), 4 valid" in msg and msg.endswith("... and 3 more")
