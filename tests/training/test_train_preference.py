"""Preference tuning (core/training/preference.py) on the tiny model: dpo, kto and orpo learn the preferred answers;
dpo's reference is the base (from a new adapter) or the starting adapter (a frozen LoRA copy on the same base
weights); a SIGKILLed run resumes to the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_LORA
from safetensors.torch import load_file
from test_faults_train import RESUME_ATOL, WORKER, _wait_for

import core.training.preference as preference
from core.config import LoraSettings, PreferenceConfig, QuantConfig, TrainConfig
from core.reports import TrainMetrics
from core.training.checkpoints import latest_complete_checkpoint
from core.training.preference import train_preference_adapter

PAIRS = 8  # one micro-batch holds them all: every step's logged means are over the same rows
BETA = 0.1
# A few steps at a learning rate far above a real run's: the tiny model learns the pattern in seconds.
TINY_PREFERENCE = dict(max_steps=4, learning_rate=1e-2, micro_batch_size=PAIRS, beta=BETA)
TINY_STAGE = dict(save_every=4, logging_steps=1, warmup_ratio=0.0)


def _pairs(tokenizer, items: range) -> dict:
    """Pairs whose chosen answer is always the same pattern, naming the item; the rejected one never is."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Is item {i} in stock?"}], tokenize=False, add_generation_prompt=True
        )
        for i in items
    ]
    return {
        "id": [f"pairs.jsonl:{i + 1}" for i in items],
        "prompt": prompts,
        "chosen": [f"Yes, item {i} is in stock.<|im_end|>\n" for i in items],
        "rejected": [["No idea.", "Ask someone else.", "Maybe."][i % 3] + "<|im_end|>\n" for i in items],
    }


@pytest.fixture(scope="module")
def pairs(tiny_source):
    """(train, held-out) pairs in trl's standard format, rendered with the tiny model's chat template."""
    from datasets import Dataset

    from core.models import load_tokenizer

    tok = load_tokenizer(tiny_source)
    return Dataset.from_dict(_pairs(tok, range(PAIRS))), Dataset.from_dict(_pairs(tok, range(PAIRS, PAIRS + 2)))


def _unpaired(ds):
    """kto's rows: each pair as a desirable and an undesirable completion."""
    from datasets import Dataset

    rows = {"id": [], "prompt": [], "completion": [], "label": []}
    for row in ds:
        for answer, label in ((row["chosen"], True), (row["rejected"], False)):
            rows["id"].append(f"{row['id']}:{'chosen' if label else 'rejected'}")
            rows["prompt"].append(row["prompt"])
            rows["completion"].append(answer)
            rows["label"].append(label)
    return Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def start_adapter(tmp_path_factory, tiny_source) -> Path:
    """A stand-in for the SFT stage's adapter, built not trained: random non-zero LoRA weights (TINY_LORA's shape),
    so the model it makes differs from the base."""
    from peft import get_peft_model

    from core.models import load_base
    from core.training.trainer import lora_config

    torch.manual_seed(3)
    config = lora_config(LoraSettings(**TINY_LORA))
    config.init_lora_weights = False
    model = get_peft_model(load_base(tiny_source, quant=None), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.3)  # a nudge, not noise that drowns the model
    out = tmp_path_factory.mktemp("start") / "adapter"
    model.save_pretrained(out, save_embedding_layers=False)
    return out


def answer_logps(source, adapter: Path | None, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(chosen), log p(rejected) of each pair, summed over the answer's tokens (cut after its last eos, as
    training sees it), under the 4-bit base (+ adapter): the model as training builds it, loaded afresh."""
    from peft import PeftModel

    from core.models import load_base, load_tokenizer
    from core.training.trainer import keep_4bit_differentiable

    tok = load_tokenizer(source)
    model = load_base(source, QuantConfig())
    keep_4bit_differentiable(model)  # the numerics of training, not of bitsandbytes' CPU inference path
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    rows = preference.answers_end_at_eos(rows, tok)
    sums = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            for key in sums:
                ids = tok(row["prompt"] + row[key])["input_ids"]
                assert ids[: len(prompt)] == prompt
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
                targets = torch.tensor(ids[1:])
                sums[key].append(logps.gather(-1, targets[:, None])[len(prompt) - 1 :].sum().item())
    return torch.tensor(sums["chosen"]), torch.tensor(sums["rejected"])


@dataclass
class Run:
    root: Path
    adapter: Path
    metrics: TrainMetrics
    trainer: object  # the trainer that trained (spied on), for what it holds


def _train(root: Path, tiny_source, train, held_out, method: str, start: Path | None = None, **stage) -> Run:
    """A TINY_PREFERENCE run with checkpoints in root/ckpt and its adapter in root/adapter; `stage`: train settings
    other than TINY_STAGE's."""
    cfg = TrainConfig(
        **{**TINY_STAGE, **stage},
        method=method,
        preference=PreferenceConfig(**TINY_PREFERENCE),
        checkpoint_dir=str(root / "ckpt"),
    )
    trainers = []
    settle = preference.settle_trainer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preference, "settle_trainer", lambda trainer, *a: trainers.append(trainer) or settle(trainer, *a))
        adapter, metrics = train_preference_adapter(
            train, held_out, tiny_source, QuantConfig(), LoraSettings(**TINY_LORA), cfg, root / "adapter", start
        )
    return Run(root, adapter.path, metrics, trainers[-1])


@pytest.fixture(scope="module")
def dpo_from_base(tmp_path_factory, tiny_source, pairs):
    return _train(tmp_path_factory.mktemp("dpo-base"), tiny_source, *pairs, "dpo")


@pytest.fixture(scope="module")
def dpo_from_adapter(tmp_path_factory, tiny_source, pairs, start_adapter):
    return _train(tmp_path_factory.mktemp("dpo-adapter"), tiny_source, *pairs, "dpo", start_adapter)


@pytest.fixture(scope="module")
def base_logps(tiny_source, pairs):
    return answer_logps(tiny_source, None, pairs[0])


def _assert_learned(run: Run, source, rows, start_logps) -> None:
    """The loss fell, and the margin log p(chosen) - log p(rejected) rose on every training pair."""
    losses = [loss for _, loss in run.metrics.loss_curve]
    assert run.metrics.steps == TINY_PREFERENCE["max_steps"] and len(losses) == run.metrics.steps
    assert losses[-1] < losses[0], losses
    chosen, rejected = answer_logps(source, run.adapter, rows)
    before, after = start_logps[0] - start_logps[1], chosen - rejected
    assert (after > before).all(), (before, after)


def _implied_reference(run: Run) -> list[tuple[float, float]]:
    """The reference's mean log p(chosen), log p(rejected) over the pairs at every logged step, as trl computed it
    during training: its reward is beta x (policy - reference), and it logs both the reward and the policy's."""
    logs = [e for e in run.trainer.state.log_history if "rewards/chosen" in e and "loss" in e]
    assert len(logs) == run.metrics.steps
    return [tuple(e[f"logps/{k}"] - e[f"rewards/{k}"] / BETA for k in ("chosen", "rejected")) for e in logs]


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo"])
def test_each_method_learns_the_preferred_answers(
    method, tmp_path_factory, tiny_source, pairs, base_logps, dpo_from_base
):
    train, held_out = pairs
    if method == "dpo":
        run = dpo_from_base
    elif method == "kto":
        run = _train(tmp_path_factory.mktemp("kto"), tiny_source, _unpaired(train), _unpaired(held_out), "kto")
    else:
        run = _train(tmp_path_factory.mktemp("orpo"), tiny_source, train, held_out, "orpo")
    _assert_learned(run, tiny_source, train, base_logps)
    m = run.metrics
    assert m.method == method and m.train_tokens > 0 and m.tokens_per_s > 0 and m.final_eval_loss is not None
    assert m.reward_margin is not None and m.reward_margin > 0
    assert (m.reward_accuracy is None) == (method == "kto")  # kto logs no accuracy
    assert f"Preference training ({method})" in m.to_html()
    assert TrainMetrics.model_validate_json(m.model_dump_json()) == m


def test_dpo_from_a_new_adapter_is_held_to_the_base(dpo_from_base, base_logps):
    """trl disables the adapter for the reference: at every step its log-probs are the base model's."""
    run = dpo_from_base
    assert "ref" not in run.trainer.model.peft_config and run.trainer.ref_model is None
    # trl trains each answer through its end of turn once: "<|im_end|>\n" would have become "<|im_end|>\n<|im_end|>"
    eos = run.trainer.processing_class.eos_token_id
    for row in run.trainer.train_dataset:
        for answer in (row["chosen_ids"], row["rejected_ids"]):
            assert answer[-1] == eos and answer.count(eos) == 1
    expected = (base_logps[0].mean().item(), base_logps[1].mean().item())
    for step, implied in enumerate(_implied_reference(run), start=1):
        assert implied == pytest.approx(expected, rel=1e-5), f"step {step}"


def test_dpo_from_an_adapter_is_held_to_that_adapter_with_one_copy_of_the_base(
    dpo_from_adapter, start_adapter, tiny_source, pairs
):
    run = dpo_from_adapter
    start = answer_logps(tiny_source, start_adapter, pairs[0])
    _assert_learned(run, tiny_source, pairs[0], start)
    # the reference trl used at every step is the starting adapter, though the adapter trained moved away from it
    expected = (start[0].mean().item(), start[1].mean().item())
    for step, implied in enumerate(_implied_reference(run), start=1):
        assert implied == pytest.approx(expected, rel=1e-5), f"step {step}"
    # ... held as a frozen copy of the starting LoRA weights on the same base weights: no reference model
    model, trainer = run.trainer.model, run.trainer
    assert trainer.ref_model is None and set(model.peft_config) == {"default", "ref"}
    saved_start = load_file(start_adapter / "adapter_model.safetensors")
    ref = _reference_weights(run)
    assert ref and not any(p.requires_grad for _, p in ref)
    assert all(torch.equal(p.cpu(), saved_start[_saved_name(n, "ref")]) for n, p in ref)
    import bitsandbytes as bnb

    from core.models import load_base

    fresh = load_base(tiny_source, QuantConfig())
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base_params == sum(p.numel() for p in fresh.parameters())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == sum(
        isinstance(m, bnb.nn.Linear4bit) for m in fresh.modules()
    )
    # what ships is the trained adapter alone, named after the base like SFT's
    assert sorted(p.name for p in run.adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    shipped = load_file(run.adapter / "adapter_model.safetensors")
    assert shipped.keys() == saved_start.keys()
    assert any(not torch.equal(shipped[k], saved_start[k]) for k in shipped)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_source.name


def _reference_weights(run: Run) -> list[tuple[str, torch.Tensor]]:
    """The LoRA weights of trl's reference adapter in the trained model."""
    return [(n, p) for n, p in run.trainer.model.named_parameters() if ".ref." in n]


def _saved_name(param_name: str, adapter: str) -> str:
    """The key peft saves a LoRA weight under: the adapter's name dropped."""
    return param_name.replace(f".{adapter}.", ".")


def test_a_finished_preference_training_rerun_trains_nothing_more(dpo_from_base, tiny_source, pairs):
    """As SFT's: the rerun of a training that ran to its end takes its last checkpoint, without another step."""
    first = load_file(dpo_from_base.adapter / "adapter_model.safetensors")
    rerun = _train(dpo_from_base.root, tiny_source, *pairs, "dpo")
    assert rerun.metrics.resumed_from_step == rerun.metrics.steps == TINY_PREFERENCE["max_steps"]
    assert rerun.metrics.loss_curve == []
    again = load_file(rerun.adapter / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert rerun.metrics.reward_accuracy == dpo_from_base.metrics.reward_accuracy  # from the restored trainer state


def test_the_checkpoint_folder_covers_the_method_its_settings_the_rows_and_the_start_adapter(
    tmp_path, tiny_source, pairs, start_adapter
):
    import shutil

    from safetensors.torch import save_file

    from core.models import resolve_base
    from core.training.checkpoints import checkpoint_folder

    base, lora = resolve_base(tiny_source), LoraSettings(**TINY_LORA)
    nudged = tmp_path / "nudged"
    shutil.copytree(start_adapter, nudged)
    weights = load_file(nudged / "adapter_model.safetensors")
    next(iter(weights.values()))[0, 0] += 1e-3
    save_file(weights, nudged / "adapter_model.safetensors")

    def key(method="dpo", rows=pairs, start=start_adapter, train=None, **settings) -> str:
        pref = PreferenceConfig(**settings)
        cfg = TrainConfig(**(train or {}), method=method, preference=pref)
        return checkpoint_folder(*rows, base, QuantConfig(), lora, cfg, start_adapter=start).name

    different = [key(), key(method="orpo"), key(beta=0.2), key(loss_type="ipo"), key(learning_rate=1e-4),
                 key(max_steps=3), key(micro_batch_size=2), key(max_length=128), key(start=None), key(start=nudged),
                 key(rows=(pairs[0].select(range(PAIRS - 1)), pairs[1])), key(train={"optim": "sgd"})]  # fmt: skip
    assert len(set(different)) == len(different)
    # where the rows and the start adapter come from is keyed by their contents, not their names
    assert key(data={"path": "elsewhere.jsonl", "format": "pairs"}, start_from=3) == key()
    assert key(train={"logging_steps": 1, "checkpoint_dir": str(tmp_path)}) == key()


def test_preference_errors_come_before_loading_anything(tmp_path, tiny_source, pairs, monkeypatch):
    monkeypatch.setattr(preference, "setup_model", lambda *a, **k: pytest.fail("loaded a model"))
    train, held_out = pairs
    lora = LoraSettings(**TINY_LORA)

    def run(method, rows=pairs, **settings):
        cfg = TrainConfig(method=method, preference=PreferenceConfig(**settings), checkpoint_dir=str(tmp_path))
        train_preference_adapter(*rows, tiny_source, QuantConfig(), lora, cfg, tmp_path / "a")

    with pytest.raises(ValueError, match="kto trains on rows with columns prompt, completion, label; the training rows "
                       "lack completion, label"):  # fmt: skip
        run("kto", micro_batch_size=2)
    with pytest.raises(ValueError, match="loss_type 'sigmoid' is not one of kto's losses: kto, apo_zero_unpaired"):
        run("kto", rows=(_unpaired(train), _unpaired(held_out)), loss_type="sigmoid")
    with pytest.raises(ValueError, match="orpo has one loss: leave train.preference.loss_type null"):
        run("orpo", loss_type="ipo")
    with pytest.raises(ValueError, match="sft trains with train_adapter"):
        train_preference_adapter(train, held_out, tiny_source, QuantConfig(), lora, TrainConfig(), tmp_path / "a")


@pytest.mark.long  # ~30 s: make test-integration
def test_sigkilled_dpo_from_an_adapter_resumes_to_the_same_adapter(
    tmp_path, tiny_model_dir, tiny_source, pairs, start_adapter, dpo_from_adapter
):
    """Killed between checkpoints, rerun: it resumes the trained adapter from the checkpoint and rebuilds the reference
    from the starting adapter, ending where the uninterrupted run (dpo_from_adapter: the same settings but for
    save_every) did."""
    train, held_out = pairs
    train.save_to_disk(tmp_path / "train")
    held_out.save_to_disk(tmp_path / "eval")
    save_every, hold_at = 2, 3  # killed after step 3: one step past checkpoint-2
    cfg = TrainConfig(
        **{**TINY_STAGE, "save_every": save_every},
        method="dpo",
        preference=PreferenceConfig(**TINY_PREFERENCE),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    spec = {
        "model_dir": str(tiny_model_dir),
        "train_dir": str(tmp_path / "train"),
        "eval_dir": str(tmp_path / "eval"),
        "train": cfg.model_dump_json(),
        "lora": LoraSettings(**TINY_LORA).model_dump_json(),
        "start_adapter": str(start_adapter),
        "out_dir": str(tmp_path / "adapter"),
        "progress": str(tmp_path / "progress.txt"),
        "hold_marker": str(tmp_path / "hold"),
        "hold_at": hold_at,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, str(WORKER), str(tmp_path / "spec.json")]
    # cwd: away from the repo, so ZenML (imported by steps.train) does not touch the repo's .zen/ settings
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("the hold point", (tmp_path / "hold").exists, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    checkpoint = latest_complete_checkpoint(run_dir)
    assert checkpoint.name == "checkpoint-2"
    assert not (checkpoint / "ref").exists()  # checkpoints hold the trained adapter only, as SFT's

    # The rerun in this process (the kill needed one of its own, the resume does not): a second worker's start-up
    # would double the test's time.
    rerun = _train(tmp_path, tiny_source, *pairs, "dpo", start_adapter, save_every=save_every)
    assert rerun.metrics.resumed_from_step == 2 and rerun.metrics.steps == cfg.preference.max_steps
    assert rerun.metrics.loss_curve[0][0] == 3  # only the remaining steps ran again
    saved_start = load_file(start_adapter / "adapter_model.safetensors")
    assert all(torch.equal(p.cpu(), saved_start[_saved_name(n, "ref")]) for n, p in _reference_weights(rerun))
    resumed = load_file(rerun.adapter / "adapter_model.safetensors")
    expected = load_file(dpo_from_adapter.adapter / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    diffs = {k: (resumed[k] - expected[k]).abs().max().item() for k in expected}
    assert max(diffs.values()) <= RESUME_ATOL, diffs
