"""Serving: a model version with two adapters, deployed with ZenML's local deployer on loopback.

The deployment loads both adapters once, answers, switches adapter per request (each answer equal to
evaluation's greedy generation with that adapter alone), answers bad requests with a clear error, and
keeps serving. It is deprovisioned at the end, pass or fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import pytest
import requests
import torch
import yaml
from conftest import REPO_ROOT, default_stack_plus
from support.deployments import fail_with_server_logs, wait_answering
from zenml import Model, pipeline, step

import materializers  # noqa: F401  (folder artifacts)
from core.artifacts import ModelFolder
from core.models import BaseModelRef, resolve_base
from core.serving.model import ServeConfig, ServeRequestError, served_name

MODEL_NAME = "serve-test"
QUESTION = "What is the code for item 3?"
SYSTEM = "You answer toy questions."


@pytest.fixture(scope="module")
def model_version(zenml_home, two_adapters):
    """A ZenML model version at staging holding `adapter` and `adapter_prices`, as training would link them."""
    from zenml import save_artifact
    from zenml.client import Client
    from zenml.model.utils import link_artifact_version_to_model_version

    from core.artifacts import ModelFolder

    client = Client()
    client.create_model(name=MODEL_NAME)
    version = client.create_model_version(model_name_or_id=MODEL_NAME)  # number 1
    for name, path in zip(("adapter", "adapter_prices"), two_adapters):
        link_artifact_version_to_model_version(save_artifact(ModelFolder(path), name=name), version)
    client.update_model_version(model_name_or_id=MODEL_NAME, version_name_or_id=version.id, stage="staging")
    return version


def direct_answer(tiny_source, adapter_dir: Path | None, question: str, max_new_tokens: int, model=None) -> str:
    """What evaluation would answer: training's prompt rendering, evaluate.generate_answers, one adapter alone."""
    from datasets import Dataset
    from peft import PeftModel

    from core.data.formatting import tokenize_example
    from core.evaluation.scoring import generate_answers
    from core.models import load_base, load_tokenizer
    from core.prompts import with_system

    tok = load_tokenizer(tiny_source)
    messages = with_system([{"role": "user", "content": question}, {"role": "assistant", "content": "x"}], SYSTEM)
    ids, _, prompt_len = tokenize_example(messages, tok, "chat")
    ds = Dataset.from_dict({"input_ids": [ids[:prompt_len]], "prompt_len": [prompt_len]})
    if model is None:
        model = PeftModel.from_pretrained(load_base(tiny_source, quant=None), str(adapter_dir)).eval()
    return generate_answers(model, tok, ds, max_new_tokens, batch_size=1)[0]


def test_served_names_and_shipped_config():
    assert served_name("adapter") == "default"
    assert served_name("adapter_faq") == "faq"
    assert served_name("adapter_") is None and served_name("merged_model") is None
    doc = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    cfg = ServeConfig.model_validate(doc["on_init_kwargs"]["config"])
    default = yaml.safe_load((REPO_ROOT / "configs" / "default.yaml").read_text())
    # served prompts must be rendered like the default training run's prompts
    assert cfg.model_name == default["model"]["name"]
    assert cfg.system_prompt == default["parameters"]["config"]["prompt"]["system_prompt"]
    with pytest.raises(ValueError, match="mode"):
        ServeConfig.model_validate({"mode": "fast"})


def test_load_from_model_version_in_process(model_version, tiny_source, two_adapters):
    """on_init's loader: both adapters from the model version, base found from adapter_config.json."""
    from core.serving.model import answer, load_served_model

    served = load_served_model(
        ServeConfig(model_name=MODEL_NAME, stage="staging", system_prompt=SYSTEM, context_length=96)
    )
    assert served.adapters == ["base", "default", "prices"]
    assert served.info["base"]["name"] == tiny_source.name and served.info["model_version"] == "1"
    got = {name: answer(served, QUESTION, name, 12)["answer"] for name in ("default", "prices", "default")}
    assert got["default"] == direct_answer(tiny_source, two_adapters[0], QUESTION, 12)
    assert got["prices"] == direct_answer(tiny_source, two_adapters[1], QUESTION, 12)
    with pytest.raises(ServeRequestError, match=r"unknown adapter 'nope'; known adapters: base, default, prices"):
        answer(served, QUESTION, "nope", 8)
    with pytest.raises(ServeRequestError, match="exceeds the context length of 96"):
        answer(served, "word " * 100, "default", 8)


def test_task_adapters_only_default_and_per_adapter_system_prompt(tiny_source, two_adapters):
    """Without an `adapter` artifact the first task is the default (never `base`); system_prompts apply per adapter."""
    from core.serving.model import ServeLoadError, build_served_model, prompt_ids

    dirs = {"support": two_adapters[0], "routing": two_adapters[1]}
    cfg = ServeConfig(system_prompt=SYSTEM, system_prompts={"routing": "Name the department."})
    served = build_served_model(cfg, tiny_source, adapter_dirs=dirs)
    assert served.adapters == ["base", "routing", "support"] and served.default_adapter == "routing"
    text = served.tokenizer.decode(prompt_ids(served, QUESTION, "routing"))
    assert "Name the department." in text and SYSTEM not in text
    assert SYSTEM in served.tokenizer.decode(prompt_ids(served, QUESTION, "support"))
    with pytest.raises(ServeLoadError, match=r"system_prompts names adapters that are not loaded: \['faq'\]"):
        build_served_model(ServeConfig(system_prompts={"faq": "x"}), tiny_source, adapter_dirs=dirs)


@step
def _fake_train(base: BaseModelRef, adapter_dir: str) -> Annotated[ModelFolder, "adapter_support"]:
    """Stands in for steps/train.py: an adapter output produced from a `base` parameter."""
    return ModelFolder(adapter_dir)


@pipeline(model=Model(name="serve-producer-test"), enable_cache=False)
def _fake_training(base: BaseModelRef, adapter_dir: str) -> None:
    _fake_train(base, adapter_dir)


def test_base_comes_from_the_producing_step(zenml_home, tiny_source, two_adapters, tmp_path):
    """A pipeline-made adapter: the base is its step's `base` parameter, not adapter_config.json's name."""
    from zenml.client import Client

    from core.serving.model import load_served_model

    adapter = tmp_path / "adapter"
    shutil.copytree(two_adapters[1], adapter)
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace(tiny_source.name, "not-a-folder/nor-on-the-hub"))
    _fake_training(resolve_base(tiny_source), str(adapter))
    Client().update_model_version("serve-producer-test", "latest", stage="production")
    served = load_served_model(ServeConfig(model_name="serve-producer-test", stage="production"))
    assert served.adapters == ["base", "support"] and served.default_adapter == "support"
    assert served.info["base"] == tiny_source.model_dump()


def test_load_merged_model_in_process(model_version, tiny_source, two_adapters, tmp_path):
    """load: merged serves the version's merged_model artifact under the one name `merged`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from zenml import save_artifact
    from zenml.model.utils import link_artifact_version_to_model_version

    from core.models import load_base, load_tokenizer
    from core.serving.model import answer, load_served_model

    merged = PeftModel.from_pretrained(load_base(tiny_source, quant=None), str(two_adapters[0])).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    load_tokenizer(tiny_source).save_pretrained(tmp_path / "merged")
    link_artifact_version_to_model_version(
        save_artifact(ModelFolder(tmp_path / "merged"), name="merged_model"), model_version
    )
    served = load_served_model(ServeConfig(model_name=MODEL_NAME, load="merged", system_prompt=SYSTEM))
    assert served.adapters == ["merged"] and not served.is_peft
    got = answer(served, QUESTION, "", 12)
    assert got["adapter"] == "merged"
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert got["answer"] == direct_answer(tiny_source, None, QUESTION, 12, model=direct)
    with pytest.raises(ServeRequestError, match="unknown adapter 'default'; known adapters: merged"):
        answer(served, QUESTION, "default", 4)


@pytest.fixture(scope="module")
def deployment(model_version, monkeypatch_module, tmp_path_factory):
    """serve_pipeline deployed with the local deployer on 127.0.0.1; deprovisioned and deleted afterwards."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    from pipelines.serve_pipeline import serve_pipeline

    monkeypatch_module.chdir(REPO_ROOT)  # the server process imports the pipeline from its working directory
    client = Client()
    stack_id, deployer = default_stack_plus(StackComponentType.DEPLOYER, "local", "local-deployer")
    monkeypatch_module.setenv("ZENML_ACTIVE_STACK_ID", stack_id)
    suffix = deployer.rsplit("-", 1)[-1]
    name = f"lora-chat-test-{suffix}"
    try:
        # The shipped config, pointed at the test's model version, on any free port.
        doc = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
        doc["on_init_kwargs"]["config"].update(model_name=MODEL_NAME, system_prompt=SYSTEM, context_length=96)
        doc["settings"]["deployer.local"]["port"] = None
        doc["settings"]["deployer.local"]["generate_auth_key"] = True  # every request must carry the key
        config_path = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
        config_path.write_text(yaml.safe_dump(doc))
        pipe = serve_pipeline.with_options(config_path=str(config_path))
        try:
            url = pipe.deploy(deployment_name=name, timeout=60).url.rstrip("/")
            wait_answering(url + "/health")
        except Exception as err:
            fail_with_server_logs(client, name, err)
        assert url.startswith("http://127.0.0.1:")  # loopback only
        key = client.get_deployment(name).auth_key
        assert key and key not in config_path.read_text()  # generated by the deployer, not written in the config
        yield url, name, key
    finally:
        try:
            client.delete_deployment(name, force=True)  # stops the server process, then forgets the deployment
        except KeyError:
            pass  # deploy failed before registering it


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def invoke(deployment: tuple, **parameters) -> requests.Response:
    """POST /invoke on the (url, name, auth key) deployment, with its key."""
    url, _, key = deployment
    headers = {"Authorization": f"Bearer {key}"}
    return requests.post(url + "/invoke", json={"parameters": parameters}, headers=headers, timeout=120)


@pytest.mark.integration  # a deployed server process: make test-integration
def test_deployment_answers_switches_and_survives_bad_requests(deployment, tiny_source, two_adapters):

    url, name, key = deployment
    assert requests.post(url + "/invoke", json={"parameters": {"prompt": QUESTION}}, timeout=60).status_code == 401
    first = invoke(deployment, prompt=QUESTION, adapter="default", max_new_tokens=12).json()
    assert first["success"], first
    out = first["outputs"]
    assert set(out) == {"answer", "adapter_name", "prompt_tokens", "completion_tokens"}
    assert out["adapter_name"] == "default" and out["prompt_tokens"] > 0 and 1 <= out["completion_tokens"] <= 12
    assert out["answer"] == direct_answer(tiny_source, two_adapters[0], QUESTION, 12)

    second = invoke(deployment, prompt=QUESTION, adapter="prices", max_new_tokens=12).json()
    assert second["success"], second
    assert second["outputs"]["adapter_name"] == "prices"
    assert second["outputs"]["answer"] == direct_answer(tiny_source, two_adapters[1], QUESTION, 12)
    assert second["outputs"]["answer"] != out["answer"]

    # no adapter named: the config's default ("default" when the version has the single-task artifact)
    assert invoke(deployment, prompt=QUESTION, max_new_tokens=12).json()["outputs"]["answer"] == out["answer"]

    bad = invoke(deployment, prompt=QUESTION, adapter="nope", max_new_tokens=4).json()
    assert not bad["success"] and "unknown adapter 'nope'; known adapters: base, default, prices" in bad["error"]
    assert bad["metadata"]["run_id"] is None  # refused before any pipeline run was made
    # /submit (the background variant) checks requests the same way: HTTP 400 with the reason, no run id
    submitted = requests.post(
        url + "/submit",
        json={"parameters": {"prompt": QUESTION, "adapter": "nope"}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert submitted.status_code == 400, submitted.text
    assert "unknown adapter 'nope'; known adapters: base, default, prices" in submitted.json()["detail"]
    empty = invoke(deployment, prompt="   ", max_new_tokens=4).json()
    assert not empty["success"] and "prompt: must not be empty" in empty["error"]
    long = invoke(deployment, prompt="word " * 100, max_new_tokens=4).json()
    assert not long["success"] and "exceeds the context length of 96 tokens" in long["error"]
    too_many = invoke(deployment, prompt=QUESTION, max_new_tokens=100000).json()
    assert not too_many["success"] and "max_new_tokens: must be between 1 and 256" in too_many["error"]
    wrong_type = invoke(deployment, prompt=QUESTION, max_new_tokens="many")
    assert wrong_type.status_code == 422 and "max_new_tokens" in wrong_type.text
    unknown_field = invoke(deployment, prompt=QUESTION, top_k=5)
    assert unknown_field.status_code == 422 and "top_k" in unknown_field.text

    again = invoke(deployment, prompt=QUESTION, adapter="default", max_new_tokens=12).json()
    assert again["success"] and again["outputs"]["answer"] == out["answer"]


@pytest.mark.integration  # a deployed server process: make test-integration
def test_openai_client_against_the_deployment(deployment, tiny_source, two_adapters):
    """The official client, over HTTP, with the deployment's key: chat, stream, switch adapters, errors, 401s."""
    import openai
    from zenml.client import Client

    url, name, key = deployment
    oa = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    assert [m.id for m in oa.models.list().data] == ["base", "default", "prices"]
    messages = [{"role": "user", "content": QUESTION}]
    for adapter, folder in (("default", two_adapters[0]), ("prices", two_adapters[1])):
        reply = oa.chat.completions.create(model=adapter, messages=messages, max_tokens=12, temperature=0)
        text = reply.choices[0].message.content
        assert text.strip() == direct_answer(tiny_source, folder, QUESTION, 12)  # evaluation's answer, this adapter
        streamed = oa.chat.completions.create(
            model=adapter, messages=messages, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    with pytest.raises(openai.NotFoundError, match="models served: base, default, prices"):
        oa.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 96 tokens") as err:
        oa.chat.completions.create(model="default", messages=[{"role": "user", "content": "word " * 100}])
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        oa.chat.completions.create(model="default", messages=[])
    for wrong in ("", "wrong-key"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key=wrong or "-", max_retries=0).models.list()
    no_key = requests.post(url + "/v1/chat/completions", json={"model": "default", "messages": messages}, timeout=60)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    # still serving after all of that, and the key is in none of the server's log lines
    assert oa.chat.completions.create(model="default", messages=messages, max_tokens=2).choices[0].message.content
    logs = "\n".join(Client().get_deployment_logs(name, tail=2000))
    assert "/v1/chat/completions" in logs and key not in logs


@pytest.mark.integration  # a deployed server process: make test-integration
def test_deployment_records_completions_and_takes_feedback(deployment):
    """The request log on the real deployment (its default SQLite under ZenML's stores): a chat completion and an
    /invoke answer are recorded under the ids their clients got, and rated through the feedback routes."""
    import openai

    url, _, key = deployment
    oa = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    reply = oa.chat.completions.create(
        model="prices", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0
    )
    invoked = invoke(deployment, prompt=QUESTION, adapter="default", max_new_tokens=8).json()
    run_id = invoked["metadata"]["run_id"]
    oa.post("/feedback", body={"completion_id": reply.id, "rating": "down", "correction": "Code P3."}, cast_to=object)
    oa.post("/feedback", body={"completion_id": run_id, "rating": 5}, cast_to=object)
    rows = {
        r["completion_id"]: r for r in oa.get("/feedback", cast_to=object, options={"params": {"version": "1"}})["data"]
    }
    chat_row, invoke_row = rows[reply.id], rows[run_id]
    assert chat_row["correction"] == "Code P3." and chat_row["completion"]["adapter"] == "prices"
    assert chat_row["completion"]["answer"] == reply.choices[0].message.content
    assert (chat_row["completion"]["model"], chat_row["completion"]["version"]) == (MODEL_NAME, "1")
    assert invoke_row["score"] == 5 and invoke_row["completion"]["endpoint"] == "invoke"
    assert invoke_row["completion"]["answer"] == invoked["outputs"]["answer"]
    with pytest.raises(openai.NotFoundError):
        oa.post("/feedback", body={"completion_id": "chatcmpl-nope", "rating": "up"}, cast_to=object)
    stats = requests.get(url + "/v1/feedback/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert stats["dropped"] == 0 and stats["last_error"] is None and stats["database"].endswith(f"/{MODEL_NAME}.db")
    assert requests.get(url + "/v1/feedback/stats", timeout=30).status_code == 401


@pytest.mark.integration  # a deployed server process: make test-integration
def test_deprovision_stops_the_server(deployment):
    from zenml.client import Client

    url, name, _ = deployment
    Client().deprovision_deployment(name)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)
