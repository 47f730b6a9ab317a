"""cli.trace: a completion's chain from the store and the ZenML model registry (core/feedback/trace.py)."""

from __future__ import annotations

import uuid

from cli.trace import main
from core.feedback.store import FeedbackStore, sqlite_url, utcnow
from core.runs.registry import headline, model_history


def test_trace_names_the_answering_version_and_the_one_that_learned(zenml_home, tmp_path, capsys):
    from zenml import log_metadata
    from zenml.client import Client

    client = Client()
    model = f"trace-{uuid.uuid4().hex[:8]}"
    client.create_model(name=model)
    first, second = (client.create_model_version(model_name_or_id=model) for _ in range(2))
    url = sqlite_url(tmp_path / "feedback.db")
    store = FeedbackStore.open(url)
    store.add_completions(
        [
            dict(
                id="chatcmpl-7", created_at=utcnow(), endpoint="chat.completions", model=model,
                version=str(first.number), adapter="default", messages=[{"role": "user", "content": "Refund?"}],
                answer="No.", sampling={}, prompt_tokens=3, completion_tokens=2, latency_s=0.1, stream=False,
            )
        ]
    )  # fmt: skip
    store.put_feedback("chatcmpl-7", "reviewer", rating="down", correction="Within 30 days, yes.")
    record = {"rows": 1, "completions": {"chatcmpl-7": str(first.number)}}
    log_metadata(metadata={"feedback_chat": record}, model_name=model, model_version=str(second.number))

    assert main(["chatcmpl-7", "--db", url]) == 0
    out = capsys.readouterr().out
    assert f"answered by model {model} version {first.number} (adapter default)" in out
    assert "reviewer at" in out and "correction: Within 30 days, yes." in out
    assert f"learned by version {second.number}" in out and f"learned by version {first.number}" not in out
    meta = client.get_model_version(model, second.number).run_metadata
    assert headline(meta)["feedback_rows"] == 1
    assert "learned from 1 feedback rows" in model_history(model).to_html()  # the promote step's history artifact

    assert main(["chatcmpl-404", "--db", url]) == 2
    assert "chatcmpl-404: no such completion" in capsys.readouterr().err
