import json
import os

import pytest
import torch
from conftest import TINY_LORA, TINY_TRAIN
from safetensors.torch import load_file
from transformers import TrainerCallback

from core.config import LoraSettings, QuantConfig, TrainConfig
from core.training import train_adapter
from core.training.checkpoints import latest_complete_checkpoint


def test_training_loss_goes_down(trained_adapter):
    _, metrics, _ = trained_adapter
    losses = [loss for _, loss in metrics.loss_curve]
    assert metrics.steps == TINY_TRAIN["max_steps"]
    assert losses[-1] < losses[0] - 0.1, losses
    assert metrics.train_tokens > 0 and metrics.tokens_per_s > 0 and metrics.peak_mem_bytes > 0
    assert metrics.final_eval_loss is not None
    assert 0 < metrics.trainable_params < metrics.total_params


def test_lora_weights_train_in_the_compute_dtype(trained_adapter):
    # trl would leave a quantized model's LoRA weights in bf16: ~20x slower on CPU than fp32
    _, metrics, snaps = trained_adapter
    assert metrics.compute_dtype == "float32"
    assert snaps["trainable_dtypes"] == {torch.float32}


def test_lora_weights_change_and_base_weights_do_not(trained_adapter):
    adapter, _, snaps = trained_adapter
    begin, end = snaps["begin"], snaps["end"]
    lora = [n for n in begin if "lora_" in n]
    base = [n for n in begin if "lora_" not in n]
    assert lora and base
    changed = [n for n in lora if not torch.equal(begin[n], end[n])]
    assert len(changed) == len(lora), set(lora) - set(changed)
    for n in base:
        assert torch.equal(begin[n], end[n]), f"base weight {n} changed"
    saved = load_file(adapter.path / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def test_interrupted_run_resumes_from_newest_complete_checkpoint(tmp_path, tiny_source, tiny_splits):
    train, held_out = tiny_splits
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 6, "save_every": 2}, checkpoint_dir=str(tmp_path / "ckpt"))
    args = (train, held_out, tiny_source, QuantConfig(), LoraSettings(**TINY_LORA), cfg)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(*args, tmp_path / "a1", callbacks=[CrashAt(5)])
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert latest_complete_checkpoint(run_dir).name == "checkpoint-4"
    # a crash while writing checkpoint-6 left only the adapter file behind
    partial = run_dir / "checkpoint-6"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"")
    assert latest_complete_checkpoint(run_dir).name == "checkpoint-4"
    _, metrics = train_adapter(*args, tmp_path / "a2")
    assert metrics.resumed_from_step == 4
    assert metrics.steps == 6
    assert [s for s, _ in metrics.loss_curve][0] > 4  # only the remaining steps ran


def test_checkpoint_saves_never_look_up_the_hub(tmp_path, tiny_source, tiny_splits, monkeypatch):
    """A base recorded under a Hub name (as the bundled model is) must not make every checkpoint save ask the Hub."""
    import peft.utils.other

    from core import models

    lookups = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # as on a user's machine
    monkeypatch.setattr(peft.utils.other, "file_exists", lambda *a, **kw: lookups.append(a))
    monkeypatch.setattr(models, "display_name", lambda src: "some-org/not-on-this-machine")
    train, held_out = tiny_splits
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 2, "save_every": 1}, checkpoint_dir=str(tmp_path / "ckpt"))
    train_adapter(train, held_out, tiny_source, QuantConfig(), LoraSettings(**TINY_LORA), cfg, tmp_path / "a")
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert latest_complete_checkpoint(run_dir).name == "checkpoint-2"
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "some-org/not-on-this-machine"
    )
    assert lookups == []
    assert "HF_HUB_OFFLINE" not in os.environ  # training does not switch the process offline


def test_keep_best_ships_the_lowest_eval_loss_checkpoint_and_early_stopping_ends_the_run(
    tmp_path, tiny_source, tiny_splits
):
    """A learning rate far too high: the eval loss turns up after a step or two; patience 1 stops the run, and the
    adapter shipped is the checkpoint of the step with the lowest eval loss, not the last one."""
    from conftest import qa_rows
    from datasets import Dataset

    from core.data.formatting import tokenize_example
    from core.models import load_tokenizer

    train, _ = tiny_splits
    # held-out rows that contradict the training answers: the better the model learns them, the worse these score
    tok = load_tokenizer(tiny_source)
    rows = [tokenize_example([m[0], {"role": "assistant", "content": "No idea, sorry."}], tok, "chat")
            for m in qa_rows(8)["messages"]]  # fmt: skip
    contradicting = Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    cfg = TrainConfig(**{**TINY_TRAIN, "learning_rate": 0.05, "max_steps": 12, "save_every": 1, "save_total_limit": 20},
                      eval_every=1, early_stopping_patience=2, checkpoint_dir=str(tmp_path / "ckpt"))  # fmt: skip
    adapter, metrics = train_adapter(
        train, contradicting, tiny_source, QuantConfig(), LoraSettings(**TINY_LORA), cfg, tmp_path / "adapter"
    )
    curve = dict(metrics.eval_curve)
    best = min(curve, key=curve.get)
    assert metrics.best_step == best and metrics.final_eval_loss == pytest.approx(curve[best], rel=1e-4)
    assert metrics.stopped_early and metrics.steps < 12 and metrics.steps == best + 2  # two evals without a new low
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    shipped = load_file(adapter.path / "adapter_model.safetensors")
    at_best = load_file(run_dir / f"checkpoint-{best}" / "adapter_model.safetensors")
    at_last = load_file(run_dir / f"checkpoint-{metrics.steps}" / "adapter_model.safetensors")
    assert shipped.keys() == at_best.keys()
    assert all(torch.equal(shipped[k], at_best[k]) for k in shipped)
    assert any(not torch.equal(shipped[k], at_last[k]) for k in shipped)
    assert f"the checkpoint of step {best} (lowest eval loss)" in metrics.to_html()
