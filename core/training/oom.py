"""CUDA out of memory during training: retry at a smaller micro-batch with more accumulation, the same effective
batch, from the newest complete checkpoint (train_with_oom_retry); a clear error at micro-batch 1."""

from __future__ import annotations

import copy
import gc
import logging
from pathlib import Path

import torch

from core.training.checkpoints import checkpoint_step, latest_complete_checkpoint

logger = logging.getLogger(__name__)


class TrainOutOfMemoryError(RuntimeError):
    """CUDA ran out of memory even at micro-batch 1."""


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
    run before the OOM may have changed them); `progress` (a ProgressLog) forgets the steps that run again.
    Returns (trainer, train result, checkpoint resumed from).
    """
    initial = trainable_weights(peft_model)
    while True:
        trainer = make_trainer(args)
        try:
            return trainer, trainer.train(resume_from_checkpoint=str(resume) if resume else None), resume
        except torch.cuda.OutOfMemoryError as err:
            smaller = smaller_micro_batch(args.per_device_train_batch_size, args.gradient_accumulation_steps)
            if smaller is None:
                raise _out_of_memory_at_one(args) from err
        # Outside the except block, so the traceback (whose frames hold the activations) is gone before freeing.
        del trainer
        _free_memory()
        resume = _restart_point(run_dir, peft_model, initial, progress)
        _log_retry(args, smaller, resume)
        args = _with_micro_batch(args, *smaller)


def trainable_weights(peft_model) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter's trainable weights, to restart from."""
    return {n: p.detach().to("cpu", copy=True) for n, p in peft_model.named_parameters() if p.requires_grad}


def _out_of_memory_at_one(args) -> TrainOutOfMemoryError:
    """The error for an OOM with nothing left to shrink, naming the settings that would help."""
    packed = f", one packed sequence of up to {args.max_length} tokens" if args.packing else ""
    return TrainOutOfMemoryError(
        f"CUDA out of memory even at micro-batch 1 (grad accum {args.gradient_accumulation_steps}){packed}: lower "
        f"{'train.tokens_per_micro_batch or ' if args.packing else ''}prompt.max_seq_len, keep "
        "train.gradient_checkpointing on, or use a smaller base model"
    )


def _free_memory() -> None:
    """Collect what the failed attempt left and hand CUDA's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _restart_point(run_dir: Path, peft_model, initial: dict[str, torch.Tensor], progress) -> Path | None:
    """Where a retry starts: the newest complete checkpoint, or else the initial adapter weights, put back."""
    resume = latest_complete_checkpoint(run_dir)
    if resume is None:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n in initial:
                    p.copy_(initial[n].to(p.device))
    progress.forget_after(checkpoint_step(resume) if resume else 0)  # those steps run again
    return resume


def _log_retry(args, smaller: tuple[int, int], resume: Path | None) -> None:
    """One warning: the batch shape before and after, and where the retry starts."""
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
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


def _with_micro_batch(args, micro: int, accum: int):
    """A copy of the trainer args with this micro-batch (train and eval) and gradient accumulation."""
    args = copy.copy(args)
    args.per_device_train_batch_size, args.gradient_accumulation_steps = micro, accum
    args.per_device_eval_batch_size = micro
    return args
