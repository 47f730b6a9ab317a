"""A Kubernetes Deployment + Service running vLLM's OpenAI server for a GPU, from the same ServeConfig the ZenML
deployment reads: the alternative to the CPU engines (transformers, llama_cpp) when a GPU node is there.

    from core.serving.vllm import vllm_manifests_yaml
    print(vllm_manifests_yaml(cfg, "/cache/models/smollm2", {"default": "/cache/adapters/default"}))
    # kubectl apply -f -   (not run here: no GPU, no cluster; rendered and checked by tests/serving/test_vllm.py)

What it renders: `vllm serve <model> --enable-lora --lora-modules <name>=<path> ...` (the merged model alone for
`load: merged`), the base served as `base` (or `merged`) and each adapter under its task name, as /v1/models lists
them on the ZenML deployment; `--max-num-seqs` = the config's slots, `--max-model-len` = its context_length,
`--dtype` from its dtype; the API key from a Kubernetes Secret (`--api-key` via VLLM_API_KEY) when named. Paths are
paths inside the pod: the model and adapter folders on the cache volume (infra/k8s/cache-pvc.yaml, mounted at
/cache). vLLM renders prompts with the model's own chat template: the config's system prompts are not added by the
server, so clients send their system message (the ZenML deployment adds it itself).
"""

from __future__ import annotations

from typing import Any

from core.serving.model import BASE_ADAPTER, MERGED_ADAPTER, ServeConfig

DEFAULT_IMAGE = "vllm/vllm-openai:v0.11.0"  # pin a release; vLLM's flags move between releases
PORT = 8000  # vLLM's default HTTP port


def vllm_args(cfg: ServeConfig, model: str, adapters: dict[str, str], max_lora_rank: int = 16) -> list[str]:
    """`vllm serve` arguments for the config: the model (base or merged folder) and every adapter by name."""
    if cfg.load == "merged" and adapters:
        raise ValueError("load: merged serves the merged model alone; adapters apply to load: adapters")
    if cfg.load == "adapters" and not adapters:
        raise ValueError("load: adapters needs at least one adapter folder")
    if BASE_ADAPTER in adapters or MERGED_ADAPTER in adapters:
        raise ValueError(f"adapter names '{BASE_ADAPTER}' and '{MERGED_ADAPTER}' are reserved")
    served_name = MERGED_ADAPTER if cfg.load == "merged" else BASE_ADAPTER
    args = ["serve", model, "--served-model-name", served_name, "--host", "0.0.0.0", "--port", str(PORT)]
    args += ["--max-num-seqs", str(cfg.slots)]
    if cfg.context_length:
        args += ["--max-model-len", str(cfg.context_length)]
    args += ["--dtype", "auto" if cfg.dtype == "auto" else cfg.dtype]
    if adapters:
        # one LoRA slot per adapter on the GPU (no swapping between requests); rank: the largest adapter's r
        args += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_lora_rank)]
        args += ["--lora-modules", *[f"{name}={path}" for name, path in sorted(adapters.items())]]
    return args


def vllm_manifests(
    cfg: ServeConfig,
    model: str,
    adapters: dict[str, str] | None = None,
    *,
    name: str = "lora-chat-vllm",
    namespace: str = "zenml",
    image: str = DEFAULT_IMAGE,
    gpus: int = 1,
    memory: str = "16Gi",
    cache_claim: str = "zenml-qlora-cache",
    api_key_secret: str | None = None,
    max_lora_rank: int = 16,
) -> list[dict[str, Any]]:
    """[Deployment, Service]: one vLLM pod on `gpus` GPUs, its /health as startup, readiness and liveness probe,
    the cache volume at /cache, a ClusterIP Service on port 8000. `api_key_secret`: a Secret with key `api-key`."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "vllm"}
    env = [{"name": "HF_HOME", "value": "/cache/huggingface"}]
    if api_key_secret:
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": api_key_secret, "key": "api-key"}}})
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": "vllm",
        "image": image,
        "command": ["vllm"],
        "args": vllm_args(cfg, model, adapters or {}, max_lora_rank),
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": env,
        "resources": {
            "requests": {"cpu": "4", "memory": memory, "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": memory, "nvidia.com/gpu": str(gpus)},
        },
        # loading weights and CUDA graphs takes minutes: the startup probe allows 20 min (120 x 10 s) before the
        # liveness probe may restart the pod
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 120},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "volumes": [
                        {"name": "cache", "persistentVolumeClaim": {"claimName": cache_claim}},
                        # PyTorch's shared memory between worker processes (Docker's 64 MB default is too small)
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
        },
    }
    return [deployment, service]


def vllm_manifests_yaml(cfg: ServeConfig, model: str, adapters: dict[str, str] | None = None, **kw: Any) -> str:
    """vllm_manifests as one multi-document YAML (kubectl apply -f)."""
    import yaml

    return yaml.safe_dump_all(vllm_manifests(cfg, model, adapters, **kw), sort_keys=False)
