"""The model card (README.md of the Hub repo): Hub metadata and a human-readable body, from the run's reports."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from core.config import DataSource, LoraSettings, ModelSource, PushConfig, TrainConfig
from core.models import BaseModelRef, as_source, display_name
from core.reports import EvalReport, ModelScores, TrainMetrics

# metric field -> (model-index metric type, pretty name, digits shown in the card)
METRICS: dict[str, tuple[str, str, int]] = {
    "loss": ("loss", "Eval loss (nats/token)", 4),
    "perplexity": ("perplexity", "Perplexity", 3),
    "rouge_l": ("rouge", "ROUGE-L F1", 4),
    "exact_match": ("exact_match", "Exact match", 4),
}

# Rendered by ModelCard.from_template; `card_data` is the YAML header from ModelCardData.
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

`{{ base_name }}` fine-tuned with {{ method }} by a [ZenML](https://zenml.io) pipeline
(ingest, validate, format prompts, train, evaluate against the base model, merge, push).
This repo holds the merged model ({{ merged_dtype }}){% if push_adapter %} and, under `adapter/`, the LoRA adapter alone{% endif %}.

## Evaluation

Held-out rows: {{ eval_rows }} (dataset sha256 `{{ eval_hash }}`).

| metric | {{ score_columns | join(" | ") }} |
|---|{% for _ in score_columns %}---|{% endfor %}
{% for row in score_rows %}| {{ row | join(" | ") }} |
{% endfor %}
{% if preference %}Preference accuracy on {{ preference.rows }} held-out pairs (chosen answer ranked above the rejected one):
base {{ "%.3f" | format(preference.base.accuracy) }}, {{ preference.start_name }} {{ "%.3f" | format(preference.start.accuracy) }}, this model {{ "%.3f" | format(preference.tuned.accuracy) }}.

{% endif %}Quality gate against {{ reference_name }}: **{{ gate }}**
{% for message in gate_messages %}
- {{ message }}
{%- endfor %}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}")
```
{% if push_adapter %}
The adapter alone, on top of the base model:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{{ base_name }}")
model = PeftModel.from_pretrained(base, "{{ repo_id }}", subfolder="adapter")
```
{% endif %}
## LoRA settings

| setting | value |
|---|---|
{% for row in lora_rows %}| {{ row | join(" | ") }} |
{% endfor %}
## Training

| setting | value |
|---|---|
{% for row in train_rows %}| {{ row | join(" | ") }} |
{% endfor %}
## Provenance

- ZenML pipeline run: `{{ run_id }}`
- Base model: `{{ base_name }}`
"""


def cell(value: object) -> str:
    """A value as a Markdown table cell: a pipe or newline would break the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _score_table(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """The "Evaluation" table: each metric for base, fine-tuned, the change, and the stage compared with if any."""
    columns = ["base", "fine-tuned", "change vs base"]
    reference = report.reference if report.reference is not None and report.reference_name != "base" else None
    if reference is not None:
        columns.append(report.reference_name)
    rows = []
    for field, (_, pretty, digits) in METRICS.items():
        base, tuned = getattr(report.base, field), getattr(report.tuned, field)
        row = [pretty, f"{base:.{digits}f}", f"{tuned:.{digits}f}", f"{tuned - base:+.{digits}f}"]
        if reference is not None:
            row.append(f"{getattr(reference, field):.{digits}f}")
        rows.append([cell(c) for c in row])
    return columns, rows


def is_hub_id(model: ModelSource | BaseModelRef) -> bool:
    # A local folder's path is not a Hub model id: the Hub's metadata check would reject it as base_model.
    return as_source(model).source != "local"


def replay_line(train: TrainConfig) -> str:
    """How general rows were mixed into training, in one line for the card."""
    replay = train.replay
    if replay is None:
        return "none: the task data alone"
    source = replay.data.where
    how = (
        f"the base model's own greedy answers (self-synthesized rehearsal, up to {replay.max_new_tokens} tokens)"
        if replay.answers == "own"
        else "the source's own answers"
    )
    kl = f"; KL to the base on replay rows, weight {replay.kl:g}" if replay.kl else ""
    return f"{replay.ratio:g} rows per task row from {source}, {how}{kl}"


def mixture_line(data: DataSource, train: TrainConfig) -> str:
    """data.mix's sources with their shares and the seed they were drawn with, in one line for the card."""
    shares = [
        f"{m.name} ({m.where}): " + (f"{m.ratio:g} rows per task row" if m.ratio is not None else f"{m.rows} rows")
        for m in data.mix
    ]
    return f"task data + {'; '.join(shares)}; drawn with seed {train.seed}"


def method_line(lora: LoraSettings, train: TrainConfig) -> str:
    """How the adapter was trained, in the card's first sentence: QLoRA SFT, or SFT then DPO/KTO/ORPO."""
    qlora = "QLoRA with DoRA" if lora.use_dora else "QLoRA"
    if train.method == "sft":
        return qlora
    start = {"sft": "supervised fine-tuning, then ", "base": ""}.get(
        train.preference_start(), f"the {train.preference_start()} version's adapter, then "
    )
    return f"{qlora}: {start}{train.method.upper()} on preference data"


def preference_line(train: TrainConfig) -> str:
    """The preference stage's data and settings, for the card's Training table."""
    pref = train.preference
    source = pref.data.where
    weights = (
        f", desirable/undesirable weights {pref.desirable_weight:g}/{pref.undesirable_weight:g}"
        if train.method == "kto"
        else ""
    )
    loss = f", loss {pref.loss_type}" if pref.loss_type else ""
    return (
        f"{train.method.upper()} on {source} ({pref.data.format}), beta {pref.beta:g}{loss}{weights}, learning rate "
        f"{pref.learning_rate:g}, starting from {train.preference_start()}"
    )


def build_model_card(
    *,
    model: ModelSource | BaseModelRef,
    lora: LoraSettings,
    train: TrainConfig,
    push: PushConfig,
    eval_report: EvalReport,
    train_metrics: TrainMetrics,
    run_id: str | None,
    merged_dtype: str = "unknown dtype",
    data: DataSource | None = None,
) -> ModelCard:
    """The README.md: Hub metadata (base model, license, tags, eval results) and a human-readable body. `data`: the
    task's data source, for its mixture (data.mix) in the Training table."""
    base_name = display_name(model)
    repo_id = push.repo_id or "<your-org>/<repo>"
    model_name = repo_id.split("/")[-1]
    columns, score_rows = _score_table(eval_report)
    return ModelCard.from_template(
        _card_data(model, push, eval_report, model_name),
        template_str=CARD_TEMPLATE,
        title=model_name,
        base_name=base_name,
        method=method_line(lora, train),
        merged_dtype=merged_dtype,
        push_adapter=push.push_adapter,
        repo_id=repo_id,
        eval_rows=eval_report.eval_rows,
        eval_hash=eval_report.eval_dataset_hash,
        score_columns=columns,
        score_rows=score_rows,
        reference_name=eval_report.reference_name,
        gate="passed" if eval_report.gate_passed else "failed",
        preference=eval_report.preference,
        gate_messages=[cell(m) for m in eval_report.gate_messages],
        lora_rows=[[cell(c) for c in row] for row in _lora_rows(lora)],
        train_rows=[[cell(c) for c in row] for row in _train_rows(train, train_metrics, data)],
        run_id=run_id or "n/a (not run by ZenML)",
    )


def _card_data(
    model: ModelSource | BaseModelRef, push: PushConfig, eval_report: EvalReport, model_name: str
) -> ModelCardData:
    """The card's YAML header: what the Hub indexes (base model, license, tags, datasets, eval results)."""
    return ModelCardData(
        base_model=display_name(model) if is_hub_id(model) else None,
        library_name="transformers",
        license=push.license,
        tags=list(push.tags),
        datasets=[push.dataset_name] if push.dataset_name else None,
        pipeline_tag="text-generation",
        metrics=sorted({metric_type for metric_type, _, _ in METRICS.values()}),
        model_name=model_name,
        eval_results=_eval_results(push, eval_report),
    )


def _eval_results(push: PushConfig, eval_report: EvalReport) -> list[EvalResult]:
    """The fine-tuned model's scores as model-index entries: the Hub shows them on the model page."""
    scores: ModelScores = eval_report.tuned
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=push.dataset_name or "custom",
            dataset_name=push.dataset_name or f"held-out split ({eval_report.eval_rows} rows)",
            dataset_split="eval",
            metric_type=metric_type,
            metric_name=pretty,
            metric_value=round(getattr(scores, field), digits),
        )
        for field, (metric_type, pretty, digits) in METRICS.items()
    ]


def _lora_rows(lora: LoraSettings) -> list[list[object]]:
    """The "LoRA settings" section: rank, alpha and the scale they make, dropout, targets, variants."""
    scale = (
        f"alpha/sqrt(r) = {lora.alpha / lora.r**0.5:.3g}" if lora.use_rslora else f"alpha/r = {lora.alpha / lora.r:.3g}"
    )
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    return [
        ["rank r", lora.r],
        ["alpha", lora.alpha],
        ["scale", scale],
        ["dropout", lora.dropout],
        ["target modules", targets],
        ["DoRA", lora.use_dora],
        ["rsLoRA", lora.use_rslora],
    ]


def _train_rows(train: TrainConfig, tm: TrainMetrics, data: DataSource | None = None) -> list[list[object]]:
    """The "Training" section: the settings trained with, then what the run measured."""
    return [
        ["optimizer steps", tm.steps],
        ["max steps / epochs", f"{train.max_steps} / {train.num_epochs}"],
        ["learning rate", train.learning_rate],
        ["schedule", f"{train.lr_scheduler}, warmup ratio {train.warmup_ratio}"],
        ["batch (micro x grad accum)", f"{train.micro_batch_size} x {train.grad_accum}"],
        ["weight decay", train.weight_decay],
        ["optimizer", train.optim],
        ["gradient checkpointing", train.gradient_checkpointing],
        ["seed", train.seed],
        *([["data mixture", mixture_line(data, train)]] if data is not None and data.mix else []),
        ["replay (keeps general ability)", replay_line(train)],
        *([["preference stage", preference_line(train)]] if train.method != "sft" else []),
        ["final train loss", f"{tm.final_train_loss:.4f}"],
        ["final eval loss", "n/a" if tm.final_eval_loss is None else f"{tm.final_eval_loss:.4f}"],
        ["trainable / total params", f"{tm.trainable_params:,} / {tm.total_params:,}"],
        ["tokens trained (non-pad)", f"{tm.train_tokens:,}"],
        ["throughput (tokens/s)", f"{tm.tokens_per_s:.1f}"],
        ["wall time (s)", f"{tm.seconds:.1f}"],
        ["device / compute dtype", f"{tm.device} / {tm.compute_dtype}"],
    ]
