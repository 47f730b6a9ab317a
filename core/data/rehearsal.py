"""Self-synthesized rehearsal: the base model answers general prompts itself, and those answers become replay rows.

A team fine-tuning a Hub checkpoint never has the data it was trained on; what it always has is the checkpoint.
Having the base answer a set of everyday prompts (greedy, with the run's own template and system prompt) and
training on those answers next to the task (Huang et al., "Mitigating Catastrophic Forgetting in Large Language
Models with Self-Synthesized Rehearsal", ACL 2024; Yang et al., "Self-Distillation Bridges Distribution Gap in
Language Model Fine-Tuning", ACL 2024) keeps the fine-tuned model answering them as the base did.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from datasets import Dataset

from core import models
from core.config import PromptConfig
from core.data.formatting import format_all
from core.data.ingest import FEATURES as RAW_FEATURES
from core.models import BaseModelRef

logger = logging.getLogger(__name__)


def with_answer(messages: list[dict], answer: str) -> list[dict]:
    """The conversation with its last assistant turn replaced by `answer` (or `answer` appended, if it has none)."""
    context = messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)
    return context + [{"role": "assistant", "content": answer}]


SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def whole_sentences(answer: str) -> str:
    """An unfinished answer up to the end of its last whole sentence ("" when it has none)."""
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    return answer[: ends[-1]].strip() if ends else ""


def synthesize(
    prompts: Dataset, base: BaseModelRef, prompt: PromptConfig, max_new_tokens: int, batch_size: int = 64
) -> tuple[Dataset, dict[str, Any]]:
    """Canonical rows (id, split, messages) whose answers are the base model's own; returns (rows, what happened).

    An answer the base did not finish within max_new_tokens (train.replay.max_new_tokens) keeps its whole sentences
    and loses the rest (training on a cut sentence would teach the model to stop mid-sentence); one without a whole
    sentence, or an empty one, is dropped."""
    tokenizer = models.load_tokenizer(base)
    model = models.load_base(base, quant=None).eval()  # unquantized, as evaluate scores the base
    from core.evaluation.scoring import generate_finished

    rendered = format_all(prompts, tokenizer, prompt, "train.replay", overlong="drop")
    started = time.perf_counter()
    answers = generate_finished(model, tokenizer, rendered, max_new_tokens, batch_size)
    seconds = time.perf_counter() - started
    rows, counts = _answered_rows(prompts, rendered["id"], answers)
    if not rows["id"]:
        raise ValueError(
            f"train.replay: the base model wrote no whole sentence in any of its {len(rendered)} answers within "
            f"max_new_tokens={max_new_tokens}; raise train.replay.max_new_tokens"
        )
    stats = {
        "prompts": len(prompts),
        "rows": len(rows["id"]),
        **counts,
        "dropped_overlong_prompt": len(prompts) - len(rendered),
        "written_by": models.display_name(base),
        "base_identity": base.identity,
        "generation": {
            "decoding": "greedy",
            "max_new_tokens": max_new_tokens,
            "template": prompt.template,
            "system_prompt": prompt.system_prompt,
        },
        "seconds": round(seconds, 1),
    }
    logger.info(
        "self-synthesized rehearsal: %d of %d prompts answered by the base in %.0f s (at %d tokens: %d cut to whole "
        "sentences, %d without one dropped)",
        len(rows["id"]),
        len(prompts),
        seconds,
        max_new_tokens,
        counts["cut_to_whole_sentences"],
        counts["dropped_unfinished"],
    )
    return Dataset.from_dict(rows, features=RAW_FEATURES), stats


def _answered_rows(prompts: Dataset, ids: list[str], answers: list[tuple[str, bool]]) -> tuple[dict, dict[str, int]]:
    """The canonical rows with the base's answers (unfinished ones cut to whole sentences); what was cut or dropped."""
    by_id = dict(zip(prompts["id"], prompts["messages"]))
    rows: dict[str, list] = {"id": [], "split": [], "messages": []}
    cut = unfinished = empty = 0
    for row_id, (answer, finished) in zip(ids, answers):
        if not finished:
            answer = whole_sentences(answer)
            cut += bool(answer)
            unfinished += not answer
        if not answer:
            empty += finished
        else:
            rows["id"].append(row_id)
            rows["split"].append("")
            rows["messages"].append(with_answer(by_id[row_id], answer))
    return rows, {"cut_to_whole_sentences": cut, "dropped_unfinished": unfinished, "dropped_empty": empty}
