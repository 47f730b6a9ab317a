"""Tensor helpers shared by the stages that compare two models' logits: evaluation, the merge check, the GGUF check."""

from __future__ import annotations

import torch


def pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """Sequences of ids as one tensor, padded with `value` on the left (generation) or the right."""
    width = max(len(s) for s in seqs)
    return torch.tensor([([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs])


@torch.no_grad()
def batch_logits(model, batches: list[list[list[int]]], pad_id: int) -> list[torch.Tensor]:
    """The model's fp32 logits for each batch of id sequences (right-padded; padding positions zeroed)."""
    device = next(model.parameters()).device
    out = []
    for seqs in batches:
        ids = pad(seqs, pad_id, left=False).to(device)
        mask = pad([[1] * len(s) for s in seqs], 0, left=False).to(device)
        out.append(model(input_ids=ids, attention_mask=mask).logits.float().cpu() * mask.cpu()[..., None])
    return out


def max_relative_diff(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """max |actual - expected| logit over every batch, as a fraction of that batch's max |expected| logit.

    The check behind the merge (merged vs base+adapter) and the GGUF export (file vs merged model).
    """
    return max(float((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) for a, e in zip(actual, expected))
