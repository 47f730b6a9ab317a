"""Typed reports passed between steps (train -> evaluate -> merge -> push -> promote).

Each renders as HTML in the ZenML dashboard through ReportMaterializer.
"""

from __future__ import annotations

import html

from pydantic import BaseModel, Field

from core.artifacts import HtmlReport, html_table


class TrainMetrics(HtmlReport):
    steps: int  # optimizer steps completed
    resumed_from_step: int = 0  # checkpoint step this run resumed from (0: fresh start)
    final_train_loss: float
    final_eval_loss: float | None = None
    train_tokens: int  # real (non-pad) tokens seen by the optimizer
    tokens_per_s: float  # real tokens per wall-clock second of training
    seconds: float
    peak_mem_bytes: int  # CUDA max allocated, else peak RSS of the process
    trainable_params: int
    total_params: int
    compute_dtype: str
    device: str
    loss_curve: list[tuple[int, float]] = Field(default_factory=list)  # (step, train loss)
    eval_curve: list[tuple[int, float]] = Field(default_factory=list)  # (step, eval loss)

    def to_html(self) -> str:
        summary = html_table(
            ["metric", "value"],
            [[k, v] for k, v in self.model_dump(exclude={"loss_curve", "eval_curve"}).items()],
        )
        return f"<h3>Training</h3>{summary}{_loss_svg(self.loss_curve, self.eval_curve)}"


def _loss_svg(train: list[tuple[int, float]], evals: list[tuple[int, float]], w: int = 640, h: int = 320) -> str:
    """Loss curve as inline SVG: no plotting library, renders in the dashboard as is."""
    points = train + evals
    if not points:
        return "<p>no loss logged</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def poly(curve: list[tuple[int, float]], color: str) -> str:
        pts = " ".join(
            f"{40 + (x - x0) / (x1 - x0) * (w - 60):.1f},{h - 30 - (y - y0) / (y1 - y0) * (h - 50):.1f}"
            for x, y in curve
        )
        # a marker per point too: a one-point curve (eval loss measured once) has no visible line
        dots = "".join(
            f"<circle cx='{p.split(',')[0]}' cy='{p.split(',')[1]}' r='3' fill='{color}'/>" for p in pts.split()
        )
        return f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{pts}'/>{dots}"

    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' style='background:#fff'>"
        f"<text x='40' y='15' font-size='12'>loss (train: blue, eval: orange); "
        f"steps {x0}..{x1}, loss {y0:.3f}..{y1:.3f}</text>"
        f"<line x1='40' y1='{h - 30}' x2='{w - 20}' y2='{h - 30}' stroke='#888'/>"
        f"<line x1='40' y1='20' x2='40' y2='{h - 30}' stroke='#888'/>"
        f"{poly(train, '#1f77b4')}{poly(evals, '#ff7f0e')}</svg>"
    )


class Sample(BaseModel):
    id: str
    prompt: str
    reference: str
    base_answer: str
    tuned_answer: str


class ModelScores(BaseModel):
    loss: float  # mean cross-entropy per response token, nats
    perplexity: float
    rouge_l: float  # mean ROUGE-L F1 over generated samples, 0..1
    exact_match: float  # fraction of samples whose answer equals the reference (normalized)


class EvalReport(HtmlReport):
    eval_rows: int
    eval_dataset_hash: str  # scores are comparable only on the same held-out data
    base: ModelScores
    tuned: ModelScores
    # what the gate compared against: "base", or e.g. "production (version 3)"
    reference_name: str = "base"
    reference: ModelScores | None = None
    gate_passed: bool
    on_fail: str = "stop"  # what merge does with a failed gate: "stop" or "warn" (EvalConfig.gate.on_fail)
    gate_messages: list[str] = Field(default_factory=list)
    samples: list[Sample] = Field(default_factory=list)

    def to_html(self) -> str:
        scores = html_table(
            ["metric", "base", "fine-tuned"],
            [[m, f"{getattr(self.base, m):.4f}", f"{getattr(self.tuned, m):.4f}"] for m in ModelScores.model_fields],
        )
        gate = "PASSED" if self.gate_passed else "FAILED"
        msgs = "".join(f"<li>{html.escape(m)}</li>" for m in self.gate_messages)
        table = html_table(
            ["id", "prompt", "reference", "base answer", "fine-tuned answer"],
            [[s.id, s.prompt, s.reference, s.base_answer, s.tuned_answer] for s in self.samples],
        )
        return (
            f"<h3>Evaluation on {self.eval_rows} held-out rows</h3>{scores}"
            f"<p>Quality gate vs {html.escape(self.reference_name)}: <b>{gate}</b></p><ul>{msgs}</ul>"
            f"<h3>Side by side</h3>{table}"
        )


class PushResult(HtmlReport):
    mode: str  # dry_run or hub
    repo_id: str | None
    files: list[str]  # paths in the repo (or that would be), sorted
    total_bytes: int  # sum of the file sizes, bytes
    commit_url: str | None = None  # hub mode only
    commit_oid: str | None = None  # hub mode only
    revision: str | None = None  # hub mode: "main", or the pull request's "refs/pr/N" (push.publish: pr)
    pr_url: str | None = None  # push.publish: pr only

    def to_html(self) -> str:
        summary = html_table(
            ["field", "value"],
            [[k, v] for k, v in self.model_dump(exclude={"files"}).items()],
        )
        return f"<h3>Push ({self.mode})</h3>{summary}<h4>{len(self.files)} files</h4>" + html_table(
            ["file"], [[f] for f in self.files]
        )


class Promotion(HtmlReport):
    """What the promote step did with the run's model version."""

    requested: str | None  # the stage asked for (promote_to); None: promotion is off
    stage: str | None = None  # the stage set, None when not promoted
    reason: str  # why (or why not), one line

    def to_html(self) -> str:
        return f"<h3>Promotion</h3>{html_table(['requested', 'stage set', 'reason'], [[self.requested, self.stage, self.reason]])}"
