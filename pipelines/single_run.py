"""The single-run DAG: one adapter, merged, pushed and promoted.

ingest -> validate -> format_prompts -> [mix_data ->] train -> evaluate -> merge [-> export_gguf] -> push -> promote
                                        load_probe -----^---------^   (evaluate.general: the forgetting check)
ingest_replay -> validate_replay [-> synthesize_rehearsal] -> format_replay -^   (train.replay)
ingest_mix_<name> -> validate_mix_<name> -> format_mix_<name> ----------------^   (data.mix)
train.method dpo / kto / orpo: train is train_sft -> train_preference (pipelines/preference.py)
"""

from __future__ import annotations

import uuid

from core.config import Candidate, PipelineConfig
from core.data.ingest import source_fingerprint
from core.data.mixing import REPLAY
from core.models import BaseModelRef
from core.runs import tracking
from pipelines.preference import preference_run
from pipelines.sources import fingerprint
from steps.evaluate import evaluate
from steps.export_gguf import export_gguf
from steps.format_prompts import format_prompts
from steps.format_source import format_source
from steps.ingest import ingest
from steps.load_probe import load_probe
from steps.merge import merge
from steps.mix_data import mix_data
from steps.promote import promote
from steps.push import push
from steps.synthesize_rehearsal import synthesize_rehearsal
from steps.train import train
from steps.validate import validate


def prepare_data(config: PipelineConfig, base: BaseModelRef, data=None, suffix: str = ""):
    """ingest -> validate -> format_prompts on the task's own data; returns (train_dataset, eval_dataset). Shared by
    every shape, and compiled first so bad task data stops a run in seconds."""
    data = (data or config.data).without_mix()  # a changed share re-runs the mixing, not the task's own chain
    # The data's fingerprint becomes an ingest parameter, computed here at compile time: edited data misses the
    # cache and identical data hits it (ZenML hashes step code and parameters, not the files they point at).
    raw = ingest(data=data, fingerprint=fingerprint(data), id=f"ingest{suffix}")
    clean, _report = validate(raw, validation=config.validation, id=f"validate{suffix}")
    return format_prompts(clean, base=base, prompt=config.prompt, id=f"format_prompts{suffix}")


def mix_training_data(config: PipelineConfig, base: BaseModelRef, train_ds, eval_ds, data=None, suffix="", **shared):
    """[mix_data]: the task's training rows plus each data.mix source's and train.replay's seeded share; the
    held-out split stays the task's alone. `shared`: the run's `general` probe and `replay` rows (each made once).
    Without a mix or replay, the task's rows as they are."""
    data = data or config.data
    sources, shares = [], []
    for source in data.mix:
        sources.append(
            mixed_in_source(config, base, source.as_data_source(), f"mix_{source.name}{suffix}", source.name)
        )
        shares.append({"name": source.name, "ratio": source.ratio, "rows": source.rows})
    if shared.get("replay") is not None:
        sources.append(shared["replay"])
        shares.append({"name": REPLAY, "ratio": config.train.replay.ratio, "rows": None})
    if not sources:
        return train_ds
    return mix_data(
        train_ds,
        eval_ds,
        sources,
        shares=shares,
        seed=config.train.seed,
        general_dataset=shared.get("general"),
        id=f"mix_data{suffix}",
    )


def mixed_in_source(
    config: PipelineConfig, base: BaseModelRef, source, suffix: str, name: str, rehearse=None, after=None
):
    """ingest_<suffix> -> validate_<suffix> [-> synthesize_rehearsal] -> format_<suffix>: one mixed-in source's rows,
    validated on their own and formatted for training. `rehearse`: the replay settings when the base writes the
    answers itself."""
    raw = ingest(data=source, fingerprint=fingerprint(source), id=f"ingest_{suffix}", after=after)
    clean, _report = validate(raw, validation=config.validation, id=f"validate_{suffix}")
    if rehearse is not None:
        clean = synthesize_rehearsal(
            clean,
            base=base,
            prompt=config.prompt,
            max_new_tokens=rehearse.max_new_tokens,
            batch_size=rehearse.generate_batch_size,
        )
    return format_source(clean, base=base, prompt=config.prompt, name=name, id=f"format_{suffix}")


def replay_source(config: PipelineConfig, base: BaseModelRef, after: list[str]):
    """train.replay's rows, formatted for training (the base's own answers with answers: own); None without.

    It starts `after` the task data is formatted (those step ids): bad task data stops the run before the base
    spends minutes writing rehearsal answers (ZenML's default execution mode goes on with independent steps after
    one fails)."""
    replay = config.train.replay
    if replay is None:
        return None
    rehearse = replay if replay.answers == "own" else None
    return mixed_in_source(config, base, replay.data, REPLAY, REPLAY, rehearse=rehearse, after=after)


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
        train_cfg=train_settings,
        candidate=candidate,
        id=ids["train"],
    )
    report = evaluate.with_options(substitutions=names, **tracked)(
        adapter,
        eval_ds,
        base=base,
        eval_cfg=config.evaluate,
        candidate=candidate,
        general_dataset=general,
        id=ids["evaluate"],
    )
    return adapter, metrics, report


def ship(config: PipelineConfig, base: BaseModelRef, adapter, report, metrics, eval_ds, lora, train_settings) -> None:
    """merge -> (export_gguf) -> push -> promote, for the adapter a single run or a sweep chose."""
    merged = merge(adapter, report, eval_ds, base=base, merge_cfg=config.merge)
    if config.export.enabled:  # the merged model as one GGUF file for llama.cpp / Ollama
        export_gguf(merged, eval_ds, base=base, export=config.export, system_prompt=config.prompt.system_prompt)
    push(
        merged,
        adapter,
        report,
        metrics,
        base=base,
        lora=lora,
        train_cfg=train_settings,
        push_cfg=config.push,
        data=config.data,
    )
    promote_run(config, [report], after="push")  # only after a successful push


def promote_run(config: PipelineConfig, reports: list, after: str) -> None:
    """promote, never from the cache (a token new at every compile: a run config's enable_cache overrides the
    step's own), with the stack's tracker, so a tracked run whose training was cached still reaches MLflow."""
    tracked = tracking.step_options(Candidate())
    promote.with_options(**tracked)(reports, promote_to=config.promote_to, run_token=uuid.uuid4().hex, after=after)


def single_run(config: PipelineConfig, base: BaseModelRef) -> None:
    train_ds, eval_ds = prepare_data(config, base)
    general = general_probe(config, base)
    replay = replay_source(config, base, after=["format_prompts"])
    train_ds = mix_training_data(config, base, train_ds, eval_ds, general=general, replay=replay)
    if config.train.method != "sft":  # dpo / kto / orpo: SFT (or another start) then the preference stage
        adapter, metrics, report = preference_run(config, base, train_ds, eval_ds, general=general)
    else:
        # train.num_processes > 1 trains across N GPUs inside the same step (core/training/distributed.py)
        adapter, metrics, report = train_and_evaluate(
            config, base, train_ds, eval_ds, config.lora, config.train, general=general
        )
    ship(config, base, adapter, report, metrics, eval_ds, config.lora, config.train)
