"""Formatting: chat template -> token ids -> response-only labels, and the train/eval split.

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
import json
import statistics
from typing import Any

from datasets import Dataset, DatasetInfo, Features, List, Value

from core.config import PromptConfig
from core.prompts import IGNORE, prompt_format, render, with_system

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
    """Rows longer than prompt.max_seq_len under prompt.overlong: fail; the message names them."""


def tokenize_example(
    messages: list[dict], tokenizer, fmt: str, all_turns: bool = False
) -> tuple[list[int], list[int], int]:
    """input_ids, labels (-100 where nothing is learned), prompt length; EOS ends the labels.

    The last assistant turn is always learned. With `all_turns` (chat template only) every earlier assistant turn
    is too, each from its first token through its end-of-turn token; system and user turns, and the template's
    "<|im_start|>assistant" headers, stay -100. The prompt (everything before the last answer) is tokenized in
    one piece either way, exactly as generation tokenizes it (core.serving.model, core.evaluation.scoring).
    """
    prompt, response = render(messages, tokenizer, fmt)
    chat = fmt == "chat"
    # The chat template carries its own special tokens; Alpaca and user templates add BOS if the tokenizer uses one.
    spans = earlier_answer_spans(messages, tokenizer, prompt) if chat and all_turns else []
    if spans:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        prompt_ids = enc["input_ids"]
        prompt_labels = [
            tid if any(lo <= start < hi for lo, hi in spans) else IGNORE
            for tid, (start, _end) in zip(prompt_ids, enc["offset_mapping"])
        ]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        prompt_labels = [IGNORE] * len(prompt_ids)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id not in response_ids:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, prompt_labels + response_ids, len(prompt_ids)


def earlier_answer_spans(messages: list[dict], tokenizer, prompt: str) -> list[tuple[int, int]]:
    """Character spans, in the rendered prompt, of every assistant turn before the last one: from where the
    template's generation prompt ends to where the turn (end-of-turn marker included) ends."""
    spans = []
    for k, message in enumerate(messages[:-1]):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
        end = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (end.startswith(start) and prompt.startswith(end)):
            raise ValueError(
                "prompt.train_on: all_turns needs a chat template that renders each turn as a prefix of the whole "
                "conversation; this one does not (use train_on: last_turn)"
            )
        spans.append((len(start), len(end)))
    return spans


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


def append_row(columns: dict[str, list], row_id: str, messages: list[dict], ids, labels, prompt_len: int) -> None:
    """One tokenized row onto FEATURES' column lists."""
    for key, value in zip(FEATURES, (row_id, messages, ids, labels, prompt_len)):
        columns[key].append(value)


def format_dataset(clean: Dataset, tokenizer, cfg: PromptConfig) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Tokenize, apply the overlong policy and split; returns (train, eval, counts)."""
    fmt = prompt_format(tokenizer, cfg.template)
    out = {"train": {k: [] for k in FEATURES}, "eval": {k: [] for k in FEATURES}}
    counts = {"truncated": 0, "dropped_overlong": 0}
    overlong: list[str] = []
    has_eval_rows = "eval" in set(clean["split"])
    for row in clean:
        messages = with_system(row["messages"], cfg.system_prompt)
        ids, labels, prompt_len = tokenize_example(messages, tokenizer, fmt, cfg.train_on == "all_turns")
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
            split = "eval" if is_eval(render(messages, tokenizer, fmt)[0], cfg.seed, cfg.eval_fraction) else "train"
        append_row(out[split], row["id"], messages, ids, labels, prompt_len)
    if overlong and cfg.overlong == "fail":
        raise OverlongError(
            f"{len(overlong)} row(s) longer than prompt.max_seq_len={cfg.max_seq_len} tokens "
            f"(prompt.overlong is 'fail'): {', '.join(overlong[:5])}"
        )
    # The tokenizer's folder or Hub id rides along in the dataset's info (not in its content hash), so that the
    # dataset preview (materializers/dataset_materializer.py) can show decoded text instead of id lists.
    description = json.dumps({"tokenizer": tokenizer.name_or_path})
    train, held_out = (
        Dataset.from_dict(out[s], features=FEATURES, info=DatasetInfo(description=description, features=FEATURES))
        for s in ("train", "eval")
    )
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(
            f"after formatting: {len(train)} train and {len(held_out)} eval rows; both splits need rows "
            f"(check prompt.eval_fraction={cfg.eval_fraction} and prompt.max_seq_len={cfg.max_seq_len})"
        )
    counts["template"] = fmt if fmt in ("chat", "alpaca") else "custom"
    return train, held_out, counts


def format_all(rows: Dataset, tokenizer, cfg: PromptConfig, what: str, overlong: str = "fail") -> Dataset:
    """Every row rendered and tokenized exactly like the run's own rows (template, system prompt), none split off.
    Rows longer than prompt.max_seq_len: `overlong` fail (an error naming them), drop or truncate (the response)."""
    fmt = prompt_format(tokenizer, cfg.template)
    out = {k: [] for k in FEATURES}
    too_long = []
    for row in rows:
        messages = with_system(row["messages"], cfg.system_prompt)
        ids, labels, prompt_len = tokenize_example(messages, tokenizer, fmt, cfg.train_on == "all_turns")
        if len(ids) > cfg.max_seq_len:
            too_long.append(f"{row['id']} ({len(ids)} tokens)")
            if overlong == "drop" or (overlong == "truncate" and prompt_len >= cfg.max_seq_len):
                continue
            if overlong == "truncate":
                ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        append_row(out, row["id"], messages, ids, labels, prompt_len)
    if too_long and overlong == "fail":
        raise OverlongError(
            f"{what}: {len(too_long)} row(s) longer than prompt.max_seq_len={cfg.max_seq_len} "
            f"tokens: {', '.join(too_long[:5])}"
        )
    if not out["id"]:
        raise ValueError(f"{what}: no rows left to use")
    description = json.dumps({"tokenizer": tokenizer.name_or_path})
    return Dataset.from_dict(out, features=FEATURES, info=DatasetInfo(description=description, features=FEATURES))


def format_probe(rows: Dataset, tokenizer, cfg: PromptConfig) -> Dataset:
    """Every row of a probe set (evaluate.general: general-ability questions), none split off and none trained on.
    An overlong row is an error naming it: a probe is short questions, and a silently shorter probe would change
    what the gate measures."""
    return format_all(rows, tokenizer, cfg, "evaluate.general", overlong="fail")


def format_source(rows: Dataset, tokenizer, cfg: PromptConfig, name: str) -> Dataset:
    """A mixed-in training source (data.mix, train.replay): every row trains, overlong rows by prompt.overlong."""
    return format_all(rows, tokenizer, cfg, f"mix source {name!r}", overlong=cfg.overlong)
