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
import torch  # noqa: E402

from core.config import ModelSource  # noqa: E402


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


def build_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template: trains in seconds on CPU."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), bundled_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dir) -> ModelSource:
    return ModelSource(source="local", name=str(tiny_model_dir))
