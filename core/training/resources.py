"""What a training run needs from the machine, checked before it starts and adapted while it runs.

- check_disk_space: the checkpoint disk must hold the checkpoints and the merged model, or the run fails
  in seconds, before anything loads.
- train_with_oom_retry: a CUDA out-of-memory error retries at half the micro-batch and twice the
  accumulation, the same effective batch.
- packed_sequence_length / resolve_liger: settings errors before the model loads.
- usable_cpus / pin_cpu_threads / CpuShare: torch's CPU threads fit the cores this process may and can use.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from core import models
from core.config import LoraSettings, ModelSource, TrainConfig
from core.training.checkpoints import latest_complete_checkpoint

logger = logging.getLogger(__name__)


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


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# CPU features that decide which kernels torch (oneDNN) and bitsandbytes pick on a CPU.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The KERNEL_FLAGS this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in KERNEL_FLAGS if f in have]


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (a pod's CPU limit).

    os.cpu_count() and torch's default thread count see the machine's cores, not the container's share.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = period = None
    try:  # cgroup v2: "<quota> <period>", or "max <period>" for no limit
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # cgroup v1: the quota (-1: no limit) and the period, in two files
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            pass
    if quota not in (None, "max", "-1") and int(period) > 0:
        count = min(count, max(1, math.ceil(int(quota) / int(period))))
    return max(1, count)


def pin_cpu_threads() -> int:
    """torch's intra-op threads = usable_cpus() when it had more (a CPU-limited pod, a narrowed affinity)."""
    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()


def _busy_seconds(cpus: set[int], stat: Path, count_niced: bool) -> float:
    """CPU-seconds the given CPUs have spent busy since boot, by every process (/proc/stat, in clock ticks).

    Niced processes' time counts only when `count_niced`: the kernel gives a nice-19 build about 1/70 of a core
    against a normal-priority thread, so it takes nothing a run of ours would notice.
    """
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        busy += user + system + irq + softirq + steal + (nice if count_niced else 0)
    return busy / tick


def _own_seconds() -> float:
    """CPU-seconds this process has used, all its threads together."""
    t = os.times()
    return t.user + t.system


class CpuShare:
    """torch's intra-op threads follow the cores that other processes leave free, re-checked while training runs.

    Two runs of 2 threads each on 2 cores do not share them: OpenMP threads spin at every barrier while their
    partner waits for a core the other run holds, and each run slows about 10x (measured: 7.3 against 83 tokens/s,
    docs/performance.md). With one thread each, two runs cost about 2x one run. So every `interval_s` (wall
    seconds, checked between micro-batches) this measures how many cores of this process's CPUs others kept busy
    (every process's busy time from /proc/stat less our own) and sets threads = free cores, rounded, between 1 and
    `max_threads` (usable_cpus()). Alone, nothing changes; when the other run ends, the threads come back.
    Only call from the training thread: an OpenMP thread count belongs to the thread that sets it.
    """

    def __init__(self, max_threads: int, interval_s: float = 3.0, stat: Path = Path("/proc/stat")):
        self.max_threads = max_threads
        self.interval_s = interval_s
        self.stat = stat
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.changes: list[tuple[int, int, float]] = []  # (threads before, after, cores busy elsewhere)
        self.niced = os.nice(0) > 0  # a niced run of ours counts its peers at the same or lower priority
        try:
            self._last = (time.perf_counter(), _busy_seconds(self.cpus, stat, self.niced), _own_seconds())
        except (OSError, ValueError):
            self._last = None  # no /proc/stat (not Linux): keep the threads as they are

    def others_busy(self) -> float | None:
        """Cores kept busy by other processes since the last call, or None before interval_s has passed."""
        if self._last is None:
            return None
        now = time.perf_counter()
        if now - self._last[0] < self.interval_s:
            return None
        busy, own = _busy_seconds(self.cpus, self.stat, self.niced), _own_seconds()
        wall, busy0, own0 = now - self._last[0], self._last[1], self._last[2]
        self._last = (now, busy, own)
        return max(0.0, ((busy - busy0) - (own - own0)) / wall)

    def adjust(self) -> int | None:
        """Set torch's threads to the free cores; returns the new count when it changed."""
        others = self.others_busy()
        if others is None:
            return None
        want = min(self.max_threads, max(1, round(len(self.cpus) - others)))
        have = torch.get_num_threads()
        if want == have:
            return None
        torch.set_num_threads(want)
        self.changes.append((have, want, others))
        logger.info(
            "other processes keep %.1f of this run's %d cores busy: torch threads %d -> %d",
            others,
            len(self.cpus),
            have,
            want,
        )
        return want


class CpuShareCallback(TrainerCallback):
    """CpuShare.adjust() between micro-batches of a CPU training run."""

    def __init__(self, share: CpuShare):
        self.share = share

    def on_substep_end(self, args, state, control, **kwargs):
        self.share.adjust()

    def on_step_end(self, args, state, control, **kwargs):
        self.share.adjust()


def pin_training_precision(dtype: torch.dtype) -> None:
    """fp32 training computes in full fp32: no TF32/bf16 shortcuts for fp32 matmuls, whatever was set before."""
    if dtype != torch.float32:
        return
    torch.set_float32_matmul_precision("highest")
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if matmul is not None and hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "none"  # oneDNN: no bf16 for fp32 matmuls on CPUs that have it


def compute_settings() -> dict:
    """What decides the numbers a training run computes on this machine; logged by the train step and printed in
    the train benchmark's header."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return {
        "torch": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "onednn_fp32_matmul_precision": getattr(matmul, "fp32_precision", "n/a"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "bitsandbytes": bnb.__version__,
        # bitsandbytes' CPU inference layout (gemv_4bit, no autograd): never on a model being trained
        "bnb_cpu_inference_layout": "available, off for training" if has_avx512bf16() else "not on this CPU",
        "torch_threads": torch.get_num_threads(),
        "usable_cpus": usable_cpus(),
    }
