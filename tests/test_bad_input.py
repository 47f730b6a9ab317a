"""Malformed input (tests/data/bad/): every file gives a clear error naming file, row and field, or is dropped and counted.

Each file goes through the functions the pipeline's first steps run: core.data.ingest.load_rows, then
core.data.validation.validate_dataset (and core.data.formatting.format_dataset for the token-length case).
What ingest cannot map stops there (IngestError, "file:line: ..."); what it can map but is bad is reported by
validate (DataValidationError: the expectation, the column and the offending row ids) under policy fail, and
dropped and counted under policy drop. Nothing ends in a raw KeyError/TypeError/UnicodeDecodeError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import DataSource, PromptConfig, ValidationConfig
from core.data.formatting import OverlongError, format_dataset
from core.data.ingest import IngestError, load_rows
from core.data.validation import DataValidationError, validate_dataset

BAD = Path(__file__).parent / "data" / "bad"

NULL = "expect_column_values_to_not_be_null"
REGEX = "expect_column_values_to_match_regex"  # non-blank text (messages.content), role order (roles)
CONTROL = "expect_column_values_to_not_match_regex"
MOJIBAKE = "expect_column_values_to_not_match_regex_list"
LENGTH = "expect_column_value_lengths_to_be_between"
UNIQUE = "expect_column_values_to_be_unique"
LEAK = "expect_column_values_to_not_be_in_set"
IN_SET = "expect_column_values_to_be_in_set"

CHAT = {"format": "chat"}

# Stops in ingest. file -> (DataSource settings besides path, fragments the error must contain)
INGEST_CASES = {
    "broken_json.jsonl": ({}, ["broken_json.jsonl:2: not valid JSON", "column 1"]),
    "missing_column.jsonl": ({}, ["missing_column.jsonl:2: missing column 'output'", "columns present"]),
    "misnamed_columns.jsonl": (
        {},
        ["misnamed_columns.jsonl:1: missing column 'instruction'", "['answer', 'question']"],
    ),
    "misnamed.csv": ({}, ["misnamed.csv:2: missing column 'output'", "'response'"]),
    "wrong_type.jsonl": ({}, ["wrong_type.jsonl:3: field 'output' must be a string, got int"]),
    "wrong_type_list.jsonl": ({}, ["wrong_type_list.jsonl:1: field 'instruction' must be a string, got list"]),
    "empty.jsonl": ({}, ["empty.jsonl: file is empty"]),
    "blank_lines.jsonl": ({}, ["blank_lines.jsonl: no rows found"]),
    "nul_raw.jsonl": ({}, ["nul_raw.jsonl:2: NUL byte at column 81"]),
    "invalid_utf8.jsonl": ({}, ["invalid_utf8.jsonl:2: not valid UTF-8", "at byte 75"]),
    "invalid_utf8.csv": ({}, ["invalid_utf8.csv:2: not valid UTF-8"]),
    "bom.jsonl": ({}, ["bom.jsonl:1: not valid JSON", "BOM"]),
    "not_array.json": ({}, ["not_array.json: expected a JSON array of objects, got dict"]),
    "chat_bad_turn.jsonl": (CHAT, ["chat_bad_turn.jsonl:2: messages[0] must be an object with 'role' and 'content'"]),
    "chat_not_list.jsonl": (CHAT, ["chat_not_list.jsonl:1: field 'messages' must be a list"]),
}

# Read fine, fails validation. file -> (DataSource settings, [(expectation, column, offending row ids)], rows dropped)
# The ids are the rows the error must name; under policy drop exactly `dropped` rows go (a duplicate keeps its first).
VALIDATE_CASES = {
    "empty_fields.jsonl": (
        {},
        [(REGEX, "messages.content", ["empty_fields.jsonl:2"]), (LENGTH, "response", ["empty_fields.jsonl:2"])],
        ["empty_fields.jsonl:2"],
    ),
    "whitespace.jsonl": ({}, [(REGEX, "messages.content", ["whitespace.jsonl:2"])], ["whitespace.jsonl:2"]),
    "null_field.jsonl": ({}, [(NULL, "messages.content", ["null_field.jsonl:3"])], ["null_field.jsonl:3"]),
    "nul_escaped.jsonl": ({}, [(CONTROL, "messages.content", ["nul_escaped.jsonl:2"])], ["nul_escaped.jsonl:2"]),
    "mojibake.jsonl": ({}, [(MOJIBAKE, "messages.content", ["mojibake.jsonl:2"])], ["mojibake.jsonl:2"]),
    "duplicates.jsonl": (
        {},
        [(UNIQUE, "messages", ["duplicates.jsonl:1", "duplicates.jsonl:3"])],
        ["duplicates.jsonl:3"],
    ),
    "leak_train.jsonl": (
        {"eval_path": str(BAD / "leak_eval.jsonl")},
        [(LEAK, "prompt", ["leak_eval.jsonl:2"])],
        ["leak_eval.jsonl:2"],
    ),
    "too_long_chars.jsonl": ({}, [(LENGTH, "response", ["too_long_chars.jsonl:2"])], ["too_long_chars.jsonl:2"]),
    "huge_row.jsonl": ({}, [(LENGTH, "response", ["huge_row.jsonl:3"])], ["huge_row.jsonl:3"]),
    "chat_unknown_role.jsonl": (
        CHAT,
        [(IN_SET, "messages.role", ["chat_unknown_role.jsonl:2"]), (REGEX, "roles", ["chat_unknown_role.jsonl:2"])],
        ["chat_unknown_role.jsonl:2"],
    ),
    "chat_no_assistant.jsonl": (CHAT, [(REGEX, "roles", ["chat_no_assistant.jsonl:2"])], ["chat_no_assistant.jsonl:2"]),
}


def _source(name: str, settings: dict) -> DataSource:
    return DataSource(path=str(BAD / name), **settings)


def _line(message: str, expectation: str, column: str) -> str:
    lines = [ln for ln in message.splitlines() if ln.strip().startswith(f"- {expectation} on {column!r}:")]
    assert len(lines) == 1, f"no single line for {expectation} on {column!r} in:\n{message}"
    return lines[0]


def test_corpus_is_complete():
    """Every file in tests/data/bad is covered by a case below (a new file needs a row in a table)."""
    covered = set(INGEST_CASES) | set(VALIDATE_CASES) | {"leak_eval.jsonl", "extra_columns.jsonl"}
    covered |= {"overlong_tokens.jsonl"}
    assert {f.name for f in BAD.iterdir()} == covered
    assert len(covered) >= 15


@pytest.mark.parametrize("name", list(INGEST_CASES))
def test_unreadable_file_stops_in_ingest_naming_file_row_and_field(name):
    settings, fragments = INGEST_CASES[name]
    with pytest.raises(IngestError) as err:
        load_rows(_source(name, settings))
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message and len(message) < 300  # one line, no dump of the row


@pytest.mark.parametrize("policy", ["fail", "drop"])
@pytest.mark.parametrize("name", list(VALIDATE_CASES))
def test_bad_rows_fail_validation_or_are_dropped_and_counted(name, policy):
    settings, failures, dropped = VALIDATE_CASES[name]
    raw = load_rows(_source(name, settings))
    if policy == "fail":
        with pytest.raises(DataValidationError) as err:
            validate_dataset(raw, ValidationConfig(policy="fail"))
        message = str(err.value)
        for expectation, column, ids in failures:
            line = _line(message, expectation, column)
            for id_ in ids:
                assert id_ in line
        # One line per failed expectation, with the value previews capped: a 100 kB row is not echoed.
        assert len(message) < 2000
        return
    clean, report = validate_dataset(raw, ValidationConfig(policy="drop"))
    assert set(raw["id"]) - set(clean["id"]) == set(dropped)
    assert (report.rows_in, report.rows_out) == (len(raw), len(raw) - len(dropped))
    for expectation, column, _ in failures:
        [result] = [r for r in report.results if (r.expectation, r.column) == (expectation, column)]
        assert not result.success and result.dropped >= 1


def test_mojibake_error_says_what_it_probably_is():
    with pytest.raises(DataValidationError) as err:
        validate_dataset(load_rows(_source("mojibake.jsonl", {})), ValidationConfig())
    line = _line(str(err.value), MOJIBAKE, "messages.content")
    assert "'Where is the CafÃ© open?'" in line and "UTF-8 text decoded as Latin-1" in line


def test_extra_columns_are_ignored():
    """Decision: unmapped source columns (here category, source_url and even `split`) are ignored, not errors.

    Sources often carry metadata; only the mapped columns are read. `split` in particular does not override the
    split ingest assigns (train/eval come from data.path vs data.eval_path).
    """
    raw = load_rows(_source("extra_columns.jsonl", {}))
    assert raw.column_names == ["id", "split", "messages"]
    assert raw["split"] == ["", "", ""]
    assert raw[0]["messages"] == [
        {"role": "user", "content": "What is the code for item 1?"},
        {"role": "assistant", "content": "The code for item 1 is 7."},
    ]
    clean, report = validate_dataset(raw, ValidationConfig(policy="fail"))
    assert report.success and len(clean) == 3


@pytest.mark.parametrize("overlong", ["fail", "drop"])
def test_sample_over_max_seq_len_fails_or_is_dropped_and_counted(tiny_source, overlong):
    from core.models import load_tokenizer

    clean, _ = validate_dataset(load_rows(_source("overlong_tokens.jsonl", {})), ValidationConfig())
    cfg = PromptConfig(max_seq_len=64, overlong=overlong, eval_fraction=0.5)
    tokenizer = load_tokenizer(tiny_source)
    if overlong == "fail":
        with pytest.raises(OverlongError, match=r"1 row\(s\) longer than prompt.max_seq_len=64 tokens") as err:
            format_dataset(clean, tokenizer, cfg)
        assert "overlong_tokens.jsonl:3 (" in str(err.value)
        return
    train, held_out, counts = format_dataset(clean, tokenizer, cfg)
    assert counts["dropped_overlong"] == 1
    kept = set(train["id"]) | set(held_out["id"])
    assert kept == set(clean["id"]) - {"overlong_tokens.jsonl:3"}


@pytest.mark.long  # ~30 s: make test-integration
@pytest.mark.slow
def test_the_cli_run_ends_with_our_message_not_a_traceback(tmp_path):
    """`zenml pipeline run` on bad data: the console ends with the validation error, not ZenML's tracebacks."""
    import json
    import os
    import subprocess
    import sys

    import yaml
    from conftest import REPO_ROOT

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": ""}) + "\n")
    doc = yaml.safe_load((REPO_ROOT / "configs" / "default.yaml").read_text())
    doc["parameters"]["config"]["data"] = {"path": str(data), "format": "instruction"}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, ZENML_CONFIG_PATH=str(tmp_path / "zenml"), ZENML_ANALYTICS_OPT_IN="false")
    zenml = Path(sys.executable).with_name("zenml")
    proc = subprocess.run(
        [str(zenml), "pipeline", "run", "pipelines.lora_pipeline", "-c", str(config)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out and "│" not in out, out[-3000:]  # neither plain nor framed
    tail = out.strip().splitlines()[-4:]
    assert tail[0].startswith("error in step validate: DataValidationError: Data validation failed"), tail
    assert tail[-1].startswith("(the full traceback is in the failed step's logs")
