"""Preference evaluation: held-out pairs scored by base, start adapter and tuned adapter on one set of weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from core.config import GateConfig
from core.evaluation.gate import preference_checks
from core.evaluation.preference import START_ADAPTER, answer_logps, evaluate_preferences, pair_token_ids
from core.models import load_base, load_tokenizer
from core.prompts import render, with_system


def _pairs(tokenizer, n: int = 12) -> Dataset:
    rows = {"id": [], "prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        messages = with_system([{"role": "user", "content": f"What is code {i}?"}], "You answer.")
        prompt, chosen = render(
            messages + [{"role": "assistant", "content": f"Code {i} is {i * 7}."}], tokenizer, "chat"
        )
        prompt2, rejected = render(messages + [{"role": "assistant", "content": "There is a fee."}], tokenizer, "chat")
        assert prompt == prompt2
        rows["id"].append(f"p:{i}")
        rows["prompt"].append(prompt)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
    return Dataset.from_dict(rows)


def _one_by_one(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt) summed, from one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
    targets = ids[0, 1:]
    per_token = logps.gather(-1, targets[:, None])[:, 0]
    return float(per_token[len(prompt_ids) - 1 :].sum())


@pytest.fixture(scope="module")
def scored(tiny_source, two_adapters):
    from peft import PeftModel

    tuned_dir, start_dir = two_adapters
    tokenizer = load_tokenizer(tiny_source)
    pairs = _pairs(tokenizer)
    model = PeftModel.from_pretrained(load_base(tiny_source, quant=None), str(tuned_dir)).eval()
    model.load_adapter(str(start_dir), adapter_name=START_ADAPTER)
    report = evaluate_preferences(
        model,
        tokenizer,
        pairs,
        start_name="SFT adapter",
        has_start_adapter=True,
        beta=0.1,
        batch_size=5,
        resamples=200,
        seed=0,
    )
    return report, pairs, tokenizer


def test_batched_padded_logps_equal_one_pass_per_row(tiny_source):
    tokenizer = load_tokenizer(tiny_source)
    model = load_base(tiny_source, quant=None).eval()
    ids = pair_token_ids(_pairs(tokenizer, 5), tokenizer)
    sequences = [(p, c) for p, c, _ in ids] + [(p, r) for p, _, r in ids]
    batched = answer_logps(model, sequences, batch_size=4, pad_id=tokenizer.pad_token_id)
    single = [_one_by_one(model, p, a) for p, a in sequences]
    assert batched == pytest.approx(single, abs=1e-3)


def test_each_model_is_scored_on_its_own_weights(scored, tiny_source, two_adapters):
    from peft import PeftModel

    report, pairs, tokenizer = scored
    ids = pair_token_ids(pairs, tokenizer)
    tuned_dir, start_dir = two_adapters
    expected = {}
    for name, folder in (("tuned", tuned_dir), ("start", start_dir), ("base", None)):
        model = load_base(tiny_source, quant=None).eval()
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder)).eval()
        margins = np.array([_one_by_one(model, p, c) - _one_by_one(model, p, r) for p, c, r in ids])
        expected[name] = margins
    for name in ("base", "start", "tuned"):
        scores = getattr(report, name)
        assert scores.accuracy == pytest.approx(float((expected[name] > 0).mean()))
        assert scores.logp_margin == pytest.approx(float(expected[name].mean()), abs=1e-3)
        assert scores.reward_margin == pytest.approx(0.1 * float((expected[name] - expected["base"]).mean()), abs=1e-3)
    assert report.base.reward_margin == 0.0
    # the start adapter differs from the tuned one: the test would not tell them apart otherwise
    assert not np.allclose(expected["start"], expected["tuned"])


def test_intervals_bracket_the_point_estimates(scored):
    report, pairs, _ = scored
    assert report.rows == len(pairs)
    for name in ("base", "start", "tuned"):
        d = report.accuracy_intervals[name]
        assert d.low <= d.delta <= d.high
        assert d.delta == pytest.approx(getattr(report, name).accuracy)
    d = report.tuned_minus_start
    assert d.delta == pytest.approx(report.tuned.accuracy - report.start.accuracy)
    assert d.low <= d.delta <= d.high and d.resamples == 200


def test_preference_gate(scored):
    report, _, _ = scored
    better = report.model_copy(update={"tuned": report.tuned.model_copy(update={"accuracy": 0.9})})
    better = better.model_copy(update={"start": report.start.model_copy(update={"accuracy": 0.5})})
    ok, lines = preference_checks(better, GateConfig(min_preference_accuracy=0.8, max_preference_accuracy_drop=0.0))
    assert ok and len(lines) == 2 and all(line.endswith("ok") for line in lines)
    worse = better.model_copy(update={"tuned": better.tuned.model_copy(update={"accuracy": 0.45})})
    ok, lines = preference_checks(worse, GateConfig(min_preference_accuracy=None, max_preference_accuracy_drop=0.0))
    assert not ok and lines[-1].endswith("FAIL") and "SFT adapter 0.5000" in lines[-1]
    ok, lines = preference_checks(worse, GateConfig(min_preference_accuracy=0.5, max_preference_accuracy_drop=0.1))
    assert not ok and lines[0].endswith("FAIL") and lines[1].endswith("ok")
    ok, lines = preference_checks(worse, GateConfig(min_preference_accuracy=None, max_preference_accuracy_drop=None))
    assert ok and lines == []
    assert not math.isnan(report.tuned.logp_margin)
