"""Trace a served answer: the answer, the version and adapter that gave it, the run that trained that version
(dashboard link), its feedback, and every version that learned from it (core/feedback/trace.py).

    python -m cli.trace chatcmpl-...                                  # the deployment's default store
    python -m cli.trace chatcmpl-... --model my-model                 # ... of another model's deployment
    python -m cli.trace chatcmpl-... --db postgresql+psycopg://user@host/feedback
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "smollm2-acme-support"  # ServeConfig.model_name's default: what `make serve` serves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("completion_id", help="the id the client received (chatcmpl-...)")
    parser.add_argument("--db", help="the feedback store's URL (default: the --model deployment's own SQLite store)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the served ZenML model (default {DEFAULT_MODEL})")
    args = parser.parse_args(argv)

    from core.feedback.requestlog import default_url
    from core.feedback.store import FeedbackStore
    from core.feedback.trace import TraceError, trace

    try:
        found = trace(args.completion_id, FeedbackStore.open(args.db or default_url(args.model)))
    except TraceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(found.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
