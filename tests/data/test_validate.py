"""steps/validate.py: every bad case is caught under `fail` (named, with row ids) and dropped exactly under `drop`."""

from __future__ import annotations

from typing import Annotated

import pytest
from datasets import Dataset
from zenml import pipeline, step

from core.config import ValidationConfig
from core.data.validation import DataValidationError, ValidationReport, validate_dataset
from steps.validate import validate


def chat(prompt, response, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
    ]


def row(id_, messages, split="train"):
    return {"id": id_, "split": split, "messages": messages}


# Clean rows that exercise the allowed shapes: a system turn, several turns, tabs and newlines, eval and
# unassigned splits, an eval response equal to a train response (only shared *prompts* are leakage).
CLEAN = [
    row("train.jsonl:1", chat("What is ZenML?", "An MLOps framework.")),
    row("train.jsonl:2", chat("Name a colour.", "Blue.", system="You are terse.")),
    row("train.jsonl:3", chat("Indent this:\n\tx = 1", "Done:\n\tx = 1\r\n")),
    row(
        "train.jsonl:4",
        [
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Say bye."},
            {"role": "assistant", "content": "Bye."},
        ],
    ),
    row("eval.jsonl:1", chat("What is LoRA?", "An MLOps framework."), split="eval"),
    row("more.jsonl:1", chat("Café in French?", "Café."), split=""),
]
CLEAN_IDS = [r["id"] for r in CLEAN]

NUL = "expect_column_values_to_not_be_null"
BLANK = "expect_column_values_to_match_regex"  # also the role-sequence check, on column `roles`
CONTROL = "expect_column_values_to_not_match_regex"
LENGTH = "expect_column_value_lengths_to_be_between"
UNIQUE = "expect_column_values_to_be_unique"
NOT_IN = "expect_column_values_to_not_be_in_set"
IN_SET = "expect_column_values_to_be_in_set"

# name: (extra rows, expected expectation, column, ids it must name and drop, config overrides)
CASES = {
    "null prompt": ([row("bad.jsonl:1", chat(None, "An answer."))], NUL, "messages.content", ["bad.jsonl:1"], {}),
    "null response": ([row("bad.jsonl:1", chat("A question?", None))], NUL, "messages.content", ["bad.jsonl:1"], {}),
    "null system": (
        [row("bad.jsonl:1", [{"role": "system", "content": None}, *chat("Q?", "A.")])],
        NUL,
        "messages.content",
        ["bad.jsonl:1"],
        {},
    ),
    "empty response": ([row("bad.jsonl:1", chat("A question?", ""))], BLANK, "messages.content", ["bad.jsonl:1"], {}),
    "whitespace prompt": (
        [row("bad.jsonl:1", chat(" \n\t ", "Answer."))],
        BLANK,
        "messages.content",
        ["bad.jsonl:1"],
        {},
    ),
    "empty middle turn": (
        [
            row(
                "bad.jsonl:1",
                [*chat("Hi.", "   "), {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}],
            )
        ],
        BLANK,
        "messages.content",
        ["bad.jsonl:1"],
        {},
    ),
    "too long response": (
        [row("bad.jsonl:1", chat("Q?", "x" * 61))],
        LENGTH,
        "response",
        ["bad.jsonl:1"],
        {"max_chars": 60},
    ),
    "too long prompt": (
        [row("bad.jsonl:1", chat("q" * 61, "A."))],
        LENGTH,
        "prompt",
        ["bad.jsonl:1"],
        {"max_chars": 60},
    ),
    "too short response": (
        [row("bad.jsonl:1", chat("A question?", "No"))],
        LENGTH,
        "response",
        ["bad.jsonl:1"],
        {"min_chars": 3},
    ),
    "NUL byte": ([row("bad.jsonl:1", chat("Q?", "A\x00B"))], CONTROL, "messages.content", ["bad.jsonl:1"], {}),
    "escape char": (
        [row("bad.jsonl:1", chat("\x1b[31mred\x1b[0m?", "A."))],
        CONTROL,
        "messages.content",
        ["bad.jsonl:1"],
        {},
    ),
    "C1 control": (
        [row("bad.jsonl:1", chat("Q?", "caf\xc3\x83\x82"))],
        CONTROL,
        "messages.content",
        ["bad.jsonl:1"],
        {},
    ),
    "U+FFFD": ([row("bad.jsonl:1", chat("Caf\ufffd?", "A."))], CONTROL, "messages.content", ["bad.jsonl:1"], {}),
    "exact duplicate": ([row("dup.jsonl:7", CLEAN[0]["messages"])], UNIQUE, "messages", ["dup.jsonl:7"], {}),
    "eval prompt in train": (
        [row("eval.jsonl:2", chat("Name a colour.", "Red."), split="eval")],
        NOT_IN,
        "prompt",
        ["eval.jsonl:2"],
        {},
    ),
    "no assistant turn": (
        [row("bad.jsonl:1", [{"role": "user", "content": "Q?"}])],
        BLANK,
        "roles",
        ["bad.jsonl:1"],
        {},
    ),
    "ends with user": (
        [row("bad.jsonl:1", [*chat("Q?", "A."), {"role": "user", "content": "And?"}])],
        BLANK,
        "roles",
        ["bad.jsonl:1"],
        {},
    ),
    "no messages": ([row("bad.jsonl:1", [])], BLANK, "roles", ["bad.jsonl:1"], {}),
    "system not first": (
        [
            row(
                "bad.jsonl:1",
                [
                    {"role": "user", "content": "Q?"},
                    {"role": "system", "content": "S."},
                    {"role": "assistant", "content": "A."},
                ],
            )
        ],
        BLANK,
        "roles",
        ["bad.jsonl:1"],
        {},
    ),
    "unknown role": (
        [row("bad.jsonl:1", [{"role": "user", "content": "Q?"}, {"role": "bot", "content": "A."}])],
        IN_SET,
        "messages.role",
        ["bad.jsonl:1"],
        {},
    ),
    "null split": ([row("bad.jsonl:1", chat("Q?", "A."), split=None)], NUL, "split", ["bad.jsonl:1"], {}),
    "unknown split": ([row("bad.jsonl:1", chat("Q?", "A."), split="test")], IN_SET, "split", ["bad.jsonl:1"], {}),
}


def dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list(rows)


def failure_line(message: str, expectation: str, column: str) -> str:
    """The error line of one expectation on one column."""
    lines = [ln for ln in message.splitlines() if ln.strip().startswith(f"- {expectation} on {column!r}:")]
    assert len(lines) == 1, f"no single line for {expectation} on {column!r} in:\n{message}"
    return lines[0]


@pytest.fixture(scope="module")
def clean_ds() -> Dataset:
    return dataset(CLEAN)


@pytest.mark.parametrize("policy", ["fail", "drop"])
def test_clean_dataset_passes_unchanged(clean_ds, policy):
    out, report = validate_dataset(clean_ds, ValidationConfig(policy=policy))
    assert out is clean_ds
    assert report.success and report.rows_in == report.rows_out == len(CLEAN)
    assert all(r.dropped == 0 and r.unexpected_count == 0 for r in report.results)
    assert report.ge_version.startswith("1.")
    assert {r.expectation for r in report.results} >= {NUL, BLANK, CONTROL, LENGTH, UNIQUE, NOT_IN, IN_SET}


@pytest.mark.parametrize("case", list(CASES))
def test_fail_names_expectation_column_and_row(case):
    bad, expectation, column, ids, overrides = CASES[case]
    with pytest.raises(DataValidationError) as err:
        validate_dataset(dataset(CLEAN + bad), ValidationConfig(policy="fail", **overrides))
    line = failure_line(str(err.value), expectation, column)
    for id_ in ids:
        assert id_ in line
    for id_ in set(CLEAN_IDS) - set(ids):
        if case != "exact duplicate":  # the duplicate's first occurrence is named too
            assert id_ not in str(err.value)


@pytest.mark.parametrize("case", list(CASES))
def test_drop_removes_exactly_the_bad_rows(case):
    bad, expectation, column, ids, overrides = CASES[case]
    out, report = validate_dataset(dataset(CLEAN + bad), ValidationConfig(policy="drop", **overrides))
    assert list(out["id"]) == CLEAN_IDS
    assert (report.rows_in, report.rows_out) == (len(CLEAN) + len(bad), len(CLEAN))
    [result] = [r for r in report.results if r.expectation == expectation and r.column == column]
    assert not result.success and result.dropped == len(ids)
    assert set(ids) <= set(result.example_ids)


def test_all_failures_gathered_in_one_error():
    bad = [
        row("bad.jsonl:1", chat(None, "A.")),
        row("bad.jsonl:2", chat("Q\x00?", "A.")),
        row("bad.jsonl:3", [{"role": "user", "content": "Q?"}]),
    ]
    with pytest.raises(DataValidationError) as err:
        validate_dataset(dataset(CLEAN + bad), ValidationConfig())
    message = str(err.value)
    assert "3 of" in message.splitlines()[0]
    assert "bad.jsonl:1" in failure_line(message, NUL, "messages.content")
    assert "bad.jsonl:2" in failure_line(message, CONTROL, "messages.content")
    assert "bad.jsonl:3" in failure_line(message, BLANK, "roles")


def test_examples_capped_at_max_examples():
    bad = [row(f"bad.jsonl:{i}", chat(f"Q{i}?", "")) for i in range(1, 5)]
    with pytest.raises(DataValidationError) as err:
        validate_dataset(dataset(CLEAN + bad), ValidationConfig(max_examples=2))
    line = failure_line(str(err.value), BLANK, "messages.content")
    assert "bad.jsonl:1" in line and "bad.jsonl:2" in line and "bad.jsonl:3" not in line
    assert "4 of" in line and "+2 more rows" in line


def test_duplicates_keep_first_surviving_occurrence():
    # Three copies of one conversation. The first is an eval row whose prompt is also trained on: leakage
    # drops it, so the first *surviving* copy (train.jsonl:1) is kept, not none of them.
    leaked = chat("What is ZenML?", "An MLOps framework.")
    rows = [row("eval.jsonl:9", leaked, split="eval"), *CLEAN, row("train.jsonl:9", leaked)]
    out, report = validate_dataset(dataset(rows), ValidationConfig(policy="drop"))
    assert list(out["id"]) == CLEAN_IDS
    by_type = {(r.expectation, r.column): r for r in report.results}
    assert by_type[(NOT_IN, "prompt")].dropped == 1
    assert by_type[(UNIQUE, "messages")].unexpected_count == 3 and by_type[(UNIQUE, "messages")].dropped == 1


@pytest.mark.parametrize("policy", ["fail", "drop"])
def test_missing_column_raises_under_both_policies(clean_ds, policy):
    with pytest.raises(DataValidationError, match=r"expect_column_to_exist on 'messages': column missing"):
        validate_dataset(clean_ds.remove_columns("messages"), ValidationConfig(policy=policy))


def test_empty_dataset_raises(clean_ds):
    with pytest.raises(DataValidationError, match="expect_table_row_count_to_be_between"):
        validate_dataset(clean_ds.select([]), ValidationConfig(policy="drop"))


def test_dropping_every_row_raises():
    with pytest.raises(DataValidationError, match="dropped every one of the 2 rows"):
        validate_dataset(
            dataset([row("a:1", chat("", "A.")), row("a:2", chat("Q?", None))]), ValidationConfig(policy="drop")
        )


def test_report_round_trips_and_renders():
    _, report = validate_dataset(dataset(CLEAN + CASES["NUL byte"][0]), ValidationConfig(policy="drop"))
    assert ValidationReport.model_validate_json(report.model_dump_json()) == report
    page = report.to_html()
    assert "FAIL" in page and CONTROL in page and "bad.jsonl:1" in page
    assert page.index("FAIL") < page.index("pass")  # failures listed first


@step
def _rows_with_one_bad() -> Annotated[Dataset, "raw_dataset"]:
    return dataset(CLEAN + CASES["U+FFFD"][0])


@pipeline(enable_cache=False)
def _validate_only() -> None:
    validate(_rows_with_one_bad(), validation=ValidationConfig(policy="drop"))


@pytest.mark.slow
def test_step_in_pipeline_stores_both_outputs_and_metadata(zenml_home):
    """The ZenML step: named outputs through the project's materializers, counts logged as step metadata."""
    from zenml.client import Client

    run = Client().get_pipeline_run(_validate_only().id)
    assert run.status.value == "completed"
    step_run = run.steps["validate"]
    clean = step_run.outputs["clean_dataset"][0].load()
    report = step_run.outputs["validation_report"][0].load()
    assert list(clean["id"]) == CLEAN_IDS
    assert isinstance(report, ValidationReport) and (report.rows_in, report.rows_out) == (len(CLEAN) + 1, len(CLEAN))
    assert step_run.run_metadata["rows_dropped"] == 1


# --- PII left after redaction (validation.pii) ----------------------------------------------

NULL = "expect_column_values_to_be_null"
EMAIL, CARD = "jane.doe@example.com", "4111 1111 1111 1111"  # a Luhn-valid test card number
LEFT_OVER = [
    row("feedback:chatcmpl-1", chat("Where is my order?", f"We wrote to {EMAIL} yesterday.")),
    row("acme_feedback::feedback:chatcmpl-2", chat(f"Charge {CARD} again?", "No, it was refunded.")),  # mixed in
]


def test_pii_left_in_feedback_rows_fails_naming_row_field_and_kind_not_the_text():
    with pytest.raises(DataValidationError) as err:
        validate_dataset(dataset(CLEAN + LEFT_OVER), ValidationConfig(policy="fail"))
    message = str(err.value)
    line = failure_line(message, NULL, "pii")
    assert "feedback:chatcmpl-1 = 'email in messages[1].content'" in line
    assert "acme_feedback::feedback:chatcmpl-2 = 'card in messages[0].content'" in line
    assert "2 of" in line
    assert EMAIL not in message and "jane.doe" not in message and CARD not in message and "4111" not in message
    assert all(id_ not in message for id_ in CLEAN_IDS)


def test_pii_left_in_feedback_rows_is_dropped_under_drop(caplog):
    out, report = validate_dataset(dataset(CLEAN + LEFT_OVER), ValidationConfig(policy="drop"))
    assert list(out["id"]) == CLEAN_IDS
    [result] = [r for r in report.results if r.column == "pii"]
    assert not result.success and result.dropped == 2
    assert result.example_ids == ["feedback:chatcmpl-1", "acme_feedback::feedback:chatcmpl-2"]
    assert "feedback:chatcmpl-1" in caplog.text and EMAIL not in caplog.text and CARD not in caplog.text
    assert EMAIL not in report.model_dump_json() and EMAIL not in report.to_html()


def test_pii_in_task_data_is_checked_only_when_asked():
    """A support address in the task data is a fact to learn (data/acme_support): untouched by default."""
    support = [row("train.jsonl:9", chat("How do I reach support?", "Write to help@acmetrailworks.example."))]
    ds = dataset(CLEAN + support)
    out, report = validate_dataset(ds, ValidationConfig())  # pii: feedback
    assert out is ds and report.success
    with pytest.raises(DataValidationError, match=r"train.jsonl:9 = 'email in messages\[1\].content'"):
        validate_dataset(ds, ValidationConfig(pii="all"))
    out, report = validate_dataset(dataset(CLEAN + LEFT_OVER), ValidationConfig(pii="off"))
    assert len(out) == len(CLEAN) + 2 and not any(r.column == "pii" for r in report.results)


def test_pii_in_feedback_preference_rows_names_the_answer():
    from core.data.preference import FEATURES as PREFERENCE_FEATURES

    def pair(id_, prompt, chosen, rejected):
        fields = {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}
        return {k: None for k in PREFERENCE_FEATURES} | {"id": id_, "split": "train", **fields}

    rows = [
        pair("feedback:chatcmpl-1", "Refund?", "Yes, within 45 days.", "No."),
        pair("feedback:chatcmpl-2", "Contact?", f"Mail {EMAIL}.", f"Call, or card {CARD}."),
    ]
    ds = Dataset.from_list(rows, features=PREFERENCE_FEATURES)
    with pytest.raises(DataValidationError) as err:
        validate_dataset(ds, ValidationConfig())
    line = failure_line(str(err.value), NULL, "pii")
    assert "feedback:chatcmpl-2 = 'email in chosen; card in rejected'" in line and EMAIL not in str(err.value)
    out, _ = validate_dataset(ds, ValidationConfig(policy="drop"))
    assert out["id"] == ["feedback:chatcmpl-1"]


def test_other_failures_quote_values_redacted():
    """Every quoted value goes through redaction, so a row failing another expectation leaks nothing either."""
    bad = [row("bad.jsonl:1", chat(f"{EMAIL}\x00", "A."))]
    with pytest.raises(DataValidationError) as err:
        validate_dataset(dataset(CLEAN + bad), ValidationConfig(pii="off"))
    line = failure_line(str(err.value), CONTROL, "messages.content")
    assert "bad.jsonl:1 = '[email]\\x00'" in line and EMAIL not in str(err.value)
