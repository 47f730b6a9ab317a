"""configs/retrain_from_feedback.yaml through the `zenml` CLI on the tiny model: a store of answers by a staged
version, some corrected and rated; the retrain run's training data holds exactly the corrections and up-rated answers
(SFT, via data.mix) and the correction pairs (DPO), each with its completion id; cli.trace names both versions; a run
with too little new feedback stops at ingest, saying so, and promotes nothing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from support.cli_run import run_config
from test_preference_run import toy_pairs
from test_shipped_configs import toy_data

from core.feedback.store import FeedbackStore, sqlite_url, utcnow

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # two CLI runs, ~2 min: make test-integration

MODEL = "feedback-retrain"
CORRECTED = range(500, 506)  # answered wrong, corrected: SFT rows (the correction) and DPO pairs
UP = range(506, 508)  # answered right, rated up: SFT rows (the answer as served)
IGNORED = {508: {"rating": "down"}, 509: {"score": 3}}  # no correction, no positive rating: no row


def question(i: int) -> str:
    return f"What is the code for item {i}?"


def right(i: int) -> str:
    return f"The code for item {i} is {i * 7 % 100}."


def fill_store(url: str, version: str) -> None:
    store = FeedbackStore.open(url)
    store.add_completions(
        [
            dict(
                id=f"chatcmpl-{i}", created_at=utcnow(), endpoint="chat.completions", model=MODEL, version=version,
                adapter="default", messages=[{"role": "user", "content": question(i)}],
                answer=right(i) if i in UP else f"The fee for item {i} is {i % 10}.", sampling={}, prompt_tokens=9,
                completion_tokens=9, latency_s=0.1, stream=False,
            )
            for i in range(500, 510)
        ]
    )  # fmt: skip
    for i in CORRECTED:
        store.put_feedback(f"chatcmpl-{i}", "reviewer", rating="down", correction=right(i))
    for i in UP:
        store.put_feedback(f"chatcmpl-{i}", "api", rating="up")
    for i, fields in IGNORED.items():
        store.put_feedback(f"chatcmpl-{i}", "api", **fields)


def tiny_retrain_config(root: Path, tiny_model_dir: Path, url: str, sft_min_rows: int = 5) -> Path:
    doc = yaml.safe_load((REPO_ROOT / "configs" / "retrain_from_feedback.yaml").read_text())
    doc["model"]["name"] = MODEL
    config = doc["parameters"]["config"]
    config["model"] = {"source": "local", "name": str(tiny_model_dir)}
    toy_data(config["data"], root, "data", offset=300)
    (feedback,) = config["data"]["mix"]
    feedback.update(url=url, min_rows=sft_min_rows)
    config["train"].update(
        num_epochs=2, learning_rate=1e-2, micro_batch_size=4, tokens_per_micro_batch=None, save_every=100,
        checkpoint_dir=str(root / "ckpt"),
    )  # fmt: skip
    config["train"]["replay"]["answers"] = "data"  # a random tiny model never ends an answer: no own rehearsal
    pairs = config["train"]["preference"]
    pairs["data"].update(url=url, min_rows=3, eval_path=toy_pairs(root)["eval_path"])
    pairs.update(learning_rate=5e-3, num_epochs=2)
    config["evaluate"].update(num_generate=2, max_new_tokens=4, general_max_new_tokens=4)
    # this test is about the data the run trains on: a tiny model's gate verdict would only make it flaky
    config["evaluate"]["gate"].update(min_loss_improvement=0.01, on_fail="warn")
    config["merge"]["logit_rtol"] = (
        0.05  # fp16 rounding of the random tiny model (tests/pipelines/test_preference_run.py)
    )
    path = root / "retrain.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def failure(done: subprocess.CompletedProcess) -> str:
    """The lines naming an error (a failed step's is far above the run's own traceback), then the output's end."""
    output = done.stdout + done.stderr
    return "\n".join(line for line in output.splitlines() if "Error" in line)[-4000:] + "\n...\n" + output[-2000:]


def test_retrain_learns_exactly_the_feedback_and_traces_it(zenml_home, tmp_path, tiny_model_dir, capsys):
    from zenml.client import Client

    from cli.trace import main as trace
    from core.runs.registry import headline

    client = Client()
    client.create_model(name=MODEL)
    served = client.create_model_version(model_name_or_id=MODEL)
    client.update_model_version(model_name_or_id=MODEL, version_name_or_id=served.id, stage="staging")
    url = sqlite_url(tmp_path / "feedback.db")
    fill_store(url, str(served.number))  # every feedback entry is newer than the staged version

    done = run_config(tiny_retrain_config(tmp_path, tiny_model_dir, url))
    assert done.returncode == 0, failure(done)
    run = client.get_pipeline("lora_pipeline").last_run
    mixed = run.steps["mix_data"].outputs["mixed_train_dataset"][0].load()
    learned = {r["id"]: r["messages"][-1]["content"] for r in mixed if r["id"].startswith("feedback::")}
    assert learned == {f"feedback::feedback:chatcmpl-{i}": right(i) for i in [*CORRECTED, *UP]}
    pairs = run.steps["ingest_preference"].outputs["raw_dataset"][0].load()
    trained_pairs = {r["id"]: (r["chosen"], r["rejected"]) for r in pairs if r["split"] == "train"}
    assert trained_pairs == {
        f"feedback:chatcmpl-{i}": (right(i), f"The fee for item {i} is {i % 10}.") for i in CORRECTED
    }
    preference_train = run.steps["format_preference"].outputs["preference_train"][0].load()
    assert sorted(preference_train["id"]) == sorted(trained_pairs)

    new = run.model_version
    meta = client.get_model_version(MODEL, new.id).run_metadata
    assert meta["feedback_chat"]["completions"] == {f"chatcmpl-{i}": str(served.number) for i in [*CORRECTED, *UP]}
    assert headline(meta)["feedback_rows"] == 8  # the history counts each completion once (SFT row and pair)

    assert trace(["chatcmpl-501", "--db", url]) == 0
    out = capsys.readouterr().out
    assert f"answered by model {MODEL} version {served.number} (adapter default)" in out
    assert f"learned by version {new.number}" in out and run.name in out

    # too little new feedback: the run stops at the feedback's ingest and promotes nothing
    stages = {v.number: v.stage for v in client.list_model_versions(model=MODEL).items}
    done = run_config(tiny_retrain_config(tmp_path, tiny_model_dir, url, sft_min_rows=100))
    assert done.returncode != 0
    stopped = re.search(
        r"error in step ingest_mix_feedback: TooLittleFeedback: too little new feedback: \d+ chat rows since version "
        r"\d+ .*needs min_rows=100",
        done.stderr,
    )
    assert stopped and "Traceback" not in done.stderr, done.stderr[-3000:]
    newest = client.list_model_versions(model=MODEL, sort_by="desc:number", size=1).items[0]
    assert newest.stage is None and {v.number: v.stage for v in client.list_model_versions(model=MODEL).items} == (
        stages | {newest.number: None}
    )
