"""4-bit LoRA training must track the same training on the dequantized fp32 weights (core/training/reference.py).

The 4-bit base computes every matmul with its dequantized weights, so with the same LoRA initialisation and
batches the two runs must give the same losses and LoRA gradients (measured: identical to the last bit on CPU).
A kernel or precision change that silently alters training breaks that on any CPU: the broken settings below
(bf16 compute; bitsandbytes' AVX512-BF16 CPU inference layout, which has no autograd) must be caught.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LORA, qa_rows

from core import models
from core.config import LoraSettings, QuantConfig
from core.training.reference import build_dequantized_model
from core.training.trainer import build_model

STEPS = 6
LR = 1e-2
LOSS_RTOL = 1e-4  # per step, relative; measured 0.0 on CPU (the same fp32 matmuls), slack for other BLAS builds
GRAD_RTOL = 1e-3  # first step's LoRA gradients, relative (norm of difference / norm)


def _batches(source) -> list[dict]:
    tok = models.load_tokenizer(source)
    texts = [m[0]["content"] + " " + m[1]["content"] for m in qa_rows(16)["messages"]]
    out = []
    for i in range(0, len(texts), 4):
        enc = tok(texts[i : i + 4], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def _train(model, batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    """An eval-mode pass without gradients first (as a held-out score before training does), then STEPS AdamW steps;
    returns the losses and the first step's LoRA gradients."""
    model.eval()
    with torch.no_grad():
        model(**batches[0])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        if not grads:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _twins(source, quant: QuantConfig, break_layout: bool = False):
    """The trained 4-bit model (core's own builder) and its dequantized fp32 twin with the same LoRA weights."""
    import bitsandbytes as bnb

    lora = LoraSettings(**TINY_LORA)
    qlora = build_model(source, quant, lora, gradient_checkpointing=False)
    if break_layout:  # undo keep_4bit_differentiable: let bitsandbytes switch to its CPU inference kernel
        for module in qlora.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
    # the same frozen weights the 4-bit matmuls use, in fp32, and the same LoRA initialisation
    ref = build_dequantized_model(source, QuantConfig(compute_dtype="float32"), lora, gradient_checkpointing=False)
    lora_weights = {n: p for n, p in qlora.state_dict().items() if "lora_" in n}
    assert ref.load_state_dict(lora_weights, strict=False).unexpected_keys == []
    return qlora, ref


def _divergence(source, quant: QuantConfig, break_layout: bool = False) -> tuple[float, float]:
    qlora, ref = _twins(source, quant, break_layout)
    batches = _batches(source)
    (lq, gq), (lr, gr) = _train(qlora, batches), _train(ref, batches)
    assert sorted(gq) == sorted(gr) and gq
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(lq, lr))
    grad_diff = max(float((gq[k].float() - gr[k]).norm() / gr[k].norm().clamp_min(1e-12)) for k in gq)
    return loss_diff, grad_diff


def test_4bit_training_tracks_dequantized_fp32_training(tiny_source):
    loss_diff, grad_diff = _divergence(tiny_source, QuantConfig(compute_dtype="float32"))
    assert loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL, (loss_diff, grad_diff)


def test_bf16_compute_is_caught(tiny_source):
    """A deliberately broken precision setting: bf16 matmuls instead of fp32 (any CPU)."""
    loss_diff, grad_diff = _divergence(tiny_source, QuantConfig(compute_dtype="bfloat16"))
    assert loss_diff > LOSS_RTOL or grad_diff > GRAD_RTOL, (loss_diff, grad_diff)


def test_bitsandbytes_cpu_inference_layout_is_caught(tiny_source):
    """Why core.training.trainer.keep_4bit_differentiable exists: without it, on a CPU with AVX512-BF16, the eval pass
    moves every 4-bit layer to gemv_4bit (no autograd) and training no longer tracks the reference."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes uses its CPU inference layout only on CPUs with AVX512-BF16")
    loss_diff, grad_diff = _divergence(tiny_source, QuantConfig(compute_dtype="float32"), break_layout=True)
    assert loss_diff > LOSS_RTOL or grad_diff > GRAD_RTOL, (loss_diff, grad_diff)
