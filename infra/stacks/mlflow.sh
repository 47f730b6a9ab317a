#!/usr/bin/env bash
# The local stack plus an MLflow experiment tracker: the train and evaluate steps stream their metrics to
# MLflow while they run (core/runs/tracking.py). MLflow's store: SQLite inside the local artifact store.
#   make tracking                 # = installs the `tracking` extra, then this script (idempotent)
#   make run STACK=local-mlflow   # the default run, tracked
#   make mlflow-ui                # MLflow's UI on http://127.0.0.1:5000 (loopback only)
# Run it from the repo root with the project's venv on PATH; ZENML_CONFIG_PATH as the Makefile sets it.
set -euo pipefail

zenml experiment-tracker describe mlflow_tracker >/dev/null 2>&1 ||
    zenml experiment-tracker register mlflow_tracker --flavor=mlflow >/dev/null
zenml stack describe local-mlflow >/dev/null 2>&1 ||
    zenml stack register local-mlflow -o default -a default -e mlflow_tracker >/dev/null
echo "stack local-mlflow: default + experiment tracker mlflow_tracker (MLflow at $(python -m core.runs.tracking uri))"
