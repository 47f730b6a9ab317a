"""Export for llama.cpp / Ollama: the GGUF writer and its checks (gguf), llama.cpp's build and driver (llamacpp)."""

from core import lazy_submodule


def __getattr__(name: str):  # `core.export.<submodule>` imports it (ZenML cache policies; core/__init__.py)
    return lazy_submodule(__name__, name)
