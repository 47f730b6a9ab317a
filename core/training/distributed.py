"""Training across N processes (one per GPU) with DDP, started by Hugging Face Accelerate's `accelerate launch`.

    python -m core.training.distributed JOB_DIR      # what each process runs (accelerate launch starts N)

The train step calls `train_distributed` when `train.num_processes > 1`. The datasets and settings are
written to a job folder first, because each process is a fresh interpreter: trl/transformers see the
distributed environment that `accelerate launch` sets up and train with DDP, every rank runs
core.training.train_adapter, and the main process (rank 0) writes the adapter and metrics, which
train_distributed then returns. Each rank also writes `rank-<n>.json` (its rank and process-group size),
checked afterwards, so a launch that silently ran fewer processes fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk

from core import models
from core.artifacts import ModelFolder
from core.config import LoraSettings, QuantConfig, TrainConfig
from core.logs import quiet_libraries
from core.models import BaseModelRef
from core.reports import TrainMetrics
from core.training.checkpoints import checkpoint_folder, checkpoint_lock

REPO_ROOT = Path(__file__).resolve().parents[2]  # on each process's PYTHONPATH, for `-m core.training.distributed`
_SETTINGS = {"base": BaseModelRef, "quant": QuantConfig, "lora": LoraSettings, "train": TrainConfig}


def write_job(job_dir: Path, train_ds: Dataset, eval_ds: Dataset, **settings) -> None:
    """Everything one rank needs, as files: the two datasets and the settings as JSON."""
    train_ds.save_to_disk(str(job_dir / "train_dataset"))
    eval_ds.save_to_disk(str(job_dir / "eval_dataset"))
    spec = {name: settings[name].model_dump(mode="json") for name in _SETTINGS}
    (job_dir / "job.json").write_text(json.dumps(spec))


def run_rank(job_dir: str | Path) -> None:
    """One process's share of training; the main process (rank 0) writes `adapter/` and `metrics.json`."""
    import torch.distributed as dist

    from core.training.trainer import train_adapter

    # torchrun's RANK, not accelerate's state: on CPU (gloo, as in the tests) accelerate's first
    # state reads one process, and only the trainer sets up the process group.
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():  # one GPU per process: the 4-bit base loads onto the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    job = Path(job_dir)
    spec = json.loads((job / "job.json").read_text())
    settings = {name: cls.model_validate(spec[name]) for name, cls in _SETTINGS.items()}
    quiet_libraries()
    # Each rank saves its own copy of the (identical, DDP-synchronised) adapter: no two writers on one folder.
    out = job / ("adapter" if rank == 0 else f"adapter-rank{rank}")
    _, metrics = train_adapter(
        load_from_disk(str(job / "train_dataset")),
        load_from_disk(str(job / "eval_dataset")),
        settings["base"],
        settings["quant"],
        settings["lora"],
        settings["train"],
        out,
    )
    if rank == 0:
        (job / "metrics.json").write_text(metrics.model_dump_json())
    # Proof of participation, checked by train_distributed: which rank, in how large a process group, how many steps.
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    (job / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "steps": metrics.steps}))


def launch(job_dir: Path, num_processes: int) -> None:
    """`accelerate launch --multi_gpu --num_processes N -m core.training.distributed JOB_DIR`, and wait for it.

    multi_gpu: one process per GPU with DDP (NCCL on CUDA; gloo when there is no GPU, as in the tests).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--num_processes", str(num_processes), "--multi_gpu", "--module", __name__, str(job_dir)]
    )
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([path] if path else []))
    try:
        launch_command(args)
    except (Exception, SystemExit) as err:  # torchrun exits the launcher on a failed rank
        raise RuntimeError(f"distributed training across {num_processes} processes failed: {err}") from err
    finally:
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path


def train_distributed(
    train_ds: Dataset,
    eval_ds: Dataset,
    base: BaseModelRef,
    quant: QuantConfig,
    lora: LoraSettings,
    cfg: TrainConfig,
    job_dir: Path,
) -> tuple[ModelFolder, TrainMetrics]:
    """core.training.train_adapter across `cfg.num_processes` processes; the adapter lands in job_dir/adapter."""
    job_dir = Path(job_dir)
    write_job(job_dir, train_ds, eval_ds, base=base, quant=quant, lora=lora, train=cfg)
    run_dir = checkpoint_folder(train_ds, eval_ds, models.resolve_base(base), quant, lora, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint_lock(run_dir):  # for every rank: an identical run waits, then resumes from these checkpoints
        launch(job_dir, cfg.num_processes)
    ranks = [json.loads(f.read_text()) for f in sorted(job_dir.glob("rank-*.json"))]
    if len(ranks) != cfg.num_processes or any(r["world_size"] != cfg.num_processes for r in ranks):
        raise RuntimeError(f"expected {cfg.num_processes} training processes in one process group, got {ranks}")
    return ModelFolder(job_dir / "adapter"), TrainMetrics.model_validate_json((job_dir / "metrics.json").read_text())


if __name__ == "__main__":
    run_rank(sys.argv[1])
