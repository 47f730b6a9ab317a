"""The one tiny Llama builder, shared by the tests and the benchmarks (plain Python, no ZenML).

`build_tiny_model(out)` writes a randomly initialised 2-layer Llama (hidden 64) with SmolLM2's tokenizer and
chat template: it loads, trains and merges in seconds on a CPU. Every other random-weight model the benchmarks
build (a smaller vocabulary without a tokenizer, the Llama-3.2-1B and Llama-3.1-8B shapes) is this config with
overrides, never a second config.
"""

from __future__ import annotations

from pathlib import Path

# The tiny shape; any LlamaConfig field can be overridden per call.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def build_tiny_model(
    out: Path,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    *,
    tokenizer: bool = True,
    dtype=None,
    device: str = "cpu",
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Write a random-weight Llama (TINY_SHAPE updated by `overrides`) and its tokenizer to `out`; returns `out`.

    tokenizer_dir: the tokenizer (and chat template) saved with the model; its length and special tokens set the
        config's vocab_size and bos/eos/pad ids. Default: the bundled SmolLM2 folder (core.models).
    tokenizer: False writes weights only, with LlamaConfig's default special ids (give vocab_size in overrides).
    seed: torch.manual_seed before the model is created; the same seed gives the same weights.
    dtype, device: the weights' dtype (default float32) and where they are initialised (a large shape is
        minutes faster on a GPU; the weights then differ from a CPU initialisation).
    max_shard_size: split the safetensors file (transformers' default when None).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    settings = dict(TINY_SHAPE)
    tok = None
    if tokenizer:
        if tokenizer_dir is None:
            from core.models import bundled_model_dir

            tokenizer_dir = bundled_model_dir()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        settings.update(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    config = LlamaConfig(**(settings | overrides))
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    out = Path(out)
    model.save_pretrained(out, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if tok is not None:
        tok.save_pretrained(out)
    return out
