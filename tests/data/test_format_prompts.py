import json

import pytest
from datasets import Dataset

from core.config import PromptConfig
from core.data.formatting import OverlongError, format_dataset
from core.data.ingest import FEATURES
from core.models import load_tokenizer
from core.prompts import IGNORE, render_prompt


@pytest.fixture(scope="module")
def tok(tiny_source):
    return load_tokenizer(tiny_source)


def _rows(n, split="", answer="The answer is {i}."):
    return Dataset.from_dict(
        {
            "id": [f"r{i}" for i in range(n)],
            "split": [split] * n,
            "messages": [
                [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer.format(i=i)}]
                for i in range(n)
            ],
        },
        features=FEATURES,
    )


def test_prompt_tokens_masked_response_and_eos_kept(tok):
    train, _, counts = format_dataset(_rows(30), tok, PromptConfig(eval_fraction=0.2))
    assert counts["template"] == "chat"
    row = train[0]
    n = row["prompt_len"]
    assert row["labels"][:n] == [IGNORE] * n
    response = row["labels"][n:]
    assert IGNORE not in response and response == row["input_ids"][n:]
    assert tok.eos_token_id in response
    answer = tok.decode(response, skip_special_tokens=True).strip()
    assert answer == row["messages"][-1]["content"]
    # generation sees exactly the tokens training masked
    prompt = render_prompt(row["messages"][:-1], tok, "chat")
    assert tok(prompt, add_special_tokens=False)["input_ids"] == row["input_ids"][:n]


def test_alpaca_template_for_models_without_chat_template(tok):
    train, _, counts = format_dataset(_rows(10), tok, PromptConfig(template="alpaca", eval_fraction=0.3))
    text = tok.decode(train[0]["input_ids"])
    assert counts["template"] == "alpaca" and "### Instruction:" in text and "### Response:" in text
    assert train[0]["labels"][-1] == tok.eos_token_id


def test_user_template_renders_trains_and_generates_the_same_prompt(tok):
    template = "### System: {system}\n### Question: {instruction}\n### Answer: "
    cfg = PromptConfig(template=template, system_prompt="Be brief.", eval_fraction=0.3)
    train, _, counts = format_dataset(_rows(10), tok, cfg)
    row = train[0]
    n = row["prompt_len"]
    assert counts["template"] == "custom"
    prompt = tok.decode(row["input_ids"][:n], skip_special_tokens=True)
    number = row["messages"][-1]["content"].split()[-1].rstrip(".")
    assert prompt == f"### System: Be brief.\n### Question: Question {number}?\n### Answer: "
    assert row["labels"][:n] == [IGNORE] * n and row["labels"][-1] == tok.eos_token_id
    answer = tok.decode(row["labels"][n:], skip_special_tokens=True).strip()
    assert answer == row["messages"][-1]["content"]
    # serving and evaluation render the same prompt text from the context turns
    assert render_prompt(row["messages"][:-1], tok, template) == prompt


@pytest.mark.parametrize(
    "template, problem",
    [
        ("chta", "no {instruction} placeholder"),
        ("Q: {question}\nA:", "unknown placeholder(s) {question}"),
        ("{instruction!r} ->", "no conversion or format spec"),
        ("{instruction} {", "not a valid template string"),
        ("{} {instruction}", "unknown placeholder(s) {}"),
    ],
)
def test_bad_user_template_is_an_error_at_config_load(tmp_path, template, problem):
    from core.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "parameters:\n  config:\n    data: {path: x.jsonl}\n    prompt:\n      template: " + json.dumps(template) + "\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "prompt.template" in str(err.value) and problem in str(err.value)


def test_split_is_seeded_deterministic_and_prompt_disjoint(tok):
    data = _rows(60)
    a_train, a_eval, _ = format_dataset(data, tok, PromptConfig(eval_fraction=0.25, seed=1))
    b_train, b_eval, _ = format_dataset(data, tok, PromptConfig(eval_fraction=0.25, seed=1))
    c_train, c_eval, _ = format_dataset(data, tok, PromptConfig(eval_fraction=0.25, seed=2))
    assert a_eval["id"] == b_eval["id"] and a_eval["id"] != c_eval["id"]
    assert set(a_train["id"]).isdisjoint(a_eval["id"]) and len(a_train) + len(a_eval) == 60
    assert 5 <= len(a_eval) <= 25


def test_explicit_eval_rows_are_the_eval_split(tok):
    data = Dataset.from_dict(
        {"id": _rows(8)["id"], "split": ["train"] * 6 + ["eval"] * 2, "messages": _rows(8)["messages"]},
        features=FEATURES,
    )
    train, held_out, _ = format_dataset(data, tok, PromptConfig())
    assert held_out["id"] == ["r6", "r7"] and len(train) == 6


def test_overlong_policies(tok):
    data = _rows(12, answer="word " * 80 + "{i}")
    short = PromptConfig(max_seq_len=60, eval_fraction=0.3)
    with pytest.raises(OverlongError, match=r"12 row\(s\) longer than prompt.max_seq_len=60.*r0"):
        format_dataset(data, tok, short.model_copy(update={"overlong": "fail"}))
    train, held_out, counts = format_dataset(data, tok, short.model_copy(update={"overlong": "truncate"}))
    assert (
        counts["truncated"] == 12 and max(len(x) for x in list(train["input_ids"]) + list(held_out["input_ids"])) == 60
    )
    mixed = Dataset.from_dict(
        {
            "id": ["long", "s1", "s2", "s3"],
            "split": ["train", "train", "train", "eval"],
            "messages": [_rows(1, answer="word " * 80)[0]["messages"]] + list(_rows(3)["messages"]),
        },
        features=FEATURES,
    )
    train, _, counts = format_dataset(mixed, tok, short.model_copy(update={"overlong": "drop"}))
    assert counts["dropped_overlong"] == 1 and "long" not in train["id"]


def _runs(ids, labels):
    """The learned token runs of a row, each as (start, end) positions."""
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("train_on", ["all_turns", "last_turn"])
def test_three_turn_conversation_masks_token_by_token(tok, train_on):
    conversation = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is item 1?"},
        {"role": "assistant", "content": "Code A1."},
        {"role": "user", "content": "And item 2?"},
        {"role": "assistant", "content": "Code B2."},
        {"role": "user", "content": "And item 3?"},
        {"role": "assistant", "content": "Code C3."},
    ]
    data = Dataset.from_dict({"id": ["c"] * 4, "split": ["train", "train", "train", "eval"],
                              "messages": [conversation] * 4}, features=FEATURES)  # fmt: skip
    train, _, _ = format_dataset(data, tok, PromptConfig(train_on=train_on))
    ids, labels, prompt_len = train[0]["input_ids"], train[0]["labels"], train[0]["prompt_len"]
    # the whole conversation, as the chat template writes it, and labels copy ids wherever they are learned
    assert tok.decode(ids) == tok.apply_chat_template(conversation, tokenize=False)
    assert all(lab in (IGNORE, tid) for tid, lab in zip(ids, labels))
    learned = [tok.decode(ids[a:b]) for a, b in _runs(ids, labels)]
    answers = ["Code A1.<|im_end|>\n", "Code B2.<|im_end|>\n", "Code C3.<|im_end|>\n"]
    expected = answers if train_on == "all_turns" else answers[-1:]
    assert learned == expected
    # every other token is -100: the system and user turns and the "<|im_start|>assistant\n" headers
    masked = tok.apply_chat_template(conversation, tokenize=False)
    for answer in expected:
        masked = masked.replace(answer, "", 1)
    assert tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE]) == masked
    # generation's prompt is the same in both modes: everything before the last answer, tokenized in one piece
    assert ids[:prompt_len] == tok(render_prompt(conversation[:-1], tok, "chat"), add_special_tokens=False)["input_ids"]


def test_all_turns_is_the_default_and_single_turn_rows_do_not_change(tok):
    assert PromptConfig().train_on == "all_turns"
    a, _, _ = format_dataset(_rows(20), tok, PromptConfig(eval_fraction=0.2))
    b, _, _ = format_dataset(_rows(20), tok, PromptConfig(eval_fraction=0.2, train_on="last_turn"))
    assert a["labels"] == b["labels"] and a["input_ids"] == b["input_ids"]
