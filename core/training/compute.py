"""How a training run computes on this machine: fp32 pinned to full precision, liger-kernel on where it can run,
the settings that decide the numbers (logged by the train step), and the peak memory it took."""

from __future__ import annotations

import resource

import torch

from core.cpus import cpu_flags, usable_cpus


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
    """The most memory this run held: CUDA's peak allocation, else the process's peak resident size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
