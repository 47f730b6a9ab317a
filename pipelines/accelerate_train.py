"""The train step across N processes (one per GPU) under Hugging Face Accelerate, via ZenML's `run_with_accelerate`.

The pipeline uses `train_accelerated` instead of `steps.train.train` when `train.num_processes > 1`
(same inputs, outputs and invocation id `train`, so configs and lineage do not change).

Why not wrap `steps.train.train` itself: `run_with_accelerate` re-runs the wrapped step function in
each process through a generated command-line script, so every argument must be a str, int,
float, bool or Path. `train` takes datasets and config models. So this step writes its inputs to a
job folder and wraps `train_ranks(job_dir: str)`, which each process runs: trl/transformers see
the distributed environment that `accelerate launch` sets up and train with DDP; the main
process writes the adapter and metrics, which this step then returns as usual.

`run_with_accelerate` lives in ZenML's huggingface integration (zenml.integrations.huggingface.steps).
It imports with what this project installs anyway (accelerate, cloudpickle), without installing
that integration; it is imported only inside the step and only when N > 1.
"""

# No `from __future__ import annotations` here: ZenML's CLI wrapper reads `train_ranks`'s
# annotations as types (`str`), and postponed annotations would hand it the string "str".
import json
import os
import sys
from pathlib import Path
from typing import Annotated

# ZenML's accelerate script imports this file as a top-level module (`accelerate_train`), with
# only this folder on sys.path; the repo root (for `core`, `steps`) may not be the working directory.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

import torch  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402
from zenml import log_metadata, step  # noqa: E402
from zenml.config.cache_policy import CachePolicy  # noqa: E402
from zenml.logger import get_logger  # noqa: E402

import materializers  # noqa: E402, F401
from core import models  # noqa: E402
from core.artifacts import ModelFolder, scratch_dir  # noqa: E402
from core.config import LoraSettings, ModelSource, QuantConfig, TrainConfig  # noqa: E402
from core.reports import TrainMetrics  # noqa: E402
from steps import train as train_module  # noqa: E402

logger = get_logger(__name__)

_SETTINGS = {"model": ModelSource, "quant": QuantConfig, "lora": LoraSettings, "train": TrainConfig}


def write_job(job_dir: Path, train_ds: Dataset, eval_ds: Dataset, base_id: str, **settings) -> None:
    """Everything one rank needs, as files: the two datasets and the settings as JSON."""
    train_ds.save_to_disk(str(job_dir / "train_dataset"))
    eval_ds.save_to_disk(str(job_dir / "eval_dataset"))
    spec = {name: settings[name].model_dump(mode="json") for name in _SETTINGS}
    (job_dir / "job.json").write_text(json.dumps({**spec, "base_id": base_id}))


def run_rank(job_dir: str) -> None:
    """One process's share of training; the main process (rank 0) writes `adapter/` and `metrics.json`."""
    import torch.distributed as dist

    # torchrun's RANK, not accelerate's state: on CPU (gloo, as in the tests) accelerate's first
    # state reads one process, and only the trainer sets up the process group.
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():  # one GPU per process: the 4-bit base loads onto the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    job = Path(job_dir)
    spec = json.loads((job / "job.json").read_text())
    settings = {name: cls.model_validate(spec[name]) for name, cls in _SETTINGS.items()}
    train_module.quiet_libraries()
    # Each rank saves its own copy of the (identical, DDP-synchronised) adapter: no two writers on one folder.
    out = job / ("adapter" if rank == 0 else f"adapter-rank{rank}")
    adapter, metrics = train_module.train_adapter(
        load_from_disk(str(job / "train_dataset")),
        load_from_disk(str(job / "eval_dataset")),
        settings["model"],
        settings["quant"],
        settings["lora"],
        settings["train"],
        out,
        base_id=spec["base_id"],
    )
    if rank == 0:
        (job / "metrics.json").write_text(metrics.model_dump_json())
    # Proof of participation, checked by the step: which rank, in how large a process group, how many steps.
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    (job / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "steps": metrics.steps}))


@step
def train_ranks(job_dir: str) -> None:
    """The function `run_with_accelerate` runs in every process (see module docstring); not a pipeline step."""
    run_rank(job_dir)


def launch(job_dir: Path, num_processes: int) -> None:
    """`accelerate launch` N copies of `train_ranks` through ZenML's run_with_accelerate; wait for them."""
    from zenml.integrations.huggingface.steps import run_with_accelerate

    # run_with_accelerate replaces the step's entrypoint in place: wrap a copy, so each call wraps once.
    # multi_gpu: one process per GPU with DDP (NCCL on CUDA; gloo when there is no GPU, as in the tests).
    wrapped = run_with_accelerate(train_ranks.copy(), num_processes=num_processes, multi_gpu=True)
    # ZenML's wrapper writes its launcher script into the working directory and imports this
    # module from it: run from a scratch folder so nothing lands in the user's checkout.
    cwd = os.getcwd()
    os.chdir(job_dir)
    try:
        wrapped.entrypoint(job_dir=str(job_dir))
    finally:
        os.chdir(cwd)


# Same cache policy as steps.train: this file, the train step's module and the model loaders.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], train_module, models]))
def train_accelerated(
    train_dataset: Dataset,
    eval_dataset: Dataset,
    model: ModelSource,
    quant: QuantConfig,
    lora: LoraSettings,
    train: TrainConfig,
    base_id: str = "",
) -> tuple[Annotated[ModelFolder, "adapter"], Annotated[TrainMetrics, "train_metrics"]]:
    """steps.train.train across `train.num_processes` processes (GPUs) with DDP."""
    job = scratch_dir("accelerate-")
    write_job(job, train_dataset, eval_dataset, base_id, model=model, quant=quant, lora=lora, train=train)
    logger.info("training with accelerate across %d processes", train.num_processes)
    launch(job, train.num_processes)
    ranks = [json.loads(f.read_text()) for f in sorted(job.glob("rank-*.json"))]
    if len(ranks) != train.num_processes or any(r["world_size"] != train.num_processes for r in ranks):
        raise RuntimeError(f"expected {train.num_processes} training processes in one process group, got {ranks}")
    metrics = TrainMetrics.model_validate_json((job / "metrics.json").read_text())
    summary = metrics.model_dump(exclude={"loss_curve", "eval_curve"})
    summary["num_processes"] = train.num_processes
    logger.info("training done: %s", json.dumps(summary))
    log_metadata(metadata=summary, artifact_name="train_metrics", infer_artifact=True)
    try:  # also on the model version, when the run is linked to a ZenML Model
        log_metadata(metadata={"training": summary}, infer_model=True)
    except Exception as err:  # no model in this step's context
        logger.debug("no model version to log to: %s", err)
    return ModelFolder(job / "adapter"), metrics
