"""Ingest: read instruction data into one canonical, versioned dataset.

Sources: a local .jsonl/.json/.csv/.parquet file or folder of them, a Hub
dataset id (+ split, revision), or the serving feedback store (core/data/feedback.py). Columns are mapped (DataSource.columns) into
the canonical schema every later step reads:

    id        "<file>:<line>" (or "<dataset>[<split>]:<row>"), quoted in every error
    split     "train", "eval", or "" (format_prompts assigns those later)
    messages  [{"role": ..., "content": ...}, ...]; instruction rows become user + assistant turns

Preference data (format pairs / unpaired) has its own canonical schema: core/data/preference.py.

Ingest maps, it does not judge: null or empty texts pass through to validate,
which reports them with great-expectations. What ingest cannot map (a broken
JSON line, invalid UTF-8, a missing column, a wrong type) stops here with the
file, row and field named.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset, Features, List, Value

from core.config import PREFERENCE_FORMATS, DataSource

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FEATURES = Features(
    {
        "id": Value("string"),
        "split": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
    }
)
INSTRUCTION_COLUMNS = ("instruction", "input", "output")


class IngestError(ValueError):
    """Input data that cannot be read or mapped; the message names file, row and field."""


def resolve_path(path: str) -> Path:
    """Relative to the working directory, else to the ZenML source root (as inside a step pod)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    from zenml.utils import source_utils

    candidate = Path(source_utils.get_source_root()) / p
    return candidate if candidate.exists() else p


def data_files(path: str) -> list[Path]:
    p = resolve_path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise IngestError(f"{path}: folder has no {'/'.join(SUFFIXES)} files")
        return files
    if not p.exists():
        raise IngestError(f"{path}: no such file or folder")
    if p.suffix not in SUFFIXES:
        raise IngestError(f"{path}: unsupported file type '{p.suffix}' (use {', '.join(SUFFIXES)})")
    return [p]


def source_fingerprint(data: DataSource) -> str:
    """Changes whenever the data would: file bytes for local sources, the resolved commit for Hub datasets.

    Called by the pipeline at compile time and passed to ingest as a parameter,
    because ZenML's cache key sees parameters, not the files they point at.
    """
    if data.source == "feedback":  # the store's newest feedback time and count since `since`
        from core.data.feedback import feedback_fingerprint

        return feedback_fingerprint(data)
    h = hashlib.sha256(data.model_dump_json().encode())
    if data.source == "hub":
        from huggingface_hub import HfApi

        try:
            h.update(HfApi().dataset_info(data.path, revision=data.revision).sha.encode())
        except Exception as err:  # offline, or no access: fall back to the configured revision
            logger.warning("could not resolve %s on the Hub (%s); caching by revision name", data.path, err)
            h.update(str(data.revision).encode())
        return h.hexdigest()
    for path in [data.path] + ([data.eval_path] if data.eval_path else []):
        for f in data_files(path):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# --- reading: each yields (row id, record dict) ------------------------------------------


def _read_jsonl(f: Path):
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise IngestError(f"{f.name}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            if "\x00" in line:  # json's own message ("Invalid control character at") does not say which
                raise IngestError(f"{f.name}:{lineno}: NUL byte at column {line.index(chr(0)) + 1}; not valid in JSON")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise IngestError(f"{f.name}:{lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(rec, dict):
                raise IngestError(f"{f.name}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield f"{f.name}:{lineno}", rec


def _read_json(f: Path):
    try:
        doc = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise IngestError(f"{f.name}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise IngestError(f"{f.name}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(doc, list):
        raise IngestError(f"{f.name}: expected a JSON array of objects, got {type(doc).__name__}")
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            raise IngestError(f"{f.name}[{i}]: expected a JSON object, got {type(rec).__name__}")
        yield f"{f.name}[{i}]", rec


def _frame_rows(f: Path, frame: pd.DataFrame, first_row: int):
    for i, rec in enumerate(frame.to_dict(orient="records")):
        # pandas reads missing CSV cells as NaN: make them null like JSON's
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in rec.items()}
        yield f"{f.name}:{first_row + i}", clean


def _read_file(f: Path):
    if f.stat().st_size == 0:
        raise IngestError(f"{f.name}: file is empty")
    if f.suffix == ".jsonl":
        yield from _read_jsonl(f)
    elif f.suffix == ".json":
        yield from _read_json(f)
    elif f.suffix == ".csv":
        raw = f.read_bytes()
        try:  # decoded here, not by pandas: its error offsets are into an internal buffer, not the file
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise IngestError(f"{f.name}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
        except pd.errors.ParserError as err:
            raise IngestError(f"{f.name}: not valid CSV ({err})") from None
        yield from _frame_rows(f, frame, first_row=2)  # line 1 is the header
    else:
        yield from _frame_rows(f, pd.read_parquet(f), first_row=1)


def _read_hub(data: DataSource, split: str):
    from datasets import load_dataset

    ds = load_dataset(data.path, split=split, revision=data.revision)
    for i, rec in enumerate(ds):
        yield f"{data.path}[{split}]:{i}", rec


# --- mapping into the canonical schema ----------------------------------------------------


def _text(row_id: str, rec: dict, column: str, field: str, required: bool) -> str | None:
    if column not in rec:
        if not required:
            return None
        raise IngestError(f"{row_id}: missing column '{column}' (mapped to '{field}'); columns present: {sorted(rec)}")
    value = rec[column]
    if value is not None and not isinstance(value, str):
        raise IngestError(f"{row_id}: field '{column}' must be a string, got {type(value).__name__}: {value!r:.60}")
    return value


# ShareGPT's role names (FastChat, Vicuna and most datasets that followed) -> ours
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(row_id: str, rec: dict, data: DataSource) -> list[dict[str, Any]]:
    if data.format == "instruction":
        col = {c: data.columns.get(c, c) for c in INSTRUCTION_COLUMNS}
        instruction = _text(row_id, rec, col["instruction"], "instruction", required=True)
        extra = _text(row_id, rec, col["input"], "input", required=False)
        output = _text(row_id, rec, col["output"], "output", required=True)
        user = instruction if not extra or instruction is None else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    column = data.columns.get("messages", "conversations" if data.format == "sharegpt" else "messages")
    if column not in rec:
        raise IngestError(f"{row_id}: missing column '{column}' (mapped to 'messages'); columns present: {sorted(rec)}")
    return chat_turns(row_id, rec[column], column, data)


def chat_turns(row_id: str, turns: Any, column: str, data: DataSource) -> list[dict[str, Any]]:
    """A field holding chat turns, as {role, content} dicts with the data's turn keys and role names mapped."""
    sharegpt = data.format == "sharegpt"
    if hasattr(turns, "tolist"):  # parquet gives numpy arrays
        turns = turns.tolist()
    defaults = {"role": "from", "content": "value"} if sharegpt else {"role": "role", "content": "content"}
    role_key, content_key = (data.turn_keys.get(k, defaults[k]) for k in ("role", "content"))
    roles = data.roles or (SHAREGPT_ROLES if sharegpt else {})
    if not isinstance(turns, list):
        raise IngestError(
            f"{row_id}: field '{column}' must be a list of {{{role_key}, {content_key}}}, got {type(turns).__name__}"
        )
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            hint = ""
            if isinstance(turn, dict) and {"from", "value"} <= set(turn) and not sharegpt:
                fix = (
                    "data.format: sharegpt" if data.format == "chat" else "data.turn_keys: {role: from, content: value}"
                )
                hint = f" (this looks like ShareGPT data: set {fix})"
            raise IngestError(
                f"{row_id}: {column}[{j}] must be an object with '{role_key}' and '{content_key}', got "
                f"{turn!r:.80}{hint}"
            )
        for key in (role_key, content_key):
            if turn[key] is not None and not isinstance(turn[key], str):
                raise IngestError(f"{row_id}: {column}[{j}].{key} must be a string, got {type(turn[key]).__name__}")
        # an unknown role passes through: validation reports it (or drops the row, by validation.policy)
        out.append({"role": roles.get(turn[role_key], turn[role_key]), "content": turn[content_key]})
    return out


def record_parts(data: DataSource) -> list[tuple[bool, Iterator[tuple[str, dict]]]]:
    """The source's row readers, each flagged held out (eval_path / eval_split) or not: training rows first."""
    if data.source == "hub":
        parts = [(False, _read_hub(data, data.split))]
        return parts + ([(True, _read_hub(data, data.eval_split))] if data.eval_split else [])
    parts = [(False, _read_file(f)) for f in data_files(data.path)]
    return parts + [(True, _read_file(f)) for f in (data_files(data.eval_path) if data.eval_path else [])]


def load_rows(data: DataSource) -> Dataset:
    """Read every configured source into the canonical schema (preference data: into core.data.preference's)."""
    if data.source == "feedback":
        from core.data.feedback import load_feedback_rows

        return load_feedback_rows(data)
    if data.format in PREFERENCE_FORMATS:
        from core.data.preference import load_preference_rows

        return load_preference_rows(data)
    train_split = "train" if data.eval_path or data.eval_split else ""
    rows: dict[str, list] = {"id": [], "split": [], "messages": []}
    for held_out, records in record_parts(data):
        for row_id, rec in records:
            rows["id"].append(row_id)
            rows["split"].append("eval" if held_out else train_split)
            rows["messages"].append(_messages(row_id, rec, data))
    if not rows["id"]:
        raise IngestError(f"{data.path}: no rows found")
    return Dataset.from_dict(rows, features=FEATURES)
