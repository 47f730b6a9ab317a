"""Trace a served answer: the answer, the version and adapter that gave it, the run that trained that version
(dashboard link), its feedback, and every version that learned from it (core/feedback/trace.py).

    python -m cli.trace chatcmpl-...                                  # the default store, .cache/feedback.db
    python -m cli.trace chatcmpl-... --db postgresql+psycopg://user@host/feedback
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_DB = "sqlite:///.cache/feedback.db"  # configs/retrain_from_feedback.yaml's store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("completion_id", help="the id the client received (chatcmpl-...)")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"the feedback store's URL (default {DEFAULT_DB})")
    args = parser.parse_args(argv)

    from core.feedback.store import FeedbackStore
    from core.feedback.trace import TraceError, trace

    try:
        found = trace(args.completion_id, FeedbackStore.open(args.db))
    except TraceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(found.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
