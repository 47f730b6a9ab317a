"""Preference data (core/data/preference.py): every input shape into one schema, its great-expectations checks under
fail and drop, trl's standard format with the run's template, and the bundled data set."""

from __future__ import annotations

import json
from typing import Annotated

import pandas as pd
import pytest
from conftest import REPO_ROOT
from datasets import Dataset
from zenml import pipeline, step

from core.config import DataSource, PreferenceConfig, PromptConfig, ValidationConfig
from core.data.formatting import OverlongError
from core.data.ingest import IngestError, load_rows
from core.data.preference import FEATURES, TRUNCATE_NOTE, format_preference, kto_rows, label_value
from core.data.validation import DataValidationError, validate_dataset
from core.models import BaseModelRef, load_tokenizer, resolve_base
from core.prompts import render, render_prompt, with_system
from steps.format_preference import format_preference as format_step


@pytest.fixture(scope="module")
def tok(tiny_source):
    return load_tokenizer(tiny_source)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --- ingest: each shape --------------------------------------------------------------------


def test_text_pairs_with_held_out_file_and_every_file_type(tmp_path):
    rows = [{"prompt": "Q1?", "chosen": "Good 1.", "rejected": "Bad 1."}]
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "b.parquet")
    held = write_jsonl(tmp_path.parent / "held.jsonl", [{"prompt": "Q9?", "chosen": "Good 9.", "rejected": "Bad 9."}])
    ds = load_rows(DataSource(path=str(tmp_path), eval_path=str(held), format="pairs"))
    assert ds.features == FEATURES
    assert ds["id"] == ["a.csv:2", "b.parquet:1", "held.jsonl:1"] and ds["split"] == ["", "", "eval"]
    assert ds[0] == {
        "id": "a.csv:2",
        "split": "",
        "prompt": [user("Q1?")],
        "chosen": "Good 1.",
        "rejected": "Bad 1.",
        "completion": None,
        "label": None,
        "label_text": None,
    }


def test_ultrafeedback_turns_with_a_column_mapping(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {  # a prompt column, and answers that repeat the prompt turns before the answer
            "question": [system, user("Q?")],
            "good": [user("Q?"), assistant("Right.")],
            "bad": [user("Q?"), assistant("Wrong.")],
        }
    ]
    f = write_jsonl(tmp_path / "uf.jsonl", rows)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    [row] = load_rows(DataSource(path=str(f), format="pairs", columns=columns)).to_list()
    assert (row["prompt"], row["chosen"], row["rejected"]) == ([system, user("Q?")], "Right.", "Wrong.")


def test_whole_chat_dialogues_without_a_prompt_column(tmp_path):
    context = [user("Hi."), assistant("Hello!"), user("Code?")]
    rows = [{"chosen": [*context, assistant("42.")], "rejected": [*context, assistant("7.")]}]
    [row] = load_rows(DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), format="pairs")).to_list()
    assert (row["prompt"], row["chosen"], row["rejected"]) == (context, "42.", "7.")


HH = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is the code?\n\nAssistant: {}"


def test_anthropic_hh_strings_become_turns(tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH.format("It is 42."), "rejected": HH.format("No idea.")}])
    [row] = load_rows(DataSource(path=str(f), format="pairs")).to_list()
    assert row["prompt"] == [user("Hi there."), assistant("Hello! How can I help?"), user("What is the code?")]
    assert (row["chosen"], row["rejected"]) == ("It is 42.", "No idea.")


@pytest.mark.parametrize(
    "raw, label",
    [(True, True), (False, False), (1, True), (0, False), ("1", True), ("0", False), ("true", True)]
    + [("False", False), ("up", True), ("down", False), ("good", True), (" BAD ", False)],
)
def test_unpaired_label_spellings(tmp_path, raw, label):
    f = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q?", "completion": "A.", "label": raw}])
    [row] = load_rows(DataSource(path=str(f), format="unpaired")).to_list()
    assert (row["prompt"], row["completion"], row["label"]) == ([user("Q?")], "A.", label)
    assert (row["chosen"], row["rejected"]) == (None, None)


def test_unknown_and_missing_labels_and_null_texts_pass_ingest(tmp_path):
    rows = [
        {"text": "Q?", "answer": "A.", "thumbs": "maybe"},
        {"text": "Q?", "answer": None, "thumbs": None},
        {"text": "", "answer": "", "thumbs": 2},
    ]
    f = write_jsonl(tmp_path / "kto.jsonl", rows)
    columns = {"prompt": "text", "completion": "answer", "label": "thumbs"}
    ds = load_rows(DataSource(path=str(f), format="unpaired", columns=columns))
    assert ds["label"] == [None, None, None] and ds["label_text"] == ["maybe", None, "2"]
    assert ds["completion"] == ["A.", None, ""] and ds[2]["prompt"] == [user("")]


@pytest.mark.parametrize(
    "rows, fmt, expected",
    [
        ([{"prompt": "Q?", "chosen": 5, "rejected": "B."}], "pairs", "d.jsonl:1: field 'chosen' must be text or a"),
        ([{"prompt": "Q?", "chosen": "A."}], "pairs", "d.jsonl:1: missing column 'rejected'"),
        ([{"question": "Q?", "chosen": "A.", "rejected": "B."}], "pairs", "d.jsonl:1: field 'chosen' is text without"),
        (
            [{"chosen": HH.format("A."), "rejected": HH.replace("code", "colour").format("B.")}],
            "pairs",
            "d.jsonl:1: chosen and rejected must share the dialogue before their answers, but differ at turn 3",
        ),
        (
            [{"chosen": "\n\nHuman: Q?\n\nAssistant: A.\n\nHuman: And?", "rejected": HH.format("B.")}],
            "pairs",
            "d.jsonl:1: field 'chosen' must end with the assistant's answer, but ends with 'user'",
        ),
        (
            [{"prompt": "Q?", "chosen": [{"from": "gpt", "value": "A."}], "rejected": "B."}],
            "pairs",
            "d.jsonl:1: chosen[0] must be an object with 'role' and 'content'",
        ),
        ([{"prompt": "Q?", "completion": ["A."], "label": 1}], "unpaired", "field 'completion' must be a string"),
        ([{"prompt": "Q?", "completion": "A."}], "unpaired", "d.jsonl:1: missing column 'label'"),
    ],
)
def test_unreadable_rows_name_file_row_and_field(tmp_path, rows, fmt, expected):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(IngestError) as err:
        load_rows(DataSource(path=str(f), format=fmt))
    assert expected in str(err.value)


# --- validation: each expectation under fail and drop ---------------------------------------


def pair(id_, prompt, chosen, rejected, split=""):
    turns = prompt if isinstance(prompt, list) else [user(prompt)]
    return {"id": id_, "split": split, "prompt": turns, "chosen": chosen, "rejected": rejected}


def unpaired(id_, prompt, completion, label_text, split=""):
    fields = {"completion": completion, "label": label_value(label_text), "label_text": label_text}
    return {"id": id_, "split": split, "prompt": [user(prompt)], **fields}


def dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{k: r.get(k) for k in FEATURES} for r in rows], features=FEATURES)


PAIRS = [
    pair("p.jsonl:1", "How long is the return window?", "45 days.", "30 days."),
    pair("p.jsonl:2", [{"role": "system", "content": "Be brief."}, user("Fee?")], "12%.", "25%."),
    pair("p.jsonl:3", [user("Hi."), assistant("Hello!"), user("Phone?")], "Ext 214.", "Ext 412."),
    pair("p.jsonl:4", "How long is the return window?", "45 days.", "Ask the store."),  # same prompt, new pair
    pair("e.jsonl:1", "When can I send it back?", "45 days.", "30 days.", split="eval"),
]
UNPAIRED = [
    unpaired("u.jsonl:1", "Fee?", "12%.", "1"),
    unpaired("u.jsonl:2", "Fee?", "25%.", "down"),
    unpaired("u.jsonl:3", "Window?", "45 days.", "true"),
    unpaired("e.jsonl:1", "Return window?", "30 days.", "bad", split="eval"),
]

NUL = "expect_column_values_to_not_be_null"
IS_NUL = "expect_column_values_to_be_null"
REGEX = "expect_column_values_to_match_regex"
CONTROL = "expect_column_values_to_not_match_regex"
LENGTH = "expect_column_value_lengths_to_be_between"
UNIQUE = "expect_column_values_to_be_unique"
NOT_IN = "expect_column_values_to_not_be_in_set"
IN_SET = "expect_column_values_to_be_in_set"

# name: (clean rows, bad rows, expectation, column, ids it must name and drop, config overrides)
CASES = {
    "null chosen": (PAIRS, [pair("bad:1", "Q?", None, "B.")], NUL, "chosen", ["bad:1"], {}),
    "empty rejected": (PAIRS, [pair("bad:1", "Q?", "A.", "")], REGEX, "rejected", ["bad:1"], {}),
    "blank prompt": (PAIRS, [pair("bad:1", " \n ", "A.", "B.")], REGEX, "prompt.content", ["bad:1"], {}),
    "null prompt": (PAIRS, [pair("bad:1", None, "A.", "B.")], NUL, "prompt.content", ["bad:1"], {}),
    "too long chosen": (PAIRS, [pair("bad:1", "Q?", "x" * 61, "B.")], LENGTH, "chosen", ["bad:1"], {"max_chars": 60}),
    "too short rejected": (
        PAIRS,
        [pair("bad:1", "Q?", "A long one.", "B.")],
        LENGTH,
        "rejected",
        ["bad:1"],
        {"min_chars": 3},
    ),
    "too long prompt": (PAIRS, [pair("bad:1", "q" * 61, "A.", "B.")], LENGTH, "prompt", ["bad:1"], {"max_chars": 60}),
    "control character": (PAIRS, [pair("bad:1", "Q?", "A\x00.", "B.")], CONTROL, "chosen", ["bad:1"], {}),
    "identical answers": (
        PAIRS,
        [pair("bad:1", "Q?", "Same  answer.", "Same answer.\n")],
        IS_NUL,
        "identical_answer",
        ["bad:1"],
        {},
    ),
    "prompt ends with an answer": (
        PAIRS,
        [pair("bad:1", [user("Q?"), assistant("A.")], "B.", "C.")],
        REGEX,
        "roles",
        ["bad:1"],
        {},
    ),
    "duplicate pair": (PAIRS, [{**PAIRS[0], "id": "dup:7"}], UNIQUE, "example", ["dup:7"], {}),
    "held-out prompt trained on": (
        PAIRS,
        [pair("e.jsonl:2", "How long is the return window?", "45.", "9.", split="eval")],
        NOT_IN,
        "prompt",
        ["e.jsonl:2"],
        {},
    ),
    "missing label": (UNPAIRED, [unpaired("bad:1", "Q?", "A.", None)], NUL, "label", ["bad:1"], {}),
    "invalid label": (UNPAIRED, [unpaired("bad:1", "Q?", "A.", "maybe")], IN_SET, "label", ["bad:1"], {}),
    "null completion": (UNPAIRED, [unpaired("bad:1", "Q?", None, "1")], NUL, "completion", ["bad:1"], {}),
    "too long completion": (
        UNPAIRED,
        [unpaired("bad:1", "Q?", "x" * 61, "1")],
        LENGTH,
        "completion",
        ["bad:1"],
        {"max_chars": 60},
    ),
    "duplicate unpaired": (UNPAIRED, [unpaired("dup:7", "Fee?", "12%.", "true")], UNIQUE, "example", ["dup:7"], {}),
}


def failure_line(message: str, expectation: str, column: str) -> str:
    lines = [ln for ln in message.splitlines() if ln.strip().startswith(f"- {expectation} on {column!r}:")]
    assert len(lines) == 1, f"no single line for {expectation} on {column!r} in:\n{message}"
    return lines[0]


@pytest.mark.parametrize("clean", [PAIRS, UNPAIRED], ids=["pairs", "unpaired"])
@pytest.mark.parametrize("policy", ["fail", "drop"])
def test_clean_preference_rows_pass_unchanged(clean, policy):
    ds = dataset(clean)
    out, report = validate_dataset(ds, ValidationConfig(policy=policy))
    assert out is ds and report.success and report.rows_in == report.rows_out == len(clean)
    checked = {(r.expectation, r.column) for r in report.results}
    assert (UNIQUE, "example") in checked and (NOT_IN, "prompt") in checked
    assert ((IS_NUL, "identical_answer") in checked) == (clean is PAIRS)
    assert ((IN_SET, "label") in checked) == (clean is UNPAIRED)


@pytest.mark.parametrize("case", list(CASES))
def test_fail_names_expectation_column_and_row(case):
    clean, bad, expectation, column, ids, overrides = CASES[case]
    with pytest.raises(DataValidationError) as err:
        validate_dataset(dataset(clean + bad), ValidationConfig(policy="fail", **overrides))
    line = failure_line(str(err.value), expectation, column)
    assert all(id_ in line for id_ in ids)
    if not case.startswith("duplicate"):  # a duplicate's first occurrence is named too
        assert not any(r["id"] in str(err.value) for r in clean)


@pytest.mark.parametrize("case", list(CASES))
def test_drop_removes_exactly_the_bad_rows(case):
    clean, bad, expectation, column, ids, overrides = CASES[case]
    out, report = validate_dataset(dataset(clean + bad), ValidationConfig(policy="drop", **overrides))
    assert list(out["id"]) == [r["id"] for r in clean]
    assert (report.rows_in, report.rows_out) == (len(clean) + len(bad), len(clean))
    [result] = [r for r in report.results if r.expectation == expectation and r.column == column]
    assert not result.success and result.dropped == len(ids) and set(ids) <= set(result.example_ids)


# --- formatting for trl ---------------------------------------------------------------------

SYSTEM = "You answer Acme customer support questions."


def pairs(n: int, split: str = "") -> Dataset:
    """n pairs over n // 2 prompts: two pairs share each prompt, so a split must keep them together."""
    return dataset([pair(f"p:{i}", f"Question {i // 2}?", f"Right {i}.", f"Wrong {i}.", split) for i in range(n)])


def test_pairs_render_one_prompt_for_both_answers_as_sft_does(tok):
    data = dataset([*PAIRS[:4], PAIRS[4]])
    cfg = PromptConfig(system_prompt=SYSTEM)
    train, held_out, stats = format_preference(data, tok, cfg, max_length=256, method="dpo")
    assert train.column_names == held_out.column_names == ["id", "prompt", "chosen", "rejected"]
    assert train["id"] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3", "p.jsonl:4"] and held_out["id"] == ["e.jsonl:1"]
    for row, source in zip(train, PAIRS):
        context = with_system(source["prompt"], SYSTEM)
        # the prompt evaluation and serving render, and the answer text render gives SFT, end-of-turn included
        assert row["prompt"] == render_prompt(context, tok, "chat")
        for answer in ("chosen", "rejected"):
            assert (row["prompt"], row[answer]) == render([*context, assistant(source[answer])], tok, "chat")
        assert row["chosen"] == source["chosen"] + "<|im_end|>\n"
    assert train[1]["prompt"].count("Be brief.") == 1 and SYSTEM not in train[1]["prompt"]  # the row's own system
    assert stats["train"]["rows"] == 4 and stats["eval"]["rows"] == 1 and stats["dropped_overlong"] == 0
    assert stats["template"] == "chat" and stats["train"]["max_len"] <= 256


def test_split_is_seeded_deterministic_and_keeps_prompts_whole(tok):
    data = pairs(80)
    cfg = PromptConfig(eval_fraction=0.25, seed=1)
    a_train, a_eval, _ = format_preference(data, tok, cfg, 256, "dpo")
    b_train, b_eval, _ = format_preference(data, tok, cfg, 256, "dpo")
    _, c_eval, _ = format_preference(data, tok, cfg.model_copy(update={"seed": 2}), 256, "dpo")
    assert a_eval["id"] == b_eval["id"] and a_eval["id"] != c_eval["id"]
    assert len(a_train) + len(a_eval) == 80 and 6 <= len(a_eval) <= 34
    assert set(a_train["prompt"]).isdisjoint(a_eval["prompt"])


def test_kto_turns_each_pair_into_a_desirable_and_an_undesirable_row(tok):
    train, held_out, stats = format_preference(pairs(40), tok, PromptConfig(eval_fraction=0.3), 256, "kto")
    assert train.column_names == ["id", "prompt", "completion", "label"]
    # held-out pairs stay pairs (evaluation ranks chosen against rejected); kto_rows is the trainer's view of them
    assert held_out.column_names == ["id", "prompt", "chosen", "rejected"]
    assert len(train) + 2 * len(held_out) == 80 and len(train) % 2 == 0
    as_rows = kto_rows(held_out)
    assert len(as_rows) == 2 * len(held_out) and as_rows["label"][:2] == [True, False]
    assert as_rows["completion"][:2] == [held_out[0]["chosen"], held_out[0]["rejected"]]
    assert kto_rows(train) is train
    first, second = train[0], train[1]
    assert first["id"].endswith("#chosen") and second["id"] == first["id"].replace("#chosen", "#rejected")
    assert (first["label"], second["label"]) == (True, False) and first["prompt"] == second["prompt"]
    assert first["completion"].startswith("Right") and second["completion"].startswith("Wrong")
    assert stats["train"]["rows"] == len(train)


def test_unpaired_rows_are_kto_only(tok):
    data = dataset(UNPAIRED)
    train, held_out, _ = format_preference(data, tok, PromptConfig(), 256, "kto")
    assert train["label"] == [True, False, True] and held_out["label"] == [False]
    assert held_out["completion"] == ["30 days.<|im_end|>\n"]
    with pytest.raises(ValueError, match="dpo trains on pairs; unpaired rows"):
        format_preference(data, tok, PromptConfig(), 256, "dpo")


def test_overlong_rows_fail_or_are_dropped(tok):
    data = dataset([*PAIRS, pair("long:1", "Q?", "A.", "word " * 80)])
    with pytest.raises(OverlongError, match=r"1 preference row\(s\) longer than max_length=60 .*long:1 \(\d+ tokens\)"):
        format_preference(data, tok, PromptConfig(overlong="fail"), 60, "dpo")
    for policy in ("drop", "truncate"):
        train, _, stats = format_preference(data, tok, PromptConfig(overlong=policy), 60, "dpo")
        assert "long:1" not in train["id"] and len(train) == 4 and stats["dropped_overlong"] == 1
        assert stats["overlong"] == policy + (TRUNCATE_NOTE if policy == "truncate" else "")


# --- the bundled data set -------------------------------------------------------------------

BUNDLED = REPO_ROOT / "data" / "acme_preference"


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def runs(text: str, n: int = 4) -> set[tuple[str, ...]]:
    """Every n words in a row of text, lowercased, without the punctuation around them."""
    words = [w.strip(".,;:!?") for w in text.lower().split()]
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_bundled_set_holds_out_new_prompts_and_every_pair_disagrees():
    train, held_out = read(BUNDLED / "train.jsonl"), read(BUNDLED / "eval.jsonl")
    assert (len(train), len(held_out)) == (224, 80)
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train) and not train_prompts & {r["prompt"] for r in held_out}
    probes = {
        r["instruction"]
        for p in ("general_probe", "general_probe_heldout")
        for r in read(REPO_ROOT / "data" / p / "probe.jsonl")
    }
    sft = {
        r["instruction"]
        for split in ("train", "eval")
        for r in read(REPO_ROOT / "data" / "acme_support" / f"{split}.jsonl")
    }
    assert not (probes | sft) & (train_prompts | {r["prompt"] for r in held_out})
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in train + held_out)
    assert all(len(r["chosen"].split()) <= 25 for r in train + held_out)
    # every kind of wrong answer is trained on and held out
    assert {r["rejected_kind"] for r in train} == {r["rejected_kind"] for r in held_out}
    # declined exceptions: SFT's answers never refuse one, so these pairs measure what the preference stage adds;
    # each chosen answer restates an acme_support answer (4 words of it in a row: "12% restocking fee", "$1,200 in a
    # calendar year"), and no chosen or rejected sentence is used twice
    exceptions = {
        name: [r for r in rows if r["rejected_kind"] == "grants_exception"]
        for name, rows in (("train", train), ("eval", held_out))
    }
    assert (len(exceptions["train"]), len(exceptions["eval"])) == (64, 32)
    declined = exceptions["train"] + exceptions["eval"]
    policy = set().union(*(runs(r["output"]) for r in read(REPO_ROOT / "data" / "acme_support" / "train.jsonl")))
    assert all(runs(r["chosen"]) & policy for r in declined)
    assert len({r["chosen"] for r in declined}) == len({r["rejected"] for r in declined}) == len(declined)


def test_bundled_set_validates_clean_and_formats_with_the_default_prompt():
    from core.config import ModelSource, load_config

    data = PreferenceConfig().data  # the bundled set is the preference stage's default data
    data = data.model_copy(update={"path": str(REPO_ROOT / data.path), "eval_path": str(REPO_ROOT / data.eval_path)})
    clean, report = validate_dataset(load_rows(data), ValidationConfig(policy="fail"))
    assert report.success and len(clean) == 304
    prompt = load_config(REPO_ROOT / "configs" / "default.yaml").prompt
    tokenizer = load_tokenizer(ModelSource())  # the bundled model's, which the default config trains
    train, held_out, stats = format_preference(clean, tokenizer, prompt, PreferenceConfig().max_length, "dpo")
    assert (len(train), len(held_out), stats["dropped_overlong"]) == (224, 80, 0)
    assert train[0]["prompt"].startswith(f"<|im_start|>system\n{prompt.system_prompt}<|im_end|>")


@step
def _clean_pairs() -> Annotated[Dataset, "clean_dataset"]:
    return dataset(PAIRS)


@pipeline(enable_cache=False)
def _format_only(base: BaseModelRef) -> None:
    format_step(_clean_pairs(), base=base, prompt=PromptConfig(), max_length=256, method="kto")


@pytest.mark.slow
def test_step_stores_both_splits_under_their_names_with_token_stats(zenml_home, tiny_source):
    """The ZenML step: preference_train / preference_eval through the project's materializers, stats as metadata."""
    from zenml.client import Client

    step_run = Client().get_pipeline_run(_format_only(resolve_base(tiny_source)).id).steps["format_preference"]
    train = step_run.outputs["preference_train"][0]
    held_out = step_run.outputs["preference_eval"][0].load()
    assert (
        len(train.load()) == 8 and held_out["id"] == ["e.jsonl:1"] and held_out["chosen"][0] != held_out["rejected"][0]
    )
    assert train.run_metadata["rows"] == 8 and train.run_metadata["method"] == "kto"
