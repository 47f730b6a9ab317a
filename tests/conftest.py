"""Shared fixtures. ZenML state goes to a temporary folder, never the user's."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_ZENML_HOME = tempfile.mkdtemp(prefix="zenml-tests-")
# Before anything imports zenml: a throwaway global config, SQLite store and artifact store.
os.environ["ZENML_CONFIG_PATH"] = _ZENML_HOME
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("ZENML_LOGGING_VERBOSITY", "WARN")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

from core.config import ModelSource  # noqa: E402
from core.tiny import build_tiny_model  # noqa: E402, F401  (tests import it from here)


def pytest_configure(config):
    # registered here, not in pyproject.toml (editing it would rebuild the venv and the stack's base image)
    config.addinivalue_line(
        "markers",
        "container: the local-container stack for real (Docker, moto S3, a ZenML server): make test-stack, not make test",
    )
    config.addinivalue_line(
        "markers",
        "bench: a benchmark script end to end on its smoke preset (fresh processes, minutes of CPU): make "
        "test-integration, not make test",
    )


def pytest_sessionfinish(session, exitstatus):
    """The throwaway ZenML home (its SQLite store and local artifact store) goes with the session."""
    import shutil

    shutil.rmtree(_ZENML_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def zenml_home() -> Path:
    """The temporary ZenML config dir; source root pinned to the repo."""
    from zenml.utils import source_utils

    source_utils.set_custom_source_root(str(REPO_ROOT))
    return Path(_ZENML_HOME)


@pytest.fixture(scope="session")
def bundled_tokenizer_dir() -> Path:
    """The bundled SmolLM2 folder (converted once per machine, then reused)."""
    from core.models import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), bundled_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dir) -> ModelSource:
    return ModelSource(source="local", name=str(tiny_model_dir))


def qa_rows(n: int, split: str = "") -> dict:
    """A learnable toy task: fixed, short answers keyed by the question."""
    return {
        "id": [f"qa.jsonl:{i + 1}" for i in range(n)],
        "split": [split] * n,
        "messages": [
            [
                {"role": "user", "content": f"What is the code for item {i}?"},
                {"role": "assistant", "content": f"The code for item {i} is {i * 7 % 100}."},
            ]
            for i in range(n)
        ],
    }


def instruction_rows(n: int, offset: int = 0) -> list[dict]:
    """qa_rows items offset .. offset+n-1 as instruction-format JSONL records (what the pipeline ingests)."""
    messages = qa_rows(n + offset)["messages"][offset:]
    return [{"instruction": m[0]["content"], "input": "", "output": m[1]["content"]} for m in messages]


@pytest.fixture(scope="session")
def tiny_splits(tiny_source):
    """(train, eval) tokenized with the tiny model's tokenizer."""
    from datasets import Dataset

    from core.config import PromptConfig
    from core.data.formatting import format_dataset
    from core.data.ingest import FEATURES
    from core.models import load_tokenizer

    tok = load_tokenizer(tiny_source)
    train, held_out, _ = format_dataset(
        Dataset.from_dict(qa_rows(48), features=FEATURES), tok, PromptConfig(eval_fraction=0.2)
    )
    return train, held_out


TINY_LORA = dict(r=8, alpha=16, dropout=0.0)
TINY_TRAIN = dict(max_steps=8, learning_rate=1e-2, micro_batch_size=4, save_every=4, logging_steps=1, warmup_ratio=0.0)


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_source, tiny_splits):
    """One short QLoRA run on the tiny model, shared by the train/evaluate/merge tests.

    Returns (adapter folder, metrics, parameter snapshots taken at train begin and end).
    """
    from transformers import TrainerCallback

    from core.config import LoraSettings, QuantConfig, TrainConfig
    from core.training import train_adapter

    snapshots = {}

    class Snapshot(TrainerCallback):
        def _take(self, model):
            return {n: p.detach().clone().float() for n, p in model.named_parameters()}

        def on_train_begin(self, args, state, control, model=None, **kw):
            snapshots["begin"] = self._take(model)
            snapshots["trainable_dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kw):
            snapshots["end"] = self._take(model)

    root = tmp_path_factory.mktemp("trained")
    train, held_out = tiny_splits
    adapter, metrics = train_adapter(
        train,
        held_out,
        tiny_source,
        QuantConfig(),
        LoraSettings(**TINY_LORA),
        TrainConfig(**TINY_TRAIN, checkpoint_dir=str(root / "ckpt")),
        root / "adapter",
        callbacks=[Snapshot()],
    )
    return adapter, metrics, snapshots


@pytest.fixture(scope="session")
def two_adapters(tmp_path_factory, tiny_source, trained_adapter):
    """(trained adapter dir, second adapter dir). The second is built, not trained (seconds, not minutes): random
    non-zero LoRA weights on other modules at another rank, so its answers differ, as a second task's would."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_base

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    second = get_peft_model(load_base(tiny_source, quant=None), config)
    out = tmp_path_factory.mktemp("second-adapter") / "adapter"
    second.save_pretrained(out, save_embedding_layers=False)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_source.name
    return trained_adapter[0].path, out


def default_stack_plus(component_type, flavor: str, prefix: str):
    """A new stack: the default orchestrator and artifact store plus one new component of `flavor`. Returns
    (stack id, component name). Activate it with ZENML_ACTIVE_STACK_ID for this process and the ones it starts:
    activate_stack would write the repo's .zen config."""
    import uuid

    from zenml.client import Client
    from zenml.enums import StackComponentType

    client, suffix = Client(), uuid.uuid4().hex[:6]
    component = f"{prefix}-{suffix}"
    client.create_stack_component(name=component, flavor=flavor, component_type=component_type, configuration={})
    stack = client.create_stack(
        name=f"{prefix}-stack-{suffix}",
        components={
            StackComponentType.ORCHESTRATOR: "default",
            StackComponentType.ARTIFACT_STORE: "default",
            component_type: component,
        },
    )
    return str(stack.id), component
