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


class ReplayKL:
    """The distillation term on replay rows: KL(base || fine-tuned) of the next-token distributions at the answer
    positions, where the base is the same model with its adapter disabled (no second copy of the weights).

    Each call takes the next batch of whole replay rows (about `tokens` tokens, at least one row) from a seeded
    stream over the rows, packed padding-free like training batches; batch n is the same in every run with the
    same seed, so a resumed run takes the batches an uninterrupted one would.
    """

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]], weight: float, tokens: int, seed: int):
        if not input_ids:
            raise ValueError("train.replay.kl needs replay rows in the training data; there are none")
        self.input_ids, self.labels = input_ids, labels
        self.weight, self.tokens, self.seed = weight, tokens, seed
        self._batches: list[list[int]] = []
        self._stream: list[int] = []
        self._epoch = 0

    def rows(self, n: int) -> list[int]:
        """The row indices of batch n."""
        while len(self._batches) <= n:
            batch, size = [], 0
            while True:
                row = self._next()
                if batch and size + len(self.input_ids[row]) > self.tokens:
                    break
                self._stream.pop(0)
                batch.append(row)
                size += len(self.input_ids[row])
            self._batches.append(batch)
        return self._batches[n]

    def _next(self) -> int:
        """The next row of the stream: every row once in a seeded order, then again in a new one."""
        if not self._stream:
            import numpy as np

            rng = np.random.default_rng(self.seed + self._epoch)
            self._stream = rng.permutation(len(self.input_ids)).tolist()
            self._epoch += 1
        return self._stream[0]

    def batch(self, n: int, device) -> dict:
        rows = self.rows(n)
        ids = torch.tensor([t for r in rows for t in self.input_ids[r]], device=device)[None]
        labels = torch.tensor([t for r in rows for t in self.labels[r]], device=device)[None]
        positions = torch.cat([torch.arange(len(self.input_ids[r])) for r in rows]).to(device)[None]
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def loss(self, model, n: int) -> torch.Tensor:
        """KL(base || fine-tuned), mean over batch n's answer positions; `model` is the peft model."""
        batch = self.batch(n, next(model.parameters()).device)
        labels = batch.pop("labels")
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        inputs = batch | {"use_cache": False, "logits_to_keep": keep}
        with torch.no_grad(), model.disable_adapter():
            reference = F.log_softmax(model(**inputs).logits.float(), dim=-1)
        current = F.log_softmax(model(**inputs).logits.float(), dim=-1)
        return F.kl_div(current, reference, log_target=True, reduction="batchmean")


def with_replay_kl(cls, kl: ReplayKL | None):
    """`cls` (an SFTTrainer class) with `kl.weight * KL` added to each training micro-batch's loss; `cls` itself
    when there is no KL term."""
    if kl is None or kl.weight == 0:
        return cls

    class ReplayKLTrainer(cls):
        _kl_calls: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:  # eval loss stays the plain held-out loss
                return out
            if self._kl_calls is None:  # a resumed run continues the batch stream where the checkpoint left it
                self._kl_calls = self.state.global_step * self.args.gradient_accumulation_steps
            term = kl.loss(self.accelerator.unwrap_model(model), self._kl_calls)
            self._kl_calls += 1
            self._metrics["train"]["replay_kl"].append(term.item())
            # per micro-batch, like the token-averaged loss it is added to
            extra = kl.weight * term / self.args.gradient_accumulation_steps
            return (out[0] + extra, *out[1:]) if return_outputs else out + extra

    return ReplayKLTrainer
