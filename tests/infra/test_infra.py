"""infra/: the stack recipes use flags ZenML 0.98 accepts, and the manifests match what configs/k8s_gpu.yaml names."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_SCRIPT = REPO / "infra" / "stacks" / "k8s.sh"


def _commands(script: Path) -> list[list[str]]:
    """Every `zenml ...` command in a shell script, continuation lines joined, shell-split."""
    text = script.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if not ln.strip().startswith("#")]
    return [shlex.split(ln) for ln in lines if ln.startswith("zenml ")]


def _config_classes():
    from zenml.container_registries.default_container_registry import DefaultContainerRegistryFlavor
    from zenml.image_builders.local_image_builder import LocalImageBuilderFlavor
    from zenml.integrations.kubernetes.flavors.kubernetes_orchestrator_flavor import KubernetesOrchestratorConfig
    from zenml.integrations.s3.flavors.s3_artifact_store_flavor import S3ArtifactStoreConfig

    return {
        ("orchestrator", "kubernetes"): KubernetesOrchestratorConfig,
        ("artifact-store", "s3"): S3ArtifactStoreConfig,
        ("container-registry", "default"): DefaultContainerRegistryFlavor().config_class,
        ("image-builder", "local"): LocalImageBuilderFlavor().config_class,
    }


def test_k8s_stack_script_registers_components_with_real_config_fields():
    pytest.importorskip("kubernetes")
    classes = _config_classes()
    flavors, configs = {}, {}
    for cmd in _commands(K8S_SCRIPT):
        if len(cmd) < 4 or cmd[2] not in ("register", "update") or cmd[1] not in {k for k, _ in classes} | {"stack"}:
            continue
        kind, verb, name, args = cmd[1], cmd[2], cmd[3], cmd[4:]
        if kind == "stack":
            stack = dict(zip(args[::2], args[1::2], strict=False))
            continue
        values = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
        if verb == "register":
            flavors[(kind, name)] = values.pop("flavor")
        configs.setdefault((kind, name), {}).update(values)

    assert {k for k, _ in flavors} == {"orchestrator", "artifact-store", "container-registry", "image-builder"}
    for (kind, name), values in configs.items():
        cls = classes[(kind, flavors[(kind, name)])]
        unknown = set(values) - set(cls.model_fields) - {"authentication_secret"}
        assert not unknown, f"{kind} {name}: {sorted(unknown)} are not {cls.__name__} fields"
        # shell variables stand in for the real values; JSON options parse as JSON, as ZenML's CLI does
        parsed = {}
        for key, value in values.items():
            value = re.sub(r"\$\{?(\w+)[^}]*\}?", lambda m: "s3://bucket" if "BUCKET" in m.group(1) else "x", value)
            try:
                parsed[key] = json.loads(value)
            except json.JSONDecodeError:
                parsed[key] = value
        if kind == "artifact-store" and "client_kwargs" in parsed:
            parsed["client_kwargs"] = {"endpoint_url": "http://minio:9000"}
        cls.model_validate(parsed)
    orchestrator = configs[("orchestrator", "k8s-gpu")]
    assert orchestrator["pass_zenml_token_as_secret"] == "true"  # the API token never in plain pod env
    # the stack is made of exactly the components registered above
    kinds = {"-o": "orchestrator", "-a": "artifact-store", "-c": "container-registry", "-i": "image-builder"}
    assert {(kinds[flag], name) for flag, name in stack.items()} == set(flavors)


def _manifests() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted((REPO / "infra" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_manifests_provide_what_the_k8s_config_names():
    docs = _manifests()
    cfg = yaml.safe_load((REPO / "configs" / "k8s_gpu.yaml").read_text())
    orch = cfg["settings"]["orchestrator.kubernetes"]
    namespace = re.search(r'NAMESPACE="\$\{NAMESPACE:-(\w+)\}"', K8S_SCRIPT.read_text()).group(1)
    for account in (orch["service_account_name"], orch["step_pod_service_account_name"]):
        assert docs[("ServiceAccount", account)]["metadata"]["namespace"] == namespace
    assert docs[("ServiceAccount", orch["step_pod_service_account_name"])]["automountServiceAccountToken"] is False
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for step in cfg["steps"].values()
        for v in step.get("settings", {}).get("orchestrator.kubernetes", {}).get("pod_settings", {}).get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert claims and all(("PersistentVolumeClaim", c) in docs for c in claims)


def test_orchestrator_role_covers_the_calls_zenml_makes_from_the_orchestrator_pod():
    """kubernetes_orchestrator_entrypoint (ZenML 0.98): reads its pod and Job, creates and watches step Jobs
    and their pods and logs, deletes the run's token Secret at the end."""
    docs = _manifests()
    binding = docs[("RoleBinding", "zenml-orchestrator")]
    assert binding["subjects"][0]["name"] == "zenml-orchestrator"
    rules = docs[("Role", binding["roleRef"]["name"])]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    needed = {("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
    needed |= {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "patch", "delete")}
    needed |= {("", "secrets", "delete")}
    assert needed <= granted, sorted(needed - granted)
    assert not any(r in ("*",) or v == "*" for _, r, v in granted)  # nothing wildcard


def test_one_uv_version_for_setup_and_images():
    """make setup installs uv by pin, the images copy it from UV_IMAGE: one version, or a lock or resolution
    quirk of one uv shows up on only one of the paths."""
    dockerfile = re.search(r"^ARG UV_IMAGE=\S+:(\S+)$", (REPO / "infra/Dockerfile").read_text(), re.M)
    pins = set(re.findall(r"\buv==(\S+)", (REPO / "Makefile").read_text()))
    assert dockerfile and pins == {dockerfile.group(1)}, (dockerfile and dockerfile.group(1), pins)
