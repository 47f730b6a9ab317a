"""Data mixtures: the task's training rows plus other sources, each with its share, drawn with a seed.

Every mixed-in row keeps its source in its id (`<source>::<row id>`), so the trained dataset says where each row
came from and the trainer finds the replay rows (core/training/loss.py: the KL term). The held-out split and the
probe come from elsewhere and are protected: a mixed-in row whose prompt is one of theirs is refused, named,
because a score measured on rows the model trained on decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, concatenate_datasets

REPLAY = "replay"  # the source name of train.replay's rows
SEP = "::"  # between a mixed-in row's source and its own id (ingest's ids never contain it)


class MixtureError(ValueError):
    """A mixture that cannot be made as configured; the message names the source and rows."""


@dataclass(frozen=True)
class Share:
    """One mixed-in source: its rows (formatted like the task's) and how many of them to draw."""

    name: str
    rows: Dataset
    ratio: float | None = None  # rows per task training row
    count: int | None = None  # or exactly this many; neither: every row once (a feedback source)


def prompt_key(messages: list[dict]) -> str:
    """A row's prompt for overlap checks: its user turns, lowercased, spaces collapsed, end punctuation dropped
    (inner symbols stay: "9 / 3" and "9 - 3" are different questions)."""
    text = " ".join(m["content"] for m in messages if m["role"] == "user")
    return " ".join(text.lower().split()).strip(" .?!:;,")


def check_disjoint(name: str, rows: Dataset, protected: dict[str, Dataset], max_examples: int = 5) -> None:
    """Refuse a source that holds a prompt of a protected set (the held-out split, the probe), naming the rows."""
    problems = []
    for what, ds in protected.items():
        keys = {prompt_key(m): i for m, i in zip(ds["messages"], ds["id"])}
        hits = [
            f"{rid} (= {what} row {keys[k]})"
            for rid, m in zip(rows["id"], rows["messages"])
            if (k := prompt_key(m)) in keys
        ]
        if hits:
            problems.append(f"{len(hits)} row(s) whose prompt is in the {what}: {', '.join(hits[:max_examples])}")
    if problems:
        raise MixtureError(
            f"mix source {name!r}: " + "; ".join(problems) + ". Remove them from the source: a score measured on "
            "rows the model trained on decides nothing"
        )


def draw(available: int, wanted: int, seed: int) -> list[int]:
    """`wanted` row indices out of `available`, seeded: without repeats while they last, then a new seeded pass."""
    if available == 0:
        raise MixtureError("cannot draw rows from an empty source")
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    while len(picked) < wanted:
        picked += rng.permutation(available)[: wanted - len(picked)].tolist()
    return picked


def share_count(share: Share, task_rows: int) -> int:
    if share.count is None and share.ratio is None:
        return len(share.rows)
    return share.count if share.count is not None else max(1, round(share.ratio * task_rows))


def mix(task: Dataset, shares: list[Share], seed: int) -> tuple[Dataset, dict]:
    """The task rows (all, in order) followed by each source's drawn rows; returns (dataset, what was drawn)."""
    parts, record = [task], {"seed": seed, "task_rows": len(task), "sources": {}}
    names = [s.name for s in shares]
    if len(set(names)) != len(names) or "task" in names:
        raise MixtureError(f"mix sources need unique names other than 'task': {names}")
    for k, share in enumerate(shares):
        wanted = share_count(share, len(task))
        picked = draw(len(share.rows), wanted, seed + 1000 * (k + 1))  # each source its own stream
        rows = share.rows.select(picked)
        rows = rows.map(lambda row, prefix=f"{share.name}{SEP}": {"id": prefix + row["id"]})
        parts.append(rows.cast(task.features))
        record["sources"][share.name] = {
            "rows": wanted,
            "available": len(share.rows),
            "repeated": max(0, wanted - len(share.rows)),
            **({"ratio": share.ratio} if share.ratio is not None else {"count": share.count}),
        }
    mixed = concatenate_datasets(parts)
    total = len(mixed)
    for entry in record["sources"].values():
        entry["fraction"] = round(entry["rows"] / total, 4)
    record["rows"] = total
    return mixed, record


def source_of(row_id: str) -> str:
    """The source a mixed row came from ("task" for the task's own rows)."""
    head, sep, _ = row_id.partition(SEP)
    return head if sep else "task"
