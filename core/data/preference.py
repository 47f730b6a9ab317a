"""Preference data (train.preference.data, format pairs or unpaired): read into one canonical dataset, and
rendered for trl's preference trainers exactly as SFT renders its rows.

Ingest (load_rows dispatches here) reads the files as core/data/ingest.py does and maps every accepted shape
into one schema, which validate checks (core/data/validation.py) and format_preference renders:

    id          "<file>:<line>" (or "<dataset>[<split>]:<row>"), quoted in every error
    split       "eval" for eval_path / eval_split rows, else "" (format_preference holds some out later)
    prompt      [{"role": ..., "content": ...}, ...]: the context before the answer, a system turn included
    chosen      pairs: the preferred answer (text); unpaired: None
    rejected    pairs: the dispreferred answer (text); unpaired: None
    completion  unpaired: the answer (text); pairs: None
    label       unpaired: True for a desirable answer, None when missing or not a label; pairs: None
    label_text  unpaired: the label as the data wrote it ("1", "up", ...), so validation can quote a bad one

Shapes of format pairs: prompt text + chosen/rejected text; prompt turns + chosen/rejected turns (UltraFeedback:
the answer is their last assistant turn, the turns before it may repeat the prompt); no prompt column, and
chosen/rejected as whole dialogues sharing everything before their answer: chat turns, or Anthropic HH's
"\\n\\nHuman: ...\\n\\nAssistant: ..." text. Ingest maps, it does not judge: null or empty texts pass through.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from datasets import Dataset, Features, List, Value

from core.config import DataSource, PromptConfig
from core.data.formatting import OverlongError, is_eval
from core.data.ingest import IngestError, chat_turns, record_parts
from core.prompts import prompt_format, render, with_system

TURN = {"role": Value("string"), "content": Value("string")}
FEATURES = Features(
    {
        "id": Value("string"),
        "split": Value("string"),
        "prompt": List(TURN),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "completion": Value("string"),
        "label": Value("bool"),
        "label_text": Value("string"),
    }
)
ANSWERS = {"pairs": ("chosen", "rejected"), "unpaired": ("completion",)}
# KTO's binary feedback as datasets spell it (thumbs up/down, good/bad, 1/0), lower-cased
LABELS = {"true": True, "1": True, "up": True, "good": True, "false": False, "0": False, "down": False, "bad": False}
HH_MARKER = re.compile(r"\n\n(Human|Assistant):")  # Anthropic HH's turn separators
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# --- ingest: the data's rows -> the canonical schema -----------------------------------------


def load_preference_rows(data: DataSource) -> Dataset:
    """Read every configured source (format pairs or unpaired) into the canonical preference schema."""
    mapper = _pair if data.format == "pairs" else _unpaired
    rows: dict[str, list] = {k: [] for k in FEATURES}
    for held_out, records in record_parts(data):
        for row_id, rec in records:
            row = {"id": row_id, "split": "eval" if held_out else "", **mapper(row_id, rec, data)}
            for key in FEATURES:
                rows[key].append(row.get(key))
    if not rows["id"]:
        raise IngestError(f"{data.path}: no rows found")
    return Dataset.from_dict(rows, features=FEATURES)


def _column(row_id: str, rec: dict, data: DataSource, field: str) -> tuple[str, Any]:
    """(the data's column name, its value) for canonical `field`; a missing column names both."""
    column = data.columns.get(field, field)
    if column not in rec:
        raise IngestError(f"{row_id}: missing column '{column}' (mapped to '{field}'); columns present: {sorted(rec)}")
    value = rec[column]
    return column, value.tolist() if hasattr(value, "tolist") else value  # parquet gives numpy values


def _pair(row_id: str, rec: dict, data: DataSource) -> dict[str, Any]:
    if "prompt" not in data.columns and "prompt" not in rec:  # chosen and rejected hold whole dialogues
        return _dialogue_pair(row_id, rec, data)
    prompt = _prompt(row_id, *_column(row_id, rec, data, "prompt"), data)
    chosen, rejected = (_answer(row_id, *_column(row_id, rec, data, f), data) for f in ANSWERS["pairs"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _dialogue_pair(row_id: str, rec: dict, data: DataSource) -> dict[str, Any]:
    """No prompt column: chosen and rejected are whole dialogues that must share everything before the answer."""
    (chosen_context, chosen), (rejected_context, rejected) = (
        _dialogue(row_id, *_column(row_id, rec, data, f), data) for f in ANSWERS["pairs"]
    )
    if None not in (chosen_context, rejected_context) and chosen_context != rejected_context:
        raise IngestError(f"{row_id}: {_first_difference(chosen_context, rejected_context)}")
    context = chosen_context if chosen_context is not None else rejected_context
    return {"prompt": context or [], "chosen": chosen, "rejected": rejected}


def _first_difference(chosen: list[dict], rejected: list[dict]) -> str:
    k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    shown = [repr(turns[k]["content"])[:60] if k < len(turns) else "(no turn)" for turns in (chosen, rejected)]
    return (
        f"chosen and rejected must share the dialogue before their answers, but differ at turn {k + 1}: "
        f"chosen {shown[0]} vs rejected {shown[1]}"
    )


def _unpaired(row_id: str, rec: dict, data: DataSource) -> dict[str, Any]:
    prompt = _prompt(row_id, *_column(row_id, rec, data, "prompt"), data)
    column, completion = _column(row_id, rec, data, "completion")
    if completion is not None and not isinstance(completion, str):
        raise IngestError(f"{row_id}: field '{column}' must be a string, got {type(completion).__name__}")
    _, raw = _column(row_id, rec, data, "label")
    text = _label_text(raw)
    return {"prompt": prompt, "completion": completion, "label": label_value(text), "label_text": text}


def _label_text(raw: Any) -> str | None:
    """The label as text: bools as true/false, whole numbers without a decimal point (1.0 -> "1")."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return str(raw).lower()
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw)


def label_value(text: str | None) -> bool | None:
    """True / False for an accepted spelling (LABELS), None for a missing or unknown one (validation reports it)."""
    return None if text is None else LABELS.get(label_key(text))


def label_key(text: str) -> str:
    return text.strip().lower()


def _prompt(row_id: str, column: str, value: Any, data: DataSource) -> list[dict]:
    """A prompt column's text (one user turn; null stays a null turn for validation) or chat turns."""
    if value is None or isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return chat_turns(row_id, value, column, data)
    raise IngestError(f"{row_id}: field '{column}' must be text or a list of turns, got {type(value).__name__}")


def _answer(row_id: str, column: str, value: Any, data: DataSource) -> str | None:
    """An answer next to a prompt column: text, or turns whose last one is the answer (UltraFeedback)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return _last_answer(row_id, chat_turns(row_id, value, column, data), column)[1]
    raise IngestError(f"{row_id}: field '{column}' must be text or a list of turns, got {type(value).__name__}")


def _dialogue(row_id: str, column: str, value: Any, data: DataSource) -> tuple[list[dict] | None, str | None]:
    """A whole dialogue (chat turns or HH text) -> (the turns before the last answer, the answer)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return _last_answer(row_id, hh_turns(row_id, value, column), column)
    if isinstance(value, list):
        return _last_answer(row_id, chat_turns(row_id, value, column, data), column)
    raise IngestError(f"{row_id}: field '{column}' must be a dialogue (text or turns), got {type(value).__name__}")


def _last_answer(row_id: str, turns: list[dict], column: str) -> tuple[list[dict], str | None]:
    if not turns or turns[-1]["role"] != "assistant":
        last = repr(turns[-1]["role"]) if turns else "nothing"
        raise IngestError(
            f"{row_id}: field '{column}' must end with the assistant's answer, but ends with {last} "
            "(map the data's role names with data.roles)"
        )
    return turns[:-1], turns[-1]["content"]


def hh_turns(row_id: str, text: str, column: str) -> list[dict]:
    """Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as user / assistant turns."""
    lead, *parts = HH_MARKER.split(text if text.startswith("\n\n") else "\n\n" + text)
    if lead.strip() or not parts:
        raise IngestError(
            f"{row_id}: field '{column}' is text without a prompt column, so it must be an Anthropic HH dialogue "
            f"('\\n\\nHuman: ...\\n\\nAssistant: ...'), got {text!r:.60}; or map the prompt column with data.columns"
        )
    return [{"role": HH_ROLES[who], "content": said.strip()} for who, said in zip(parts[::2], parts[1::2])]


def preference_kind(ds: Dataset) -> str:
    """pairs or unpaired: ingest fills chosen/rejected for pairs, completion/label for unpaired, never both."""
    unpaired = any(v is not None for v in ds["completion"]) or any(v is not None for v in ds["label_text"])
    return "unpaired" if unpaired else "pairs"


# --- formatting: canonical rows -> trl's standard (prompt, answer texts) format -------------

# prompt.overlong truncate, for preference rows: a cut answer would change what is preferred
TRUNCATE_NOTE = " (as drop: a preference answer is never cut)"
PAIR_FEATURES = Features({k: Value("string") for k in ("id", "prompt", "chosen", "rejected")})
KTO_FEATURES = Features(
    {"id": Value("string"), "prompt": Value("string"), "completion": Value("string"), "label": Value("bool")}
)


def format_preference(
    clean: Dataset, tokenizer, prompt_cfg: PromptConfig, max_length: int, method: str
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Render every row as SFT renders its rows (template, system prompt), apply prompt.overlong at `max_length`
    tokens and split; returns (train, eval, stats). dpo / orpo: id, prompt, chosen, rejected; kto: id, prompt,
    completion, label (a training pair becoming two rows). Held-out pairs stay pairs for every method: evaluation
    ranks chosen against rejected (kto_rows gives the trainer its own view of them)."""
    kind = preference_kind(clean)
    _check_method(kind, method)
    fmt = prompt_format(tokenizer, prompt_cfg.template)
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    overlong: list[str] = []
    has_eval_rows = "eval" in set(clean["split"])
    for row in clean:
        example = render_row(row, kind, tokenizer, fmt, prompt_cfg.system_prompt)
        if longest(example) > max_length:
            overlong.append(f"{row['id']} ({longest(example)} tokens)")
            continue
        split = _split(row["split"], example["prompt"], has_eval_rows, prompt_cfg)
        out[split] += as_kto(example) if method == "kto" and kind == "pairs" and split == "train" else [example]
    _check_overlong(overlong, prompt_cfg.overlong, max_length)
    train = _dataset(out["train"], method)
    held_out = _dataset(out["eval"], "kto" if kind == "unpaired" else "dpo")
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(
            f"after formatting the preference data: {len(train)} train and {len(held_out)} eval rows; both splits "
            f"need rows (check prompt.eval_fraction={prompt_cfg.eval_fraction} and max_length={max_length})"
        )
    stats = {s: _length_stats(out[s]) for s in out} | {
        "method": method,
        "template": fmt if fmt in ("chat", "alpaca") else "custom",
        "dropped_overlong": len(overlong),
        "overlong": prompt_cfg.overlong + (TRUNCATE_NOTE if prompt_cfg.overlong == "truncate" else ""),
    }
    return train, held_out, stats


def _check_method(kind: str, method: str) -> None:
    if method not in ("dpo", "kto", "orpo"):
        raise ValueError(f"format_preference: method {method!r} is not a preference method (dpo, kto or orpo)")
    if kind == "unpaired" and method != "kto":
        raise ValueError(f"{method} trains on pairs; unpaired rows (prompt, completion, label) are kto's")


def render_row(row: dict, kind: str, tokenizer, fmt: str, system_prompt: str | None) -> dict[str, Any]:
    """One canonical row as trl's standard format, plus `tokens`: prompt + each answer, EOS included."""
    context = with_system(row["prompt"], system_prompt)
    rendered = {a: render(context + [{"role": "assistant", "content": row[a]}], tokenizer, fmt) for a in ANSWERS[kind]}
    prompts = {prompt for prompt, _ in rendered.values()}
    if len(prompts) != 1:  # the chat template saw the answer: trl would compare answers to different prompts
        raise ValueError(f"{row['id']}: the template renders a different prompt for each answer")
    prompt = prompts.pop()
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=fmt != "chat")["input_ids"])
    example = {"id": row["id"], "prompt": prompt} | {a: answer for a, (_, answer) in rendered.items()}
    tokens = {a: prompt_tokens + _answer_tokens(example[a], tokenizer) for a in rendered}
    return example | ({"label": row["label"]} if kind == "unpaired" else {}) | {"tokens": tokens}


def _answer_tokens(answer: str, tokenizer) -> int:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return len(ids) + (tokenizer.eos_token_id not in ids)  # the trainer ends every answer with EOS


def as_kto(example: dict[str, Any]) -> list[dict[str, Any]]:
    """A pair as KTO's two unpaired rows: the chosen answer desirable, the rejected one not."""
    return [
        {
            "id": f"{example['id']}#{answer}",
            "prompt": example["prompt"],
            "completion": example[answer],
            "label": answer == "chosen",
            "tokens": {"completion": example["tokens"][answer]},
        }
        for answer in ANSWERS["pairs"]
    ]


def kto_rows(pairs: Dataset) -> Dataset:
    """Formatted pairs (id, prompt, chosen, rejected) as KTO's rows; a dataset already in KTO's columns as it is."""
    if "completion" in pairs.column_names:
        return pairs
    rows = [
        {"id": f"{r['id']}#{a}", "prompt": r["prompt"], "completion": r[a], "label": a == "chosen"}
        for r in pairs
        for a in ANSWERS["pairs"]
    ]
    return Dataset.from_dict({k: [r[k] for r in rows] for k in KTO_FEATURES}, features=KTO_FEATURES)


def longest(example: dict[str, Any]) -> int:
    """Tokens of the example's prompt + its longer answer: what must fit in max_length."""
    return max(example["tokens"].values())


def _split(split: str, prompt_text: str, has_eval_rows: bool, cfg: PromptConfig) -> str:
    """The data's own held-out rows, else SFT's seeded prompt hash (formatting.is_eval): whole prompts per side."""
    if has_eval_rows:
        return "eval" if split == "eval" else "train"
    return "eval" if is_eval(prompt_text, cfg.seed, cfg.eval_fraction) else "train"


def _check_overlong(overlong: list[str], policy: str, max_length: int) -> None:
    if overlong and policy == "fail":
        raise OverlongError(
            f"{len(overlong)} preference row(s) longer than max_length={max_length} tokens, prompt + longer answer "
            f"(prompt.overlong is 'fail'): {', '.join(overlong[:5])}"
        )


def _dataset(rows: list[dict[str, Any]], method: str) -> Dataset:
    features = KTO_FEATURES if method == "kto" else PAIR_FEATURES
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def _length_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Like formatting.token_stats, per row: its prompt + longest answer in tokens."""
    lengths = [longest(r) for r in rows]
    if not lengths:
        return {"rows": 0}
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "mean_len": round(statistics.mean(lengths), 1),
        "max_len": max(lengths),
        "min_len": min(lengths),
    }
