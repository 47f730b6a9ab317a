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
    prompt = render_prompt(row["messages"][:-1], tok, chat=True)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == row["input_ids"][:n]


def test_alpaca_template_for_models_without_chat_template(tok):
    train, _, counts = format_dataset(_rows(10), tok, PromptConfig(template="alpaca", eval_fraction=0.3))
    text = tok.decode(train[0]["input_ids"])
    assert counts["template"] == "alpaca" and "### Instruction:" in text and "### Response:" in text
    assert train[0]["labels"][-1] == tok.eos_token_id


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
