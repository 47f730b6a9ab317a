"""The labels-only loss: the LM head and cross-entropy run only where the shifted label is not -100."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from core.prompts import IGNORE as IGNORE_INDEX  # label of a position that has no loss (prompt tokens, padding)


def labels_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Mean next-token cross-entropy over the labelled positions, with logits computed at those positions only.

    transformers' `logits_to_keep` takes a boolean (batch, seq) mask: the model runs its LM head on the kept hidden
    states alone and returns (kept positions, vocab) logits. Position t is kept when label t+1 is not -100 (the
    usual causal shift), so prompt and padding positions never reach the vocab-sized projection. The value equals the
    model's own loss (sum over labelled tokens / their number, or / num_items_in_batch under gradient accumulation).
    Returns (loss, logits, targets).
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    # No KV cache: with one, transformers would not detect packed rows and they would attend to each other.
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False, "logits_to_keep": keep}
    logits = model(**model_inputs).logits
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), logits, targets


@functools.cache
def labels_only_trainer_class():
    """SFTTrainer whose loss is labels_only_loss wherever trl's fused LM head would score every position.

    trl's head (added to every SFTTrainer model) projects only the labelled positions on CUDA/XPU with Triton and
    never materializes the logits; elsewhere (CPU) it projects every position, in chunks. So: keep trl's on those
    devices, use labels_only_loss on the others. Built on first use: importing trl takes seconds.
    """
    from trl import SFTTrainer

    try:  # the device test trl's fused head uses to decide whether to score only the labelled positions
        from trl.kernels.chunked_logprob import _use_triton as trl_scores_labels_only
    except ImportError:  # another trl: assume it scores every position, and take over everywhere
        trl_scores_labels_only = lambda device: False  # noqa: E731

    class LabelsOnlySFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if return_outputs or labels is None or trl_scores_labels_only(labels.device):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, logits, targets = labels_only_loss(model, inputs, num_items_in_batch)
            # as trl does: num_items_in_batch counts every rank's tokens and DDP averages the gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            # trl's metrics, from the logits already computed: token accuracy and tokens seen
            mode = "train" if self.model.training else "eval"
            with torch.no_grad():
                valid = self.accelerator.gather_for_metrics(torch.tensor(targets.numel(), device=loss.device)).sum()
                correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(labels.numel(), device=labels.device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return LabelsOnlySFTTrainer
