"""Preference evaluation: on held-out pairs, how often a model ranks the chosen answer above the rejected one.

Each model scores a pair by the summed log-likelihood of each answer's tokens given the prompt (the quantity DPO
trains). Preference accuracy is the share of pairs where chosen scores higher; the reward margin is DPO's implicit
reward, beta * ((log pi(chosen) - log pi_base(chosen)) - (log pi(rejected) - log pi_base(rejected))), measured
against the base for every model, so base, the adapter the stage started from and the tuned adapter sit on one
scale (the base's margin is 0 by definition). Intervals are 95% percentile bootstraps over the pairs, paired for
differences (seeded, like core.evaluation.scoring's).

The three models are one set of weights: the base with its adapters disabled, the start adapter and the tuned
adapter loaded next to each other on it (peft's set_adapter), so no second base is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from core.evaluation.scoring import bootstrap, by_length
from core.reports import Difference, PreferenceEval, PreferenceScores

START_ADAPTER = "start"  # the peft adapter name of the start adapter while scoring


@dataclass(frozen=True)
class PairRows:
    """Each held-out pair's summed answer log-likelihoods under one model: chosen[i], rejected[i] (nats)."""

    chosen: np.ndarray
    rejected: np.ndarray

    @property
    def margins(self) -> np.ndarray:
        return self.chosen - self.rejected


def pair_token_ids(pairs: Dataset, tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) per pair, tokenized as SFT rows are: the prompt in one piece with the
    template's own special tokens, each answer after it without any."""
    out = []
    for row in pairs:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        rejected = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]
        out.append((prompt, chosen, rejected))
    return out


@torch.no_grad()
def answer_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[float]:
    """Summed log p(answer | prompt) for each (prompt ids, answer ids), batched by length, right-padded."""
    device = next(model.parameters()).device

    def run(batch: list[int]) -> list[float]:
        rows = [sequences[i][0] + sequences[i][1] for i in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
        out = []
        for j, i in enumerate(batch):
            start, end = len(sequences[i][0]), len(rows[j])  # answer tokens are predicted from position start-1
            out.append(float(logps[j, start - 1 : end - 1].sum()))
        return out

    lengths = [len(p) + len(a) for p, a in sequences]
    return by_length(lengths, batch_size, run)


def score_pairs(model, token_ids, batch_size: int, pad_id: int) -> PairRows:
    """One model's PairRows on the tokenized pairs."""
    chosen = answer_logps(model, [(p, c) for p, c, _ in token_ids], batch_size, pad_id)
    rejected = answer_logps(model, [(p, r) for p, _, r in token_ids], batch_size, pad_id)
    return PairRows(np.array(chosen), np.array(rejected))


def preference_scores(rows: PairRows, base: PairRows, beta: float) -> PreferenceScores:
    """Accuracy, mean log-likelihood margin and mean reward margin vs the base of one model's rows."""
    return PreferenceScores(
        accuracy=float((rows.margins > 0).mean()),
        logp_margin=float(rows.margins.mean()),
        reward_margin=float(beta * (rows.margins - base.margins).mean()),
    )


def _interval(statistic: Callable[[np.ndarray], float], rows: int, resamples: int, seed: int) -> Difference:
    """statistic over every pair, with its 95% interval from `resamples` bootstrap resamples (seeded per statistic)."""
    return bootstrap(statistic, rows, resamples, np.random.default_rng(seed))


def evaluate_preferences(
    peft_model,
    tokenizer,
    pairs: Dataset,
    *,
    start_name: str,
    has_start_adapter: bool,
    beta: float,
    batch_size: int,
    resamples: int,
    seed: int,
) -> PreferenceEval:
    """Base, start and tuned scores on the held-out `pairs`, and tuned - start / tuned - base accuracy with
    intervals. `peft_model` holds the tuned adapter as "default" and, with `has_start_adapter`, the start adapter
    as START_ADAPTER; it is left with "default" active."""
    token_ids = pair_token_ids(pairs, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with peft_model.disable_adapter():
        base = score_pairs(peft_model, token_ids, batch_size, pad)
    if has_start_adapter:
        peft_model.set_adapter(START_ADAPTER)
        start = score_pairs(peft_model, token_ids, batch_size, pad)
    else:
        start = base
    peft_model.set_adapter("default")
    tuned = score_pairs(peft_model, token_ids, batch_size, pad)
    n = len(token_ids)
    wins = {
        name: (rows.margins > 0).astype(float) for name, rows in (("base", base), ("start", start), ("tuned", tuned))
    }
    return PreferenceEval(
        rows=n,
        beta=beta,
        start_name=start_name,
        base=preference_scores(base, base, beta),
        start=preference_scores(start, base, beta),
        tuned=preference_scores(tuned, base, beta),
        accuracy_intervals={
            name: _interval(lambda i, w=w: float(w[i].mean()), n, resamples, seed) for name, w in wins.items()
        },
        tuned_minus_start=_interval(lambda i: float((wins["tuned"][i] - wins["start"][i]).mean()), n, resamples, seed),
        tuned_minus_base=_interval(lambda i: float((wins["tuned"][i] - wins["base"][i]).mean()), n, resamples, seed),
    )
