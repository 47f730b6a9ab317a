"""Step 7 (push): the upload folder, the model card, dry_run vs hub mode against a local fake Hub, the token."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Annotated

import pytest
from huggingface_hub import ModelCard, constants, metadata_load
from support.hub_server import DROP, FakeHub
from zenml import Model, pipeline, step

from core.artifacts import ModelFolder
from core.config import DataSource, LoraSettings, ModelSource, PushConfig, TrainConfig
from core.hub import push_model
from core.hub.card import build_model_card
from core.hub.publish import PushError, resolve_token
from core.models import resolve_base
from core.reports import EvalReport, ModelScores, PushResult, TrainMetrics
from steps.promote import promote
from steps.push import push

SENTINEL = "hf_SENTINELdoNotLeak0123456789abcdefXYZ"
RUN_ID = "0b3c2a1e-0000-4000-8000-00000000beef"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # display_name of the bundled source


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub on 127.0.0.1; conftest's HF_HUB_OFFLINE=1 is lifted for huggingface_hub while it runs."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        yield server


@pytest.fixture
def folders(tmp_path) -> tuple[ModelFolder, ModelFolder]:
    """A merged-model folder and a PEFT adapter folder; random bytes stand in for weights."""
    rng = __import__("random").Random(0)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float16"}))
    (merged / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (merged / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(300_000))
    (merged / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(120_000))
    (merged / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    (merged / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (merged / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/home/me/.cache/zenml-lora/bundled/x", "r": 8, "peft_type": "LORA"})
    )
    (adapter / "adapter_model.safetensors").write_bytes(rng.randbytes(50_000))
    (adapter / "README.md").write_text("---\nbase_model: /home/me/x\n---\n# Model Card for Model ID\n")
    return ModelFolder(merged), ModelFolder(adapter)


def _report(gate_passed: bool = True) -> EvalReport:
    return EvalReport(
        eval_rows=12,
        eval_dataset_hash="ab" * 32,
        base=ModelScores(loss=2.5, perplexity=12.18, rouge_l=0.21, exact_match=0.0),
        tuned=ModelScores(loss=1.75, perplexity=5.75, rouge_l=0.4321, exact_match=0.25),
        reference_name="production (version 3)",
        reference=ModelScores(loss=1.9, perplexity=6.69, rouge_l=0.4, exact_match=0.1),
        gate_passed=gate_passed,
        gate_messages=["eval loss 1.7500 vs 1.9000: -7.9% | ok"],
    )


def _metrics() -> TrainMetrics:
    return TrainMetrics(
        steps=20, final_train_loss=1.6, final_eval_loss=1.75, train_tokens=40_000, tokens_per_s=900.0, seconds=44.4,
        peak_mem_bytes=10**9, trainable_params=1_000, total_params=100_000, compute_dtype="float32", device="cpu",
    )  # fmt: skip


def _push(folders, tmp_path: Path, name: str = "bundle", **push_kwargs) -> tuple[ModelFolder, PushResult]:
    merged, adapter = folders
    return push_model(
        merged,
        adapter,
        _report(),
        _metrics(),
        model=ModelSource(),
        lora=LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        train=TrainConfig(max_steps=20, learning_rate=1e-4),
        push=PushConfig(**{"token_secret": None, **push_kwargs}),
        run_id=RUN_ID,
        out_dir=tmp_path / name,
    )


def _expected_files(folders) -> set[str]:
    merged, adapter = folders
    return {*merged.files(), "README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def test_hub_mode_uploads_exact_files(hub, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    bundle, result = _push(folders, tmp_path, mode="hub", repo_id="acme/tuned", endpoint=hub.endpoint)

    remote = hub.files("acme/tuned")
    assert set(remote) == _expected_files(folders)
    merged, adapter = folders
    for rel in merged.files():
        assert remote[rel] == (merged.path / rel).read_bytes(), rel
    assert remote["adapter/adapter_model.safetensors"] == (adapter.path / "adapter_model.safetensors").read_bytes()
    assert remote["README.md"] == (bundle.path / "README.md").read_bytes()
    # The pushed adapter points at the Hub base model, not the local cache path it was trained from.
    assert json.loads(remote["adapter/adapter_config.json"])["base_model_name_or_path"] == BASE

    commit = hub.repos["acme/tuned"].commits[-1]
    assert result.mode == "hub"
    assert result.commit_oid == commit["oid"]
    assert result.commit_url == f"{hub.endpoint}/acme/tuned/commit/{commit['oid']}"
    assert RUN_ID in commit["summary"]
    assert result.files == sorted(remote)
    assert result.total_bytes == sum(len(b) for b in remote.values())
    assert hub.unhandled == []
    # A second push of changed content lands on top; unchanged files are not re-sent.
    bundle2, result2 = _push(folders, tmp_path, name="bundle2", mode="hub", repo_id="acme/tuned",
                             endpoint=hub.endpoint, tags=["lora", "v2"])  # fmt: skip
    assert hub.repos["acme/tuned"].commits[-1]["paths"] == ["README.md"]
    assert result2.commit_oid != result.commit_oid


@pytest.mark.parametrize("private", [True, False])
def test_private_flag_reaches_create_repo(hub, folders, tmp_path, monkeypatch, private):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    _push(folders, tmp_path, mode="hub", repo_id="acme/vis", endpoint=hub.endpoint, private=private)
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body) == {
        "name": "vis",
        "organization": "acme",
        "visibility": "private" if private else "public",
    }
    assert hub.repos["acme/vis"].private is private


def test_model_card_metadata_and_body(folders, tmp_path):
    bundle, _ = _push(folders, tmp_path, repo_id="acme/tuned", dataset_name="acme/support-tickets")
    meta = metadata_load(bundle.path / "README.md")
    assert meta["base_model"] == BASE
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["lora", "qlora", "zenml"]
    assert meta["datasets"] == ["acme/support-tickets"]
    assert meta["pipeline_tag"] == "text-generation"
    results = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "tuned"
    assert results["dataset"]["type"] == "acme/support-tickets"
    assert {m["type"]: m["value"] for m in results["metrics"]} == {
        "loss": 1.75,
        "perplexity": 5.75,
        "rouge": 0.4321,
        "exact_match": 0.25,
    }

    card = ModelCard.load(bundle.path / "README.md")  # the library's own parser
    assert card.data.base_model == BASE
    assert [r.metric_type for r in card.data.eval_results] == ["loss", "perplexity", "rouge", "exact_match"]
    body = card.text
    assert "| Eval loss (nats/token) | 2.5000 | 1.7500 | -0.7500 | 1.9000 |" in body
    assert "production (version 3)" in body and "**passed**" in body
    assert "-7.9% \\| ok" in body  # a pipe in a gate message does not break the table
    assert "| rank r | 8 |" in body and "| target modules | q_proj, v_proj |" in body
    assert "| learning rate | 0.0001 |" in body and "| optimizer steps | 20 |" in body
    assert RUN_ID in body
    assert 'PeftModel.from_pretrained(base, "acme/tuned", subfolder="adapter")' in body
    assert "(float16)" in body


def test_model_card_for_local_base_has_no_base_model_id(tmp_path):
    """A local folder's path is not a Hub id: it stays out of the YAML (the Hub would reject it)."""
    card = build_model_card(
        model=ModelSource(source="local", name=str(tmp_path)),
        lora=LoraSettings(),
        train=TrainConfig(),
        push=PushConfig(),
        eval_report=_report(),
        train_metrics=_metrics(),
        run_id=None,
    )
    assert card.data.base_model is None
    assert str(tmp_path) in card.text


def test_model_card_lists_the_data_mixture():
    """data.mix's sources, each with its share (a ratio or a row count), and the seed they were drawn with; no row
    without a mix."""
    data = DataSource(
        path="data/acme_support/train.jsonl",
        mix=[
            {"name": "faq", "path": "data/faq.jsonl", "ratio": 0.25},
            {"name": "chat", "source": "hub", "path": "acme/chats", "format": "chat", "rows": 120},
        ],
    )
    args = dict(
        model=ModelSource(),
        lora=LoraSettings(),
        train=TrainConfig(seed=7),
        push=PushConfig(),
        eval_report=_report(),
        train_metrics=_metrics(),
        run_id=None,
    )
    body = build_model_card(**args, data=data).text
    assert (
        "| data mixture | task data + faq (data/faq.jsonl): 0.25 rows per task row; "
        "chat (acme/chats (Hub)): 120 rows; drawn with seed 7 |"
    ) in body
    assert "data mixture" not in build_model_card(**args, data=data.without_mix()).text
    assert "data mixture" not in build_model_card(**args).text


def test_dry_run_touches_no_network_and_matches_hub_upload(hub, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)

    def no_network(*args, **kwargs):
        raise AssertionError(f"dry_run opened a connection: {args}")

    with monkeypatch.context() as m:
        m.setattr(constants, "HF_HUB_OFFLINE", True)
        m.setattr(socket.socket, "connect", no_network)
        m.setattr(socket, "create_connection", no_network)
        dry_bundle, dry = _push(folders, tmp_path, name="dry", repo_id="acme/same", endpoint=hub.endpoint)
    assert hub.requests == []
    assert dry.mode == "dry_run" and dry.commit_url is None and dry.commit_oid is None
    assert set(dry.files) == set(dry_bundle.files()) == _expected_files(folders)

    _, real = _push(folders, tmp_path, name="real", mode="hub", repo_id="acme/same", endpoint=hub.endpoint)
    remote = hub.files("acme/same")
    assert dry.files == real.files == sorted(remote)
    # Same inputs, same run: the dry-run bundle is byte for byte what hub mode uploads.
    assert {f: (dry_bundle.path / f).read_bytes() for f in dry.files} == remote


def test_push_adapter_false_leaves_adapter_out(folders, tmp_path):
    bundle, result = _push(folders, tmp_path, push_adapter=False)
    assert not any(f.startswith("adapter/") for f in result.files)
    assert "subfolder=" not in (bundle.path / "README.md").read_text()


def test_token_never_leaks(hub, folders, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    bundle, result = _push(folders, tmp_path, mode="hub", repo_id="acme/secret", endpoint=hub.endpoint)

    out, err = capfd.readouterr()
    assert caplog.records, "expected the step to log something"
    assert SENTINEL not in caplog.text and SENTINEL not in out + err
    assert SENTINEL not in result.model_dump_json()
    for rel in bundle.files():
        assert SENTINEL.encode() not in (bundle.path / rel).read_bytes(), rel
    for content in hub.files("acme/secret").values():
        assert SENTINEL.encode() not in content
    # ... while every request did carry it.
    assert hub.requests and all(r.headers["authorization"] == f"Bearer {SENTINEL}" for r in hub.requests)


def test_error_text_masks_token(hub, folders, tmp_path, monkeypatch, caplog, capfd):
    """A server (or proxy) that echoes the Authorization header into an error body."""
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub.fail("/commit/", 400, times=10, message=lambda req: f"bad request, you sent {req.headers['authorization']}")
    with pytest.raises(PushError) as info:
        _push(folders, tmp_path, mode="hub", repo_id="acme/echo", endpoint=hub.endpoint)
    text = "".join(traceback.format_exception(info.value))
    assert "bad request, you sent Bearer ***" in text
    assert SENTINEL not in text
    assert info.value.status_code == 400
    out, err = capfd.readouterr()
    assert SENTINEL not in caplog.text + out + err


def test_hub_mode_without_token_is_a_clear_error(hub, folders, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PushError, match="no Hugging Face token.*ZenML secret 'huggingface'.*HF_TOKEN"):
        _push(folders, tmp_path, mode="hub", repo_id="acme/x", endpoint=hub.endpoint)
    assert hub.requests == []
    assert not (tmp_path / "bundle").exists()  # fails before building anything


def test_hub_rejecting_the_token_is_reported(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    with FakeHub(token="hf_the_right_one") as strict:
        with pytest.raises(PushError) as info:
            _push(folders, tmp_path, mode="hub", repo_id="acme/x", endpoint=strict.endpoint)
    assert info.value.status_code == 401
    assert "acme/x" in str(info.value) and SENTINEL not in str(info.value)


def test_token_from_zenml_secret_then_env(zenml_home, monkeypatch):
    from zenml.client import Client

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_token(PushConfig(token_secret="no-such-secret-here")) == "hf_from_env"
    Client().create_secret("test-push-hf", values={"token": "hf_from_secret"})
    try:
        assert resolve_token(PushConfig(token_secret="test-push-hf")) == "hf_from_secret"
        # an exact name only: a secret whose name merely contains the configured one is not used
        assert resolve_token(PushConfig(token_secret="test-push")) == "hf_from_env"
    finally:
        Client().delete_secret("test-push-hf")
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token(PushConfig(token_secret=None)) is None
    assert os.environ.get("HF_TOKEN") is None


@step
def _push_inputs(merged_dir: str, adapter_dir: str) -> tuple[
    Annotated[ModelFolder, "merged"], Annotated[ModelFolder, "adapter"],
    Annotated[EvalReport, "report"], Annotated[TrainMetrics, "metrics"],
]:  # fmt: skip
    return ModelFolder(merged_dir), ModelFolder(adapter_dir), _report(), _metrics()


@pipeline(model=Model(name="push-step-test"), enable_cache=False)
def _push_only(merged_dir: str, adapter_dir: str) -> None:
    merged, adapter, report, metrics = _push_inputs(merged_dir, adapter_dir)
    push(merged, adapter, report, metrics, base=resolve_base(ModelSource()), lora=LoraSettings(), train_cfg=TrainConfig(),
         push_cfg=PushConfig(repo_id="acme/tuned"))  # fmt: skip
    promote([report], promote_to="staging", after="push")


@pytest.mark.slow
def test_step_in_pipeline_promotes_and_logs_metadata(zenml_home, folders):
    """The ZenML steps: both named outputs stored, push metadata on the model version; promote after it: gate
    pass -> staging."""
    from zenml.client import Client

    run = _push_only(str(folders[0].path), str(folders[1].path))
    run = Client().get_pipeline_run(run.id)
    assert run.status.value == "completed"
    step_run = run.steps["push"]
    result = step_run.outputs["push_result"][0].load()
    bundle = step_run.outputs["upload_bundle"][0].load()
    assert isinstance(result, PushResult) and result.mode == "dry_run"
    promotion = run.steps["promote"].outputs["promotion"][0].load()
    assert promotion.stage == "staging" and promotion.requested == "staging"
    assert bundle.files() == result.files
    assert str(run.id) in (bundle.path / "README.md").read_text()

    version = Client().get_model_version("push-step-test", "staging")
    assert version.id == run.model_version.id
    logged = version.run_metadata["push"]
    assert logged["mode"] == "dry_run" and logged["file_count"] == len(result.files)
    assert version.run_metadata["promotion"]["stage"] == "staging"


# --- publishing: candidate branch, verification, one commit onto main, retries ------------------------------------

FAST = {"retry_wait_s": 0.01}  # seconds before the first retry (doubling): keeps retry tests quick


def _main_commits(hub: FakeHub, repo_id: str) -> list[dict]:
    return [c for c in hub.repos[repo_id].commits if c["revision"] == "main"]


def _hub_push(hub, folders, tmp_path, name="bundle", repo_id="acme/pub", **kwargs):
    return _push(folders, tmp_path, name=name, mode="hub", repo_id=repo_id, endpoint=hub.endpoint, **kwargs)


def test_hub_publish_goes_through_a_verified_candidate_branch(hub, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    _, result = _hub_push(hub, folders, tmp_path)
    calls = hub.calls()
    branch_calls = [c for c in calls if "/branch/" in c]
    assert len(branch_calls) == 2 and branch_calls[0].startswith("POST") and branch_calls[1].startswith("DELETE")
    candidate = branch_calls[0].rsplit("/", 1)[1]
    assert candidate.startswith("candidate%2F" + RUN_ID[:8])
    # upload to the branch, list it to verify, then the single commit onto main, then delete the branch
    upload = calls.index(f"POST /api/models/acme/pub/commit/{candidate}")
    verify = calls.index(f"GET /api/models/acme/pub/tree/{candidate}", upload)
    publish = calls.index("POST /api/models/acme/pub/commit/main", verify)
    assert calls.index(f"DELETE /api/models/acme/pub/branch/{candidate}", publish)
    repo = hub.repos["acme/pub"]
    assert set(repo.branches) == {"main"}  # the candidate branch is gone
    [main_commit] = _main_commits(hub, "acme/pub")
    assert main_commit["oid"] == result.commit_oid == repo.heads["main"] and result.revision == "main"
    assert set(hub.files("acme/pub")) == _expected_files(folders)
    commit_body = next(r.body for r in hub.requests if r.path == "/api/models/acme/pub/commit/main")
    assert json.loads(commit_body.splitlines()[0])["value"]["parentCommit"] == "0" * 40  # main's head when it began

    # Publishing without the adapter: main then holds exactly the new upload folder, adapter/ removed in the same
    # single commit (no stale files from the earlier push).
    _, second = _hub_push(hub, folders, tmp_path, name="bundle2", push_adapter=False)
    assert set(hub.files("acme/pub")) == _expected_files(folders) - {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    }
    assert len(_main_commits(hub, "acme/pub")) == 2 and second.commit_oid == repo.heads["main"]
    assert hub.unhandled == []


def test_transient_errors_and_dropped_connections_are_retried(hub, folders, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)  # record the backoff instead of sleeping it
    # calls huggingface_hub retries itself (preupload, tree listing) and calls with_retries covers (the rest)
    hub.fail("/api/repos/create", 502)
    hub.fail("/branch/candidate", 500, method="POST")
    hub.fail("/preupload/", 503)
    hub.fail("/commit/candidate", DROP)
    hub.fail("/commit/candidate", 500)
    hub.fail("/tree/candidate", DROP)
    hub.fail("/paths-info/", 500)
    hub.fail("/resolve/", DROP)
    hub.fail("/commit/main", 503)
    hub.fail("/branch/candidate", DROP, method="DELETE")
    with caplog.at_level(logging.WARNING):
        _, result = _hub_push(hub, folders, tmp_path, **FAST)
    assert all(rule.times == 0 for rule in hub.failures), [r for r in hub.failures if r.times]
    assert set(hub.files("acme/pub")) == _expected_files(folders)
    assert [c["oid"] for c in _main_commits(hub, "acme/pub")] == [result.commit_oid]  # still one commit
    assert set(hub.repos["acme/pub"].branches) == {"main"}
    assert caplog.text.count("Hub: ") >= 7 and "retry 1 of 5" in caplog.text
    # ours: retry_wait_s, doubling on consecutive failures of one call; huggingface_hub's own: 1 s first
    assert 0.01 in waits and 0.02 in waits and 1 in waits
    assert SENTINEL not in caplog.text


def test_retries_give_up_on_persistent_errors_and_not_on_client_errors(hub, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    hub.fail("/commit/candidate", 500, times=100)
    with pytest.raises(PushError) as err:
        _hub_push(hub, folders, tmp_path, max_retries=2)
    assert err.value.status_code == 500 and "main is unchanged" in str(err.value)
    assert sum(c.startswith("POST /api/models/acme/pub/commit/candidate") for c in hub.calls()) == 3  # 1 + 2 retries
    hub.failures.clear()
    hub.fail("/commit/candidate", 422, times=100)
    with pytest.raises(PushError) as err:
        _hub_push(hub, folders, tmp_path, name="b2")
    assert err.value.status_code == 422
    assert sum(c.startswith("POST /api/models/acme/pub/commit/candidate") for c in hub.calls()) == 4  # no retry


@pytest.mark.parametrize(
    "path, status",
    [
        ("/commit/candidate", 500),  # the upload itself
        ("/tree/candidate", 404),  # the branch cannot be listed (before upload, for verification)
        ("/resolve/", 500),  # copying the verified files onto main
        ("/commit/main", 503),  # the one commit onto main
        ("/commit/main", 400),  # ... rejected outright
    ],
)
def test_failure_mid_publish_leaves_main_as_it_was(hub, folders, tmp_path, monkeypatch, path, status):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    _hub_push(hub, folders, tmp_path, name="v1")
    repo = hub.repos["acme/pub"]
    before_files, before_head, before_commits = hub.files("acme/pub"), repo.heads["main"], len(repo.commits)
    hub.fail(path, status, times=1000)
    with pytest.raises(PushError) as err:  # v2: a different card, so there is something to publish
        _hub_push(hub, folders, tmp_path, name="v2", tags=["v2"], max_retries=2)
    assert err.value.status_code == status
    assert "main is unchanged" in str(err.value)
    assert hub.files("acme/pub") == before_files and repo.heads["main"] == before_head
    assert len([c for c in repo.commits[before_commits:] if c["revision"] == "main"]) == 0
    assert set(repo.branches) == {"main"}  # the failed candidate was cleaned up too
    assert SENTINEL not in str(err.value)


def test_lost_answer_to_the_main_commit_is_not_committed_twice(hub, folders, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub.fail("/commit/main", DROP, after=True)  # the commit lands; its answer never arrives
    _, result = _hub_push(hub, folders, tmp_path, **FAST)
    [commit] = _main_commits(hub, "acme/pub")
    assert result.commit_oid == commit["oid"] == hub.repos["acme/pub"].heads["main"]
    assert sum(c == "POST /api/models/acme/pub/commit/main" for c in hub.calls()) == 1  # not sent again
    assert set(hub.files("acme/pub")) == _expected_files(folders)


def test_concurrent_push_to_main_is_not_overwritten(hub, folders, tmp_path, monkeypatch):
    """Someone pushes to main after the candidate branch was made: the publish commit is refused, theirs stays."""
    from huggingface_hub import HfApi

    import core.hub.publish as push_module

    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    verify = push_module.remote_problems
    theirs = {}

    def verify_then_someone_pushes(api, repo_id, revision, *args):
        problems = verify(api, repo_id, revision, *args)
        if revision.startswith("candidate/") and not theirs:
            api = HfApi(endpoint=hub.endpoint, token=SENTINEL)
            theirs["oid"] = api.upload_file(path_or_fileobj=b"theirs", path_in_repo="NOTES.md", repo_id=repo_id).oid
        return problems

    monkeypatch.setattr(push_module, "remote_problems", verify_then_someone_pushes)
    with pytest.raises(PushError, match="main moved while publishing") as err:
        _hub_push(hub, folders, tmp_path, **FAST)
    assert "not published" in str(err.value)
    assert hub.repos["acme/pub"].heads["main"] == theirs["oid"]
    assert hub.files("acme/pub") == {"NOTES.md": b"theirs"}
    assert set(hub.repos["acme/pub"].branches) == {"main"}


def test_publish_pr_opens_a_pull_request_and_leaves_main(hub, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    _hub_push(hub, folders, tmp_path, name="v1")
    main_before = hub.files("acme/pub")
    _, result = _hub_push(hub, folders, tmp_path, name="v2", tags=["v2"], publish="pr")
    assert result.revision == "refs/pr/1" and result.pr_url == f"{hub.endpoint}/acme/pub/discussions/1"
    assert hub.files("acme/pub") == main_before  # main untouched until someone merges
    proposed = hub.files("acme/pub", revision="refs/pr/1")
    assert set(proposed) == _expected_files(folders) and proposed["README.md"] != main_before["README.md"]
    assert b"- v2" in proposed["README.md"]
    assert result.commit_oid == hub.repos["acme/pub"].heads["refs/pr/1"]
    assert not [b for b in hub.repos["acme/pub"].branches if b.startswith("candidate/")]


def test_verification_names_missing_changed_and_extra_files(hub, tmp_path, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi

    from core.hub.publish import remote_problems

    api = HfApi(endpoint=hub.endpoint, token=SENTINEL)
    api.create_repo("acme/check")
    remote = {"same.bin": b"abc", "changed.bin": b"xyz", "resized.bin": b"12345", "extra.txt": b"!"}
    api.create_commit(
        "acme/check", [CommitOperationAdd(p, b) for p, b in remote.items()], commit_message="remote state"
    )
    local = tmp_path / "local"
    local.mkdir()
    for name, data in {"same.bin": b"abc", "changed.bin": b"xyw", "resized.bin": b"123", "missing.bin": b"?"}.items():
        (local / name).write_bytes(data)
    problems = remote_problems(api, "acme/check", "main", local, sorted(p.name for p in local.iterdir()))
    assert problems == [
        "changed.bin: content differs (same size)",
        "missing.bin: missing",
        "resized.bin: 5 bytes, expected 3",
        "extra.txt: not in the upload folder",
    ]
    assert remote_problems(api, "acme/check", "main", local, []) == [
        f"{p}: not in the upload folder" for p in sorted(remote)
    ]


def test_secrets_are_masked_in_messages_but_not_every_short_value():
    from core.logs import mask_secrets

    msg = "403 for key AKIAXYZ123 with secret s3cr3t-value at http://127.0.0.1:1/b"
    assert mask_secrets(msg, "AKIAXYZ123", "s3cr3t-value", None, "") == (
        "403 for key *** with secret *** at http://127.0.0.1:1/b"
    )
    assert mask_secrets(msg, "1") == msg  # a one-character "secret" would blank every digit and hide nothing
