"""The quality gate: every decision about whether a candidate may ship, in one place.

- apply_gate (run by evaluate): the candidate must beat the base, and the model version at
  `evaluate.gate.compare_with_stage` when it was scored on the same eval data, by the configured margins, on
  enough held-out rows, without forgetting too much on the general-ability probe; a preference run must also rank
  enough held-out pairs right and no fewer than the adapter it started from.
  The verdict and its reasons are stored in the EvalReport.
- enforce_gate (run by merge, before anything is merged, and by summarize_tasks): a failed gate stops the
  run with QualityGateError, or only warns under `gate.on_fail: warn`.
- may_promote (run by promote): a version is promoted only when every one of its candidates passed.
"""

from __future__ import annotations

import logging

from core.config import GateConfig
from core.reports import EvalReport, ModelScores, PreferenceEval

logger = logging.getLogger(__name__)


class QualityGateError(RuntimeError):
    """A candidate failed its quality gate under gate.on_fail: stop; the message lists what failed."""


def apply_gate(
    tuned: ModelScores,
    references: list[tuple[str, ModelScores]],
    gate: GateConfig,
    eval_rows: int | None = None,
    general: tuple[ModelScores, ModelScores] | None = None,
    preference: PreferenceEval | None = None,
) -> tuple[bool, list[str]]:
    """Candidate must beat every reference by the configured margins, on at least gate.min_eval_rows held-out rows,
    on the general-ability probe (`general`: base's and its scores) lose no more than the forgetting margins, and on
    held-out preference pairs (`preference`) meet the preference margins; returns (passed, reasons)."""
    passed, messages = True, []
    if eval_rows is not None:
        ok = eval_rows >= gate.min_eval_rows
        passed &= ok
        advice = (
            ""
            if ok
            else (
                ": too few to decide anything; hold out more (data.eval_path with your own held-out file, or a larger "
                "data.eval_fraction) or lower evaluate.gate.min_eval_rows knowingly"
            )
        )
        messages.append(
            f"held-out rows {eval_rows}: needs >= {gate.min_eval_rows} (min_eval_rows){advice} -> {'ok' if ok else 'FAIL'}"
        )
    for name, ref in references:
        max_loss = ref.loss * (1 - gate.min_loss_improvement)
        ok = tuned.loss <= max_loss
        passed &= ok
        messages.append(
            f"eval loss {tuned.loss:.4f} vs {name} {ref.loss:.4f}: needs <= {max_loss:.4f} "
            f"(min_loss_improvement={gate.min_loss_improvement}) -> {'ok' if ok else 'FAIL'}"
        )
        min_rouge = ref.rouge_l - gate.max_rouge_drop
        ok = tuned.rouge_l >= min_rouge
        passed &= ok
        messages.append(
            f"ROUGE-L {tuned.rouge_l:.4f} vs {name} {ref.rouge_l:.4f}: needs >= {min_rouge:.4f} "
            f"(max_rouge_drop={gate.max_rouge_drop}) -> {'ok' if ok else 'FAIL'}"
        )
    if general is not None:
        base, candidate = general
        if gate.max_general_loss_increase is not None:
            max_loss = base.loss * (1 + gate.max_general_loss_increase)
            ok = candidate.loss <= max_loss
            passed &= ok
            messages.append(
                f"general-ability loss {candidate.loss:.4f} vs base {base.loss:.4f} "
                f"({candidate.loss / max(base.loss, 1e-9) - 1:+.1%}): needs <= {max_loss:.4f} "
                f"(max_general_loss_increase={gate.max_general_loss_increase}) -> {'ok' if ok else 'FAIL'}"
            )
        if gate.max_general_em_drop is not None:
            min_em = base.exact_match - gate.max_general_em_drop
            ok = candidate.exact_match >= min_em - 1e-9
            passed &= ok
            messages.append(
                f"general-ability exact match {candidate.exact_match:.4f} vs base {base.exact_match:.4f}: needs >= "
                f"{min_em:.4f} (max_general_em_drop={gate.max_general_em_drop}) -> {'ok' if ok else 'FAIL'}"
            )
    if preference is not None:
        ok, lines = preference_checks(preference, gate)
        passed &= ok
        messages += lines
    return passed, messages


def preference_checks(preference: PreferenceEval, gate: GateConfig) -> tuple[bool, list[str]]:
    """min_preference_accuracy, and max_preference_accuracy_drop against the adapter the stage started from."""
    passed, messages, accuracy = True, [], preference.tuned.accuracy
    if gate.min_preference_accuracy is not None:
        ok = accuracy >= gate.min_preference_accuracy - 1e-9
        passed &= ok
        messages.append(
            f"preference accuracy {accuracy:.4f} on {preference.rows} held-out pairs: needs >= "
            f"{gate.min_preference_accuracy:.4f} (min_preference_accuracy) -> {'ok' if ok else 'FAIL'}"
        )
    if gate.max_preference_accuracy_drop is not None:
        floor = preference.start.accuracy - gate.max_preference_accuracy_drop
        ok = accuracy >= floor - 1e-9
        passed &= ok
        messages.append(
            f"preference accuracy {accuracy:.4f} vs {preference.start_name} {preference.start.accuracy:.4f}: needs >= "
            f"{floor:.4f} (max_preference_accuracy_drop={gate.max_preference_accuracy_drop}) -> "
            f"{'ok' if ok else 'FAIL'}"
        )
    return passed, messages


def failed_checks(report: EvalReport) -> list[str]:
    return [m for m in report.gate_messages if m.endswith("FAIL")]


def enforce_gate(
    reports: EvalReport | dict[str, EvalReport], what: str = "not merging or pushing this candidate"
) -> list[str]:
    """Raise QualityGateError when a report (one, or several by candidate name) failed its gate with on_fail: stop.

    Failures under on_fail: warn are logged and returned (their names), so the caller can still decline to promote.
    """
    if isinstance(reports, EvalReport):
        reports = {"candidate": reports}
    stop = {name: r for name, r in reports.items() if not r.gate_passed and r.on_fail == "stop"}
    warn = {name: r for name, r in reports.items() if not r.gate_passed and r.on_fail != "stop"}
    label = (lambda name: "") if len(reports) == 1 else (lambda name: f"{name}: ")
    if stop:
        references = sorted({r.reference_name for r in stop.values()})
        reasons = "\n  ".join(f"{label(n)}{m}" for n, r in stop.items() for m in failed_checks(r))
        who = f" for {', '.join(stop)}" if len(reports) > 1 else ""
        raise QualityGateError(f"quality gate failed{who} against {' / '.join(references)}; {what}:\n  {reasons}")
    if warn:
        reasons = "\n  ".join(f"{label(n)}{m}" for n, r in warn.items() for m in failed_checks(r))
        logger.warning("quality gate failed (evaluate.gate.on_fail=warn, continuing):\n  %s", reasons)
    return list(warn)


def may_promote(reports: list[EvalReport]) -> bool:
    """A model version is promoted only when every candidate it holds passed its gate."""
    return bool(reports) and all(r.gate_passed for r in reports)
