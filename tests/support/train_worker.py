"""core.training.train_adapter (or, for train.method dpo/kto/orpo, train_preference_adapter) in a process of its own,
for the crash-and-resume tests (tests/training/test_faults_train.py, test_preference.py).

    python tests/support/train_worker.py SPEC.json

SPEC holds the model folder, the train/eval datasets (Dataset.save_to_disk folders), TrainConfig and LoraSettings
as JSON, the output folder, a preference run's start_adapter folder (optional), and two files for the test to watch:
- `progress`: one line per finished optimizer step, so the test knows how far a killed run got;
- `hold_marker`: when the run first finishes step `hold_at`, it writes this file and stops making progress
  (sleeps), so the test can SIGKILL it at a known point between checkpoints rather than race the trainer. A run
  that finds the marker already there (the rerun) does not hold: the command is the same both times.
On success it writes `metrics.json` (TrainMetrics) next to the adapter.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

from datasets import load_from_disk
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.config import LoraSettings, ModelSource, QuantConfig, TrainConfig  # noqa: E402
from core.training import train_adapter  # noqa: E402
from core.training.preference import train_preference_adapter  # noqa: E402


class ProgressAndHold(TrainerCallback):
    def __init__(self, progress: Path, hold_marker: Path, hold_at: int):
        self.progress, self.hold_marker, self.hold_at = progress, hold_marker, hold_at
        self.hold = not hold_marker.exists()

    def on_step_end(self, args, state, control, **kw):
        with open(self.progress, "a") as f:
            f.write(f"{state.global_step}\n")
        if self.hold and state.global_step == self.hold_at:
            self.hold_marker.write_text(str(state.global_step))
            while True:  # until SIGKILL
                time.sleep(60)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_dir"])
    cfg = TrainConfig.model_validate_json(spec["train"])
    train = train_adapter
    if cfg.method != "sft":
        train = functools.partial(train_preference_adapter, start_adapter=spec.get("start_adapter"))
    adapter, metrics = train(
        load_from_disk(spec["train_dir"]),
        load_from_disk(spec["eval_dir"]),
        ModelSource(source="local", name=spec["model_dir"]),
        QuantConfig(),
        LoraSettings.model_validate_json(spec["lora"]),
        cfg,
        out,
        callbacks=[ProgressAndHold(Path(spec["progress"]), Path(spec["hold_marker"]), spec["hold_at"])],
    )
    (out / "metrics.json").write_text(metrics.model_dump_json())


if __name__ == "__main__":
    main(sys.argv[1])
