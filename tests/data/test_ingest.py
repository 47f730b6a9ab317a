import json

import pandas as pd
import pytest

from core.config import DataSource
from core.data.ingest import IngestError, load_rows, source_fingerprint


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"question": "Q1?", "context": "", "answer": "A1."},
    {"question": "Q2?", "context": "some input", "answer": "A2."},
]


def test_instruction_mapping_and_row_ids(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = load_rows(DataSource(path=str(f), columns={"instruction": "question", "input": "context", "output": "answer"}))
    assert ds["id"] == ["d.jsonl:1", "d.jsonl:2"]
    assert ds["split"] == ["", ""]
    assert ds[0]["messages"] == [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]
    assert ds[1]["messages"][0]["content"] == "Q2?\n\nsome input"


def test_explicit_eval_file_and_every_format(tmp_path):
    frame = pd.DataFrame([{"instruction": "Q1?", "output": "A1."}, {"instruction": "Q2?", "output": "A2."}])
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Q3?", "output": "A3."}]))
    held = _write_jsonl(tmp_path.parent / "held.jsonl", [{"instruction": "Q9?", "output": "A9."}])
    ds = load_rows(DataSource(path=str(tmp_path), eval_path=str(held)))
    assert ds["id"] == ["a.csv:2", "a.csv:3", "b.parquet:1", "b.parquet:2", "c.json[0]", "held.jsonl:1"]
    assert ds["split"] == ["train"] * 5 + ["eval"]


def test_chat_format(tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    f = _write_jsonl(tmp_path / "chat.jsonl", [{"conv": msgs}])
    ds = load_rows(DataSource(path=str(f), format="chat", columns={"messages": "conv"}))
    assert ds[0]["messages"] == msgs


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "bad.jsonl:2: not valid JSON"),
        (b'{"instruction": "a", "output": "b\xff"}\n', "bad.jsonl:1: not valid UTF-8"),
        (b'{"instruction": 5, "output": "b"}\n', "bad.jsonl:1: field 'instruction' must be a string, got int"),
        (b'{"prompt": "a", "output": "b"}\n', "bad.jsonl:1: missing column 'instruction'"),
        (b"[1, 2]\n", "bad.jsonl:1: expected a JSON object"),
        (b"", "bad.jsonl: file is empty"),
    ],
)
def test_unreadable_input_names_file_row_and_field(tmp_path, content, expected):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(IngestError) as err:
        load_rows(DataSource(path=str(f)))
    assert expected in str(err.value)


def test_missing_path_and_bad_suffix(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        load_rows(DataSource(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(IngestError, match="unsupported file type"):
        load_rows(DataSource(path=str(tmp_path / "x.txt")))


def test_fingerprint_follows_content(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    src = DataSource(path=str(f))
    first = source_fingerprint(src)
    assert source_fingerprint(src) == first
    _write_jsonl(f, ROWS[:1] + [{**ROWS[1], "answer": "changed"}])
    assert source_fingerprint(src) != first


SHAREGPT = [
    {
        "id": "conv-1",
        "conversations": [
            {"from": "system", "value": "You answer briefly."},
            {"from": "human", "value": "What is item 1?"},
            {"from": "gpt", "value": "Code A1."},
            {"from": "human", "value": "And item 2?"},
            {"from": "gpt", "value": "Code B2."},
        ],
    }
]


def test_sharegpt_rows_become_messages_and_train_on_every_answer(tmp_path, tiny_source):
    from core.config import PromptConfig
    from core.data.formatting import format_dataset
    from core.models import load_tokenizer
    from core.prompts import IGNORE

    rows = [json.loads(json.dumps(SHAREGPT[0]).replace("item 2", f"item {i + 2}")) for i in range(12)]
    f = _write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    ds = load_rows(DataSource(path=str(f), format="sharegpt"))
    assert [(m["role"], m["content"]) for m in ds[0]["messages"]] == [
        ("system", "You answer briefly."),
        ("user", "What is item 1?"),
        ("assistant", "Code A1."),
        ("user", "And item 2?"),
        ("assistant", "Code B2."),
    ]
    tok = load_tokenizer(tiny_source)
    train, _, _ = format_dataset(ds, tok, PromptConfig(eval_fraction=0.3))
    row = train[0]
    learned = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert learned == "Code A1.<|im_end|>\nCode B2.<|im_end|>\n"  # both answers, nothing else


def test_chat_data_with_other_turn_keys_and_role_names(tmp_path):
    rows = [{"dialogue": [{"speaker": "customer", "text": "Hi?"}, {"speaker": "agent", "text": "Hello."}]}]
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    data = DataSource(
        path=str(f),
        format="chat",
        columns={"messages": "dialogue"},
        turn_keys={"role": "speaker", "content": "text"},
        roles={"customer": "user", "agent": "assistant"},
    )
    assert load_rows(data)[0]["messages"] == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_sharegpt_data_read_as_chat_says_which_format_it_is(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", SHAREGPT)
    with pytest.raises(IngestError, match=r"conversations\[0\] must be an object with 'role' and 'content'.*"
                       r"this looks like ShareGPT data: set data.format: sharegpt"):  # fmt: skip
        load_rows(DataSource(path=str(f), format="chat", columns={"messages": "conversations"}))
    with pytest.raises(ValueError, match="turn_keys and roles apply to format chat or sharegpt"):
        DataSource(path=str(f), roles={"bot": "assistant"})
