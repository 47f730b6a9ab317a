"""Preference tuning (train.method dpo, kto or orpo): trl's DPOTrainer, KTOTrainer or ORPOTrainer on the QLoRA
model, as a stage after SFT or from a new adapter.

The model is SFT's (build_model): the 4-bit base, and on it the starting adapter (the SFT stage's, loaded trainable)
or a new LoRA adapter seeded like SFT's. The reference the policy is held to (dpo, kto; trl's use_adapter):
- from a new adapter: the base with the adapter disabled (no second model, no copy of any weights);
- from a starting adapter: a frozen copy of its LoRA weights, trl's "ref" adapter on the same base weights. trl makes
  it from the "default" adapter whenever a trainer is built; every build here pins it to the starting weights, so a
  retry after CUDA OOM never takes a trained adapter for its reference.
ORPO has no reference.

Rows are trl's standard non-conversational format (dpo, orpo: prompt, chosen, rejected; kto: prompt, completion,
label): the prompt is the rendered chat template up to the answer, each answer ends with the template's end of turn.
trl appends the tokenizer's eos to an answer that does not end with it, which would turn SmolLM2's "<|im_end|>\\n"
into "<|im_end|>\\n<|im_end|>" and train an end of turn the model never emits; answers_end_at_eos cuts the text after
the answer's last eos instead (generation stops at eos: nothing there is ever generated). An answer without eos gets
trl's, as SFT's labels do. No packing: trl 1.16's DPOTrainer turns padding_free off (it warns and pads), KTOTrainer
and ORPOTrainer have none.

Checkpoints, resume, a finished training taken as it is, the OOM retry and the disk check are SFT's
(core/training/trainer.py); the checkpoint key also covers the method, its settings and the starting adapter's
contents. Checkpoints hold the trained "default" adapter only, so a resume restores it from the checkpoint while the
reference is always the starting adapter, never read back from a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch
from datasets import Dataset

from core import models
from core.artifacts import ModelFolder
from core.config import LoraSettings, ModelSource, QuantConfig, TrainConfig
from core.data.preference import kto_rows
from core.models import BaseModelRef
from core.reports import TrainMetrics
from core.training.checkpoints import checkpoint_folder, checkpoint_lock, in_process_group, latest_complete_checkpoint
from core.training.disk import check_disk_space, count_parameters
from core.training.oom import trainable_weights
from core.training.trainer import (
    Device,
    ProgressLog,
    best_checkpoint_step,
    evaluate_shipped,
    run_args,
    save_adapter,
    settle_trainer,
    setup_device,
    setup_model,
    train_metrics,
    train_to_end,
    trainer_callbacks,
)

logger = logging.getLogger(__name__)

REFERENCE = "ref"  # the name trl gives the frozen copy of a starting adapter
COLUMNS = {"dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected")}
COLUMNS["kto"] = ("prompt", "completion", "label")
# trl 1.16's loss types (DPOConfig.loss_type's help, KTOConfig.loss_type's choices); orpo has one loss.
LOSS_TYPES = {
    "dpo": tuple(
        "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero apo_down discopop sft "
        "sigmoid_norm".split()
    ),
    "kto": ("kto", "apo_zero_unpaired"),
    "orpo": (),
}


def train_preference_adapter(
    train_ds: Dataset,
    eval_ds: Dataset,
    base: BaseModelRef | ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    cfg: TrainConfig,
    out_dir: Path,
    start_adapter: Path | None = None,
    callbacks: list | None = None,
) -> tuple[ModelFolder, TrainMetrics]:
    """Train (or resume) the preference stage cfg.method on the formatted preference rows; save its adapter to
    `out_dir` (SFT's layout: adapter_config.json naming the base publicly + adapter_model.safetensors).

    start_adapter: the adapter folder to continue (the SFT stage's), which is also the reference (dpo, kto); None: a
    new adapter from `lora`, held to the base. The schedule is cfg.preference's; the optimizer, scheduler, warmup,
    checkpoints, logging, seed, threads, gradient checkpointing and evals are train's.
    """
    if cfg.method == "kto":  # held-out pairs stay pairs for evaluation; KTO's eval loss reads them as rows
        eval_ds = kto_rows(eval_ds)
    check_preference_run(train_ds, eval_ds, cfg)
    base = models.resolve_base(base)
    start = Path(start_adapter) if start_adapter is not None else None
    run_dir = checkpoint_folder(train_ds, eval_ds, base, quant, lora, cfg, start_adapter=start)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One training per checkpoint folder at a time, as SFT (core/training/checkpoints.py).
    lock = contextlib.nullcontext() if in_process_group() else checkpoint_lock(run_dir)
    with lock:
        return _train_in(run_dir, train_ds, eval_ds, base, quant, lora, cfg, out_dir, start, callbacks)


def check_preference_run(train_ds: Dataset, eval_ds: Dataset, cfg: TrainConfig) -> None:
    """Errors in seconds, before anything loads: a preference method with its settings, its rows' columns, a loss
    type trl knows for it."""
    if cfg.method == "sft" or cfg.preference is None:
        raise ValueError("train_preference_adapter trains train.method dpo, kto or orpo; sft trains with train_adapter")
    for name, ds in (("training", train_ds), ("held-out", eval_ds)):
        missing = [c for c in COLUMNS[cfg.method] if c not in ds.column_names]
        if missing and (len(ds) or name == "training"):
            raise ValueError(
                f"{cfg.method} trains on rows with columns {', '.join(COLUMNS[cfg.method])}; the {name} rows lack "
                f"{', '.join(missing)} (they have {', '.join(ds.column_names)})"
            )
    loss_type, known = cfg.preference.loss_type, LOSS_TYPES[cfg.method]
    if loss_type is not None and not known:
        raise ValueError(f"{cfg.method} has one loss: leave train.preference.loss_type null (it is {loss_type!r})")
    if loss_type is not None and loss_type not in known:
        raise ValueError(
            f"train.preference.loss_type {loss_type!r} is not one of {cfg.method}'s losses: {', '.join(known)}"
        )


def _train_in(
    run_dir: Path,
    train_ds: Dataset,
    eval_ds: Dataset,
    base: BaseModelRef,
    quant: QuantConfig,
    lora: LoraSettings,
    cfg: TrainConfig,
    out_dir: Path,
    start_adapter: Path | None,
    callbacks: list | None,
) -> tuple[ModelFolder, TrainMetrics]:
    """train_preference_adapter's work, with the checkpoint folder held: check, set up, fit, evaluate what ships,
    save."""
    model = base.source
    # Before loading anything: fail in seconds, not after hours of training with nowhere to save.
    check_disk_space(run_dir, *count_parameters(model, lora), cfg.save_total_limit)
    resume = latest_complete_checkpoint(run_dir)
    if cfg.num_processes > 1:
        logger.warning("the preference stage trains in one process: train.num_processes %d is SFT's", cfg.num_processes)
    device = setup_device(quant, cfg)
    tokenizer = models.load_tokenizer(model)
    train_rows, eval_rows = (answers_end_at_eos(ds, tokenizer) for ds in (train_ds, eval_ds))
    peft_model = setup_model(model, quant, lora, cfg, start_adapter)
    trainable, total = peft_model.get_nb_trainable_parameters()  # before trl adds the reference copy
    args = preference_args(cfg, run_dir, device)
    progress = ProgressLog()
    make_trainer = _trainer_factory(
        peft_model, train_rows, eval_rows, tokenizer, device, cfg, progress, callbacks, start_adapter is not None
    )
    fit = train_to_end(make_trainer, args, peft_model, model, run_dir, resume, progress, device)
    best_step = best_checkpoint_step(fit.trainer, args)
    final_eval = evaluate_shipped(fit.trainer, eval_rows, progress, best_step)
    save_adapter(peft_model, out_dir)  # the "default" adapter only
    metrics = train_metrics(fit, progress, device, cfg, final_eval, best_step, (trainable, total))
    return ModelFolder(out_dir), metrics.model_copy(update=preference_metrics(fit.trainer, cfg.method))


def answers_end_at_eos(ds: Dataset, tokenizer) -> Dataset:
    """The rows with each answer (chosen, rejected, completion) cut after its last eos: trl appends an eos to every
    answer that does not end with one (see the module docstring)."""
    eos = tokenizer.eos_token
    columns = [c for c in ("chosen", "rejected", "completion") if c in ds.column_names]
    if not eos or not columns or not len(ds):
        return ds

    def cut(row: dict) -> dict:
        return {c: row[c][: row[c].rindex(eos) + len(eos)] if eos in row[c] else row[c] for c in columns}

    # in memory: no cache files written next to a dataset loaded from an artifact store
    return ds.map(cut, keep_in_memory=True, desc="Ending answers at eos")


def preference_args(cfg: TrainConfig, output_dir: Path, device: Device):
    """The trl config of the method: cfg.preference's schedule and settings, train's optimizer, scheduler, checkpoints,
    evals, seed and device (run_args, as sft_args)."""
    pref = cfg.preference
    common = dict(
        output_dir=str(output_dir),
        **run_args(cfg, cuda=device.cuda, dtype=device.dtype, pace=pref),
        include_num_input_tokens_seen="non_padding",  # chosen and rejected (or completion) tokens, not padding
        beta=pref.beta,
        max_length=pref.max_length,  # rows were checked against it: nothing is truncated
    )
    loss = {"loss_type": pref.loss_type} if pref.loss_type is not None else {}
    if cfg.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, **loss)
    if cfg.method == "kto":
        from trl import KTOConfig

        weights = {"desirable_weight": pref.desirable_weight, "undesirable_weight": pref.undesirable_weight}
        return KTOConfig(**common, **weights, **loss)
    from trl.import_utils import suppress_experimental_warning

    with suppress_experimental_warning():  # trl.experimental warns once on import; ORPO lives there in trl 1.16
        from trl.experimental.orpo import ORPOConfig

    # its collator needs the string columns too; ORPOTrainer would switch this off itself, with a warning
    return ORPOConfig(**common, remove_unused_columns=False)


@functools.cache
def trainer_class(method: str):
    """trl's trainer of the method, whose checkpoints hold the trained "default" adapter only.

    transformers saves every adapter of a PEFT model in a checkpoint and, on resume, loads each one back: the
    reference would come from the checkpoint. Saving without it keeps checkpoints as SFT's and leaves the reference
    to _pin_reference. Built on first use: importing trl takes seconds.
    """
    if method == "dpo":
        from trl import DPOTrainer as base_class
    elif method == "kto":
        from trl import KTOTrainer as base_class
    else:
        from trl.import_utils import suppress_experimental_warning

        with suppress_experimental_warning():
            from trl.experimental.orpo import ORPOTrainer as base_class

    class PreferenceTrainer(base_class):
        def _save(self, output_dir=None, state_dict=None):
            with _without_reference(self.accelerator.unwrap_model(self.model)):
                super()._save(output_dir, state_dict)

        def _track_num_input_tokens(self, inputs):
            # ORPO's batches hold chosen_* and rejected_* sequences and no input_ids, which transformers would count
            # as no tokens at all: count both sequences' real tokens, as dpo's batches are counted
            if "input_ids" in inputs or "chosen_attention_mask" not in inputs:
                return super()._track_num_input_tokens(inputs)
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    PreferenceTrainer.__name__ = PreferenceTrainer.__qualname__ = f"Preference{base_class.__name__}"
    return PreferenceTrainer


@contextlib.contextmanager
def _without_reference(peft_model):
    """Inside the block the model lists no reference adapter (peft saves every adapter it lists)."""
    configs = getattr(peft_model, "peft_config", {})
    reference = configs.pop(REFERENCE, None)
    try:
        yield
    finally:
        if reference is not None:
            configs[REFERENCE] = reference


def _trainer_factory(
    peft_model,
    train_rows: Dataset,
    eval_rows: Dataset,
    tokenizer,
    device: Device,
    cfg: TrainConfig,
    progress: ProgressLog,
    callbacks: list | None,
    from_adapter: bool,
):
    """make_trainer(args): a new trainer of cfg.method over the run's model and rows, its reference pinned to where
    the adapter started (the OOM retry makes one per attempt, each with new callbacks)."""
    # The reference of a starting adapter: its weights as loaded, before any step; a new adapter's is the base.
    start = trainable_weights(peft_model) if from_adapter else None
    cls = trainer_class(cfg.method)

    def make_trainer(train_args):
        before = trainable_weights(peft_model)
        _drop_reference(peft_model)  # trl adds it on every build, and refuses a name already taken
        trainer = cls(
            model=peft_model,
            args=train_args,
            train_dataset=train_rows,
            eval_dataset=eval_rows if len(eval_rows) else None,
            processing_class=tokenizer,
            callbacks=trainer_callbacks(progress, device, cfg, callbacks),
        )
        settle_trainer(trainer, device.dtype, before)
        _pin_reference(peft_model, start)  # after settle_trainer: in the dtype the policy trains in
        return trainer

    return make_trainer


def _drop_reference(peft_model) -> None:
    """Delete the reference adapter a previous build added, if any."""
    if REFERENCE in peft_model.peft_config:
        peft_model.delete_adapter(REFERENCE)


def _pin_reference(peft_model, start: dict[str, torch.Tensor] | None) -> None:
    """The reference trl just added (a copy of "default" as it is now): the starting adapter's weights, or, from a
    new adapter (start None), none at all, so that trl disables the adapter for the reference (the base itself)."""
    if REFERENCE not in peft_model.peft_config:  # orpo: no reference
        return
    if start is None:
        peft_model.delete_adapter(REFERENCE)
        return
    trained = dict(peft_model.named_parameters())
    for name, param in trained.items():
        if f".{REFERENCE}." in name:
            policy = name.replace(f".{REFERENCE}.", ".default.")
            # in the policy's dtype: trl rounds it to bf16 with bf16 compute, and the two start out the same weights
            param.data = start[policy].to(param.device, trained[policy].dtype, copy=True)


def preference_metrics(trainer, method: str) -> dict:
    """TrainMetrics' preference fields from trl's logs: the method and the last logged reward accuracy and margin,
    train and held-out (None where the method logs none: kto has no accuracy)."""
    history = trainer.state.log_history

    def last(key: str) -> float | None:
        return next((float(entry[key]) for entry in reversed(history) if key in entry), None)

    return {
        "method": method,
        "reward_accuracy": last("rewards/accuracies"),
        "reward_margin": last("rewards/margins"),
        "eval_reward_accuracy": last("eval_rewards/accuracies"),
        "eval_reward_margin": last("eval_rewards/margins"),
    }
