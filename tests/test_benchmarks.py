"""benchmarks/: each benchmark runs end to end on a reduced preset and writes well-formed JSON rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

TRAIN_BENCH = REPO_ROOT / "benchmarks" / "train_throughput.py"
TRAIN_FIELDS = {
    "row",
    "device",
    "versions",
    "real_tokens_per_s",
    "s_per_step",
    "peak_mem_bytes",
    "time_to_first_step_s",
    "first_loss",
    "last_loss",
    "train_tokens",
    "steps",
    "settings",
}


@pytest.mark.bench
def test_train_throughput_smoke_rows(tmp_path):
    out = tmp_path / "train.json"
    rows_wanted = "tutorial,ours,ref-dequantized"
    command = [sys.executable, str(TRAIN_BENCH), "--preset", "smoke", "--rows", rows_wanted, "--steps", "2"]
    # One thread: the tiny model's ops are too small to share, and two threads wait on each other when the CPU is busy
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command + ["--workloads", "chat", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["row"] for r in rows] == ["tutorial", "ours", "ref-dequantized"]
    for r in rows:
        assert TRAIN_FIELDS <= r.keys(), TRAIN_FIELDS - r.keys()
        assert r["device"].startswith("cpu") and r["workload"] == "chat" and r["steps"] == 2
        assert r["real_tokens_per_s"] > 0 and r["s_per_step"] > 0 and r["time_to_first_step_s"] > 0
        assert r["peak_mem_bytes"] > 100 * 2**20  # the row's own process: torch + model, in bytes
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert r["mfu"] is None  # CUDA only
    tutorial, ours, reference = rows
    # ours trains exactly like its reference, the same base with the 4-bit weights dequantized to fp32
    assert reference["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-5)
    assert reference["last_loss"] == pytest.approx(ours["last_loss"], rel=1e-4)
    assert ours["compute_settings"]["float32_matmul_precision"] == "highest"
    assert "settings: torch" in proc.stdout  # the header names what decides the numbers
    # identical data and initial adapter: the same held-out loss before training, then about as many tokens trained
    assert abs(tutorial["first_loss"] - ours["first_loss"]) < 1e-4
    assert 0.5 < ours["train_tokens"] / tutorial["train_tokens"] < 2
    assert tutorial["settings"]["lora_dropout"] == 0.05 and tutorial["settings"]["train"]["gradient_checkpointing"]
    assert ours["settings"]["train"]["packing"] and ours["settings"]["train"]["labels_only_logits"]
    assert "workload: chat" in proc.stdout and "x tut" in proc.stdout  # the table, with the ratio columns


def test_gpu_presets_exit_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the GPU presets would run")
    proc = subprocess.run(
        [sys.executable, str(TRAIN_BENCH), "--preset", "gpu-8b"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr


PREFERENCE_BENCH = REPO_ROOT / "benchmarks" / "preference.py"


@pytest.mark.bench
def test_preference_benchmark_smoke_rows(tmp_path):
    out = tmp_path / "preference.json"
    command = [sys.executable, str(PREFERENCE_BENCH), "--preset", "smoke", "--rows", "sft,dpo,kto", "--json", str(out)]
    proc = subprocess.run(
        command, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["row"] for r in rows] == ["sft", "dpo", "kto"]
    for r in rows:
        assert r["steps"] == 2 and r["real_tokens_per_s"] > 0 and r["s_per_step"] > 0
        assert r["peak_mem_bytes"] > 100 * 2**20 and math.isfinite(r["first_loss"])
    sft, dpo, kto = rows
    # dpo trains on the chosen and the rejected sequence of each of sft's rows: about twice the tokens
    assert 1.5 < dpo["train_tokens"] / sft["train_tokens"] < 2.5
    assert kto["train_tokens"] == pytest.approx(dpo["train_tokens"], rel=0.2)  # the same sequences, as rows
    assert "x sft" in proc.stdout and "tokens/s" in proc.stdout


def test_preference_gpu_preset_exits_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the GPU preset would run")
    proc = subprocess.run(
        [sys.executable, str(PREFERENCE_BENCH), "--preset", "gpu-1b"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
