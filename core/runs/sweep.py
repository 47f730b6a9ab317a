"""Sweeps: the comparison of every grid point and the choice of the one that goes on to merge and push.

A sweep (`sweep:` in the config, core/config.py:SweepConfig) trains and evaluates one point per grid
combination with the ordinary train and evaluate steps; select_best then picks the point with the lowest
held-out eval loss (best_point) and records every point in the `sweep_table` report.
"""

from __future__ import annotations

import html
from typing import Any

from pydantic import BaseModel

from core.artifacts import HtmlReport, html_table
from core.reports import EvalReport, TrainMetrics

SELECT_BY = "eval_loss"  # held-out response-token loss of the merged fine-tuned model (EvalReport.tuned.loss)


class SweepRow(BaseModel):
    point: str
    values: dict[str, Any]  # grid key -> value
    eval_loss: float  # held-out response-token loss, nats (the selection metric)
    base_loss: float
    rouge_l: float
    exact_match: float
    bleu: float | None = None  # corpus BLEU of the generated answers, 0..100
    final_train_loss: float
    train_steps: int
    tokens_per_s: float
    peak_mem_bytes: int
    seconds: float
    gate_passed: bool


class SweepTable(HtmlReport):
    """Every point of one sweep; `best` is the one carried on to merge and push."""

    select_by: str = SELECT_BY
    best: str
    rows: list[SweepRow]

    def to_html(self) -> str:
        keys = list(self.rows[0].values) if self.rows else []
        body = [
            [("best: " if r.point == self.best else "") + r.point]
            + [r.values.get(k) for k in keys]
            + [
                f"{r.eval_loss:.4f}",
                f"{r.rouge_l:.3f}",
                f"{r.exact_match:.3f}",
                "n/a" if r.bleu is None else f"{r.bleu:.1f}",
                f"{r.final_train_loss:.4f}",
                r.train_steps,
                f"{r.tokens_per_s:.1f}",
                f"{r.peak_mem_bytes / 2**20:.0f}",
                f"{r.seconds:.0f}",
                "passed" if r.gate_passed else "FAILED",
            ]
            for r in sorted(self.rows, key=lambda r: r.eval_loss)
        ]
        table = html_table(
            ["point", *keys]
            + [
                "eval loss",
                "ROUGE-L",
                "exact match",
                "BLEU",
                "train loss",
                "steps",
                "tokens/s",
                "peak memory (MiB)",
                "train s",
                "gate",
            ],
            body,
        )
        base = f"{self.rows[0].base_loss:.4f}" if self.rows else "n/a"
        return (
            f"<h3>Sweep: {len(self.rows)} points, best {html.escape(self.best)} (lowest held-out eval loss; "
            f"the base model's: {base})</h3>{table}"
        )


def best_point(
    points: list[str], values: list[dict[str, Any]], reports: list[EvalReport], metrics: list[TrainMetrics]
) -> tuple[int, SweepTable]:
    """Index of the point with the lowest held-out eval loss (the first of equals), and the comparison table."""
    if not points or not len(points) == len(values) == len(reports) == len(metrics):
        raise ValueError(
            f"select_best: {len(points)} points, {len(values)} settings, {len(reports)} eval reports and "
            f"{len(metrics)} train metrics; expected one of each per point, at least one point"
        )
    rows = [
        SweepRow(
            point=p,
            values=v,
            eval_loss=r.tuned.loss,
            base_loss=r.base.loss,
            rouge_l=r.tuned.rouge_l,
            exact_match=r.tuned.exact_match,
            bleu=r.tuned.bleu,
            final_train_loss=m.final_train_loss,
            train_steps=m.steps,
            tokens_per_s=m.tokens_per_s,
            peak_mem_bytes=m.peak_mem_bytes,
            seconds=m.seconds,
            gate_passed=r.gate_passed,
        )
        for p, v, r, m in zip(points, values, reports, metrics)
    ]
    best = min(range(len(rows)), key=lambda i: rows[i].eval_loss)
    return best, SweepTable(best=points[best], rows=rows)
