"""The CPUs this process has: how many it may really use, and which kernel features they offer.

Shared by every stage that sizes work to the CPU: training sets torch's threads from usable_cpus
(core/training/cpu_share.py), the GGUF export gives llama.cpp as many (core/export/gguf.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

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
