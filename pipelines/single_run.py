"""The single-run DAG: one adapter, merged, pushed and promoted.

ingest -> validate -> format_prompts -> train -> evaluate -> merge [-> export_gguf] -> push -> promote
                                        load_probe ----^   (evaluate.general: the forgetting check)
"""

from __future__ import annotations

from core import tracking
from core.config import Candidate, PipelineConfig
from core.data.ingest import source_fingerprint
from core.models import BaseModelRef
from steps.evaluate import evaluate
from steps.export_gguf import export_gguf
from steps.format_prompts import format_prompts
from steps.ingest import ingest
from steps.load_probe import load_probe
from steps.merge import merge
from steps.promote import promote
from steps.push import push
from steps.train import train
from steps.validate import validate


def prepare_data(config: PipelineConfig, base: BaseModelRef, data=None, suffix: str = ""):
    """ingest -> validate -> format_prompts; returns (train_dataset, eval_dataset). Shared by every shape."""
    data = data or config.data
    # The data's fingerprint becomes an ingest parameter, computed here at compile time: edited data misses the
    # cache and identical data hits it (ZenML hashes step code and parameters, not the files they point at).
    raw = ingest(data=data, fingerprint=source_fingerprint(data), id=f"ingest{suffix}")
    clean, _report = validate(raw, validation=config.validation, id=f"validate{suffix}")
    return format_prompts(clean, base=base, prompt=config.prompt, id=f"format_prompts{suffix}")


def general_probe(config: PipelineConfig, base: BaseModelRef):
    """The general-ability probe set as a dataset artifact (None when evaluate.general is null); one per run,
    shared by every candidate's evaluate."""
    general = config.evaluate.general
    if general is None:
        return None
    return load_probe(general=general, fingerprint=source_fingerprint(general), base=base, prompt=config.prompt)


def train_and_evaluate(
    config: PipelineConfig, base: BaseModelRef, train_ds, eval_ds, lora, train_settings, candidate=None, general=None
):
    """train -> evaluate for one candidate (the run's adapter, a task's or a sweep point's); (adapter, metrics, report).

    A task or sweep point gets its own step ids (train_<name>) and output names (adapter_<task>,
    sweep_adapter_<point>, ...) through the steps' `substitutions`.
    """
    candidate = candidate or Candidate()
    names, ids = (
        candidate.substitutions(),
        {"train": candidate.step_id("train"), "evaluate": candidate.step_id("evaluate")},
    )
    tracked = tracking.step_options(candidate)  # the stack's experiment tracker, if it has one
    adapter, metrics = train.with_options(substitutions=names, **tracked)(
        train_ds,
        eval_ds,
        base=base,
        quant=config.quant,
        lora=lora,
        train=train_settings,
        candidate=candidate,
        id=ids["train"],
    )
    report = evaluate.with_options(substitutions=names, **tracked)(
        adapter,
        eval_ds,
        base=base,
        evaluate=config.evaluate,
        candidate=candidate,
        general_dataset=general,
        id=ids["evaluate"],
    )
    return adapter, metrics, report


def ship(config: PipelineConfig, base: BaseModelRef, adapter, report, metrics, eval_ds, lora, train_settings) -> None:
    """merge -> (export_gguf) -> push -> promote, for the adapter a single run or a sweep chose."""
    merged = merge(adapter, report, eval_ds, base=base, merge=config.merge)
    if config.export.enabled:  # the merged model as one GGUF file for llama.cpp / Ollama
        export_gguf(merged, eval_ds, base=base, export=config.export, system_prompt=config.prompt.system_prompt)
    push(merged, adapter, report, metrics, base=base, lora=lora, train=train_settings, push=config.push)
    promote([report], promote_to=config.promote_to, after="push")  # only after a successful push


def single_run(config: PipelineConfig, base: BaseModelRef) -> None:
    train_ds, eval_ds = prepare_data(config, base)
    general = general_probe(config, base)
    # train.num_processes > 1 trains across N GPUs inside the same step (core/training/distributed.py)
    adapter, metrics, report = train_and_evaluate(
        config, base, train_ds, eval_ds, config.lora, config.train, general=general
    )
    ship(config, base, adapter, report, metrics, eval_ds, config.lora, config.train)
