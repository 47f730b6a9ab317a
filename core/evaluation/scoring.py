"""Evaluation: the fine-tuned model against the base on the same held-out split.

Both models are the unquantized base in the compute dtype, without and then
with the adapter merged in: that is what the FP16 merge ships. Scores:

- mean cross-entropy per response token (nats) and perplexity, over every eval row;
- greedy answers on the first `evaluate.num_generate` rows, scored by ROUGE-L F1
  (the `rouge_score` package), exact match against the reference and BLEU (sacrebleu);
- the same on the general-ability probe set (`evaluate.general`, every row generated):
  what the fine-tuned model may have forgotten;
- for a preference run, preference accuracy and reward margins on held-out pairs for the base, the adapter the
  stage started from and the tuned one (core/evaluation/preference.py).

The quality gate compares the candidate with the base, and with the model
version currently at `gate.compare_with_stage` when one exists and was scored
on the same eval data. A failed gate stops the pipeline at merge (or only
warns, by config); the report is kept either way.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from datasets import Dataset

from core import models
from core.artifacts import ModelFolder, dataset_content_hash
from core.config import EvalConfig, ModelSource
from core.evaluation.gate import apply_gate
from core.models import BaseModelRef
from core.prompts import IGNORE
from core.reports import Difference, EvalReport, ModelScores, PreferenceEval, Sample
from core.tensors import pad

T = TypeVar("T")


def by_length(lengths: list[int], batch_size: int, run: Callable[[list[int]], list[T]]) -> list[T]:
    """`run(rows)` on batches of up to `batch_size` row indices, longest rows first, its results put back in row
    order: rows of like length share a batch, so little of each forward pass is padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list = [None] * len(lengths)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, result in zip(rows, run(rows), strict=True):
            out[i] = result
    return out


@torch.no_grad()
def row_losses(model, ds: Dataset, batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(summed cross-entropy in nats, response tokens) of each row: response tokens only (labels != -100).

    Only the positions that predict a response token go through the LM head (transformers' `logits_to_keep`
    mask): for SmolLM2 the head is a fifth of the matmuls and its fp32 logits the largest tensor of the pass,
    and most positions are prompt. A model without that mask gets every position's logits, the same losses.
    """
    device = next(model.parameters()).device

    def losses(rows: list[int]) -> list[tuple[float, int]]:
        batch = ds.select(rows)
        ids = pad(batch["input_ids"], pad_id, left=False).to(device)
        labels = pad(batch["labels"], IGNORE, left=False).to(device)
        mask = pad([[1] * len(x) for x in batch["input_ids"]], 0, left=False).to(device)
        # position t predicts token t + 1: keep t where that token is a response token
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE
        targets = labels[:, 1:][keep[:, :-1]]
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        if logits.shape[:-1] != targets.shape:  # no mask support: every position came back
            logits = logits[keep]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
        sums.index_add_(0, keep.nonzero()[:, 0], loss.double())
        return list(zip(sums.tolist(), keep.sum(dim=1).tolist()))

    return by_length([len(x) for x in ds["input_ids"]], batch_size, losses)


def mean_loss(rows: list[tuple[float, int]]) -> float:
    """Token-weighted mean of row_losses' (summed loss, tokens) pairs, nats per token."""
    return sum(n for n, _ in rows) / max(sum(c for _, c in rows), 1)


def response_loss(model, ds: Dataset, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy over response tokens only (labels != -100), in nats per token."""
    return mean_loss(row_losses(model, ds, batch_size, pad_id))


def generate_answers(model, tokenizer, ds: Dataset, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to each row's prompt (the tokens before its response), in row order."""
    return [text for text, _finished in generate_finished(model, tokenizer, ds, max_new_tokens, batch_size)]


@torch.no_grad()
def generate_finished(model, tokenizer, ds: Dataset, max_new_tokens: int, batch_size: int) -> list[tuple[str, bool]]:
    """Greedy answers to each row's prompt, in row order, each with whether it ended (an end-of-turn token) within
    max_new_tokens.

    Prompts of like length are batched together (less left padding). On CPU a generate call's time is mostly
    per-token overhead, so larger batches are faster: measured in docs/performance.md."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stops = {tokenizer.eos_token_id, pad_id}  # a row that ended early is padded after its end

    def answer(rows: list[int]) -> list[tuple[str, bool]]:
        batch = ds.select(rows)
        prompts = [ids[:n] for ids, n in zip(batch["input_ids"], batch["prompt_len"])]
        ids = pad(prompts, pad_id, left=True).to(device)  # left padding: every row continues at the end
        mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = [row[ids.shape[1] :] for row in out]
        return [
            (tokenizer.decode(row, skip_special_tokens=True).strip(), any(int(t) in stops for t in row)) for row in new
        ]

    return by_length(list(ds["prompt_len"]), batch_size, answer)


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def row_scores(answers: list[str], references: list[str]) -> list[tuple[float, bool]]:
    """(ROUGE-L F1, exact match) of each answer against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        (scorer.score(ref, ans)["rougeL"].fmeasure, normalize(ans) == normalize(ref))
        for ans, ref in zip(answers, references)
    ]


def text_scores(answers: list[str], references: list[str]) -> tuple[float, float]:
    """(mean ROUGE-L F1, exact-match rate) of answers against references."""
    rows = row_scores(answers, references)
    if not rows:
        return 0.0, 0.0
    return sum(r for r, _ in rows) / len(rows), sum(e for _, e in rows) / len(rows)


def bleu(answers: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 4-grams, 13a tokenization), 0..100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(answers, [references]).score) if answers else 0.0


def score_model(model, tokenizer, ds: Dataset, cfg: EvalConfig) -> tuple[ModelScores, list[str], list]:
    """The model's scores on `ds`, its greedy answers, and each row's (summed loss, tokens) for the bootstrap."""
    losses = row_losses(model, ds, cfg.batch_size, tokenizer.pad_token_id)
    loss = mean_loss(losses)
    sample = ds.select(range(min(cfg.num_generate, len(ds))))
    answers = generate_answers(model, tokenizer, sample, cfg.max_new_tokens, cfg.generate_batch_size)
    references = [m[-1]["content"] for m in sample["messages"]]
    rouge, exact = text_scores(answers, references)
    scores = ModelScores(
        loss=loss, perplexity=math.exp(min(loss, 50)), rouge_l=rouge, exact_match=exact, bleu=bleu(answers, references)
    )
    return scores, answers, losses


def paired_bootstrap(
    base_losses: list[tuple[float, int]],
    tuned_losses: list[tuple[float, int]],
    base_rows: list[tuple[float, bool]],
    tuned_rows: list[tuple[float, bool]],
    resamples: int,
    seed: int,
) -> dict[str, Difference]:
    """Fine-tuned minus base for loss (all rows, token-weighted), ROUGE-L and exact match (generated rows), each
    with a 95% percentile interval from `resamples` paired bootstrap resamples of the rows (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b_nll, b_n = np.array([x for x, _ in base_losses]), np.array([n for _, n in base_losses])
    t_nll, t_n = np.array([x for x, _ in tuned_losses]), np.array([n for _, n in tuned_losses])
    metrics = {
        "loss": (
            len(base_losses),
            lambda i: t_nll[i].sum() / max(t_n[i].sum(), 1) - b_nll[i].sum() / max(b_n[i].sum(), 1),
        ),
    }
    if base_rows:
        b_r, t_r = np.array([r for r, _ in base_rows]), np.array([r for r, _ in tuned_rows])
        b_e, t_e = np.array([e for _, e in base_rows], float), np.array([e for _, e in tuned_rows], float)
        metrics["rouge_l"] = (len(base_rows), lambda i: t_r[i].mean() - b_r[i].mean())
        metrics["exact_match"] = (len(base_rows), lambda i: t_e[i].mean() - b_e[i].mean())
    return {name: bootstrap(diff, rows, resamples, rng) for name, (rows, diff) in metrics.items()}


def bootstrap(statistic: Callable, rows: int, resamples: int, rng) -> Difference:
    """statistic(row indices) over every row, with its 95% percentile interval from `resamples` resamples of the
    rows drawn from `rng` (NaN bounds without resamples)."""
    import numpy as np

    draws = np.array([statistic(rng.integers(0, rows, rows)) for _ in range(resamples)])
    low, high = np.percentile(draws, [2.5, 97.5]) if resamples else (float("nan"), float("nan"))
    return Difference(
        delta=float(statistic(np.arange(rows))), low=float(low), high=float(high), rows=rows, resamples=resamples
    )


def _samples(ds: Dataset, base_answers: list[str], tuned_answers: list[str]):
    """Side-by-side Samples of the generated rows, and each side's (ROUGE-L, exact) rows for the bootstrap."""
    generated = ds.select(range(len(tuned_answers)))
    expected = [m[-1]["content"] for m in generated["messages"]]
    base_rows, tuned_rows = row_scores(base_answers, expected), row_scores(tuned_answers, expected)
    samples = [
        Sample(
            id=row["id"],
            prompt=row["messages"][-2]["content"] if len(row["messages"]) > 1 else "",
            reference=ref,
            base_answer=b,
            tuned_answer=t,
            base_rouge_l=b_rouge,
            tuned_rouge_l=t_rouge,
            base_exact=b_exact,
            tuned_exact=t_exact,
        )
        for row, ref, b, t, (b_rouge, b_exact), (t_rouge, t_exact) in zip(
            generated, expected, base_answers, tuned_answers, base_rows, tuned_rows
        )
    ]
    return samples, base_rows, tuned_rows


@dataclass(frozen=True)
class PreferenceInputs:
    """What a preference run's evaluation adds: held-out pairs, the adapter the stage started from (None: the
    base) and its name in the report, and the method's beta for the reward margin."""

    pairs: Dataset
    start_adapter: ModelFolder | None
    start_name: str
    beta: float


def evaluate_adapter(
    adapter: ModelFolder,
    eval_ds: Dataset,
    model: ModelSource | BaseModelRef,
    cfg: EvalConfig,
    stage_reference: tuple[str, ModelScores] | None = None,
    general_ds: Dataset | None = None,
    preference: PreferenceInputs | None = None,
) -> EvalReport:
    """Base and fine-tuned scores on `eval_ds` (and on the general-ability probe `general_ds`: every row's loss and
    greedy answer; and, for a preference run, on its held-out pairs), and the gate against the base (and
    `stage_reference`)."""
    from peft import PeftModel

    tokenizer = models.load_tokenizer(model)
    base = models.load_base(model, quant=None).eval()
    # The probe's answers are short: every row generated, with its own (smaller) token budget.
    probe_cfg = cfg.model_copy(
        update={"num_generate": len(general_ds or []), "max_new_tokens": cfg.general_max_new_tokens}
    )
    base_scores, base_answers, base_losses = score_model(base, tokenizer, eval_ds, cfg)
    base_general = score_model(base, tokenizer, general_ds, probe_cfg) if general_ds is not None else None
    # Folded into the weights, the adapter costs nothing per token: generation runs as fast as the base's.
    # (merge_and_unload changes `base` in place: every base score is taken above.)
    peft_model = PeftModel.from_pretrained(base, str(adapter.path)).eval()
    preferences = score_preferences(peft_model, tokenizer, preference, cfg) if preference is not None else None
    tuned_model = peft_model.merge_and_unload().eval()
    tuned, tuned_answers, tuned_losses = score_model(tuned_model, tokenizer, eval_ds, cfg)
    tuned_general = score_model(tuned_model, tokenizer, general_ds, probe_cfg) if general_ds is not None else None
    references = [("base", base_scores)] + ([stage_reference] if stage_reference else [])
    general = (base_general[0], tuned_general[0]) if general_ds is not None else None
    passed, messages = apply_gate(
        tuned, references, cfg.gate, eval_rows=len(eval_ds), general=general, preference=preferences
    )
    samples, base_rows, tuned_rows = _samples(eval_ds, base_answers, tuned_answers)
    differences = paired_bootstrap(
        base_losses, tuned_losses, base_rows, tuned_rows, cfg.bootstrap_resamples, cfg.bootstrap_seed
    )
    probe = {}
    if general_ds is not None:
        (g_base, g_base_answers, g_base_losses), (g_tuned, g_tuned_answers, g_tuned_losses) = (
            base_general,
            tuned_general,
        )
        g_samples, g_base_rows, g_tuned_rows = _samples(general_ds, g_base_answers, g_tuned_answers)
        probe = {
            "general_rows": len(general_ds),
            "general_base": g_base,
            "general_tuned": g_tuned,
            "general_samples": g_samples,
            "general_differences": paired_bootstrap(
                g_base_losses, g_tuned_losses, g_base_rows, g_tuned_rows, cfg.bootstrap_resamples, cfg.bootstrap_seed
            ),
        }
    return EvalReport(
        eval_rows=len(eval_ds),
        eval_dataset_hash=dataset_content_hash(eval_ds),
        base=base_scores,
        tuned=tuned,
        reference_name=" and ".join(n for n, _ in references),
        reference=stage_reference[1] if stage_reference else None,
        gate_passed=passed,
        on_fail=cfg.gate.on_fail,
        gate_messages=messages,
        samples=samples,
        differences=differences,
        preference=preferences,
        **probe,
    )


def score_preferences(peft_model, tokenizer, preference: PreferenceInputs, cfg: EvalConfig) -> PreferenceEval:
    """The held-out pairs scored by the base, the start adapter and the tuned one, all on `peft_model`'s weights
    (the start adapter is loaded next to the tuned one for this, and removed after)."""
    from core.evaluation.preference import START_ADAPTER, evaluate_preferences

    start = preference.start_adapter
    if start is not None:
        peft_model.load_adapter(str(start.path), adapter_name=START_ADAPTER)
    try:
        return evaluate_preferences(
            peft_model,
            tokenizer,
            preference.pairs,
            start_name=preference.start_name,
            has_start_adapter=start is not None,
            beta=preference.beta,
            batch_size=cfg.batch_size,
            resamples=cfg.bootstrap_resamples,
            seed=cfg.bootstrap_seed,
        )
    finally:
        if start is not None:
            peft_model.set_adapter("default")
            peft_model.delete_adapter(START_ADAPTER)
