"""Packing's sequence length: whole rows packed into sequences of a token budget, checked before the model loads."""

from __future__ import annotations

from datasets import Dataset

from core.config import TrainConfig


def longest_row(*datasets: Dataset) -> int:
    """Tokens in the longest row of the given tokenized datasets."""
    return max((len(ids) for ds in datasets for ids in ds["input_ids"]), default=0)


def packed_sequence_length(cfg: TrainConfig, longest: int) -> int | None:
    """Tokens per packed sequence with packing (None without): micro_batch_size of them form one micro-batch.

    tokens_per_micro_batch // micro_batch_size, or the longest row when no budget is set. Packing keeps rows whole
    (trl's "bfd" would cut a longer row and lose its labels), so a budget that leaves less than the longest row is
    an error, raised before the model loads.
    """
    if not cfg.packing:
        return None
    if cfg.tokens_per_micro_batch is None:
        return max(longest, 1)
    length = cfg.tokens_per_micro_batch // cfg.micro_batch_size
    if length < longest:
        raise ValueError(
            f"train.tokens_per_micro_batch={cfg.tokens_per_micro_batch} split into train.micro_batch_size="
            f"{cfg.micro_batch_size} packed sequences gives {length} tokens each, but the longest row has {longest} "
            f"tokens: raise tokens_per_micro_batch to at least {longest * cfg.micro_batch_size}, lower "
            "micro_batch_size, or leave tokens_per_micro_batch unset (null)"
        )
    return length
