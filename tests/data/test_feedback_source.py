"""The feedback source (core/data/feedback.py): the store's corrections and ratings as canonical rows of each format,
with their completion ids and versions, the `since` window, the min_rows early stop and the fingerprint."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import ValidationError

from core.config import DataSource, MixSource, ValidationConfig, validate_config
from core.data import feedback
from core.data.ingest import load_rows, source_fingerprint
from core.data.validation import validate_dataset
from core.feedback.store import FeedbackStore, sqlite_url, utcnow


def completion(i: int, version: str = "3") -> dict:
    return dict(
        id=f"chatcmpl-{i}", created_at=utcnow(), endpoint="chat.completions", model="m", version=version,
        adapter="default", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}?"}],
        answer=f"a{i}", sampling={}, prompt_tokens=3, completion_tokens=2, latency_s=0.1, stream=False,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    """Six answers by versions 3 and 4: 1 corrected and down-rated, 2 up, 3 scored 5, 4 scored 3, 5 down, 6 scored 2
    and corrected by a reviewer after an api thumbs-up."""
    store = FeedbackStore.open(sqlite_url(tmp_path / "feedback.db"))
    store.add_completions([completion(i, "3" if i <= 3 else "4") for i in range(1, 7)])
    store.put_feedback("chatcmpl-1", "api", rating="down", correction="c1")
    store.put_feedback("chatcmpl-2", "api", rating="up")
    store.put_feedback("chatcmpl-3", "api", score=5)
    store.put_feedback("chatcmpl-4", "api", score=3)
    store.put_feedback("chatcmpl-5", "api", rating="down")
    store.put_feedback("chatcmpl-6", "api", rating="up")
    store.put_feedback("chatcmpl-6", "reviewer", score=2, correction="c6")
    return store


def source(store: FeedbackStore, fmt: str, **extra) -> DataSource:
    return DataSource(**{"source": "feedback", "url": store.url, "format": fmt, "since": None, "min_rows": 1} | extra)


def prompt(i: int) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}?"}]


def test_sft_rows_are_corrections_and_up_rated_answers(store):
    ds = load_rows(source(store, "chat"))
    assert ds["id"] == ["feedback:chatcmpl-1", "feedback:chatcmpl-2", "feedback:chatcmpl-3", "feedback:chatcmpl-6"]
    assert set(ds["split"]) == {"train"}  # feedback rows train only
    answers = [m[-1] for m in ds["messages"]]
    assert answers == [{"role": "assistant", "content": c} for c in ("c1", "a2", "a3", "c6")]
    assert ds["messages"][0][:-1] == prompt(1)
    assert feedback.row_versions(ds) == {
        "feedback:chatcmpl-1": "3", "feedback:chatcmpl-2": "3", "feedback:chatcmpl-3": "3", "feedback:chatcmpl-6": "4"
    }  # fmt: skip
    assert load_rows(source(store, "instruction"))["messages"] == ds["messages"]  # the same canonical rows


def test_pairs_are_corrections_against_the_original_answer(store):
    ds = load_rows(source(store, "pairs"))
    assert ds["id"] == ["feedback:chatcmpl-1", "feedback:chatcmpl-6"]
    assert ds["prompt"] == [prompt(1), prompt(6)]
    assert (ds["chosen"], ds["rejected"]) == (["c1", "c6"], ["a1", "a6"])
    assert feedback.row_versions(ds) == {"feedback:chatcmpl-1": "3", "feedback:chatcmpl-6": "4"}


def test_ratings_become_kto_labels_and_a_3_is_skipped(store):
    ds = load_rows(source(store, "unpaired"))
    got = list(zip(ds["id"], ds["completion"], ds["label"], ds["label_text"]))
    assert got == [
        ("feedback:chatcmpl-1", "a1", False, "down"),
        ("feedback:chatcmpl-2", "a2", True, "up"),
        ("feedback:chatcmpl-3", "a3", True, "up"),  # a score is spelled as the thumb it maps to
        ("feedback:chatcmpl-5", "a5", False, "down"),
        ("feedback:chatcmpl-6", "a6", False, "down"),  # the reviewer's newer score outranks the api thumbs-up
    ]


def test_the_rows_pass_the_same_validation(store):
    for fmt in ("chat", "pairs", "unpaired"):
        clean, report = validate_dataset(load_rows(source(store, fmt)), ValidationConfig())
        assert report.success and len(clean) == report.rows_in


def test_since_keeps_newer_feedback_only(store):
    cut = utcnow()
    store.put_feedback("chatcmpl-4", "api", correction="c4")  # updated after the cut: now a new row
    ds = load_rows(source(store, "chat").model_copy(update={"since": cut}))
    assert ds["id"] == ["feedback:chatcmpl-4"]
    assert ds["messages"][0][-1]["content"] == "c4"


def test_too_little_new_feedback_stops_naming_the_window(store):
    data = source(store, "pairs", min_rows=3).model_copy(update={"since": utcnow() - dt.timedelta(days=1)})
    data = data.model_copy(update={"since_version": 7})
    with pytest.raises(feedback.TooLittleFeedback, match=r"too little new feedback: 2 pairs rows since version 7 "):
        load_rows(data)
    with pytest.raises(feedback.TooLittleFeedback, match="needs min_rows=1"):
        load_rows(source(store, "pairs").model_copy(update={"since": utcnow()}))


def test_held_out_rows_come_from_eval_path_only(store, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "p?", "chosen": "yes", "rejected": "no"}) + "\n")
    ds = load_rows(source(store, "pairs", eval_path=str(held)))
    assert list(zip(ds["id"], ds["split"])) == [
        ("feedback:chatcmpl-1", "train"), ("feedback:chatcmpl-6", "train"), ("held.jsonl:1", "eval")
    ]  # fmt: skip


def test_the_fingerprint_changes_when_feedback_arrives(store):
    data = source(store, "chat")
    before = source_fingerprint(data)
    assert source_fingerprint(data) == before
    store.put_feedback("chatcmpl-4", "api", rating="up")
    assert source_fingerprint(data) != before


def test_the_ingest_record_names_completions_and_versions(store):
    data = source(store, "pairs")
    record = feedback.ingest_record(data, load_rows(data))
    assert record["completions"] == {"chatcmpl-1": "3", "chatcmpl-6": "4"}
    assert record["rows"] == 2 and record["rows_per_version"] == {"3": 1, "4": 1}
    assert feedback.completion_id("feedback::feedback:chatcmpl-6") == "chatcmpl-6"


def test_a_feedback_source_is_validated(zenml_home):
    # without a url: the default store of the run's model's deployment, where the serving side writes
    from core.feedback.requestlog import default_url

    resolved = feedback.resolve_since(DataSource(source="feedback", format="chat", since=None), "some-model")
    assert resolved.url == default_url("some-model") and resolved.url.endswith("/feedback/some-model.db")
    with pytest.raises(ValueError, match="the run has no model"):
        feedback.resolve_since(DataSource(source="feedback", format="chat"), None)
    with pytest.raises(ValidationError, match="path is required"):
        DataSource(source="local")
    with pytest.raises(ValidationError, match="no path, eval_split, columns"):
        DataSource(source="feedback", url="sqlite:///x.db", path="data.jsonl")
    with pytest.raises(ValidationError, match="format is instruction, chat"):
        DataSource(source="feedback", url="sqlite:///x.db", format="sharegpt")
    dated = DataSource(source="feedback", url="sqlite:///x.db", since=dt.date(2026, 12, 1))
    assert dated.since == dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    assert DataSource(source="feedback", url="postgresql+psycopg://u:secret@h/db").where.endswith("u:***@h/db")
    # a feedback mix source may take every row once (neither ratio nor rows); others still need a share
    assert MixSource(name="feedback", source="feedback", url="sqlite:///x.db").rows is None
    with pytest.raises(ValidationError, match="give exactly one of ratio"):
        MixSource(name="more", path="x.jsonl")


def test_resolve_since_without_a_staged_version_reads_everything(zenml_home):
    data = DataSource(source="feedback", url="sqlite:///x.db")
    assert data.since == "last_version"
    resolved = feedback.resolve_since(data, "no-such-model")
    assert resolved.since is None and resolved.since_version is None
    assert feedback.resolve_since(resolved, "no-such-model") is resolved


def test_a_config_mixes_feedback_into_the_task_data():
    config = validate_config(
        {
            "data": {
                "path": "data/acme_support/train.jsonl",
                "mix": [{"name": "feedback", "source": "feedback", "url": "sqlite:///f.db", "format": "chat"}],
            }
        }
    )
    assert config.data.mix[0].as_data_source().source == "feedback"


def test_last_version_is_the_newest_staged_version(zenml_home):
    import uuid

    from zenml.client import Client

    client = Client()
    model = f"since-{uuid.uuid4().hex[:8]}"
    client.create_model(name=model)
    staged, _unstaged = (client.create_model_version(model_name_or_id=model) for _ in range(2))
    client.update_model_version(model_name_or_id=model, version_name_or_id=staged.id, stage="production")
    resolved = feedback.resolve_since(DataSource(source="feedback", url="sqlite:///x.db"), model)
    assert resolved.since_version == staged.number
    assert resolved.since == staged.created.replace(tzinfo=dt.timezone.utc)


def test_an_unreachable_store_is_never_a_cache_hit(tmp_path):
    data = DataSource(source="feedback", url=f"sqlite:///{tmp_path}/no/such/dir/x.db", since=None)
    assert source_fingerprint(data) != source_fingerprint(data)  # ingest reads it (and names it) when it runs
    with pytest.raises(feedback.IngestError, match="cannot open the feedback store"):
        load_rows(data)
