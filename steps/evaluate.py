"""Step 5, evaluate: the fine-tuned model against the base on the same held-out split.

Both models are the unquantized base in the compute dtype, without and then
with the adapter merged in: that is what the FP16 merge ships. Scores:

- mean cross-entropy per response token (nats) and perplexity, over every eval row;
- greedy answers on the first `evaluate.num_generate` rows, scored by ROUGE-L F1
  (the `rouge_score` package) and exact match against the reference.

The quality gate compares the candidate with the base, and with the model
version currently at `gate.compare_with_stage` when one exists and was scored
on the same eval data. A failed gate stops the pipeline at merge (or only
warns, by config); the report is kept either way.
"""

from __future__ import annotations

import math
import re
import string
import sys
from typing import Annotated

import torch
from datasets import Dataset
from zenml import get_step_context, log_metadata, step
from zenml.config.cache_policy import CachePolicy
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.artifacts import ModelFolder
from core.config import EvalConfig, GateConfig, ModelSource
from core.reports import EvalReport, ModelScores, Sample
from materializers.dataset_materializer import dataset_content_hash
from steps import format_prompts as format_prompts_module
from steps.format_prompts import IGNORE

logger = get_logger(__name__)


def _pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs])


@torch.no_grad()
def response_loss(model, ds: Dataset, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy over response tokens only (labels != -100), in nats per token."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(ds), batch_size):
        batch = ds[i : i + batch_size]
        ids = _pad(batch["input_ids"], pad_id, left=False).to(device)
        labels = _pad(batch["labels"], IGNORE, left=False).to(device)
        mask = _pad([[1] * len(x) for x in batch["input_ids"]], 0, left=False).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model, tokenizer, ds: Dataset, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to each row's prompt (the tokens before its response)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    answers = []
    for i in range(0, len(ds), batch_size):
        batch = ds[i : i + batch_size]
        prompts = [ids[:n] for ids, n in zip(batch["input_ids"], batch["prompt_len"])]
        ids = _pad(prompts, pad_id, left=True).to(device)  # left padding: every row continues at the end
        mask = _pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in out]
    return answers


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def text_scores(answers: list[str], references: list[str]) -> tuple[float, float]:
    """(mean ROUGE-L F1, exact-match rate) of answers against references."""
    from rouge_score import rouge_scorer

    if not answers:
        return 0.0, 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    exact = [normalize(a) == normalize(r) for a, r in zip(answers, references)]
    return sum(rouge) / len(rouge), sum(exact) / len(exact)


def score_model(model, tokenizer, ds: Dataset, cfg: EvalConfig) -> tuple[ModelScores, list[str]]:
    loss = response_loss(model, ds, cfg.batch_size, tokenizer.pad_token_id)
    sample = ds.select(range(min(cfg.num_generate, len(ds))))
    answers = generate_answers(model, tokenizer, sample, cfg.max_new_tokens, cfg.batch_size)
    rouge, exact = text_scores(answers, [m[-1]["content"] for m in sample["messages"]])
    return ModelScores(loss=loss, perplexity=math.exp(min(loss, 50)), rouge_l=rouge, exact_match=exact), answers


def apply_gate(
    tuned: ModelScores, references: list[tuple[str, ModelScores]], gate: GateConfig
) -> tuple[bool, list[str]]:
    """Candidate must beat every reference by the configured margins; returns (passed, reasons)."""
    passed, messages = True, []
    for name, ref in references:
        max_loss = ref.loss * (1 - gate.min_loss_improvement)
        ok = tuned.loss <= max_loss
        passed &= ok
        messages.append(
            f"eval loss {tuned.loss:.4f} vs {name} {ref.loss:.4f}: needs <= {max_loss:.4f} "
            f"(min_loss_improvement={gate.min_loss_improvement}) -> {'ok' if ok else 'FAIL'}"
        )
        min_rouge = ref.rouge_l - gate.max_rouge_drop
        ok = tuned.rouge_l >= min_rouge
        passed &= ok
        messages.append(
            f"ROUGE-L {tuned.rouge_l:.4f} vs {name} {ref.rouge_l:.4f}: needs >= {min_rouge:.4f} "
            f"(max_rouge_drop={gate.max_rouge_drop}) -> {'ok' if ok else 'FAIL'}"
        )
    return passed, messages


def evaluate_adapter(
    adapter: ModelFolder,
    eval_ds: Dataset,
    model: ModelSource,
    cfg: EvalConfig,
    stage_reference: tuple[str, ModelScores] | None = None,
) -> EvalReport:
    from peft import PeftModel

    tokenizer = models.load_tokenizer(model)
    base = models.load_base(model, quant=None).eval()
    base_scores, base_answers = score_model(base, tokenizer, eval_ds, cfg)
    # Folded into the weights, the adapter costs nothing per token: generation runs as fast as the base's.
    tuned_model = PeftModel.from_pretrained(base, str(adapter.path)).merge_and_unload().eval()
    tuned, tuned_answers = score_model(tuned_model, tokenizer, eval_ds, cfg)
    references = [("base", base_scores)] + ([stage_reference] if stage_reference else [])
    passed, messages = apply_gate(tuned, references, cfg.gate)
    samples = [
        Sample(
            id=row["id"],
            prompt=row["messages"][-2]["content"] if len(row["messages"]) > 1 else "",
            reference=row["messages"][-1]["content"],
            base_answer=b,
            tuned_answer=t,
        )
        for row, b, t in zip(eval_ds.select(range(len(tuned_answers))), base_answers, tuned_answers)
    ]
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
    )


def stage_scores(model_name: str, stage: str, eval_hash: str) -> tuple[str, ModelScores] | None:
    """Scores of the model version now at `stage`, if it was evaluated on the same eval data."""
    from zenml.client import Client

    try:
        version = Client().get_model_version(model_name, stage)
    except KeyError:
        return None
    meta = version.run_metadata.get("evaluation")
    if not isinstance(meta, dict) or meta.get("eval_dataset_hash") != eval_hash:
        logger.info("%s version %s has no scores on this eval data; gating against base only", stage, version.number)
        return None
    return f"{stage} (version {version.number})", ModelScores(**meta["tuned"])


# ZenML hashes only the step function itself: add this whole file and the helpers it calls.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], models, format_prompts_module]))
def evaluate(
    adapter: ModelFolder, eval_dataset: Dataset, model: ModelSource, evaluate: EvalConfig, base_id: str = ""
) -> Annotated[EvalReport, "eval_report"]:
    from steps.train import quiet_libraries

    quiet_libraries()
    context_model = get_step_context().model
    reference = None
    if evaluate.gate.compare_with_stage and context_model is not None:
        reference = stage_scores(
            context_model.name, evaluate.gate.compare_with_stage, dataset_content_hash(eval_dataset)
        )
    report = evaluate_adapter(adapter, eval_dataset, model, evaluate, stage_reference=reference)
    for line in report.gate_messages:
        logger.info("gate: %s", line)
    logger.info(
        "eval loss base %.4f -> fine-tuned %.4f; ROUGE-L %.3f -> %.3f; exact match %.2f -> %.2f; gate %s",
        report.base.loss,
        report.tuned.loss,
        report.base.rouge_l,
        report.tuned.rouge_l,
        report.base.exact_match,
        report.tuned.exact_match,
        "passed" if report.gate_passed else "FAILED",
    )
    evaluation = {
        "eval_dataset_hash": report.eval_dataset_hash,
        "base": report.base.model_dump(),
        "tuned": report.tuned.model_dump(),
        "gate_passed": report.gate_passed,
    }
    if context_model is not None:
        log_metadata(metadata={"evaluation": evaluation}, infer_model=True)
    return report
