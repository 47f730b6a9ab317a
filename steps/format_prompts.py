"""Step 3, format prompts: chat template -> token ids -> response-only labels, and the train/eval split.

Each row renders with the tokenizer's chat template (an Alpaca-style template
for base models without one). The prompt (every turn before the final
assistant turn, plus the generation prompt) and the response are tokenized
separately, exactly as generation will see them, and the prompt tokens get
label -100 so the loss is on the response only. The end-of-turn/EOS token
stays in the labels, so the model learns to stop.

Rows labelled "eval" by ingest form the held-out split; unlabelled rows are
split by a seeded hash of their prompt, so the same prompt never lands on both
sides and adding rows does not reshuffle earlier ones.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
from typing import Annotated, Any

from datasets import Dataset, Features, List, Value
from zenml import log_metadata, step
from zenml.config.cache_policy import CachePolicy
from zenml.logger import get_logger

import materializers  # noqa: F401
from core import models
from core.config import ModelSource, PromptConfig

logger = get_logger(__name__)

IGNORE = -100  # label value that torch's cross-entropy skips
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "{system}### Instruction:\n{prompt}\n\n### Response:\n"
)
FEATURES = Features(
    {
        "id": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "prompt_len": Value("int32"),  # tokens before the response starts
    }
)


class OverlongError(ValueError):
    pass


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def use_chat_template(tokenizer, template: str) -> bool:
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError("prompt.template is 'chat' but the tokenizer has no chat template; use 'auto' or 'alpaca'")
    return template == "chat" or (template == "auto" and bool(tokenizer.chat_template))


def render(messages: list[dict], tokenizer, chat: bool) -> tuple[str, str]:
    """(prompt text, response text); their concatenation is the whole training example."""
    *context, answer = messages
    if chat:
        prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template renders the prompt differently inside the full conversation")
        return prompt, full[len(prompt) :]
    system = "".join(m["content"] + "\n\n" for m in context if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in context if m["role"] != "system")
    return ALPACA_PROMPT.format(system=system, prompt=user), answer["content"]


def render_prompt(messages: list[dict], tokenizer, chat: bool) -> str:
    """Generation prompt for the context turns (evaluation and serving use this)."""
    return render(list(messages) + [{"role": "assistant", "content": ""}], tokenizer, chat)[0]


def tokenize_example(messages: list[dict], tokenizer, chat: bool) -> tuple[list[int], list[int], int]:
    """input_ids, labels (-100 on the prompt), prompt length; EOS ends the labels."""
    prompt, response = render(messages, tokenizer, chat)
    # The chat template carries its own special tokens; Alpaca adds BOS if the tokenizer uses one.
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id not in response_ids:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, len(prompt_ids)


def is_eval(prompt_text: str, seed: int, fraction: float) -> bool:
    """Seeded, per-prompt split decision: stable when other rows are added or removed."""
    digest = hashlib.sha256(f"{seed}:{prompt_text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def token_stats(ds: Dataset) -> dict[str, Any]:
    lengths = [len(x) for x in ds["input_ids"]]
    response = [sum(1 for t in y if t != IGNORE) for y in ds["labels"]]
    if not lengths:
        return {"rows": 0}
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "response_tokens": sum(response),
        "mean_len": round(statistics.mean(lengths), 1),
        "max_len": max(lengths),
        "min_len": min(lengths),
    }


def format_dataset(clean: Dataset, tokenizer, cfg: PromptConfig) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Tokenize, apply the overlong policy and split; returns (train, eval, counts)."""
    chat = use_chat_template(tokenizer, cfg.template)
    out = {"train": {k: [] for k in FEATURES}, "eval": {k: [] for k in FEATURES}}
    counts = {"truncated": 0, "dropped_overlong": 0}
    overlong: list[str] = []
    has_eval_rows = "eval" in set(clean["split"])
    for row in clean:
        messages = with_system(row["messages"], cfg.system_prompt)
        ids, labels, prompt_len = tokenize_example(messages, tokenizer, chat)
        if len(ids) > cfg.max_seq_len:
            overlong.append(f"{row['id']} ({len(ids)} tokens)")
            if cfg.overlong == "fail":
                continue
            if cfg.overlong == "drop" or prompt_len >= cfg.max_seq_len:  # nothing left to learn from
                counts["dropped_overlong"] += 1
                continue
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
            counts["truncated"] += 1
        if row["split"]:
            split = row["split"]
        elif has_eval_rows:  # explicit held-out data exists: everything else trains
            split = "train"
        else:
            split = "eval" if is_eval(render(messages, tokenizer, chat)[0], cfg.seed, cfg.eval_fraction) else "train"
        for key, value in (
            ("id", row["id"]),
            ("messages", messages),
            ("input_ids", ids),
            ("labels", labels),
            ("prompt_len", prompt_len),
        ):
            out[split][key].append(value)
    if overlong and cfg.overlong == "fail":
        raise OverlongError(
            f"{len(overlong)} row(s) longer than prompt.max_seq_len={cfg.max_seq_len} tokens "
            f"(prompt.overlong is 'fail'): {', '.join(overlong[:5])}"
        )
    train, held_out = (Dataset.from_dict(out[s], features=FEATURES) for s in ("train", "eval"))
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(
            f"after formatting: {len(train)} train and {len(held_out)} eval rows; both splits need rows "
            f"(check prompt.eval_fraction={cfg.eval_fraction} and prompt.max_seq_len={cfg.max_seq_len})"
        )
    counts["template"] = "chat" if chat else "alpaca"
    return train, held_out, counts


# ZenML hashes only the step function itself: add this whole file (the template helpers) and core/models.py.
@step(cache_policy=CachePolicy(source_dependencies=[sys.modules[__name__], models]))
def format_prompts(
    clean_dataset: Dataset, model: ModelSource, prompt: PromptConfig, base_id: str = ""
) -> tuple[Annotated[Dataset, "train_dataset"], Annotated[Dataset, "eval_dataset"]]:
    """`base_id` (core.models.model_identity) keys the cache to the exact tokenizer files."""
    tokenizer = models.load_tokenizer(model)
    train, held_out, counts = format_dataset(clean_dataset, tokenizer, prompt)
    for name, ds in (("train_dataset", train), ("eval_dataset", held_out)):
        stats = token_stats(ds) | counts
        logger.info("%s: %s", name, stats)
        log_metadata(metadata=stats, artifact_name=name, infer_artifact=True)
    return train, held_out
