#!/usr/bin/env bash
# Register the Kubernetes GPU stack `k8s-gpu` (kubernetes orchestrator, S3-compatible artifact
# store, container registry, local Docker image builder) and make it active.
#   KUBE_CONTEXT=gpu-cluster BUCKET=s3://my-zenml-artifacts REGISTRY=ghcr.io/my-org HF_TOKEN=hf_... \
#       bash infra/stacks/k8s.sh
# Then: zenml pipeline run pipelines.lora_pipeline -c configs/k8s_gpu.yaml
# Before: `zenml login https://<your ZenML server>` (pods must reach it; ZenML refuses a remote
# orchestrator with a local store), `kubectl apply -f infra/k8s/` on the cluster, Docker on this
# machine logged in to REGISTRY. Optional: NAMESPACE (default zenml), S3_ENDPOINT for MinIO or
# another S3-compatible store (e.g. http://minio.minio.svc.cluster.local:9000), and
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the bucket (without them, s3fs uses the
# environment's credentials, e.g. an IAM role on the nodes). First registration only: change
# a component later with `zenml <component> update <name> --key=value`.
set -euo pipefail

: "${KUBE_CONTEXT:?the kubectl context of the GPU cluster (kubectl config get-contexts)}"
: "${BUCKET:?an s3:// URL for artifacts, e.g. s3://my-zenml-artifacts}"
: "${REGISTRY:?a registry the cluster can pull from, e.g. ghcr.io/my-org}"
: "${HF_TOKEN:?a Hugging Face token with access to the base model}"
NAMESPACE="${NAMESPACE:-zenml}"
S3_ENDPOINT="${S3_ENDPOINT:-}"

# The client libraries of both integrations (kubernetes, s3fs/boto3) in this environment; the
# image gets them too (configs/k8s_gpu.yaml: install_stack_requirements).
zenml integration install kubernetes s3 -y

upsert_secret() {
    local name=$1
    shift
    if zenml secret get "$name" >/dev/null 2>&1; then
        zenml secret update "$name" "$@"
    else
        zenml secret create "$name" "$@"
    fi
}

# Secrets live in the ZenML server; pods fetch them at run time, manifests never contain them.
# `token` is read by the push step, HF_TOKEN by huggingface_hub in every step (config `secrets:`).
upsert_secret huggingface --token="$HF_TOKEN" --HF_TOKEN="$HF_TOKEN"

# Each step in its own pod. pass_zenml_token_as_secret: ZenML's API token goes into a Kubernetes
# Secret referenced by the pods, not into their env in plain text.
zenml orchestrator register k8s-gpu \
    --flavor=kubernetes \
    --kubernetes_context="$KUBE_CONTEXT" \
    --kubernetes_namespace="$NAMESPACE" \
    --pass_zenml_token_as_secret=true

zenml artifact-store register s3-artifacts \
    --flavor=s3 \
    --path="$BUCKET"
if [ -n "$S3_ENDPOINT" ]; then
    zenml artifact-store update s3-artifacts --client_kwargs="{\"endpoint_url\": \"$S3_ENDPOINT\"}"
fi
if [ -n "${AWS_ACCESS_KEY_ID:-}" ]; then
    upsert_secret s3-artifacts \
        --aws_access_key_id="$AWS_ACCESS_KEY_ID" \
        --aws_secret_access_key="${AWS_SECRET_ACCESS_KEY:?set with AWS_ACCESS_KEY_ID}"
    zenml artifact-store update s3-artifacts --authentication_secret=s3-artifacts
fi

zenml container-registry register gpu-registry \
    --flavor=default \
    --uri="$REGISTRY"

# Builds with this machine's Docker, then pushes to gpu-registry. In-cluster alternative
# (no Docker here): zenml integration install kaniko, then
#   zenml image-builder register kaniko --flavor=kaniko --kubernetes_context="$KUBE_CONTEXT"
zenml image-builder register local-docker \
    --flavor=local

zenml stack register k8s-gpu \
    -o k8s-gpu \
    -a s3-artifacts \
    -c gpu-registry \
    -i local-docker \
    --set

zenml stack describe k8s-gpu
