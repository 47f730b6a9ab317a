"""Training: QLoRA with bitsandbytes 4-bit, peft LoRA and trl's SFTTrainer.

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
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState, set_seed
from transformers.trainer_callback import PrinterCallback

from core import models
from core.artifacts import ModelFolder
from core.config import LoraSettings, ModelSource, PreferenceConfig, QuantConfig, TrainConfig
from core.data.mixing import REPLAY, source_of
from core.models import BaseModelRef
from core.reports import TrainMetrics
from core.training.checkpoints import (
    checkpoint_folder,
    checkpoint_lock,
    checkpoint_step,
    in_process_group,
    latest_complete_checkpoint,
)
from core.training.compute import compute_settings, peak_memory_bytes, pin_training_precision, resolve_liger
from core.training.cpu_share import CpuShare, CpuShareCallback, set_cpu_threads
from core.training.disk import check_disk_space, count_parameters
from core.training.loss import ReplayKL, labels_only_trainer_class, with_replay_kl
from core.training.oom import train_with_oom_retry
from core.training.packing import longest_row, packed_sequence_length

logger = logging.getLogger(__name__)


def keep_4bit_differentiable(model) -> int:
    """Keep every bitsandbytes 4-bit layer of a model to be trained on its differentiable matmul; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a Linear4bit's weights into its CPU inference layout on
    the first forward in eval mode without gradients (a held-out loss pass, before or between training steps), and
    from then on runs every matmul of that layer, training included, through `gemv_4bit`: bf16 scales and no
    autograd kernel, so the gradient never flows back through the frozen base weight and every LoRA weight below
    it trains on a wrong gradient. On CPUs without AVX512-BF16 the layout is never used, which is why the same
    seeded run learned differently on two CPUs. A model we train never takes that path, on any CPU.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def lora_config(lora: LoraSettings):
    """peft's LoraConfig for these settings (causal LM, no bias training)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    gradient_checkpointing: bool,
    start_adapter: Path | None = None,
):
    """4-bit base + LoRA adapter (trainable) on top: a new one from `lora`, or the adapter saved in `start_adapter`
    (its own LoRA settings) to train further."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    base = models.load_base(model, quant)
    if quant.load_in_4bit:
        keep_4bit_differentiable(base)
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if start_adapter is None:
        peft_model = get_peft_model(base, lora_config(lora))
    else:
        peft_model = PeftModel.from_pretrained(base, str(start_adapter), is_trainable=True)
    # Record the public name, not this machine's cache path, in adapter_config.json.
    peft_model.peft_config["default"].base_model_name_or_path = models.display_name(model)
    return peft_model


@contextlib.contextmanager
def local_base_name(peft_model, model: ModelSource):
    """While training, the adapter config names the base by its local folder: the bundled or local folder, or the
    Hub model's snapshot in the local cache (the base was just loaded from it).

    Every checkpoint save asks whether the base's vocabulary changed (peft's save_embedding_layers="auto"): with
    a Hub name that is a Hub lookup per checkpoint, offline a failed one and a warning; with a local folder it
    reads the local config.json. The public name is back for the final save, which the adapter ships with.
    """
    config = peft_model.peft_config["default"]
    public = config.base_model_name_or_path
    if model.source == "hub":
        from huggingface_hub import snapshot_download

        try:
            config.base_model_name_or_path = snapshot_download(
                model.name, revision=model.revision, allow_patterns=["config.json"], local_files_only=True
            )
        except Exception:  # not in the local cache after all: keep the Hub name (one lookup per checkpoint)
            pass
    else:
        config.base_model_name_or_path = models.resolve_model(model)
    try:
        yield
    finally:
        config.base_model_name_or_path = public


def sft_args(
    cfg: TrainConfig, output_dir: Path, *, cuda: bool, dtype: torch.dtype, pack_length: int | None, liger=False
):
    """The SFTConfig of a run: every run's settings (run_args), packing, and the fast-path switches."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        **run_args(cfg, cuda=cuda, dtype=dtype),
        **_packing(pack_length),
        **_fast_path(cfg, cuda, liger),
    )


def run_args(
    cfg: TrainConfig, *, cuda: bool, dtype: torch.dtype, pace: TrainConfig | PreferenceConfig | None = None
) -> dict:
    """What every run's trl config holds (SFT's and a preference stage's): schedule, batches, evaluation and
    checkpoints, device and precision, seed.

    pace: where the length, peak learning rate and batches come from (default `cfg`; a preference stage has its
    own); everything else is train's.
    """
    pace = pace or cfg
    return {
        **_schedule(cfg, cuda, pace),
        **_batches(pace),
        **_evaluation_and_checkpoints(cfg),
        **_device_and_precision(cfg, cuda, dtype),
        **_seeded_and_quiet(cfg),
    }


def _seeded_and_quiet(cfg: TrainConfig) -> dict:
    """The seed of the model's init and the data order; no reporting service, no tqdm bars, no loader workers."""
    return {
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _schedule(cfg: TrainConfig, cuda: bool, pace: TrainConfig | PreferenceConfig) -> dict:
    """How long and how fast the run learns (steps or epochs and the peak learning rate: pace's), the learning rate's
    schedule and the optimizer (train's)."""
    return {
        "max_steps": pace.max_steps,
        "num_train_epochs": pace.num_epochs,
        "learning_rate": pace.learning_rate,
        "warmup_steps": cfg.warmup_ratio,  # a float < 1 is a fraction of all steps
        "lr_scheduler_type": cfg.lr_scheduler,
        "weight_decay": cfg.weight_decay,
        "optim": cfg.optim if cfg.optim != "auto" else ("paged_adamw_8bit" if cuda else "adamw_torch"),
    }


def _batches(pace: TrainConfig | PreferenceConfig) -> dict:
    """Rows per forward pass (train and eval) and micro-batches per optimizer step."""
    return {
        "per_device_train_batch_size": pace.micro_batch_size,
        "per_device_eval_batch_size": pace.micro_batch_size,
        "gradient_accumulation_steps": pace.grad_accum,
    }


def _packing(pack_length: int | None) -> dict:
    """Packing (pack_length None: none) and how tokens are counted."""
    packing = pack_length is not None
    return {
        # Padding-free batches hold no padding, and the pad token (often EOS) also occurs inside rows: count them all.
        "include_num_input_tokens_seen": "all" if packing else "non_padding",
        # Without packing, format_prompts already applied prompt.max_seq_len and its overlong policy. With packing,
        # trl packs whole rows (best-fit decreasing) into sequences of max_length tokens, which packed_sequence_length
        # made at least the longest row, and padding_free turns each micro-batch into one unpadded sequence.
        "max_length": pack_length,
        "packing": packing,
        "packing_strategy": "bfd",
        "padding_free": packing,
    }


def _evaluation_and_checkpoints(cfg: TrainConfig) -> dict:
    """When the run evaluates, logs and saves, and whether the best checkpoint ships (keep_best)."""
    keep_best = bool(cfg.eval_every and cfg.keep_best)
    return {
        "eval_strategy": "steps" if cfg.eval_every else "no",
        "eval_steps": cfg.eval_every or None,
        # keep_best: the checkpoint with the lowest eval loss is loaded back at the end and shipped
        "load_best_model_at_end": keep_best,
        "metric_for_best_model": "eval_loss" if keep_best else None,
        "greater_is_better": False if keep_best else None,
        "save_strategy": "steps",
        "save_steps": cfg.save_every,
        "save_total_limit": cfg.save_total_limit,
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
    }


def _device_and_precision(cfg: TrainConfig, cuda: bool, dtype: torch.dtype) -> dict:
    """The device, the precision and gradient checkpointing."""
    return {
        "activation_checkpointing": cfg.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": not cuda,
    }


def _fast_path(cfg: TrainConfig, cuda: bool, liger: bool) -> dict:
    """The switches that save memory or time on CUDA."""
    return {
        "use_liger_kernel": liger,
        "activation_offloading": cfg.activation_offloading and cuda,
    }


def make_sft_trainer(
    model,
    args,
    train_ds,
    eval_ds,
    tokenizer,
    dtype,
    labels_only_logits=True,
    callbacks=None,
    kl: ReplayKL | None = None,
):
    """The SFTTrainer (labels-only loss when asked; the replay KL term when given), with the LoRA weights kept in the
    compute dtype."""
    from trl import SFTTrainer

    cls = with_replay_kl(labels_only_trainer_class() if labels_only_logits else SFTTrainer, kl)
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
    )
    return settle_trainer(trainer, dtype)


def settle_trainer(trainer, dtype: torch.dtype, before: dict[str, torch.Tensor] | None = None):
    """A trl trainer as every run uses it: one readable progress line per log, the LoRA weights in the compute dtype.

    before: the trainable weights as they were before the trainer was built (trainable_weights); given, they are put
    back exactly instead of cast back from bf16, so a trained adapter starts where it was (its own reference, in a
    preference run, is the same weights to the bit).
    """
    # With tqdm off, transformers prints every raw log dict; ProgressLog writes one readable line per log instead.
    trainer.remove_callback(PrinterCallback)
    if dtype != torch.bfloat16:
        # trl casts a quantized model's LoRA weights to bf16 (the QLoRA paper's choice on GPUs). With fp32
        # compute (CPU, older GPUs) every LoRA matmul then runs in bf16: ~20x slower steps on CPU. Undo it.
        before = before or {}
        for name, param in trainer.model.named_parameters():
            if param.requires_grad:
                # a copy of `before`: the optimizer updates these weights in place, the caller's stay as they were
                source = before[name] if name in before else param.data
                param.data = source.to(param.device, dtype, copy=name in before)
    return trainer


class ProgressLog(TrainerCallback):
    """Loss, learning rate, real tokens/s and time left at every logging step, one line each; keeps the curves."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens_at_start: int | None = None
        self.steps_at_start = 0
        self.console_lines = 20  # about this many progress lines per run, whatever logging_steps is
        self.loss_curve: list[tuple[int, float]] = []
        self.eval_curve: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen
        self.steps_at_start = state.global_step  # a resumed run starts past 0

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            self.loss_curve.append((state.global_step, float(logs["loss"])))
            every = max(1, state.max_steps // self.console_lines)  # every step stays on the curve
            if state.global_step % every == 0 or state.global_step in (1, state.max_steps):
                elapsed = max(time.perf_counter() - self.start, 1e-9)
                rate = self.tokens_trained(state) / elapsed
                done = max(state.global_step - self.steps_at_start, 1)
                eta = elapsed / done * max(state.max_steps - state.global_step, 0)
                filled = round(20 * state.global_step / max(state.max_steps, 1))
                logger.info(
                    "step %d/%d %s  loss %.4f  lr %.2e  %.1f tokens/s  ETA %d:%02d",
                    state.global_step,
                    state.max_steps,
                    "[" + "#" * filled + "." * (20 - filled) + "]",  # a progress bar that reads well in log files
                    logs["loss"],
                    logs.get("learning_rate", 0.0),
                    rate,
                    eta // 60,
                    eta % 60,
                )
        if "eval_loss" in logs:
            self.eval_curve.append((state.global_step, float(logs["eval_loss"])))
            logger.info("step %d  eval loss %.4f", state.global_step, logs["eval_loss"])

    def tokens_trained(self, state) -> int:
        """Input tokens seen since this run's training began (a resumed run counts only its own)."""
        return state.num_input_tokens_seen - (self.tokens_at_start or 0)

    def forget_after(self, step: int) -> None:
        """Drop the curve points past `step`: a retry from that step runs those steps again."""
        self.loss_curve = [(s, v) for s, v in self.loss_curve if s <= step]
        self.eval_curve = [(s, v) for s, v in self.eval_curve if s <= step]

    @contextlib.contextmanager
    def evals_off_the_curve(self):
        """Evaluations logged inside the block stay off the eval curve (they still print)."""
        kept = len(self.eval_curve)
        try:
            yield
        finally:
            del self.eval_curve[kept:]

    def add_final_eval(self, step: int, loss: float) -> None:
        """The eval curve's last point: `loss` at `step`, unless an evaluation during training already logged it."""
        if not self.eval_curve or self.eval_curve[-1][0] != step:
            self.eval_curve.append((step, float(loss)))


def replay_kl(train_ds: Dataset, cfg: TrainConfig) -> ReplayKL | None:
    """The KL term over the training data's replay rows (train.replay.kl), or None when it is off."""
    if cfg.replay is None or cfg.replay.kl == 0:
        return None
    replay = [i for i, row_id in enumerate(train_ds["id"]) if source_of(row_id) == REPLAY]
    rows = train_ds.select(replay)
    return ReplayKL(rows["input_ids"], rows["labels"], cfg.replay.kl, cfg.replay.kl_tokens, cfg.seed)


def finished_checkpoint(checkpoint: Path) -> bool:
    """Whether the checkpoint is the last step of its training (its trainer state: global_step >= max_steps)."""
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return state.max_steps > 0 and state.global_step >= state.max_steps


def restore_finished(trainer, peft_model, checkpoint: Path, keep_best: bool) -> tuple[Any, float]:
    """The trainer and adapter as a finished training left them, without another step: the trainer state from
    `checkpoint`, the adapter weights from it (or from the best checkpoint, with keep_best). Returns (trainer,
    last logged train loss)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint if keep_best else None
    source = Path(best) if best and Path(best).exists() else checkpoint
    set_peft_model_state_dict(peft_model, load_file(source / "adapter_model.safetensors"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    logger.info(
        "the training in %s had finished (step %d): nothing left to train", checkpoint, trainer.state.global_step
    )
    return trainer, float(losses[-1]) if losses else float("nan")


def train_adapter(
    train_ds: Dataset,
    eval_ds: Dataset,
    base: BaseModelRef | ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    cfg: TrainConfig,
    out_dir: Path,
    callbacks: list | None = None,
) -> tuple[ModelFolder, TrainMetrics]:
    """Train (or resume) and save the adapter to `out_dir`.

    `base` is the base model resolved once (core.models.resolve_base); a plain ModelSource is resolved here.
    Its identity keys the checkpoint folder, so a changed base never resumes another base's checkpoints.
    """
    base = models.resolve_base(base)
    run_dir = checkpoint_folder(train_ds, eval_ds, base, quant, lora, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One training per checkpoint folder at a time (core/training/checkpoints.py); the ranks of a multi-process
    # training run under the lock their launcher holds (core/training/distributed.py).
    lock = contextlib.nullcontext() if in_process_group() else checkpoint_lock(run_dir)
    with lock:
        return _train_in(run_dir, train_ds, eval_ds, base, quant, lora, cfg, out_dir, callbacks)


@dataclass(frozen=True)
class Device:
    """Where a run computes: on CUDA or the CPU, in which dtype, and on the CPU with which thread share."""

    cuda: bool
    dtype: torch.dtype
    cpu_share: CpuShare | None  # None: on CUDA, or a fixed train.cpu_threads


@dataclass(frozen=True)
class Fit:
    """What training left: the trainer, its last train loss, the checkpoint it resumed from, its wall time."""

    trainer: Any
    last_loss: float
    resumed_from: Path | None
    seconds: float


def _train_in(
    run_dir: Path,
    train_ds: Dataset,
    eval_ds: Dataset,
    base: BaseModelRef,
    quant: QuantConfig,
    lora: LoraSettings,
    cfg: TrainConfig,
    out_dir: Path,
    callbacks: list | None,
) -> tuple[ModelFolder, TrainMetrics]:
    """train_adapter's work, with the checkpoint folder held: check, set up, fit, evaluate what ships, save."""
    model = base.source
    # Before loading anything: fail in seconds, not after hours of training with nowhere to save.
    check_disk_space(run_dir, *count_parameters(model, lora), cfg.save_total_limit)
    resume = latest_complete_checkpoint(run_dir)
    device = setup_device(quant, cfg)
    # Settings errors before the model loads: fail in seconds.
    pack_length = packed_sequence_length(cfg, longest_row(train_ds, eval_ds))
    liger = resolve_liger(cfg.use_liger_kernel, device.cuda)
    tokenizer = models.load_tokenizer(model)
    peft_model = setup_model(model, quant, lora, cfg)
    trainable, total = peft_model.get_nb_trainable_parameters()
    args = _setup_args(cfg, run_dir, device, pack_length, liger)
    progress = ProgressLog()
    make_trainer = _trainer_factory(peft_model, train_ds, eval_ds, tokenizer, device, cfg, progress, callbacks)
    fit = train_to_end(make_trainer, args, peft_model, model, run_dir, resume, progress, device)
    best_step = best_checkpoint_step(fit.trainer, args)
    final_eval = evaluate_shipped(fit.trainer, eval_ds, progress, best_step)
    save_adapter(peft_model, out_dir)
    metrics = train_metrics(fit, progress, device, cfg, final_eval, best_step, (trainable, total))
    return ModelFolder(out_dir), metrics


def setup_device(quant: QuantConfig, cfg: TrainConfig) -> Device:
    """CUDA or the CPU, the compute dtype at its full precision, and torch's CPU threads; logs the compute settings."""
    cuda = torch.cuda.is_available()
    dtype = models.compute_dtype(quant.compute_dtype)
    pin_training_precision(dtype)
    # CPU: threads = the cores this process may use, then = the cores other processes leave free (CpuShare).
    cpu_share = None if cuda else set_cpu_threads(cfg.cpu_threads)
    logger.info("compute settings: %s", compute_settings())
    return Device(cuda=cuda, dtype=dtype, cpu_share=cpu_share)


def setup_model(
    model: ModelSource, quant: QuantConfig, lora: LoraSettings, cfg: TrainConfig, start_adapter: Path | None = None
):
    """The 4-bit base with a new LoRA adapter on top, initialised from cfg.seed (or the one in start_adapter)."""
    # The LoRA init draws from torch's global RNG before the trainer seeds it: seed here, or the same seed gives
    # a different adapter on every run (and a resumed run could never match an uninterrupted one).
    set_seed(cfg.seed)
    return build_model(model, quant, lora, cfg.gradient_checkpointing, start_adapter)


def _setup_args(cfg: TrainConfig, run_dir: Path, device: Device, pack_length: int | None, liger: bool):
    """The run's SFTConfig (sft_args); logs the packed micro-batch's shape."""
    args = sft_args(cfg, run_dir, cuda=device.cuda, dtype=device.dtype, pack_length=pack_length, liger=liger)
    if pack_length is not None:
        logger.info(
            "packing: %d packed sequences of up to %d tokens per micro-batch, x %d accumulation",
            cfg.micro_batch_size,
            pack_length,
            cfg.grad_accum,
        )
    return args


def _trainer_factory(
    peft_model,
    train_ds: Dataset,
    eval_ds: Dataset,
    tokenizer,
    device: Device,
    cfg: TrainConfig,
    progress: ProgressLog,
    callbacks: list | None,
):
    """make_trainer(args): a new SFTTrainer over the run's model and data for those args (the OOM retry makes one per
    attempt, each with new callbacks)."""
    kl = replay_kl(train_ds, cfg)

    def make_trainer(train_args):
        return make_sft_trainer(
            peft_model,
            train_args,
            train_ds,
            eval_ds,
            tokenizer,
            device.dtype,
            labels_only_logits=cfg.labels_only_logits,
            kl=kl,
            callbacks=trainer_callbacks(progress, device, cfg, callbacks),
        )

    return make_trainer


def trainer_callbacks(progress: ProgressLog, device: Device, cfg: TrainConfig, extra: list | None) -> list:
    """The progress log, the CPU share, early stopping when set, and the caller's callbacks."""
    return (
        [progress]
        + ([CpuShareCallback(device.cpu_share)] if device.cpu_share else [])
        + ([EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else [])
        + list(extra or [])
    )


def train_to_end(
    make_trainer, args, peft_model, model: ModelSource, run_dir: Path, resume, progress, device: Device
) -> Fit:
    """Train to the end from `resume` (retrying smaller after CUDA OOM), or take a training that had already ended."""
    if resume:
        logger.info("resuming from %s", resume)
    if device.cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with local_base_name(peft_model, model):
        if resume is not None and finished_checkpoint(resume):
            # The training already ran to its end (an identical run finished first, or a crash came after the last
            # step): take its result. trainer.train() resumed at max_steps would still run one more step
            # (transformers checks the limit only after a step), and the same run would ship another adapter.
            trainer, last_loss = restore_finished(make_trainer(args), peft_model, resume, args.load_best_model_at_end)
        else:
            trainer, result, resume = train_with_oom_retry(make_trainer, args, peft_model, run_dir, resume, progress)
            last_loss = result.training_loss
    return Fit(trainer=trainer, last_loss=last_loss, resumed_from=resume, seconds=time.perf_counter() - started)


def best_checkpoint_step(trainer, args) -> int | None:
    """The step of the checkpoint that ships with keep_best (the lowest eval loss); None without keep_best."""
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    return checkpoint_step(best) if best else None


def evaluate_shipped(trainer, eval_ds: Dataset, progress: ProgressLog, best_step: int | None) -> float | None:
    """The held-out loss of the weights that ship (None without held-out rows); the eval curve's last point when it
    is the last step's and no evaluation during training logged it."""
    final_eval = None
    with progress.evals_off_the_curve():
        if len(eval_ds):
            final_eval = trainer.evaluate()["eval_loss"]  # of the shipped (best) weights
    if final_eval is not None and best_step is None:
        progress.add_final_eval(trainer.state.global_step, final_eval)
    if best_step is not None:
        logger.info("shipping the checkpoint of step %d: the lowest eval loss (%.4f)", best_step, final_eval)
    return final_eval


def save_adapter(peft_model, out_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors in out_dir, without peft's empty model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The embeddings are not trained, and checking whether they were would look the base model up on the Hub. Only
    # the trained "default" adapter: a preference run's frozen reference copy ("ref") is not part of the result.
    peft_model.save_pretrained(out_dir, save_embedding_layers=False, selected_adapters=["default"])
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty card; push writes the real one


def train_metrics(
    fit: Fit,
    progress: ProgressLog,
    device: Device,
    cfg: TrainConfig,
    final_eval: float | None,
    best_step: int | None,
    params: tuple[int, int],
) -> TrainMetrics:
    """The run's TrainMetrics: steps, losses and curves, throughput, memory and the model's size."""
    state = fit.trainer.state
    tokens = progress.tokens_trained(state)
    return TrainMetrics(
        steps=state.global_step,
        resumed_from_step=checkpoint_step(fit.resumed_from) if fit.resumed_from else 0,
        final_train_loss=float(progress.loss_curve[-1][1] if progress.loss_curve else fit.last_loss),
        final_eval_loss=final_eval,
        train_tokens=int(tokens),
        tokens_per_s=round(tokens / max(fit.seconds, 1e-9), 2),
        seconds=round(fit.seconds, 2),
        peak_mem_bytes=peak_memory_bytes(),
        trainable_params=int(params[0]),
        total_params=int(params[1]),
        compute_dtype=str(device.dtype).replace("torch.", ""),
        device=torch.cuda.get_device_name() if device.cuda else "cpu",
        loss_curve=progress.loss_curve,
        eval_curve=progress.eval_curve,
        best_step=best_step,
        stopped_early=bool(cfg.early_stopping_patience and state.global_step < state.max_steps),
    )
