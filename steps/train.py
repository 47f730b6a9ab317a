"""Step 4, train: QLoRA with bitsandbytes 4-bit, peft LoRA and trl's SFTTrainer.

The base loads in 4-bit (nf4, double quant; compute dtype bf16 on a CUDA GPU
that supports it, else fp32), `prepare_model_for_kbit_training` readies it,
and a peft LoraConfig wraps it. SFTTrainer trains on the already tokenized
rows from format_prompts: a dataset with `input_ids` and `labels` is used as
is, so the response-only labels survive.

The fast path (each part a TrainConfig knob; benchmarks/train_throughput.py
measures them against the tutorial recipe):
- packing: trl's padding-free best-fit-decreasing packing of whole rows into
  micro-batches with a token budget (packed_sequence_length). Each micro-batch
  is one unpadded sequence whose position_ids restart at every row;
  transformers turns that into a block-diagonal causal mask (sdpa/eager) or
  varlen boundaries (flash attention), so no token attends across rows.
- labels_only_logits: the LM head and cross-entropy run only where the shifted
  label is not -100 (labels_only_loss, via transformers' `logits_to_keep`).
- LoRA dropout 0 (the default config) is peft's Identity; nothing re-adds it.
- CUDA only: liger-kernel (use_liger_kernel) and activation offloading.

Checkpoints go to `train.checkpoint_dir/<key>`, where the key hashes the data,
base model and every training setting. Re-running the same step after a crash
resumes from the newest *complete* checkpoint (adapter, optimizer state and
trainer_state.json all present); an incomplete one is skipped.

Before loading anything, train_adapter checks that the checkpoint disk has room
for the checkpoints and the merged model (check_disk_space). A CUDA out-of-memory
error retries at half the micro-batch and twice the accumulation, the same
effective batch (train_with_oom_retry).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainerCallback, set_seed
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
IGNORE_INDEX = -100  # label of a position that has no loss (prompt tokens, padding)


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


class InsufficientDiskError(OSError):
    """Less free disk than the run's checkpoints and merged model need; raised before any training."""


class TrainOutOfMemoryError(RuntimeError):
    """CUDA ran out of memory even at micro-batch 1."""


def count_parameters(model: ModelSource, lora: LoraSettings) -> tuple[int, int]:
    """(base model parameters, LoRA parameters), from the model's config alone: built on the meta device, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.resolve_model(model), revision=model.revision)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in base.parameters())  # tied embeddings count once
    output = base.get_output_embeddings()  # "all-linear" leaves the LM head out, as peft does
    adapter = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if lora.target_modules != "all-linear" and name.split(".")[-1] not in lora.target_modules:
            continue
        # A (r x in) + B (out x r); DoRA adds one magnitude per output feature
        adapter += lora.r * (module.in_features + module.out_features) + (module.out_features if lora.use_dora else 0)
    return total, adapter


def disk_needed(base_params: int, lora_params: int, save_total_limit: int) -> dict[str, int]:
    """Bytes of disk this run writes, by part; "total" is their sum.

    Per checkpoint: the adapter in fp32 (4 bytes/param) and AdamW's two fp32 moments (8 bytes/param; 8-bit paged
    AdamW needs about a quarter of that, so this errs high). The trainer writes a new checkpoint before deleting the
    oldest, so save_total_limit + 1 exist at the peak. The merge step then writes the base in fp16/bf16 (2 bytes/param).
    """
    per_checkpoint = lora_params * (4 + 8)
    parts = {
        "checkpoints": per_checkpoint * (save_total_limit + 1),
        "per_checkpoint": per_checkpoint,
        "merged_model": base_params * 2,
    }
    parts["total"] = parts["checkpoints"] + parts["merged_model"]
    return parts


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_disk_space(path: Path, base_params: int, lora_params: int, save_total_limit: int) -> dict[str, int]:
    """Raise InsufficientDiskError when the disk holding `path` has less free space than disk_needed(...)."""
    need = disk_needed(base_params, lora_params, save_total_limit)
    free = shutil.disk_usage(path).free
    if free < need["total"]:
        raise InsufficientDiskError(
            f"not enough free disk for training: {path} has {_size(free)} free, this run needs about "
            f"{_size(need['total'])} ({save_total_limit + 1} checkpoints x {_size(need['per_checkpoint'])} adapter + "
            f"optimizer state, and {_size(need['merged_model'])} for the merged 16-bit model of "
            f"{base_params / 1e9:.2f}B parameters). Free some space, point train.checkpoint_dir at a larger disk, "
            "or lower train.save_total_limit."
        )
    return need


def smaller_micro_batch(micro: int, accum: int) -> tuple[int, int] | None:
    """The (micro-batch, grad accum) to retry with after a CUDA OOM: the same effective batch, about half the memory.

    Halves the micro-batch when it is even (4 x 1 -> 2 x 2); otherwise takes its largest divisor below the half
    (3 x 1 -> 1 x 3), so micro x accum never changes. None at micro-batch 1: nothing left to shrink.
    """
    for m in range(micro // 2, 0, -1):
        if micro % m == 0:
            return m, accum * (micro // m)
    return None


def train_with_oom_retry(make_trainer, args, peft_model, run_dir: Path, resume: Path | None, progress):
    """trainer.train(), retried at a smaller micro-batch (same effective batch) after CUDA out-of-memory.

    A retry resumes from the newest complete checkpoint, or else restarts from the initial adapter weights (steps
    run before the OOM may have changed them). Returns (trainer, train result, checkpoint resumed from).
    """
    initial = {n: p.detach().to("cpu", copy=True) for n, p in peft_model.named_parameters() if p.requires_grad}
    while True:
        trainer = make_trainer(args)
        try:
            return trainer, trainer.train(resume_from_checkpoint=str(resume) if resume else None), resume
        except torch.cuda.OutOfMemoryError as err:
            micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
            smaller = smaller_micro_batch(micro, accum)
            if smaller is None:
                packed = f", one packed sequence of up to {args.max_length} tokens" if args.packing else ""
                raise TrainOutOfMemoryError(
                    f"CUDA out of memory even at micro-batch 1 (grad accum {accum}){packed}: lower "
                    f"{'train.tokens_per_micro_batch or ' if args.packing else ''}prompt.max_seq_len, keep "
                    "train.gradient_checkpointing on, or use a smaller base model"
                ) from err
        # Outside the except block, so the traceback (whose frames hold the activations) is gone before freeing.
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        args = copy.copy(args)
        args.per_device_train_batch_size, args.gradient_accumulation_steps = smaller
        args.per_device_eval_batch_size = smaller[0]
        resume = latest_complete_checkpoint(run_dir)
        if resume is None:
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if n in initial:
                        p.copy_(initial[n].to(p.device))
        done = int(resume.name.split("-")[-1]) if resume else 0
        progress.loss_curve = [(s, v) for s, v in progress.loss_curve if s <= done]  # steps that run again
        progress.eval_curve = [(s, v) for s, v in progress.eval_curve if s <= done]
        # With packing the micro-batch counts packed sequences of args.max_length tokens: its token budget halves too.
        budget = f", {micro * args.max_length} -> {smaller[0] * args.max_length} tokens" if args.packing else ""
        logger.warning(
            "CUDA out of memory at micro-batch %d x grad accum %d; retrying at %d x %d (same effective batch %d)%s, "
            "from %s",
            micro,
            accum,
            *smaller,
            micro * accum,
            budget,
            resume or "the start",
        )


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


def longest_row(*datasets: Dataset) -> int:
    """Tokens in the longest row of the given tokenized datasets."""
    return max((len(ids) for ds in datasets for ids in ds["input_ids"]), default=0)


def packed_sequence_length(cfg: TrainConfig, longest: int) -> int | None:
    """Tokens per packed sequence with packing (None without): micro_batch_size of them form one micro-batch.

    tokens_per_micro_batch // micro_batch_size, or the longest row when no budget is set. Packing keeps rows whole
    (trl's "bfd" would cut a longer row and lose its labels), so a budget that leaves less than the longest row is
    an error, raised before the model loads.
    """
    if not cfg.packing:
        return None
    if cfg.tokens_per_micro_batch is None:
        return max(longest, 1)
    length = cfg.tokens_per_micro_batch // cfg.micro_batch_size
    if length < longest:
        raise ValueError(
            f"train.tokens_per_micro_batch={cfg.tokens_per_micro_batch} split into train.micro_batch_size="
            f"{cfg.micro_batch_size} packed sequences gives {length} tokens each, but the longest row has {longest} "
            f"tokens: raise tokens_per_micro_batch to at least {longest * cfg.micro_batch_size}, lower "
            "micro_batch_size, or leave tokens_per_micro_batch unset (null)"
        )
    return length


def resolve_liger(setting, cuda: bool) -> bool:
    """use_liger_kernel: "auto" is on with CUDA and liger-kernel installed; the package is never imported here."""
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting == "auto":
        return cuda and installed
    if setting and not (cuda and installed):
        raise ValueError(
            "train.use_liger_kernel is true, but liger-kernel's Triton kernels need a CUDA GPU "
            f"({'found' if cuda else 'none found'}) and the liger-kernel package "
            f"({'installed' if installed else 'not installed'}); use auto to apply them only where they can run"
        )
    return bool(setting)


def labels_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Mean next-token cross-entropy over the labelled positions, with logits computed at those positions only.

    transformers' `logits_to_keep` takes a boolean (batch, seq) mask: the model runs its LM head on the kept hidden
    states alone and returns (kept positions, vocab) logits. Position t is kept when label t+1 is not -100 (the
    usual causal shift), so prompt and padding positions never reach the vocab-sized projection. The value equals the
    model's own loss (sum over labelled tokens / their number, or / num_items_in_batch under gradient accumulation).
    Returns (loss, logits, targets).
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    # No KV cache: with one, transformers would not detect packed rows and they would attend to each other.
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False, "logits_to_keep": keep}
    logits = model(**model_inputs).logits
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), logits, targets


@functools.cache
def labels_only_trainer_class():
    """SFTTrainer whose loss is labels_only_loss wherever trl's fused LM head would score every position.

    trl's head (added to every SFTTrainer model) projects only the labelled positions on CUDA/XPU with Triton and
    never materializes the logits; elsewhere (CPU) it projects every position, in chunks. So: keep trl's on those
    devices, use labels_only_loss on the others. Built on first use: importing trl takes seconds.
    """
    from trl import SFTTrainer

    try:  # the device test trl's fused head uses to decide whether to score only the labelled positions
        from trl.kernels.chunked_logprob import _use_triton as trl_scores_labels_only
    except ImportError:  # another trl: assume it scores every position, and take over everywhere
        trl_scores_labels_only = lambda device: False  # noqa: E731

    class LabelsOnlySFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if return_outputs or labels is None or trl_scores_labels_only(labels.device):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, logits, targets = labels_only_loss(model, inputs, num_items_in_batch)
            # as trl does: num_items_in_batch counts every rank's tokens and DDP averages the gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            # trl's metrics, from the logits already computed: token accuracy and tokens seen
            mode = "train" if self.model.training else "eval"
            with torch.no_grad():
                valid = self.accelerator.gather_for_metrics(torch.tensor(targets.numel(), device=loss.device)).sum()
                correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(labels.numel(), device=labels.device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return LabelsOnlySFTTrainer


def sft_args(cfg: TrainConfig, output_dir: Path, *, cuda: bool, dtype: torch.dtype, pack_length: int | None, liger=False):
    """The SFTConfig of a run: schedule, batch geometry, checkpointing and the fast-path switches."""
    from trl import SFTConfig

    packing = pack_length is not None
    return SFTConfig(
        output_dir=str(output_dir),
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
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False},
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
        # Padding-free batches hold no padding, and the pad token (often EOS) also occurs inside rows: count them all.
        include_num_input_tokens_seen="all" if packing else "non_padding",
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Without packing, format_prompts already applied prompt.max_seq_len and its overlong policy. With packing,
        # trl packs whole rows (best-fit decreasing) into sequences of max_length tokens, which packed_sequence_length
        # made at least the longest row, and padding_free turns each micro-batch into one unpadded sequence.
        max_length=pack_length,
        packing=packing,
        packing_strategy="bfd",
        padding_free=packing,
        use_liger_kernel=liger,
        activation_offloading=cfg.activation_offloading and cuda,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def make_sft_trainer(model, args, train_ds, eval_ds, tokenizer, dtype, labels_only_logits=True, callbacks=None):
    """The SFTTrainer (labels-only loss when asked), with the LoRA weights kept in the compute dtype."""
    from trl import SFTTrainer

    cls = labels_only_trainer_class() if labels_only_logits else SFTTrainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
    )
    if dtype != torch.bfloat16:
        # trl casts a quantized model's LoRA weights to bf16 (the QLoRA paper's choice on GPUs). With fp32
        # compute (CPU, older GPUs) every LoRA matmul then runs in bf16: ~20x slower steps on CPU. Undo it.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    return trainer


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


@contextlib.contextmanager
def no_hub_lookups():
    """While training: peft's checkpoint saves ask the Hub whether the base model's vocabulary changed
    (save_embedding_layers="auto"; the bundled model records its Hub name). This step never resizes or trains
    the embeddings, and offline each lookup is a failed connection and a warning per checkpoint. peft reads
    HF_HUB_OFFLINE at call time; huggingface_hub read it at import, so nothing else changes."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


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
    run_dir = Path(cfg.checkpoint_dir) / checkpoint_key(train_ds, eval_ds, base_id or str(model), quant, lora, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Before loading anything: fail in seconds, not after hours of training with nowhere to save.
    check_disk_space(run_dir, *count_parameters(model, lora), cfg.save_total_limit)
    resume = latest_complete_checkpoint(run_dir)

    cuda = torch.cuda.is_available()
    dtype = models.compute_dtype(quant.compute_dtype)
    # Settings errors before the model loads: fail in seconds.
    pack_length = packed_sequence_length(cfg, longest_row(train_ds, eval_ds))
    liger = resolve_liger(cfg.use_liger_kernel, cuda)
    tokenizer = models.load_tokenizer(model)
    # The LoRA init draws from torch's global RNG before the trainer seeds it: seed here, or the same seed gives
    # a different adapter on every run (and a resumed run could never match an uninterrupted one).
    set_seed(cfg.seed)
    peft_model = build_model(model, quant, lora, cfg.gradient_checkpointing)
    trainable, total = peft_model.get_nb_trainable_parameters()

    args = sft_args(cfg, run_dir, cuda=cuda, dtype=dtype, pack_length=pack_length, liger=liger)
    if pack_length is not None:
        logger.info(
            "packing: %d packed sequences of up to %d tokens per micro-batch, x %d accumulation",
            cfg.micro_batch_size,
            pack_length,
            cfg.grad_accum,
        )
    progress = ProgressLog()

    def make_trainer(train_args):
        return make_sft_trainer(
            peft_model,
            train_args,
            train_ds,
            eval_ds,
            tokenizer,
            dtype,
            labels_only_logits=cfg.labels_only_logits,
            callbacks=[progress] + list(callbacks or []),
        )

    if resume:
        logger.info("resuming from %s", resume)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with no_hub_lookups():
        trainer, result, resume = train_with_oom_retry(make_trainer, args, peft_model, run_dir, resume, progress)
    seconds = time.perf_counter() - started
    final_eval = trainer.evaluate()["eval_loss"] if len(eval_ds) else None
    if final_eval is not None and (not progress.eval_curve or progress.eval_curve[-1][0] != trainer.state.global_step):
        progress.eval_curve.append((trainer.state.global_step, float(final_eval)))

    out_dir.mkdir(parents=True, exist_ok=True)
    # adapter_config.json + adapter_model.safetensors; the embeddings are not trained, and checking whether
    # they were would look the base model up on the Hub
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
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
