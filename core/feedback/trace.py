"""Lineage of one served answer: the answer, the model version and adapter that gave it, the run that trained that
version, its feedback, and every later version that learned from it (python -m cli.trace <completion id>).

A version learned from a completion when a run of it ingested a feedback source holding the completion: the ingest
step records the completion ids on the version (core/data/feedback.py:ingest_record, under feedback_<format>).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.feedback.store import FeedbackStore


class TraceError(LookupError):
    """No such completion in the store; the message names the id and the store."""


@dataclass
class VersionLink:
    """A version of the ZenML model, with the runs that made it (name, dashboard URL or "")."""

    number: int | None
    stage: str = ""
    runs: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""  # why it is not found, when it is not


@dataclass
class Trace:
    completion: Any  # core.feedback.store.Completion
    feedback: list[Any]  # core.feedback.store.Feedback rows, oldest first
    answered_by: VersionLink
    learned_by: list[VersionLink]

    def lines(self) -> list[str]:
        c = self.completion
        out = [f"completion {c.id} ({c.endpoint}, {c.created_at:%Y-%m-%d %H:%M:%S} UTC)"]
        out += [f"  {m.get('role')}: {m.get('content')}" for m in c.messages]
        out += [f"  answer: {c.answer}", ""]
        out.append(f"answered by model {c.model} version {c.version} (adapter {c.adapter})")
        out += _version_lines(self.answered_by, "trained by")
        out.append("")
        out.append(f"feedback ({len(self.feedback)}):" if self.feedback else "feedback: none")
        for f in self.feedback:
            given = [f"rating {f.rating}" if f.rating else "", f"score {f.score}" if f.score is not None else ""]
            given += [
                f"correction: {f.correction}" if f.correction else "",
                f"comment: {f.comment}" if f.comment else "",
            ]
            out.append(f"  {f.source} at {f.updated_at:%Y-%m-%d %H:%M:%S}: " + "; ".join(g for g in given if g))
        out.append("")
        if not self.learned_by:
            out.append("learned by: no version yet (no run has ingested this feedback)")
        for link in self.learned_by:
            out.append(f"learned by version {link.number}" + (f" ({link.stage})" if link.stage else ""))
            out += _version_lines(link, "trained by")
        return out


def _version_lines(link: VersionLink, verb: str) -> list[str]:
    if link.note:
        return [f"  {link.note}"]
    return [f"  {verb} run {name}" + (f": {url}" if url else "") for name, url in link.runs] or ["  (no run linked)"]


def _runs(client, version) -> list[tuple[str, str]]:
    """(run name, dashboard URL) of every run linked to a model version, as core.runs.registry.model_history."""
    from zenml.utils import dashboard_utils
    from zenml.utils.pagination_utils import depaginate

    runs = []
    for link in depaginate(client.list_model_version_pipeline_run_links, model_version_id=version.id):
        try:
            url = dashboard_utils.get_run_url(link.pipeline_run) or ""
        except Exception:  # a store without a dashboard
            url = ""
        runs.append((link.pipeline_run.name, url))
    return runs


def trace(completion_id: str, store: FeedbackStore) -> Trace:
    """The chain behind `completion_id`; TraceError when the store has no such completion."""
    from zenml.client import Client
    from zenml.utils.pagination_utils import depaginate

    from core.runs.registry import feedback_completions

    completion = store.completion(completion_id)
    if completion is None:
        raise TraceError(f"{completion_id}: no such completion in the feedback store {store.url}")
    feedback = [f for f, _ in store.feedback() if f.completion_id == completion_id]
    client = Client()
    try:
        version = client.get_model_version(completion.model, completion.version)
        answered_by = VersionLink(version.number, version.stage or "", _runs(client, version))
    except KeyError:
        answered_by = VersionLink(None, note=f"model {completion.model} has no version {completion.version} here")
        return Trace(completion, feedback, answered_by, [])
    learned_by = [
        VersionLink(v.number, v.stage or "", _runs(client, v))
        for v in depaginate(client.list_model_versions, model=completion.model, sort_by="asc:number")
        if completion_id in feedback_completions(v.run_metadata)
    ]
    return Trace(completion, feedback, answered_by, learned_by)
