"""torch's CPU threads for a training run: the cores this process may use (core/cpus.py), then the cores other
processes leave free, re-checked while training runs (CpuShare)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

from core.cpus import usable_cpus

logger = logging.getLogger(__name__)


def pin_cpu_threads() -> int:
    """torch's intra-op threads = usable_cpus() when it had more (a CPU-limited pod, a narrowed affinity)."""
    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()


def set_cpu_threads(setting: Literal["auto"] | int) -> CpuShare | None:
    """A CPU run's torch threads (train.cpu_threads): "auto" pins them to usable_cpus() and returns the CpuShare
    that follows the free cores while training; a number sets that many, fixed (returns None)."""
    if setting == "auto":
        return CpuShare(max_threads=pin_cpu_threads())
    torch.set_num_threads(setting)
    return None


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
