"""Validation: check the canonical dataset with Great Expectations before any GPU time is spent on it.

Great Expectations 1.x is called directly (ZenML's GE integration pins GE<1.0): an ephemeral in-memory
context, a pandas data source with one dataframe asset and one expectation suite per frame below, each run
by a ValidationDefinition that returns every offending row index:

- `rows`: one row per example, with columns derived from `messages`: `prompt` (the non-system turns before
  the final assistant turn, joined), `response` (the final assistant turn), `roles` (the role sequence,
  comma-joined) and `messages` (the whole conversation as JSON, for exact-duplicate detection);
- `turns`: one row per message, with `messages.role` and `messages.content`, so that an empty or broken
  turn in the middle of a conversation is caught too, not hidden inside a joined prompt;
- `eval rows`: the eval rows' prompts, which must not be among the train rows' prompts (leakage).

Preference data (core/data/preference.py's schema, recognised by its columns) gets the same frames: `rows` with
`prompt` (its non-system turns, joined), `roles`, the answers (`chosen` and `rejected`, or `completion` and its
`label`), `identical_answer` (a pair's answer when chosen and rejected say the same, after whitespace) and
`example` (for exact duplicates); `turns` with the prompt turns as `prompt.role` / `prompt.content`; `eval rows`.

GE's column-map expectations (regex, lengths, in/not-in set) skip null values: they count them as
`missing_count`, not as unexpected. So nulls are caught only by the explicit not-null expectations, and a
null turn makes `prompt`/`response` null rather than "" so that it is reported once, as a null.

PII (`validation.pii`): the `rows` frame gets a `pii` column, null unless the row is in scope (feedback rows by
default) and one of its texts (turn contents, preference answers) still holds what the request log's redaction
removes (core/feedback/redaction.py: an e-mail address, a Luhn-valid card number). Its value names the kind and the
field ("email in messages[1].content"), never the text, so the error message quoting it carries no PII; every
other quoted value goes through the same redaction before it is shown.

Policy `fail` raises one DataValidationError naming every failed expectation; `drop` removes offending
rows (for duplicates it keeps the first occurrence) and counts drops per expectation. Failures that no
row can be blamed for (a missing column, an empty dataset) raise under both policies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import pandas as pd
from datasets import Dataset
from pydantic import BaseModel, Field

from core.artifacts import HtmlReport, html_table
from core.config import ValidationConfig
from core.data.preference import ANSWERS, LABELS, label_key, preference_kind
from core.data.preference import FEATURES as PREFERENCE_FEATURES
from core.feedback.redaction import pii_kinds, redact

logger = logging.getLogger(__name__)
# GE logs dozens of INFO lines on import and per context (ZenML's root logger is at INFO): keep step logs
# readable, unless the user has set a level for GE themselves.
if logging.getLogger("great_expectations").level == logging.NOTSET:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)

REQUIRED_COLUMNS = ("id", "split", "messages")
SPLITS = ("train", "eval", "")  # "": unassigned; format_prompts splits those rows later
ROLES = ("system", "user", "assistant")
# An optional leading system turn, a user turn first, an assistant turn last (the training target).
ROLE_SEQUENCE = r"^(?:system,)?user(?:,(?:user|assistant))*,assistant$"  # non-capturing: pandas warns on groups
# A preference prompt: the context before the answer, so it starts (after a system turn) and ends with a user turn.
PROMPT_ROLES = r"^(?:system,)?(?:user,(?:(?:user|assistant),)*)?user$"
# Non-whitespace somewhere: rejects "" and whitespace-only text (lengths alone would pass "   ").
NOT_BLANK = r"\S"
# C0 controls except tab/LF/CR, DEL, C1 controls (often mojibake) and U+FFFD (a decoding error upstream).
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]"
# Mojibake: UTF-8 text decoded as Latin-1 or cp1252 somewhere upstream ("Café" -> "CafÃ©", "it's" -> "itâ€™s").
# A UTF-8 lead byte (C2/C3, or E2 80 for quotes and dashes, EF BB BF for a BOM) turns into "Â"/"Ã"/"â€"/"ï»¿",
# followed by what the continuation byte shows as in Latin-1 (U+00A0-U+00BF) or cp1252 (the 0x80-0x9F specials).
# Continuation bytes that show as C1 controls (U+0080-U+009F) are left to CONTROL_CHARS. Real text almost never
# has "Ã" or "Â" before such a symbol (Portuguese "SÃO" has a letter after it).
_CONTINUATION = "[\u00a0-\u00bf\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\u017d\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u017e\u0178]"
MOJIBAKE = [f"[\u00c2\u00c3]{_CONTINUATION}", f"\u00e2\u20ac{_CONTINUATION}", "\u00ef\u00bb\u00bf"]
MOJIBAKE_HINT = (
    "looks like UTF-8 text decoded as Latin-1/cp1252 (mojibake), e.g. 'Ã©' for 'é': fix the source's encoding"
)
PROMPT_JOIN = "\n\n"  # between the turns that make up `prompt`
VALUE_PREVIEW = 40  # characters of an offending value quoted in an error message


class DataValidationError(ValueError):
    """The dataset failed validation; the message lists every failed expectation with example row ids."""


class ExpectationResult(BaseModel):
    expectation: str  # GE expectation type, e.g. expect_column_values_to_not_be_null
    column: str = ""  # "" for table-level expectations
    unit: str = "rows"  # what the counts count: rows, turns (messages), or eval rows
    success: bool
    element_count: int = 0  # values checked, in `unit`
    unexpected_count: int = 0  # values that failed, in `unit`
    example_ids: list[str] = Field(default_factory=list)  # ids of offending rows, up to max_examples
    dropped: int = 0  # rows removed because of this expectation (policy drop); a row can count under several
    error: str = ""  # GE's exception message when the expectation could not be evaluated
    parameters: str = ""  # its bounds, set or pattern, as shown in the report
    guards: str = ""  # what a failure means


class ValidationReport(HtmlReport):
    policy: str
    rows_in: int
    rows_out: int
    results: list[ExpectationResult] = Field(default_factory=list)
    ge_version: str = ""

    @property
    def failed(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success]

    @property
    def success(self) -> bool:
        return not self.failed

    def to_html(self) -> str:
        status = "all expectations passed" if self.success else f"{len(self.failed)} expectation(s) failed"
        summary = html_table(
            ["policy", "rows in", "rows out", "dropped", "status", "Great Expectations"],
            [[self.policy, self.rows_in, self.rows_out, self.rows_in - self.rows_out, status, self.ge_version]],
        )
        rows = [
            [
                r.expectation,
                r.column or "(table)",
                r.parameters,
                r.guards,
                "pass" if r.success else "FAIL",
                f"{r.unexpected_count:,} of {r.element_count:,} {r.unit}" if r.element_count else r.error or "",
                ", ".join(r.example_ids),
                r.dropped,
            ]
            for r in sorted(self.results, key=lambda r: r.success)  # failures first
        ]
        head = ["expectation", "column", "parameters", "guards against", "result", "failing", "example rows", "dropped"]
        details = html_table(head, rows)
        return f"<h3>Data validation</h3>{summary}<br>{details}"


def flatten(ds: Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `rows` and `turns` frames that the expectations run over (see the module docstring)."""
    plain = ds.with_format(None)
    rows: dict[str, list[Any]] = {"id": list(plain["id"]), "split": list(plain["split"])}
    rows.update(prompt=[], response=[], roles=[], messages=[])
    turns: dict[str, list[Any]] = {"row": [], "messages.role": [], "messages.content": []}
    for pos, messages in enumerate(plain["messages"]):
        messages = messages or []
        roles = [m.get("role") for m in messages]
        contents = [m.get("content") for m in messages]
        turns["row"] += [pos] * len(messages)
        turns["messages.role"] += roles
        turns["messages.content"] += contents
        # str(None) == "None": a missing role fails the ROLE_SEQUENCE regex instead of being skipped as null.
        rows["roles"].append(",".join(str(r) for r in roles))
        rows["messages"].append(json.dumps(messages, ensure_ascii=False, sort_keys=True))
        prompt = response = None  # stay null when there is no final assistant turn: `roles` reports that
        if roles and roles[-1] == "assistant":
            before = [c for r, c in zip(roles[:-1], contents[:-1], strict=True) if r != "system"]
            response = contents[-1]
            if before and None not in before:  # a null turn is reported by the not-null expectation
                prompt = PROMPT_JOIN.join(before)
        rows["prompt"].append(prompt)
        rows["response"].append(response)
    return pd.DataFrame(rows), pd.DataFrame(turns)


# One frame to validate: (data, expectations, suite parameters that the expectations refer to).
Check = tuple[pd.DataFrame, list[Any], dict[str, Any]]


def guards(what: str, **meta: str) -> dict[str, str]:
    """An expectation's `meta`: what a failure of it means, shown in the report next to its parameters."""
    return {"guards": what, **meta}


def parameters(kwargs: dict[str, Any]) -> str:
    """An expectation's parameters as a person reads them: bounds, sets, patterns; long sets by size."""
    shown = []
    for key, value in kwargs.items():
        if key in ("column", "result_format", "batch_id", "meta") or value is None:
            continue
        if isinstance(value, (list, set)) and len(value) > 6:
            shown.append(f"{key}: {len(value):,} values")
        else:
            shown.append(f"{key}={value!r}")
    return ", ".join(shown)


def build_checks(ds: Dataset, cfg: ValidationConfig) -> dict[str, Check]:
    """The frames to validate and their expectations, by name; the name is also the unit the counts count.

    Every frame's index is the dataset's row position, except `turns`, whose `row` column holds it.
    """
    if is_preference(ds.column_names):
        return build_preference_checks(ds, cfg)
    schema = _schema_expectations(REQUIRED_COLUMNS)
    if any(c not in ds.column_names for c in REQUIRED_COLUMNS):
        # Nothing to derive from: check only the schema, over a frame with the dataset's shape.
        return {"rows": (pd.DataFrame(index=range(len(ds)), columns=ds.column_names), schema, {})}
    rows, turns = flatten(ds)
    eval_rows, on_eval, train_prompts = _leakage_check(rows)
    pii = _pii_check(rows, turns, "messages", (), cfg)
    return {
        "rows": (rows, schema + _row_expectations(cfg) + pii, {}),
        "turns": (turns, _turn_expectations(), {}),
        "eval rows": (eval_rows, on_eval, {"train_prompts": train_prompts}),
    }


def _schema_expectations(required: tuple[str, ...]) -> list[Any]:
    """The canonical columns exist and there is at least one row."""
    # GE is imported here, not at the top: it takes seconds, and the pipeline imports every step to compile.
    import great_expectations.expectations as gxe

    schema = [gxe.ExpectColumnToExist(column=c, meta=guards("the canonical schema ingest writes")) for c in required]
    schema.append(gxe.ExpectTableRowCountToBeBetween(min_value=1, meta=guards("an empty dataset")))
    return schema


def _row_expectations(cfg: ValidationConfig) -> list[Any]:
    """Per example: named, assigned a split, a conversation that ends in an answer, sane lengths, no duplicates."""
    import great_expectations.expectations as gxe

    lengths = {"min_value": cfg.min_chars, "max_value": cfg.max_chars}
    return _id_split_expectations() + [
        gxe.ExpectColumnValuesToMatchRegex(
            column="roles",
            regex=ROLE_SEQUENCE,
            meta=guards("conversations that do not end in an assistant turn to learn (or start with one)"),
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", **lengths, meta=guards("empty or runaway prompts")),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="response", **lengths, meta=guards("empty or runaway answers (the training target)")
        ),
        gxe.ExpectColumnValuesToBeUnique(column="messages", meta=guards("the same conversation trained twice")),
    ]


def _id_split_expectations() -> list[Any]:
    """Every row named, and assigned a known split."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotBeNull(column="id", meta=guards("rows that errors could not name")),
        gxe.ExpectColumnValuesToNotBeNull(column="split", meta=guards("rows with no train/eval assignment")),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), meta=guards("a split name other than train, eval or unassigned")
        ),
    ]


def _turn_expectations(turns: str = "messages") -> list[Any]:
    """Per message: text that is there, not blank, not binary junk or mojibake, from a role the template knows."""
    import great_expectations.expectations as gxe

    return _text_expectations(f"{turns}.content", "a turn") + [
        gxe.ExpectColumnValuesToBeInSet(
            column=f"{turns}.role", value_set=list(ROLES), meta=guards("a role the chat template cannot render")
        ),
    ]


def _text_expectations(column: str, what: str) -> list[Any]:
    """Text that is there, not blank, not binary junk or mojibake."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotBeNull(column=column, meta=guards(f"{what} with no text")),
        gxe.ExpectColumnValuesToMatchRegex(
            column=column, regex=NOT_BLANK, meta=guards(f"{what} that is empty or only whitespace")
        ),
        gxe.ExpectColumnValuesToNotMatchRegex(
            column=column,
            regex=CONTROL_CHARS,
            meta=guards("control characters or U+FFFD: binary junk or a decoding error upstream"),
        ),
        gxe.ExpectColumnValuesToNotMatchRegexList(
            column=column,
            regex_list=MOJIBAKE,
            meta=guards("mojibake: UTF-8 text decoded as Latin-1/cp1252", hint=MOJIBAKE_HINT),
        ),
    ]


def _leakage_check(
    rows: pd.DataFrame, train_splits: tuple[str, ...] = ("train",), flatters: str = "eval loss and ROUGE"
) -> tuple[pd.DataFrame, list[Any], list[str]]:
    """The eval rows, the expectation that none of their prompts is trained on, and the train prompts it needs."""
    import great_expectations.expectations as gxe

    # Leakage: an eval prompt that is also trained on makes eval loss and ROUGE look better than they are.
    # Its own run over the eval rows, with the train prompts as a suite parameter: GE copies an expectation's
    # kwargs many times per run (about 7 s for 45k train prompts), so keep the big set out of the other suites.
    eval_rows = rows.loc[rows["split"] == "eval", ["id", "prompt"]]
    train_prompts = sorted(set(rows.loc[rows["split"].isin(train_splits), "prompt"].dropna()))
    leakage = guards(
        f"leakage: an eval prompt that is also trained on (flatters {flatters})",
        parameters=f"value_set: the {len(train_prompts):,} train prompts",
    )
    on_eval = [
        gxe.ExpectColumnValuesToNotBeInSet(column="prompt", value_set={"$PARAMETER": "train_prompts"}, meta=leakage)
    ]
    return eval_rows, on_eval, train_prompts


def in_pii_scope(row_id: Any, scope: str) -> bool:
    """Whether `validation.pii` checks this row: every row (all), none (off), or a feedback store's (feedback)."""
    from core.data.feedback import completion_id

    if scope == "feedback":
        return isinstance(row_id, str) and completion_id(row_id) is not None
    return scope == "all"


def _pii_check(
    rows: pd.DataFrame, turns: pd.DataFrame, turn_key: str, answers: tuple[str, ...], cfg: ValidationConfig
) -> list[Any]:
    """Adds `rows["pii"]` (what is left in each in-scope row: "email in messages[1].content; card in chosen", else
    null) and returns the expectation that it is null; nothing under `pii: off`."""
    import great_expectations.expectations as gxe

    if cfg.pii == "off":
        return []
    scoped = [in_pii_scope(i, cfg.pii) for i in rows["id"]]
    found: list[list[str]] = [[] for _ in scoped]
    turn_numbers = turns.groupby("row").cumcount()  # a turn's position in its row's conversation
    for pos, n, text in zip(turns["row"], turn_numbers, turns[f"{turn_key}.content"], strict=True):
        if scoped[pos] and isinstance(text, str):
            found[pos] += [f"{kind} in {turn_key}[{n}].content" for kind in pii_kinds(text)]
    for column in answers:
        for pos, text in enumerate(rows[column]):
            if scoped[pos] and isinstance(text, str):
                found[pos] += [f"{kind} in {column}" for kind in pii_kinds(text)]
    rows["pii"] = ["; ".join(f) if f else None for f in found]
    where = "feedback rows" if cfg.pii == "feedback" else "every row"
    return [
        gxe.ExpectColumnValuesToBeNull(
            column="pii",
            meta=guards(
                "personal data left after redaction (e-mail addresses, card numbers) trained into the model",
                parameters=f"e-mails, Luhn-valid card numbers (core/feedback/redaction.py) in {where}",
                hint=f"text the request log's redaction removes: clean the source, or see validation.pii ({cfg.pii})",
                quote="whole",  # the value names the kind and the field, never the text
            ),
        )
    ]


# --- preference data (core/data/preference.py's schema) ----------------------------------------


def is_preference(columns: list[str]) -> bool:
    """The preference schema, recognised by its answer columns (the SFT schema has `messages` instead)."""
    return "messages" not in columns and bool({"chosen", "completion"} & set(columns))


def build_preference_checks(ds: Dataset, cfg: ValidationConfig) -> dict[str, Check]:
    """build_checks for preference rows: the same frames, the answers and labels checked where SFT checks turns."""
    required = tuple(PREFERENCE_FEATURES)
    schema = _schema_expectations(required)
    if any(c not in ds.column_names for c in required):
        return {"rows": (pd.DataFrame(index=range(len(ds)), columns=ds.column_names), schema, {})}
    rows, turns = flatten_preference(ds)
    # the data's own held-out rows are "eval", every other row trains (ingest leaves them unassigned)
    eval_rows, on_eval, train_prompts = _leakage_check(rows, ("train", ""), "preference accuracy")
    kind = preference_kind(ds)
    pii = _pii_check(rows, turns, "prompt", ANSWERS[kind], cfg)
    return {
        "rows": (rows, schema + _preference_expectations(kind, cfg) + pii, {}),
        "turns": (turns, _turn_expectations("prompt"), {}),
        "eval rows": (eval_rows, on_eval, {"train_prompts": train_prompts}),
    }


def flatten_preference(ds: Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `rows` and `turns` frames of preference rows (see the module docstring)."""
    answers = ("chosen", "rejected", "completion")
    rows: dict[str, list[Any]] = {k: [] for k in ("id", "split", "prompt", "roles", *answers, "label", "label_text")}
    rows.update(identical_answer=[], example=[])
    turns: dict[str, list[Any]] = {"row": [], "prompt.role": [], "prompt.content": []}
    for pos, row in enumerate(ds.with_format(None)):
        prompt = row["prompt"] or []
        roles, contents = [t.get("role") for t in prompt], [t.get("content") for t in prompt]
        turns["row"] += [pos] * len(prompt)
        turns["prompt.role"] += roles
        turns["prompt.content"] += contents
        before = [c for r, c in zip(roles, contents) if r != "system"]
        for key in ("id", "split", *answers, "label_text"):
            rows[key].append(row[key])
        rows["prompt"].append(PROMPT_JOIN.join(before) if before and None not in before else None)
        rows["roles"].append(",".join(str(r) for r in roles))  # str(None): a missing role fails PROMPT_ROLES
        rows["label"].append(None if row["label_text"] is None else label_key(row["label_text"]))  # as LABELS spells it
        rows["identical_answer"].append(_identical_answer(row["chosen"], row["rejected"]))
        label = row["label_text"] if row["label"] is None else row["label"]  # "1" and "true" are one label
        example = [prompt, row["chosen"], row["rejected"], row["completion"], label]
        rows["example"].append(json.dumps(example, ensure_ascii=False, sort_keys=True))
    return pd.DataFrame(rows), pd.DataFrame(turns)


def _identical_answer(chosen: str | None, rejected: str | None) -> str | None:
    """The answer a pair gives twice (whitespace aside), else None: a pair with nothing to prefer."""
    if chosen is None or rejected is None:
        return None
    same = " ".join(chosen.split()) == " ".join(rejected.split())
    return " ".join(chosen.split()) if same else None


def _preference_expectations(kind: str, cfg: ValidationConfig) -> list[Any]:
    """Per example: named, a prompt that ends in a user turn, sane answers, something to prefer, no duplicates."""
    import great_expectations.expectations as gxe

    lengths = {"min_value": cfg.min_chars, "max_value": cfg.max_chars}
    checks = _id_split_expectations() + [
        gxe.ExpectColumnValuesToMatchRegex(
            column="roles",
            regex=PROMPT_ROLES,
            meta=guards("a prompt that does not start and end with a user turn (after an optional system turn)"),
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", **lengths, meta=guards("empty or runaway prompts")),
    ]
    for column in ANSWERS[kind]:
        checks += _text_expectations(column, f"a {column} answer")
        checks.append(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=column, **lengths, meta=guards(f"empty or runaway {column} answers")
            )
        )
    checks += _pair_expectations() if kind == "pairs" else _label_expectations()
    checks.append(gxe.ExpectColumnValuesToBeUnique(column="example", meta=guards("the same example trained twice")))
    return checks


def _pair_expectations() -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeNull(
            column="identical_answer",
            meta=guards("a pair whose chosen and rejected answers are the same text: nothing to prefer"),
        )
    ]


def _label_expectations() -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotBeNull(column="label", meta=guards("an unpaired row with no label")),
        gxe.ExpectColumnValuesToBeInSet(
            column="label",
            value_set=sorted(LABELS),
            meta=guards("a label that is not true/false, 1/0, up/down or good/bad"),
        ),
    ]


def run_checks(checks: dict[str, Check]) -> dict[str, list[Any]]:
    """Run each frame's expectations in one ephemeral GE context; GE's results by frame name."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # in memory, no data-docs site (the report is our own artifact), no tqdm bars in step logs
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("validate")
    results = {}
    for name, (frame, expectations, parameters) in checks.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        run = definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            # COMPLETE: every unexpected index (the frame's index), not just the first 20
            result_format={"result_format": "COMPLETE"},
        )
        results[name] = run.results
    return results


def _preview(value: Any, limit: int | None = VALUE_PREVIEW) -> str:
    """An offending value as quoted in a message: e-mails and card numbers redacted (PII never reaches a log), cut
    at `limit` characters (None: whole)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "null"
    text = repr(redact(value) if isinstance(value, str) else value)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def validate_dataset(ds: Dataset, cfg: ValidationConfig) -> tuple[Dataset, ValidationReport]:
    """Validate `ds`; return it (unchanged, or without offending rows under policy drop) and the report.

    Raises DataValidationError, before anything is returned, under policy fail when any expectation fails,
    and under either policy when a failure cannot be fixed by dropping rows or drop would leave no rows.
    """
    checks = build_checks(ds, cfg)
    found = read_results(checks, run_checks(checks), cfg.max_examples)
    report = ValidationReport(
        policy=cfg.policy,
        rows_in=len(ds),
        rows_out=len(ds),
        results=found.results,
        ge_version=version("great-expectations"),
    )
    if not found.messages:
        return ds, report
    if cfg.policy == "fail" or found.unfixable:
        why = "cannot be fixed by dropping rows" if found.unfixable else "set validation.policy: drop to remove them"
        raise DataValidationError(
            f"Data validation failed ({why}): {len(found.messages)} of {len(found.results)} expectations failed "
            f"on {len(ds)} rows:\n  - " + "\n  - ".join(found.messages)
        )
    drop = rows_to_drop(found.offending, checks["rows"][0])
    if len(drop) == len(ds):
        raise DataValidationError(
            f"Data validation dropped every one of the {len(ds)} rows:\n  - " + "\n  - ".join(found.messages)
        )
    report.rows_out = len(ds) - len(drop)
    logger.warning("validate: dropped %d of %d rows:\n  - %s", len(drop), len(ds), "\n  - ".join(found.messages))
    return ds.select([p for p in range(len(ds)) if p not in drop]), report


@dataclass
class Findings:
    """GE's results read back: one ExpectationResult per expectation, and what failed, by row or beyond rows."""

    results: list[ExpectationResult] = field(default_factory=list)
    offending: list[tuple[ExpectationResult, list[int]]] = field(default_factory=list)  # failed, row positions
    unfixable: list[ExpectationResult] = field(default_factory=list)  # failed with no row to blame
    messages: list[str] = field(default_factory=list)  # one line per failure, for the error or the warning


def read_results(checks: dict[str, Check], ge_results: dict[str, list[Any]], max_examples: int) -> Findings:
    """Every expectation's result; for each failure, the rows it blames and a message quoting a few of them."""
    found = Findings()
    rows = checks["rows"][0]
    for unit, frame_results in ge_results.items():
        frame = checks[unit][0]
        for res in frame_results:
            item = _expectation_result(res, unit)
            found.results.append(item)
            if item.success:
                continue
            detail = res.result or {}
            index = detail.get("unexpected_index_list")
            if not index:  # table-level (schema, row count) or an evaluation error: no row to blame
                found.unfixable.append(item)
                what = item.error or ("column missing" if item.column else f"observed {detail.get('observed_value')}")
                found.messages.append(f"{item.expectation}{f' on {item.column!r}' if item.column else ''}: {what}")
                continue
            positions = frame["row"].loc[index].tolist() if unit == "turns" else list(index)
            found.offending.append((item, positions))
            meta = res.expectation_config.meta or {}
            limit = None if meta.get("quote") == "whole" else VALUE_PREVIEW
            found.messages.append(
                _row_failure(item, frame, rows, positions, index, max_examples, meta.get("hint"), limit)
            )
    return found


def _expectation_result(res: Any, unit: str) -> ExpectationResult:
    """One GE result as the report's row: counts in `unit`, GE's error if any, parameters and what it guards."""
    config = res.expectation_config
    detail = res.result or {}
    return ExpectationResult(
        expectation=config.type,
        column=config.kwargs.get("column") or "",
        unit=unit,
        success=bool(res.success),
        element_count=detail.get("element_count") or 0,
        unexpected_count=detail.get("unexpected_count") or 0,
        error=(res.exception_info or {}).get("exception_message") or "",
        parameters=(config.meta or {}).get("parameters") or parameters(config.kwargs),
        guards=(config.meta or {}).get("guards", ""),
    )


def _row_failure(
    item: ExpectationResult,
    frame: pd.DataFrame,
    rows: pd.DataFrame,
    positions: list[int],
    index: list[int],
    max_examples: int,
    hint: str | None,
    limit: int | None = VALUE_PREVIEW,
) -> str:
    """A failure's message, quoting its first offending rows (by id and value); sets the item's example_ids."""
    first: dict[int, int] = {}  # row position -> its first offending value's index (one per row)
    for p, i in zip(positions, index, strict=True):
        first.setdefault(p, i)
    shown = list(first.items())[:max_examples]
    item.example_ids = [str(rows["id"].iloc[p]) for p, _ in shown]
    examples = ", ".join(f"{rows['id'].iloc[p]} = {_preview(frame[item.column].loc[i], limit)}" for p, i in shown)
    more = len(first) - len(shown)
    # what a failure usually means, where the expectation's name does not say (see MOJIBAKE_HINT)
    return (
        f"{item.expectation} on {item.column!r}: {item.unexpected_count} of {item.element_count} {item.unit}, "
        f"e.g. {examples}{f' (+{more} more rows)' if more > 0 else ''}{f'; {hint}' if hint else ''}"
    )


def rows_to_drop(offending: list[tuple[ExpectationResult, list[int]]], rows: pd.DataFrame) -> set[int]:
    """Policy drop's rows, counted per expectation (item.dropped): duplicates last, keeping each first survivor.

    Rows failing any other expectation go first, then duplicates among the rows that remain, so that the first
    *surviving* occurrence of a duplicated conversation is the one kept.
    """
    drop: set[int] = set()
    duplicates = []
    for item, positions in offending:
        if item.expectation == "expect_column_values_to_be_unique":
            duplicates.append((item, positions))
            continue
        item.dropped = len(set(positions))
        drop.update(positions)
    for item, positions in duplicates:
        seen: set[str] = set()
        removed = set()
        for p in sorted(set(positions) - drop):
            value = rows[item.column].iloc[p]
            if value in seen:
                removed.add(p)
            seen.add(value)
        item.dropped = len(removed)
        drop |= removed
    return drop
