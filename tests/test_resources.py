"""core.training.resources: how many CPUs a training process may use, and the settings it runs with."""

from __future__ import annotations

import os

import pytest
import torch

from core.training import resources


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
    assert resources.usable_cpus(tmp_path) == (expected or 4)


def test_pin_cpu_threads_lowers_torch_threads_to_the_usable_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(resources, "usable_cpus", lambda: 1)
    try:
        torch.set_num_threads(2)
        assert resources.pin_cpu_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fp32_training_pins_full_precision_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        resources.pin_training_precision(torch.float32)
        assert torch.get_float32_matmul_precision() == "highest"
        settings = resources.compute_settings()
        assert settings["float32_matmul_precision"] == "highest"
        assert {"cpu_flags", "bnb_cpu_inference_layout", "torch_threads", "usable_cpus"} <= set(settings)
    finally:
        torch.set_float32_matmul_precision(before)
