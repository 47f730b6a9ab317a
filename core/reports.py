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
    best_step: int | None = None  # train.keep_best: the step whose checkpoint was shipped (lowest eval loss)
    stopped_early: bool = False  # train.early_stopping_patience ended the run before max_steps
    # Preference stages (train.method dpo/kto/orpo; defaults: an SFT run, or a report written before they existed).
    # From trl's logs at the last logged step: rewards/accuracies (the share of pairs whose chosen answer's reward
    # beats the rejected one's; kto logs none) and rewards/margins (mean chosen minus rejected reward, nats x beta).
    method: str = "sft"
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    eval_reward_accuracy: float | None = None  # the same on the held-out pairs, trainer's final eval
    eval_reward_margin: float | None = None

    def summary(self) -> dict:
        """Every field but the curves, and none that is None: what goes into ZenML metadata (which holds no None)."""
        return {k: v for k, v in self.model_dump(exclude={"loss_curve", "eval_curve"}).items() if v is not None}

    def to_html(self) -> str:
        resumed = (
            f" (resumed at step {self.resumed_from_step}: tokens and time count this attempt)"
            if self.resumed_from_step
            else ""
        )
        shipped = ""
        if self.best_step is not None:
            shipped = f"; shipped: the checkpoint of step {self.best_step} (lowest eval loss)"
        stopped = " (stopped early: eval loss stopped improving)" if self.stopped_early else ""
        unit = " nats/token" if self.method == "sft" else f" ({self.method} loss)"
        rows = [
            ["optimizer steps", f"{self.steps:,}{resumed}{stopped}{shipped}"],
            ["train loss, last logged step", f"{self.final_train_loss:.4g}{unit}"],
            [
                "held-out loss, trainer's eval",
                "-" if self.final_eval_loss is None else f"{self.final_eval_loss:.4g}{unit}",
            ],
            *self._preference_rows(),
            ["tokens trained (real, non-padding)", f"{self.train_tokens:,}"],
            ["throughput", f"{self.tokens_per_s:.4g} tokens/s"],
            ["training time", f"{self.seconds:.4g} s"],
            [
                "peak memory",
                format_bytes(self.peak_mem_bytes) + (" (GPU allocated)" if self.device != "cpu" else " (RSS)"),
            ],
            [
                "trainable / total parameters",
                f"{self.trainable_params:,} / {self.total_params:,} ({self.trainable_params / max(self.total_params, 1):.2%})",
            ],
            ["device, compute dtype", f"{self.device}, {self.compute_dtype}"],
        ]
        note = (
            "<p><i>Held-out loss, trainer's eval</i> is measured during training on the 4-bit model with the adapter "
            "(the eval split, packed like training). The evaluate step's fine-tuned loss is the one the quality gate "
            "uses: the unquantized base with the adapter merged, what merge ships; the two differ by the 4-bit "
            "rounding of the base.</p>"
            if self.method == "sft"
            else f"<p>Losses are trl's {self.method} loss, on the 4-bit model with the adapter. "
            + (
                "A reward is beta x the answer's mean log p per token (orpo has no reference).</p>"
                if self.method == "orpo"
                else "A reward is beta x (log p of the answer with the adapter - with the reference), summed over "
                "its tokens.</p>"
            )
        )
        chart = loss_chart(self.loss_curve, self.eval_curve, unit="nats/token" if self.method == "sft" else "")
        title = "Training" if self.method == "sft" else f"Preference training ({self.method})"
        return f"<h3>{title}</h3>{html_table(['', 'value'], rows)}{note}{chart}"

    def _preference_rows(self) -> list[list[str]]:
        """The preference method and its reward accuracy and margin, train and held-out (none for SFT)."""
        if self.method == "sft":
            return []

        def pair(train: float | None, held_out: float | None, fmt: str) -> str:
            shown = [f"{v:{fmt}} {what}" for v, what in ((train, "train"), (held_out, "held-out")) if v is not None]
            return ", ".join(shown) or "- (not logged)"

        return [
            ["preference method", self.method],
            ["reward accuracy, last logged step", pair(self.reward_accuracy, self.eval_reward_accuracy, ".1%")],
            ["reward margin (chosen - rejected)", pair(self.reward_margin, self.eval_reward_margin, ".4g")],
        ]


def format_bytes(n: float) -> str:
    """1,536 -> '1.5 KiB'; binary units, 3-4 significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 1000 else f"{n / scale:,.0f} {unit}"
    return f"{int(n)} B"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) from at or below `lo` to at or above `hi`."""
    import math

    span = (hi - lo) or abs(hi) or 1.0
    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(ticks[-1] + step)
    if len(ticks) == 1:
        ticks.append(ticks[0] + step)
    return [round(t, 12) for t in ticks]


def loss_chart(
    train: list[tuple[int, float]], evals: list[tuple[int, float]], w: int = 680, h: int = 340, unit: str = "nats/token"
) -> str:
    """Train loss at every logged step and the held-out loss at every eval, as an inline SVG with axes, ticks and
    units (no plotting library: the dashboard renders it as is)."""
    points = list(train) + list(evals)
    if not points:
        return "<p>no loss logged</p>"
    left, right, top, bottom = 64, 20, 30, 46  # margins, px
    xs = _ticks(0, max(p[0] for p in points) or 1)
    low, high = min(p[1] for p in points), max(p[1] for p in points)
    ys = _ticks(0.0 if low < 0.3 * high else low, high)  # from zero unless that would flatten the curve
    x0, x1, y0, y1 = xs[0], xs[-1] or 1, ys[0], ys[-1] if ys[-1] != ys[0] else ys[0] + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' style='background:#fff;font:12px sans-serif'>"
    ]
    for x in xs:
        gx, _ = px(x, y0)
        parts.append(f"<line x1='{gx:.1f}' y1='{top}' x2='{gx:.1f}' y2='{h - bottom}' stroke='#eee'/>")
        parts.append(f"<text x='{gx:.1f}' y='{h - bottom + 16}' text-anchor='middle'>{x:g}</text>")
    for y in ys:
        _, gy = px(x0, y)
        parts.append(f"<line x1='{left}' y1='{gy:.1f}' x2='{w - right}' y2='{gy:.1f}' stroke='#eee'/>")
        parts.append(f"<text x='{left - 6}' y='{gy + 4:.1f}' text-anchor='end'>{y:g}</text>")
    parts.append(f"<line x1='{left}' y1='{h - bottom}' x2='{w - right}' y2='{h - bottom}' stroke='#444'/>")
    parts.append(f"<line x1='{left}' y1='{top}' x2='{left}' y2='{h - bottom}' stroke='#444'/>")
    parts.append(f"<text x='{(left + w - right) / 2}' y='{h - 8}' text-anchor='middle'>optimizer step</text>")
    parts.append(
        f"<text x='14' y='{(top + h - bottom) / 2}' text-anchor='middle' "
        f"transform='rotate(-90 14 {(top + h - bottom) / 2})'>loss{f' ({unit})' if unit else ''}</text>"
    )
    for curve, color, label, row in (
        (train, "#1f77b4", f"train loss ({len(train)} logged steps)", 0),
        (evals, "#ff7f0e", f"held-out loss, trainer's eval ({len(evals)} evals)", 1),
    ):
        pts = [px(x, y) for x, y in curve]
        if len(pts) > 1:
            line = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{line}'/>")
        parts += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='{color}'/>" for a, b in pts]
        lx = left + 10 + row * 260
        parts.append(f"<rect x='{lx}' y='8' width='12' height='12' fill='{color}'/>")
        parts.append(f"<text x='{lx + 16}' y='18'>{html.escape(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


class Sample(BaseModel):
    id: str
    prompt: str
    reference: str
    base_answer: str
    tuned_answer: str
    # each answer's own scores (None in reports written before they were recorded)
    base_rouge_l: float | None = None
    tuned_rouge_l: float | None = None
    base_exact: bool | None = None
    tuned_exact: bool | None = None


class ModelScores(BaseModel):
    loss: float  # mean cross-entropy per response token, nats
    perplexity: float
    rouge_l: float  # mean ROUGE-L F1 over generated samples, 0..1
    exact_match: float  # fraction of samples whose answer equals the reference (normalized)
    bleu: float | None = None  # corpus BLEU of the generated samples (sacrebleu), 0..100; None: scored before BLEU


class Difference(BaseModel):
    """Fine-tuned minus base for one metric, with a 95% paired-bootstrap interval."""

    delta: float
    low: float
    high: float
    rows: int  # rows resampled: every held-out row for loss, the generated ones for ROUGE-L / exact match
    resamples: int


class PreferenceScores(BaseModel):
    """One model on the held-out preference pairs (core/evaluation/preference.py)."""

    accuracy: float  # share of pairs whose chosen answer has the higher summed log-likelihood, 0..1
    logp_margin: float  # mean log p(chosen) - log p(rejected), nats
    reward_margin: float  # mean DPO reward margin vs the base: beta * (margin - base's margin); base: 0


class PreferenceEval(BaseModel):
    """Base, the adapter the preference stage started from, and the tuned adapter on held-out pairs."""

    rows: int
    beta: float
    start_name: str  # "SFT adapter", "base", "staging (version 3)", ...
    base: PreferenceScores
    start: PreferenceScores
    tuned: PreferenceScores
    accuracy_intervals: dict[str, Difference]  # base / start / tuned accuracy, each with its 95% interval
    tuned_minus_start: Difference  # accuracy, paired
    tuned_minus_base: Difference

    def to_html(self) -> str:
        def ci(d: Difference) -> str:
            return f"{d.delta:.3f} (95% CI {d.low:.3f} to {d.high:.3f})"

        rows = [
            [name, ci(self.accuracy_intervals[key]), f"{s.logp_margin:+.3f}", f"{s.reward_margin:+.4f}"]
            for name, key, s in (
                ("base", "base", self.base),
                (f"start: {self.start_name}", "start", self.start),
                ("tuned", "tuned", self.tuned),
            )
        ]
        d = self.tuned_minus_start
        return (
            f"<h3>Preferences on {self.rows} held-out pairs</h3>"
            + html_table(["model", "preference accuracy", "mean log-lik margin (nats)", "mean reward margin"], rows)
            + f"<p>tuned - start accuracy: {d.delta:+.3f} (95% CI {d.low:+.3f} to {d.high:+.3f}, {d.resamples} "
            f"paired resamples); reward margins use beta {self.beta} against the base.</p>"
        )


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
    # fine-tuned minus base per metric (loss, rouge_l, exact_match) with 95% paired-bootstrap intervals
    differences: dict[str, Difference] = Field(default_factory=dict)
    # the general-ability probe (evaluate.general; 0 rows / None: not probed): the forgetting check
    general_rows: int = 0
    general_base: ModelScores | None = None
    general_tuned: ModelScores | None = None
    general_differences: dict[str, Difference] = Field(default_factory=dict)
    general_samples: list[Sample] = Field(default_factory=list)
    # preference runs (train.method dpo/kto/orpo): held-out pairs for base, start and tuned; None otherwise
    preference: PreferenceEval | None = None

    def summary_lines(self, label: str) -> list[str]:
        """One log line each for the held-out scores, the probe and the held-out pairs, base -> fine-tuned."""
        b, t = self.base, self.tuned
        lines = [
            f"{label}: eval loss base {b.loss:.4f} -> fine-tuned {t.loss:.4f}; ROUGE-L {b.rouge_l:.3f} -> "
            f"{t.rouge_l:.3f}; exact match {b.exact_match:.2f} -> {t.exact_match:.2f}; gate "
            + ("passed" if self.gate_passed else "FAILED")
        ]
        if self.general_base is not None and self.general_tuned is not None:
            g0, g1 = self.general_base, self.general_tuned
            lines.append(
                f"{label}: general-ability probe ({self.general_rows} rows): loss {g0.loss:.4f} -> {g1.loss:.4f}; "
                f"exact match {g0.exact_match:.2f} -> {g1.exact_match:.2f}; ROUGE-L {g0.rouge_l:.3f} -> {g1.rouge_l:.3f}"
            )
        if (p := self.preference) is not None:
            d = p.tuned_minus_start
            lines.append(
                f"{label}: preference accuracy on {p.rows} held-out pairs: base {p.base.accuracy:.3f}, {p.start_name} "
                f"{p.start.accuracy:.3f} -> tuned {p.tuned.accuracy:.3f} (tuned - start {d.delta:+.3f}, 95% CI "
                f"{d.low:+.3f} to {d.high:+.3f}); mean reward margin {p.tuned.reward_margin:+.4f}"
            )
        return lines

    def to_html(self) -> str:
        generated = len(self.samples)
        gate = "PASSED" if self.gate_passed else "FAILED"
        msgs = "".join(f"<li>{html.escape(m)}</li>" for m in self.gate_messages)
        parts = [
            f"<h3>Evaluation on {self.eval_rows} held-out rows ({generated} of them answered by greedy generation)"
            f"</h3>{score_table(self.base, self.tuned, self.differences, self.eval_rows, generated)}"
            f"<p>Quality gate vs {html.escape(self.reference_name)}: <b>{gate}</b></p><ul>{msgs}</ul>"
        ]
        if self.general_base is not None and self.general_tuned is not None:
            g = self.general_samples
            forgotten = [x for x in g if x.base_exact and not x.tuned_exact]
            learned = [x for x in g if x.tuned_exact and not x.base_exact]
            parts.append(
                f"<h3>General ability (forgetting check) on {self.general_rows} probe rows, every one answered</h3>"
                + score_table(
                    self.general_base, self.general_tuned, self.general_differences, self.general_rows, len(g)
                )
                + f"<p>Exact before, not after: {len(forgotten)}; not before, exact after: {len(learned)}.</p>"
            )
            if forgotten or learned:
                parts.append("<h4>Probe answers that changed exactness</h4>" + sample_table(forgotten + learned))
        if self.preference is not None:
            parts.append(self.preference.to_html())
        parts.append(f"<h3>Side by side: the {generated} generated answers</h3>{sample_table(self.samples)}")
        return "".join(parts)


def score_table(
    base: ModelScores, tuned: ModelScores, differences: dict[str, Difference], rows: int, generated: int
) -> str:
    """base / fine-tuned / difference (with its interval) per metric, and which rows each metric covers."""
    covers = {
        "loss": f"all {rows} rows",
        "perplexity": f"all {rows} rows",
        "rouge_l": f"the first {generated} rows (greedy answers)",
        "exact_match": f"the first {generated} rows (greedy answers)",
        "bleu": f"the first {generated} rows (greedy answers; corpus BLEU, 0-100)",
    }

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    def interval(metric: str) -> str:
        d = differences.get(metric)
        if d is None:
            return ""
        return f"{d.delta:+.4g} (95% CI {d.low:+.4g} to {d.high:+.4g}; {d.resamples} paired resamples of {d.rows})"

    return html_table(
        ["metric", "base", "fine-tuned", "fine-tuned - base", "rows it covers"],
        [[m, fmt(getattr(base, m)), fmt(getattr(tuned, m)), interval(m), covers[m]] for m in ModelScores.model_fields],
    )


def sample_table(samples: list[Sample]) -> str:
    def mark(exact: bool | None, rouge: float | None) -> str:
        if exact is None:
            return ""
        return ("exact" if exact else "not exact") + ("" if rouge is None else f", ROUGE-L {rouge:.2f}")

    return html_table(
        ["id", "prompt", "reference", "base answer", "base", "fine-tuned answer", "fine-tuned"],
        [
            [s.id, s.prompt, s.reference, s.base_answer, mark(s.base_exact, s.base_rouge_l), s.tuned_answer,
             mark(s.tuned_exact, s.tuned_rouge_l)]
            for s in samples
        ],
    )  # fmt: skip


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


class VersionRow(BaseModel):
    number: int
    created: str  # UTC, minutes
    stage: str  # "" when none
    scores: dict  # core.runs.registry.headline: base/tuned loss, ROUGE-L, exact match, gate
    records: list[str] = Field(default_factory=list)  # which result records (core.runs.registry.RESULT_KEYS) it holds
    runs: list[tuple[str, str]] = Field(default_factory=list)  # (run name, dashboard URL or "")


class ModelHistory(HtmlReport):
    """Every version of a ZenML Model with its stage and headline scores: the open-source dashboard has no Models
    page, so the promote step writes this artifact each run."""

    model: str
    versions: list[VersionRow]

    def to_html(self) -> str:
        def num(x) -> str:
            return "-" if x is None else f"{x:.3f}"

        def scores(s: dict) -> str:
            learned = f"; learned from {s['feedback_rows']} feedback rows" if s.get("feedback_rows") else ""
            if "tuned_loss" in s:
                return (
                    f"loss {num(s.get('base_loss'))} &rarr; {num(s.get('tuned_loss'))}, "
                    f"ROUGE-L {num(s.get('base_rouge_l'))} &rarr; {num(s.get('tuned_rouge_l'))}, "
                    f"exact match {num(s.get('base_exact_match'))} &rarr; {num(s.get('tuned_exact_match'))}" + learned
                )
            tasks = [f"{k[:-5]}: loss {num(v[0])} &rarr; {num(v[1])}" for k, v in s.items() if k.endswith("_loss")]
            return ("; ".join(tasks) or "no scores recorded") + learned

        def runs(r: list[tuple[str, str]]) -> str:
            return "<br>".join(
                f"<a href='{html.escape(url)}'>{html.escape(name)}</a>" if url else html.escape(name) for name, url in r
            )

        gate = {True: "passed", False: "FAILED", None: "-"}
        body = "".join(
            f"<tr><td>#{v.number}</td><td>{html.escape(v.created)}</td><td><b>{html.escape(v.stage or '-')}</b></td>"
            f"<td>{scores(v.scores)}</td><td>{gate[v.scores.get('gate_passed')]}</td><td>{runs(v.runs)}</td></tr>"
            for v in reversed(self.versions)
        )
        head = "".join(
            f"<th>{h}</th>"
            for h in ("version", "created (UTC)", "stage", "held-out scores (base &rarr; fine-tuned)", "gate", "run")
        )
        return (
            f"<h3>Model {html.escape(self.model)}: {len(self.versions)} version(s), newest first</h3>"
            f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"
        )
