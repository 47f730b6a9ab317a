#!/usr/bin/env bash
# The local stack: ZenML's default stack (local orchestrator, local artifact store), which
# `make run` and `make test` use. Nothing to register; this makes it active and, when HF_TOKEN
# is set, stores it as the ZenML secret the Hub configs read.
#   bash infra/stacks/local.sh                 # then: make run
#   HF_TOKEN=hf_... bash infra/stacks/local.sh  # for configs/llama3_8b_qlora.yaml (gated model, Hub push)
# Run it from the repo root with the project's venv active (`make setup` creates it); the
# Makefile keeps ZenML's state in .zenml-home/, so export ZENML_CONFIG_PATH=$PWD/.zenml-home to share it.
set -euo pipefail

zenml stack set default

if [ -n "${HF_TOKEN:-}" ]; then
    # `token` is what the push step reads; HF_TOKEN is what huggingface_hub reads when a config
    # lists the secret under `secrets:` (configs/k8s_gpu.yaml does; ZenML sets both as env vars).
    if zenml secret get huggingface >/dev/null 2>&1; then
        zenml secret update huggingface --token="$HF_TOKEN" --HF_TOKEN="$HF_TOKEN"
    else
        zenml secret create huggingface --token="$HF_TOKEN" --HF_TOKEN="$HF_TOKEN"
    fi
fi

zenml stack describe
