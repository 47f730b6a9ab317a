"""The feedback loop closed on the tiny model, through the product's own paths: a staged version with an adapter is
deployed as `make serve` deploys it (pipelines/serve_pipeline.py with configs/serve.yaml, ZenML's local deployer,
127.0.0.1), its request log in the test's SQLite store; the official `openai` client asks it questions (whole and
streamed) and rates and corrects the answers through POST /v1/feedback; the deployment is deleted; then
configs/retrain_from_feedback.yaml runs through the `zenml` CLI. Its training data holds exactly the corrections and
up-rated answers (SFT, via data.mix) and the correction pairs (DPO), each with the completion id the client received;
cli.trace names both versions; a run with too little new feedback stops at ingest, saying so, and promotes nothing."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import requests
import yaml
from conftest import REPO_ROOT, default_stack_plus
from sqlalchemy import make_url
from support.cli_run import run_config
from support.deployments import fail_with_server_logs, wait_answering
from test_preference_run import toy_pairs
from test_shipped_configs import toy_data

from core.feedback.requestlog import default_url

# a deployment and two CLI runs, ~3 min: make test-integration
pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "feedback-retrain"
ITEMS = range(500, 510)  # one question each, asked of the deployment
CORRECTED = range(500, 506)  # rated down and corrected: SFT rows (the correction) and DPO pairs (correction, answer)
UP = range(506, 508)  # rated up: SFT rows (the answer as served)
IGNORED = {508: {"rating": "down"}, 509: {"rating": 3}}  # no correction, no positive rating: no row
STREAMED = {503, 507}  # asked with stream=True: one to be corrected, one to be rated up
SECOND_SOURCE = 502  # corrected by a reviewer, then rated up by an app: still one row, the correction's


def question(i: int) -> str:
    return f"What is the code for item {i}?"


def right(i: int) -> str:
    return f"The code for item {i} is {i * 7 % 100}."


def stage_served_version(root: Path, tiny_model_dir: Path):
    """Version 1 of MODEL at staging with an `adapter` artifact linked as training links it (a random LoRA on the
    tiny model: that it serves matters here, not what it learned). The deployment serves it; the retrain's
    `since: last_version` counts from it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from zenml import save_artifact
    from zenml.client import Client
    from zenml.model.utils import link_artifact_version_to_model_version

    import materializers  # noqa: F401  (folder artifacts)
    from core.artifacts import ModelFolder
    from core.config import ModelSource
    from core.models import load_base

    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = get_peft_model(load_base(ModelSource(source="local", name=str(tiny_model_dir)), quant=None), lora)
    adapter.save_pretrained(root / "served-adapter", save_embedding_layers=False)
    client = Client()
    client.create_model(name=MODEL)
    version = client.create_model_version(model_name_or_id=MODEL)
    link_artifact_version_to_model_version(save_artifact(ModelFolder(root / "served-adapter"), name="adapter"), version)
    client.update_model_version(model_name_or_id=MODEL, version_name_or_id=version.id, stage="staging")
    return version


@contextmanager
def deployed(root: Path, url: str | None = None) -> Iterator[str]:
    """configs/serve.yaml deployed as `make serve` deploys it (a stack with the local deployer), pointed at MODEL's
    staged version, its request log at `url` (None: as shipped, the model's default store), on a free port of 127.0.0.1; yields the server's URL. The deployment
    and its server process are deleted on the way out, pass or fail; the stack is active for this process (and the
    server) only while it runs, so the CLI runs after it use the default stack."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    from core.serving.llamacpp_engine import free_port
    from core.serving.model import ServeConfig
    from pipelines.serve_pipeline import serve_pipeline

    client = Client()
    doc = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    serve = doc["on_init_kwargs"]["config"]
    serve.update(model_name=MODEL, max_new_tokens_limit=16)
    if url is not None:
        serve["request_log"]["url"] = url
    ServeConfig.model_validate(serve)  # a bad edit fails here, not in the server's log
    # a free port of the OS's own choosing: the local deployer's (port None) scans up from 8000, where other servers
    # on a shared machine scan too, and one that binds first takes the port from under ours
    doc["settings"]["deployer.local"]["port"] = free_port()
    config_path = root / "serve.yaml"
    config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)  # the server process imports the pipeline from its working directory
        stack_id, deployer = default_stack_plus(StackComponentType.DEPLOYER, "local", "local-deployer")
        mp.setenv("ZENML_ACTIVE_STACK_ID", stack_id)  # no config file edits
        name = f"lora-chat-{deployer.rsplit('-', 1)[-1]}"
        try:
            try:
                pipe = serve_pipeline.with_options(config_path=str(config_path))
                deployment = pipe.deploy(deployment_name=name, timeout=120)
                base = deployment.url.rstrip("/")
                info = wait_answering(base + "/info")
                answering = info.json()["deployment"]
                if answering["id"] != str(deployment.id):  # this server, not another one on the same port
                    raise RuntimeError(f"{base} is another deployment's server ({answering['name']}), not ours")
            except Exception as err:
                fail_with_server_logs(client, name, err)
            assert base.startswith("http://127.0.0.1:")  # loopback only
            yield base
        finally:
            try:
                client.delete_deployment(name, force=True)  # stops the server process, then forgets the deployment
            except KeyError:
                pass  # deploy failed before registering it


def trainable(text: str) -> bool:
    """Text the validate step takes as an answer (core/data/validation.py): not blank, no control character or
    U+FFFD, no mojibake. A random model sampling byte tokens sometimes decodes to U+FFFD mid-answer."""
    from core.data.validation import CONTROL_CHARS, MOJIBAKE, NOT_BLANK

    return bool(re.search(NOT_BLANK, text)) and not any(re.search(r, text) for r in [CONTROL_CHARS, *MOJIBAKE])


def ask_and_rate(base: str, version: str) -> tuple[dict[int, tuple[str, str]], list[str]]:
    """The questions through the `openai` client, then feedback on the answers through POST /v1/feedback, as a client
    app and a reviewer would send it. Returns item -> (completion id, answer) as the client received them, and the
    completions left unrated: an answer validation would refuse is asked again (see trainable)."""
    oa = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=60)  # loopback: no key needed
    got, unrated, seed = {}, [], 0
    for i in ITEMS:
        while True:
            # sampled, seeded: the tiny model's greedy answer is the same few tokens for every question; sampled,
            # each completion has its own answer, so the training rows show which answer went where
            seed += 1
            request = dict(
                model="default", messages=[{"role": "user", "content": question(i)}], max_tokens=8, temperature=1.0,
                seed=seed,
            )  # fmt: skip
            if i in STREAMED:
                chunks = list(oa.chat.completions.create(**request, stream=True))
                cid, text = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                reply = oa.chat.completions.create(**request)
                cid, text = reply.id, reply.choices[0].message.content
            if trainable(text):
                got[i] = (cid, text)
                break
            unrated.append(cid)
            assert len(unrated) <= 10, f"too many answers validation would refuse: {unrated}"
    assert len({cid for cid, _ in got.values()} | set(unrated)) == len(ITEMS) + len(unrated), got

    def rate(i: int, **body) -> None:
        ack = oa.post("/feedback", body={"completion_id": got[i][0], **body}, cast_to=object)
        assert ack["completion_id"] == got[i][0] and ack["correction"] == body.get("correction"), ack

    for i in CORRECTED:
        rate(i, rating="down", correction=right(i), source="reviewer")
    rate(SECOND_SOURCE, rating="up", source="app")  # newer, but a bare rating: the correction still decides
    for i in UP:
        rate(i, rating="up")
    for i, body in IGNORED.items():
        rate(i, **body)

    listed = oa.get("/feedback", cast_to=object)["data"]  # every entry, each with its completion as stored
    assert sorted((r["completion_id"], r["source"]) for r in listed) == sorted(
        [(got[i][0], "reviewer") for i in CORRECTED] + [(got[SECOND_SOURCE][0], "app")]
        + [(got[i][0], "api") for i in [*UP, *IGNORED]]
    )  # fmt: skip
    item = {cid: i for i, (cid, _) in got.items()}
    for r in listed:  # stored as answered (nothing in them for redaction to change), by the staged version
        i, completion = item[r["completion_id"]], r["completion"]
        assert completion["answer"] == got[i][1] and completion["stream"] == (i in STREAMED), r
        assert (completion["model"], completion["version"], completion["adapter"]) == (MODEL, version, "default"), r
    return got, unrated


def tiny_retrain_config(root: Path, tiny_model_dir: Path, url: str | None = None, sft_min_rows: int = 5) -> Path:
    """configs/retrain_from_feedback.yaml on the tiny model; `url` None: as shipped, both feedback sources read the
    model's default store (the one its deployment writes)."""
    doc = yaml.safe_load((REPO_ROOT / "configs" / "retrain_from_feedback.yaml").read_text())
    doc["model"]["name"] = MODEL
    config = doc["parameters"]["config"]
    config["model"] = {"source": "local", "name": str(tiny_model_dir)}
    toy_data(config["data"], root, "data", offset=300)
    (feedback,) = config["data"]["mix"]
    feedback.update(min_rows=sft_min_rows, **({"url": url} if url else {}))
    config["train"].update(
        num_epochs=2, learning_rate=1e-2, micro_batch_size=4, tokens_per_micro_batch=None, save_every=100,
        checkpoint_dir=str(root / "ckpt"),
    )  # fmt: skip
    config["train"]["replay"]["answers"] = "data"  # a random tiny model never ends an answer: no own rehearsal
    pairs = config["train"]["preference"]
    pairs["data"].update(min_rows=3, eval_path=toy_pairs(root)["eval_path"], **({"url": url} if url else {}))
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
    served = stage_served_version(tmp_path, tiny_model_dir)
    with deployed(tmp_path) as base:  # the shipped settings: the request log in the model's default store
        got, unrated = ask_and_rate(base, str(served.number))  # all feedback is newer than the staged version
    with pytest.raises(requests.ConnectionError):  # the server the test started is gone
        requests.get(base + "/health", timeout=5)
    ids = {i: cid for i, (cid, _) in got.items()}
    answers = {i: answer for i, (_, answer) in got.items()}
    assert len(set(answers.values())) == len(ITEMS)  # each completion its own answer

    assert Path(make_url(default_url(MODEL)).database).is_file()
    done = run_config(tiny_retrain_config(tmp_path, tiny_model_dir))  # the shipped config reads that store
    assert done.returncode == 0, failure(done)
    run = client.get_pipeline("lora_pipeline").last_run
    mixed = run.steps["mix_data"].outputs["mixed_train_dataset"][0].load()
    learned = {r["id"]: r["messages"][-1]["content"] for r in mixed if r["id"].startswith("feedback::")}
    # exactly these: not the bare down, the score 3, nor the unrated completions (in the store too)
    assert not {f"feedback::feedback:{cid}" for cid in unrated} & set(learned)
    assert learned == {f"feedback::feedback:{ids[i]}": right(i) for i in CORRECTED} | {
        f"feedback::feedback:{ids[i]}": answers[i] for i in UP
    }
    pairs = run.steps["ingest_preference"].outputs["raw_dataset"][0].load()
    trained_pairs = {r["id"]: (r["chosen"], r["rejected"]) for r in pairs if r["split"] == "train"}
    assert trained_pairs == {f"feedback:{ids[i]}": (right(i), answers[i]) for i in CORRECTED}
    preference_train = run.steps["format_preference"].outputs["preference_train"][0].load()
    assert sorted(preference_train["id"]) == sorted(trained_pairs)

    new = run.model_version
    meta = client.get_model_version(MODEL, new.id).run_metadata
    assert meta["feedback_chat"]["completions"] == {ids[i]: str(served.number) for i in [*CORRECTED, *UP]}
    assert meta["feedback_pairs"]["completions"] == {ids[i]: str(served.number) for i in CORRECTED}
    assert headline(meta)["feedback_rows"] == 8  # the history counts each completion once (SFT row and pair)

    assert trace([ids[SECOND_SOURCE], "--model", MODEL]) == 0  # the model's default store, as deployed
    out = capsys.readouterr().out
    assert f"answered by model {MODEL} version {served.number} (adapter default)" in out
    assert f"learned by version {new.number}" in out and run.name in out

    # too little new feedback: the run stops at the feedback's ingest and promotes nothing
    stages = {v.number: v.stage for v in client.list_model_versions(model=MODEL).items}
    done = run_config(tiny_retrain_config(tmp_path, tiny_model_dir, sft_min_rows=100))
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
