"""How many CPUs a training process may use (core.cpus, core.training.cpu_share), and the settings it runs with
(core.training.compute)."""

from __future__ import annotations

import os

import pytest
import torch

from core import cpus
from core.training import compute, cpu_share


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, a 1.5-CPU limit: 2 threads
        ({"cpu.max": "100000 100000\n"}, 1),  # one CPU
        ({"cpu.max": "max 100000\n"}, None),  # no limit: the affinity mask
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1, half a CPU
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no limit
        ({}, None),  # no cgroup files at all
    ],
)
def test_usable_cpus_caps_the_affinity_mask_by_the_cgroup_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpus.usable_cpus(tmp_path) == (expected or 4)


def test_pin_cpu_threads_lowers_torch_threads_to_the_usable_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: 1)
    try:
        torch.set_num_threads(2)
        assert cpu_share.pin_cpu_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fp32_training_pins_full_precision_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        compute.pin_training_precision(torch.float32)
        assert torch.get_float32_matmul_precision() == "highest"
        settings = compute.compute_settings()
        assert settings["float32_matmul_precision"] == "highest"
        assert {"cpu_flags", "bnb_cpu_inference_layout", "torch_threads", "usable_cpus"} <= set(settings)
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(
    not os.path.exists("/proc/stat") or len(getattr(os, "sched_getaffinity", lambda pid: ())(0)) < 2,
    reason="needs Linux's /proc/stat and at least 2 CPUs",
)
def test_cpu_share_gives_up_a_core_another_process_keeps_busy_and_takes_it_back():
    import subprocess
    import sys
    import time

    a, b = sorted(os.sched_getaffinity(0))[:2]
    before = torch.get_num_threads()
    share = cpu_share.CpuShare(max_threads=2, interval_s=1.0)
    share.cpus = {a, b}  # watch two CPUs; the other process spins on one of them
    share.others_busy()  # a window before the spinner: what the rest of the machine already keeps busy
    time.sleep(1.0)
    if (idle_load := share.others_busy()) > 0.3:
        pytest.skip(f"the machine is busy ({idle_load:.2f} cores used by other processes before the test's own load)")
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{b}}})\nwhile True: pass"])
    try:
        torch.set_num_threads(2)
        time.sleep(1.5)
        assert share.adjust() == 1, "one of two cores busy elsewhere: one thread"
        assert torch.get_num_threads() == 1
        ((_, _, others),) = share.changes
        assert 0.6 < others < 1.4
    finally:
        spinner.kill()
        spinner.wait()
    try:
        share.others_busy()  # a window without the spinner
        time.sleep(1.5)
        assert share.adjust() == 2, "both cores free again: both threads back"
        assert torch.get_num_threads() == 2
        assert share.adjust() is None, "no new window yet: nothing measured, nothing changed"
    finally:
        torch.set_num_threads(before)
