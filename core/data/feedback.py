"""Feedback -> data: the serving deployment's request log and its feedback (core/feedback/store.py) as rows of the
canonical schema ingest gives every source (core/data/ingest.py; preference formats: core/data/preference.py).

    instruction / chat (SFT)  a correction: the messages + the correction as the answer; an up-rated answer
                              (rating up or score >= 4) without one: the messages + the answer as served
    pairs (DPO, ORPO)         a correction that differs from the answer: chosen = correction, rejected = answer
    unpaired (KTO)            a rating: the answer, desirable for up or score >= 4, undesirable for down or
                              score <= 2 (3 says neither and is skipped)

One row per completion: of several feedback rows on it (from different sources), the newest that gives a row
decides. Every row's id is `feedback:<completion id>`; the version that gave the answer rides in the dataset's
info (`row_versions`), because the canonical columns are fixed (mixing casts every source to the task's columns).
Feedback rows train only; held-out rows come from `eval_path`, a local file in the same format.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from typing import Any

from datasets import Dataset, DatasetInfo

from core.config import PREFERENCE_FORMATS, DataSource
from core.data.ingest import IngestError

logger = logging.getLogger(__name__)

ID_PREFIX = "feedback:"
STAGES = ("staging", "production")  # a version at one of these was served: its feedback is what is new


class TooLittleFeedback(IngestError):
    """Fewer new feedback rows than the source's min_rows: the run stops before training, promoting nothing."""


def record_key(data: DataSource) -> str:
    """The model version's metadata key for this source's rows (core.runs.registry.FEEDBACK_KEYS): one per format,
    so an SFT source and a pairs source of one run never overwrite each other."""
    return f"feedback_{data.format}"


def row_id(completion_id: str) -> str:
    return f"{ID_PREFIX}{completion_id}"


def completion_id(row_id: str) -> str | None:
    """The completion id in a feedback row's id (after a mix's `<source>::` too), else None."""
    tail = row_id.rpartition("::")[2]
    return tail[len(ID_PREFIX) :] if tail.startswith(ID_PREFIX) else None


# --- since: last_version --------------------------------------------------------------------


def last_staged_version(model_name: str | None) -> tuple[int, dt.datetime] | None:
    """(number, creation time in UTC) of the newest version of `model_name` at a stage; None when none is."""
    if model_name is None:
        return None
    from zenml.client import Client
    from zenml.utils.pagination_utils import depaginate

    try:
        versions = depaginate(Client().list_model_versions, model=model_name, sort_by="desc:number")
    except KeyError:  # no such model yet: the first run
        return None
    staged = [v for v in versions if (v.stage or "") in STAGES]
    if not staged:
        return None
    newest = max(staged, key=lambda v: v.number)
    created = newest.created if newest.created.tzinfo else newest.created.replace(tzinfo=dt.timezone.utc)
    return newest.number, created


def resolve_since(data: DataSource, model_name: str | None) -> DataSource:
    """`data` with `since: last_version` replaced by that version's creation time (None while no version is at a
    stage: all feedback), and without a url the default store of `model_name`'s deployment; other sources and
    explicit times unchanged."""
    if data.source != "feedback":
        return data
    if data.url is None:
        if model_name is None:
            raise ValueError(
                "a feedback source without url reads the run's model's default store; the run has no model"
            )
        from core.feedback.requestlog import default_url

        data = data.model_copy(update={"url": default_url(model_name)})
    if data.since != "last_version":
        return data
    found = last_staged_version(model_name)
    if found is None:
        logger.info("feedback since last_version: model %s has no version at a stage; reading all feedback", model_name)
        return data.model_copy(update={"since": None})
    number, created = found
    return data.model_copy(update={"since": created, "since_version": number})


def resolved(data: DataSource) -> DataSource:
    """The window as of now: `since: last_version` (and a missing url) resolved for the running step's model."""
    if data.since == "last_version" or data.url is None:
        from core.runs.registry import current_model_name

        return resolve_since(data, current_model_name())
    return data


def since_text(data: DataSource) -> str:
    if data.since_version is not None:
        return f"since version {data.since_version} ({data.since:%Y-%m-%d %H:%M} UTC)"
    if isinstance(data.since, dt.datetime):
        return f"since {data.since:%Y-%m-%d %H:%M} UTC"
    return "in the store (no version at a stage yet)" if data.since is None else "since the last staged version"


# --- reading --------------------------------------------------------------------------------


def _open(data: DataSource):
    from core.feedback.store import FeedbackStore

    try:
        return FeedbackStore.open(data.url)
    except Exception as err:  # unreachable server, bad URL, unreadable file: say which store
        raise IngestError(f"{data.where}: cannot open the feedback store ({type(err).__name__}: {err})") from err


def feedback_fingerprint(data: DataSource) -> str:
    """Changes when new feedback arrives: the source's settings + the newest feedback time + the count since."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from core.feedback.store import Feedback

    h = hashlib.sha256(data.model_dump_json().encode())
    since = resolved(data).since
    query = select(func.max(Feedback.updated_at), func.count(Feedback.id))
    if since is not None:
        query = query.where(Feedback.updated_at >= since)
    try:
        with Session(_open(data).engine) as session:
            newest, count = session.execute(query).one()
    except Exception as err:  # a store only the cluster reaches (a scheduled run): never a cache hit, ingest reads it
        logger.warning("%s unreachable while compiling (%s); ingest will not be cached", data.where, err)
        newest, count = uuid.uuid4().hex, -1
    h.update(f"{newest}|{count}".encode())
    if data.eval_path:
        from core.data.ingest import data_files

        for f in data_files(data.eval_path):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def positive(feedback) -> bool | None:
    """True for up or a score of 4-5, False for down or 1-2, None for 3 or no rating."""
    if feedback.rating in ("up", "down"):
        return feedback.rating == "up"
    if feedback.score is not None and feedback.score != 3:
        return feedback.score >= 4
    return None


def _turns(messages: list[dict]) -> list[dict[str, str]]:
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


def _row(fmt: str, feedback, completion) -> dict[str, Any] | None:
    """The canonical row one feedback entry gives in format `fmt`, or None when it gives none."""
    prompt = _turns(completion.messages)
    if fmt == "pairs":
        if not feedback.correction or feedback.correction.strip() == completion.answer.strip():
            return None
        return {"prompt": prompt, "chosen": feedback.correction, "rejected": completion.answer}
    label = positive(feedback)
    if fmt == "unpaired":
        if label is None:
            return None
        # validation accepts KTO's spellings only: a score counts as the thumb it maps to
        return {
            "prompt": prompt,
            "completion": completion.answer,
            "label": label,
            "label_text": "up" if label else "down",
        }
    if feedback.correction:
        return {"messages": prompt + [{"role": "assistant", "content": feedback.correction}]}
    if label:
        return {"messages": prompt + [{"role": "assistant", "content": completion.answer}]}
    return None


def build_rows(entries: list[tuple[Any, Any]], fmt: str) -> list[dict[str, Any]]:
    """Canonical rows (split "train", plus `version`) from (Feedback, Completion) entries, oldest first: one per
    completion, the newest entry that gives a row deciding (SFT: a correction before a rating)."""
    by_completion: dict[str, list[tuple[Any, Any]]] = {}
    for feedback, completion in entries:
        by_completion.setdefault(completion.id, []).append((feedback, completion))
    rows = []
    for cid, found in by_completion.items():
        newest_first = sorted(found, key=lambda e: e[0].updated_at, reverse=True)
        if fmt not in PREFERENCE_FORMATS:  # a reviewer's correction outranks a later bare thumbs-up
            newest_first.sort(key=lambda e: not e[0].correction)
        row = next((r for f, c in newest_first if (r := _row(fmt, f, c)) is not None), None)
        if row is not None:
            rows.append({"id": row_id(cid), "split": "train", "version": found[0][1].version, **row})
    return rows


def load_feedback_rows(data: DataSource) -> Dataset:
    """The store's feedback since `data.since` as canonical rows (held-out rows from eval_path after them);
    TooLittleFeedback when they are fewer than `data.min_rows`."""
    from core.data.ingest import FEATURES as SFT_FEATURES
    from core.data.preference import FEATURES as PREFERENCE_FEATURES

    data = resolved(data)
    entries = _open(data).feedback(since=data.since)
    rows = build_rows(entries, data.format)
    if len(rows) < max(data.min_rows, 1):
        raise TooLittleFeedback(
            f"too little new feedback: {len(rows)} {data.format} rows {since_text(data)} from {data.where} "
            f"({len(entries)} feedback entries; needs min_rows={data.min_rows}). Nothing was trained or promoted"
        )
    features = PREFERENCE_FEATURES if data.format in PREFERENCE_FORMATS else SFT_FEATURES
    columns = {k: [row.get(k) for row in rows] for k in features}
    if data.eval_path:  # the user's held-out rows; feedback rows never are
        held_out = _held_out(data)
        for k in features:
            columns[k] += held_out[k]
    versions = {row["id"]: row["version"] for row in rows}
    info = DatasetInfo(description=json.dumps({"row_versions": versions}), features=features)
    logger.info("feedback: %d %s rows %s from %s", len(rows), data.format, since_text(data), data.where)
    return Dataset.from_dict(columns, features=features, info=info)


def _held_out(data: DataSource) -> dict[str, list]:
    from core.data.ingest import load_rows

    local = DataSource(source="local", path=data.eval_path, format=data.format)
    return load_rows(local).map(lambda _: {"split": "eval"}).to_dict()


def row_versions(ds: Dataset) -> dict[str, str]:
    """Feedback row id -> the model version that gave its answer, from the ingested dataset's info."""
    try:
        return json.loads(ds.info.description or "{}").get("row_versions", {})
    except json.JSONDecodeError:
        return {}


def ingest_record(data: DataSource, ds: Dataset) -> dict[str, Any]:
    """What a feedback ingest records (on its dataset artifact and the run's model version): the rows' count,
    their completion ids with the versions that answered, and the window they came from."""
    data = resolved(data)
    versions = row_versions(ds)
    completions = {completion_id(rid): version for rid, version in versions.items()}
    counts: dict[str, int] = {}
    for version in completions.values():
        counts[version] = counts.get(version, 0) + 1
    return {
        "rows": len(completions),
        "format": data.format,
        "since": data.since.isoformat() if isinstance(data.since, dt.datetime) else data.since,
        "since_version": data.since_version,
        "rows_per_version": counts,
        "completions": completions,
    }
