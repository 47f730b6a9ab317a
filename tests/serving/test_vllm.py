"""The vLLM Kubernetes manifests rendered from a ServeConfig (core/serving/vllm.py), parsed back from YAML.

Not run against a cluster or a GPU (there is none here): the checks are what the API server and vLLM would read.
"""

from __future__ import annotations

import pytest
import yaml

from core.serving.model import ServeConfig
from core.serving.vllm import vllm_args, vllm_manifests_yaml

ADAPTERS = {"support": "/cache/adapters/support", "routing": "/cache/adapters/routing"}


def parse(cfg: ServeConfig, model: str, adapters: dict | None, **kw) -> tuple[dict, dict]:
    deployment, service = yaml.safe_load_all(vllm_manifests_yaml(cfg, model, adapters, **kw))
    return deployment, service


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_adapters_deployment_and_service():
    cfg = ServeConfig(max_batch_size=6, context_length=4096, dtype="bfloat16")
    deployment, service = parse(cfg, "/cache/models/smollm2", ADAPTERS, api_key_secret="vllm-key", gpus=2)
    assert deployment["kind"] == "Deployment" and deployment["apiVersion"] == "apps/v1"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert container["command"] == ["vllm"] and args[:2] == ["serve", "/cache/models/smollm2"]
    assert flag(args, "--served-model-name") == "base"  # the bare base under the name the ZenML deployment uses
    assert flag(args, "--max-num-seqs") == "6" and flag(args, "--max-model-len") == "4096"
    assert flag(args, "--dtype") == "bfloat16" and "--enable-lora" in args and flag(args, "--max-loras") == "2"
    lora = args[args.index("--lora-modules") + 1 :]
    assert lora == ["routing=/cache/adapters/routing", "support=/cache/adapters/support"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2" and resources["requests"]["nvidia.com/gpu"] == "2"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
    key = next(e for e in container["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "vllm-key", "key": "api-key"}  # a reference, no value
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "zenml-qlora-cache"}} in pod["volumes"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels and service["spec"]["selector"] == labels
    assert service["kind"] == "Service" and service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["type"] == "ClusterIP"  # not exposed beyond the cluster


def test_merged_and_defaults():
    cfg = ServeConfig(load="merged")
    deployment, _ = parse(cfg, "/cache/models/merged", None)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(args, "--served-model-name") == "merged" and "--enable-lora" not in args
    assert flag(args, "--max-num-seqs") == "8" and "--max-model-len" not in args and flag(args, "--dtype") == "auto"
    assert not any(e["name"] == "VLLM_API_KEY" for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"])
    assert flag(vllm_args(ServeConfig(parallel=3), "m", {"a": "/a"}), "--max-num-seqs") == "3"


def test_refusals():
    with pytest.raises(ValueError, match="load: merged serves the merged model alone"):
        vllm_args(ServeConfig(load="merged"), "m", ADAPTERS)
    with pytest.raises(ValueError, match="needs at least one adapter"):
        vllm_args(ServeConfig(), "m", {})
    with pytest.raises(ValueError, match="reserved"):
        vllm_args(ServeConfig(), "m", {"base": "/x"})
