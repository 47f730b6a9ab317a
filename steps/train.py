"""Step 4, train: QLoRA with bitsandbytes 4-bit, peft LoRA and trl's SFTTrainer.

The base loads in 4-bit (nf4, double quant; compute dtype bf16 on a CUDA GPU
that supports it, else fp32), `prepare_model_for_kbit_training` readies it,
and a peft LoraConfig wraps it. SFTTrainer trains on the already tokenized
rows from format_prompts: a dataset with `input_ids` and `labels` is used as
is, so the response-only labels survive.

Checkpoints go to `train.checkpoint_dir/<key>`, where the key hashes the data,
base model and every training setting. Re-running the same step after a crash
resumes from the newest *complete* checkpoint (adapter, optimizer state and
trainer_state.json all present); an incomplete one is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
from datasets import Dataset
from transformers import TrainerCallback
from zenml import log_metadata, step
from zenml.config.cache_policy import CachePolicy
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifacts import ModelFolder, scratch_dir
from core.config import LoraSettings, ModelSource, QuantConfig, TrainConfig
from core.reports import TrainMetrics
from materializers.dataset_materializer import dataset_content_hash

logger = get_logger(__name__)

COMPLETE_MARKERS = ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")


def checkpoint_key(train_ds: Dataset, eval_ds: Dataset, base_id: str, *settings) -> str:
    """Same data + base + settings -> same folder, so a rerun finds its checkpoints."""
    h = hashlib.sha256()
    for part in (dataset_content_hash(train_ds), dataset_content_hash(eval_ds), base_id):
        h.update(part.encode())
    for s in settings:
        h.update(s.model_dump_json(exclude={"checkpoint_dir", "logging_steps"}).encode())
    return h.hexdigest()[:16]


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint-N with adapter, optimizer state and trainer state; incomplete ones are skipped."""
    found = []
    for ckpt in run_dir.glob("checkpoint-*"):
        try:
            step_no = int(ckpt.name.split("-")[-1])
        except ValueError:
            continue
        missing = [m for m in COMPLETE_MARKERS if not (ckpt / m).exists()]
        if missing:
            logger.warning("skipping incomplete checkpoint %s (missing %s)", ckpt, ", ".join(missing))
            continue
        found.append((step_no, ckpt))
    return max(found)[1] if found else None


def build_model(model: ModelSource, quant: QuantConfig, lora: LoraSettings, gradient_checkpointing: bool):
    """4-bit base + LoRA adapter (trainable) on top."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base = models.load_base(model, quant)
    if quant.load_in_4bit:
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    # Record the public name, not this machine's cache path, in adapter_config.json.
    peft_model.peft_config["default"].base_model_name_or_path = models.display_name(model)
    return peft_model


class ProgressLog(TrainerCallback):
    """Loss, learning rate and real tokens/s at every logging step; keeps the curves."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens_at_start: int | None = None
        self.loss_curve: list[tuple[int, float]] = []
        self.eval_curve: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            self.loss_curve.append((state.global_step, float(logs["loss"])))
            seen = state.num_input_tokens_seen - (self.tokens_at_start or 0)
            rate = seen / max(time.perf_counter() - self.start, 1e-9)
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f tokens/s",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", 0.0),
                rate,
            )
        if "eval_loss" in logs:
            self.eval_curve.append((state.global_step, float(logs["eval_loss"])))
            logger.info("step %d  eval loss %.4f", state.global_step, logs["eval_loss"])


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train_adapter(
    train_ds: Dataset,
    eval_ds: Dataset,
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    cfg: TrainConfig,
    out_dir: Path,
    base_id: str = "",
    callbacks: list | None = None,
) -> tuple[ModelFolder, TrainMetrics]:
    """Train (or resume) and save the adapter to `out_dir`."""
    from trl import SFTConfig, SFTTrainer

    run_dir = Path(cfg.checkpoint_dir) / checkpoint_key(train_ds, eval_ds, base_id or str(model), quant, lora, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = latest_complete_checkpoint(run_dir)

    cuda = torch.cuda.is_available()
    dtype = models.compute_dtype(quant.compute_dtype)
    tokenizer = models.load_tokenizer(model)
    peft_model = build_model(model, quant, lora, cfg.gradient_checkpointing)
    trainable, total = peft_model.get_nb_trainable_parameters()

    args = SFTConfig(
        output_dir=str(run_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of all steps
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim if cfg.optim != "auto" else ("paged_adamw_8bit" if cuda else "adamw_torch"),
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=None,  # format_prompts already applied prompt.max_seq_len and its overlong policy
        packing=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    progress = ProgressLog()
    trainer = SFTTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[progress] + list(callbacks or []),
    )
    if resume:
        logger.info("resuming from %s", resume)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    final_eval = trainer.evaluate()["eval_loss"] if len(eval_ds) else None
    if final_eval is not None and (not progress.eval_curve or progress.eval_curve[-1][0] != trainer.state.global_step):
        progress.eval_curve.append((trainer.state.global_step, float(final_eval)))

    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty card; push writes the real one
    tokens = trainer.state.num_input_tokens_seen - progress.tokens_at_start if progress.tokens_at_start else None
    tokens = tokens if tokens is not None else trainer.state.num_input_tokens_seen
    metrics = TrainMetrics(
        steps=trainer.state.global_step,
        resumed_from_step=int(resume.name.split("-")[-1]) if resume else 0,
        final_train_loss=float(progress.loss_curve[-1][1] if progress.loss_curve else result.training_loss),
        final_eval_loss=final_eval,
        train_tokens=int(tokens),
        tokens_per_s=round(tokens / max(seconds, 1e-9), 2),
        seconds=round(seconds, 2),
        peak_mem_bytes=peak_memory_bytes(),
        trainable_params=int(trainable),
        total_params=int(total),
        compute_dtype=str(dtype).replace("torch.", ""),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        loss_curve=progress.loss_curve,
        eval_curve=progress.eval_curve,
    )
    return ModelFolder(out_dir), metrics


def quiet_libraries() -> None:
    """transformers/peft/datasets warnings repeat on every run; keep the step log readable."""
    import datasets

    datasets.disable_progress_bars()
    for name in ("transformers", "peft", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ZenML hashes only the step function itself: add this whole file and core/models.py.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], models]))
def train(
    train_dataset: Dataset,
    eval_dataset: Dataset,
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    train: TrainConfig,
    base_id: str = "",
) -> tuple[Annotated[ModelFolder, "adapter"], Annotated[TrainMetrics, "train_metrics"]]:
    quiet_libraries()
    out = scratch_dir("adapter-")
    adapter, metrics = train_adapter(
        train_dataset, eval_dataset, model, quant, lora, train, out / "adapter", base_id=base_id
    )
    summary = metrics.model_dump(exclude={"loss_curve", "eval_curve"})
    logger.info("training done: %s", json.dumps(summary))
    log_metadata(metadata=summary, artifact_name="train_metrics", infer_artifact=True)
    try:  # also on the model version, when the run is linked to a ZenML Model
        log_metadata(metadata={"training": summary}, infer_model=True)
    except Exception as err:  # no model in this step's context
        logger.debug("no model version to log to: %s", err)
    return adapter, metrics
