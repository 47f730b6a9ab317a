"""A preference run's DAG: preference data, the adapter the stage starts from, the preference stage, evaluate.

ingest_preference -> validate_preference -> format_preference --------------------------v
train_sft (start_from: sft, on the run's data; or the adapter of a version; or none) -> train_preference -> evaluate
                                                                  (held-out answers, probe, held-out pairs) --^

Its adapter and train_metrics carry the run's names (adapter, train_metrics), so merge, push, export, serving and
the model history take a preference-tuned version as they take an SFT one; the SFT stage's are sft_adapter and
sft_train_metrics.
"""

from __future__ import annotations

from core.config import Candidate, PipelineConfig
from core.models import BaseModelRef
from core.runs import registry, tracking
from pipelines.sources import fingerprint
from steps.evaluate import evaluate
from steps.format_preference import format_preference
from steps.ingest import ingest
from steps.train import train
from steps.train_preference import train_preference
from steps.validate import validate


def preference_data(config: PipelineConfig, base: BaseModelRef):
    """ingest_preference -> validate_preference -> format_preference: (training pairs or rows, held-out ones)."""
    data = config.train.preference.data
    raw = ingest(data=data, fingerprint=fingerprint(data), id="ingest_preference")
    clean, _report = validate(raw, validation=config.validation, id="validate_preference")
    return format_preference(
        clean,
        base=base,
        prompt=config.prompt,
        max_length=config.train.preference.max_length,
        method=config.train.method,
        id="format_preference",
    )


def start_adapter(config: PipelineConfig, base: BaseModelRef, train_ds, eval_ds):
    """The adapter the preference stage continues and its name in the report: this run's SFT stage's, a model
    version's, or none (the base)."""
    start = config.train.preference_start()
    if start == "base":
        return None, "base"
    if start == "sft":
        stage = Candidate(kind="sft_stage")
        sft_settings = config.train.model_copy(update={"method": "sft", "preference": None})
        adapter, _metrics = train.with_options(substitutions=stage.substitutions(), **tracking.step_options(stage))(
            train_ds,
            eval_ds,
            base=base,
            quant=config.quant,
            lora=config.lora,
            train_cfg=sft_settings,
            candidate=stage,
            id=stage.step_id("train"),
        )
        return adapter, "SFT adapter"
    # Resolved while the DAG compiles: the version's adapter artifact becomes the step's input (lineage included).
    from zenml import get_pipeline_context

    model = get_pipeline_context().model
    if model is None:
        raise ValueError(f"train.preference.start_from: {start!r} names a model version, but the run has no model")
    version = registry.version_adapter(model.name, start)
    return version, f"{start} adapter"


def preference_run(config: PipelineConfig, base: BaseModelRef, train_ds, eval_ds, general=None):
    """The preference stage after its start adapter, then evaluate with the held-out pairs; (adapter, metrics,
    report) like train_and_evaluate's."""
    pairs_train, pairs_eval = preference_data(config, base)
    start, start_name = start_adapter(config, base, train_ds, eval_ds)
    tracked = tracking.step_options(Candidate())
    adapter, metrics = train_preference.with_options(**tracked)(
        pairs_train,
        pairs_eval,
        base=base,
        quant=config.quant,
        lora=config.lora,
        train_cfg=config.train,
        start_adapter=start,
    )
    report = evaluate.with_options(**tracked)(
        adapter,
        eval_ds,
        base=base,
        eval_cfg=config.evaluate,
        general_dataset=general,
        preference_dataset=pairs_eval,
        start_adapter=start,
        start_name=start_name,
        beta=config.train.preference.beta,
    )
    return adapter, metrics, report
