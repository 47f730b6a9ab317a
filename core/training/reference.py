"""The reference a 4-bit training run must track: the same base with its 4-bit weights dequantized to fp32.

QLoRA's frozen base is stored in 4 bits, and every matmul computes with the dequantized weights. A model whose
Linear4bit layers are replaced by plain fp32 Linear layers holding exactly those dequantized weights
(`bitsandbytes.functional.dequantize_4bit`) must therefore train the same LoRA weights, up to float rounding.
tests/training/test_precision.py trains both for a few steps and compares losses and LoRA gradients, so a kernel or
precision change that silently alters training fails on any CPU; benchmarks/train_throughput.py trains it as
its `ref-dequantized` row (build_dequantized_model in place of the train step's build_model).
"""

from __future__ import annotations

import torch


def dequantize_4bit_layers(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes Linear4bit in `model` by an fp32 nn.Linear with its dequantized weights.

    Returns how many layers were replaced. The new layers are frozen (requires_grad False), like the 4-bit ones.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnbf.dequantize_4bit(child.weight.data, child.weight.quant_state).to(torch.float32)
            # skip_init: no random initialisation, so the global RNG (and the LoRA init drawn after) is untouched
            linear = torch.nn.utils.skip_init(
                torch.nn.Linear,
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=weight.device,
                dtype=torch.float32,
            )
            with torch.no_grad():
                linear.weight.copy_(weight.reshape(linear.weight.shape))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.float())
            linear.requires_grad_(False)
            setattr(parent, name, linear)
            replaced += 1
    return replaced


def build_dequantized_model(model, quant, lora, gradient_checkpointing: bool, start_adapter=None):
    """core.training.trainer.build_model's twin: the 4-bit base loaded as for training, its 4-bit layers replaced by
    their dequantized fp32 weights, and the same new LoRA adapter on top (same signature, same RNG use; a start
    adapter is the preference stage's, which this reference does not cover)."""
    if start_adapter is not None:
        raise ValueError("the dequantized reference trains a new adapter; it takes no start adapter")
    from peft import get_peft_model

    from core import models
    from core.training.trainer import lora_config

    base = models.load_base(model, quant)
    if not quant.load_in_4bit or dequantize_4bit_layers(base) == 0:
        raise ValueError("the dequantized reference needs a 4-bit base (quant.load_in_4bit: true)")
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    peft_model = get_peft_model(base, lora_config(lora))
    peft_model.peft_config["default"].base_model_name_or_path = models.display_name(model)
    return peft_model
