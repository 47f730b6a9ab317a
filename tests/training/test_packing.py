"""The fast train path on the tiny model: packing, token-budget micro-batches and the labels-only loss.

Each test compares the fast path with the plain one on the same rows: per-row losses and gradients, attention
confined to each row, every row exactly once per epoch, and the loss value of labels_only_loss.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from conftest import TINY_LORA

from core.config import LoraSettings, QuantConfig, TrainConfig
from core.training.compute import resolve_liger
from core.training.loss import IGNORE_INDEX, labels_only_loss, labels_only_trainer_class
from core.training.packing import longest_row, packed_sequence_length
from core.training.trainer import build_model, make_sft_trainer, sft_args

LOSS_RTOL = 1e-5  # fp32 on CPU: packed and unpacked differ only in summation order
LOGIT_ATOL = 1e-4  # max |logit| difference allowed between two runs of the same row


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed row in a padding-free batch: position_ids restart at 0 for every row."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.shape[1]]))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split across threads, and split ones stall when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tiny_source):
    from core.models import load_tokenizer

    return load_tokenizer(tiny_source)


@pytest.fixture(scope="module")
def qlora_model(tiny_source):
    """The tiny model exactly as training builds it: 4-bit base, LoRA on all linear layers, dropout 0."""
    torch.manual_seed(0)
    model = build_model(tiny_source, QuantConfig(), LoraSettings(**TINY_LORA), gradient_checkpointing=False)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter so that its gradients are all non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _trainer(model, tok, tmp_path, train, held_out, packing: bool, labels_only=True, **cfg):
    # 2 packed sequences of 128 tokens per micro-batch: 2 tiny rows (~50 tokens) fit in each
    cfg = TrainConfig(packing=packing, **{"micro_batch_size": 2, "tokens_per_micro_batch": 256, **cfg})
    length = packed_sequence_length(cfg, longest_row(train, held_out))
    args = sft_args(cfg, tmp_path, cuda=False, dtype=torch.float32, pack_length=length)
    return make_sft_trainer(model, args, train, held_out, tok, torch.float32, labels_only_logits=labels_only), cfg


# --- batch geometry ------------------------------------------------------------------------------------------------


def test_packed_sequence_length_splits_the_token_budget():
    assert packed_sequence_length(TrainConfig(packing=False), 50) is None
    assert packed_sequence_length(TrainConfig(micro_batch_size=4, tokens_per_micro_batch=512), 50) == 128
    assert packed_sequence_length(TrainConfig(micro_batch_size=4), 50) == 50  # no budget: the longest row
    with pytest.raises(ValueError, match=r"tokens_per_micro_batch=100 .* 25 tokens each.*longest row has 50.*200"):
        packed_sequence_length(TrainConfig(micro_batch_size=4, tokens_per_micro_batch=100), 50)


def test_token_budget_batches_cover_every_row_once_per_epoch(qlora_model, tok, tmp_path, tiny_splits):
    train, held_out = tiny_splits
    trainer, cfg = _trainer(qlora_model, tok, tmp_path, train, held_out, packing=True)
    budget = cfg.tokens_per_micro_batch
    seen = Counter()
    batches = list(trainer.get_train_dataloader())
    for batch in batches:
        assert "attention_mask" not in batch  # padding-free: one unpadded row per micro-batch
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= budget
        assert torch.all(batch["input_ids"] != -1)
        for start, end in _segments(batch["position_ids"]):
            assert torch.equal(batch["position_ids"][0, start:end], torch.arange(end - start))
            seen[(tuple(batch["input_ids"][0, start:end].tolist()), tuple(batch["labels"][0, start:end].tolist()))] += 1
    # Each row exactly once, with its labels (-100 on the prompt, the response kept) unchanged.
    expected = Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in train)
    assert seen == expected
    assert all(lbl[0] == IGNORE_INDEX and any(t != IGNORE_INDEX for t in lbl) for _, lbl in seen)
    # Packing fills the budget: fewer, fuller micro-batches than rows / micro_batch_size.
    tokens = sum(len(r["input_ids"]) for r in train)
    assert len(batches) < len(train) / cfg.micro_batch_size
    assert tokens / len(batches) > budget / 2


def test_no_token_attends_across_rows(qlora_model, tok, tmp_path, tiny_splits):
    """Perturbing one packed row changes its own logits and leaves every other row's logits unchanged."""
    train, held_out = tiny_splits
    trainer, _ = _trainer(qlora_model, tok, tmp_path, train, held_out, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    segments = _segments(batch["position_ids"])
    assert len(segments) >= 3
    # exactly what the trainer feeds (varlen kwargs too), and as training runs it: without a KV cache
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    first = segments[0]
    perturbed = dict(inputs, input_ids=inputs["input_ids"].clone())
    perturbed["input_ids"][0, first[0] : first[1]] = torch.randint(10, 1000, (first[1] - first[0],))
    qlora_model.eval()
    with torch.no_grad():
        base = qlora_model(**inputs).logits[0]
        changed = qlora_model(**perturbed).logits[0]
        for start, end in segments[1:]:
            assert torch.allclose(base[start:end], changed[start:end], atol=LOGIT_ATOL), (start, end)
            # ... and each row's logits are those of the row run on its own, unpacked
            alone = qlora_model(input_ids=inputs["input_ids"][:, start:end], use_cache=False).logits[0]
            assert torch.allclose(base[start:end], alone, atol=LOGIT_ATOL), (start, end)
        assert not torch.allclose(base[first[1] - 1], changed[first[1] - 1], atol=LOGIT_ATOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_are_isolated_for_each_cpu_attention(tiny_model_dir, attn):
    """transformers' packed-sequence detection (position_ids restarting, no attention mask) in sdpa and eager.

    It applies only without a KV cache: with use_cache on (inference's default) transformers skips it and rows attend
    across boundaries. Training never uses the cache: trl's compute_loss and labels_only_loss pass use_cache=False.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    rows = [torch.randint(10, 1000, (n,)) for n in (7, 12, 5)]
    packed = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]
    with torch.no_grad():
        logits = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=r[None], use_cache=False).logits[0]
            assert torch.allclose(logits[start : start + len(r)], alone, atol=LOGIT_ATOL)
            start += len(r)
        # the same tokens without the restarts attend across rows: the isolation comes from position_ids
        unpacked = model(input_ids=packed, use_cache=False).logits[0]
        assert not torch.allclose(unpacked[len(rows[0]) :], logits[len(rows[0]) :], atol=LOGIT_ATOL)


# --- losses --------------------------------------------------------------------------------------------------------


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _step(trainer, model, batch, num_items=None):
    """One training forward + backward through the trainer's own compute_loss; returns (loss, LoRA grads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_packed_training_step_matches_unpacked_per_row(qlora_model, tok, tmp_path, tiny_splits):
    """Same rows packed and padded: per-row losses, batch loss and the LoRA gradients agree."""
    train, held_out = tiny_splits
    rows = [train[i] for i in range(5)]
    packed_trainer, _ = _trainer(qlora_model, tok, tmp_path / "p", train, held_out, packing=True)
    padded_trainer, _ = _trainer(qlora_model, tok, tmp_path / "u", train, held_out, packing=False, labels_only=False)
    features = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    packed = packed_trainer.data_collator(features)
    padded = padded_trainer.data_collator(features)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert padded["input_ids"].shape[0] == len(rows)

    # per-row mean loss: each packed segment against the same row in the padded batch
    qlora_model.eval()
    with torch.no_grad():
        packed_logits = qlora_model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        padded_logits = qlora_model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).logits
    for i, (start, end) in enumerate(_segments(packed["position_ids"])):
        n = end - start
        lp = torch.nn.functional.cross_entropy(packed_logits[start : end - 1], packed["labels"][0, start + 1 : end])
        lu = torch.nn.functional.cross_entropy(padded_logits[i, : n - 1], padded["labels"][i, 1:n])
        assert torch.isclose(lp, lu, rtol=LOSS_RTOL), (i, lp, lu)

    # the training step itself: trl's loss on the padded batch vs ours on the packed one, same gradients
    count = (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert count == (packed["labels"][:, 1:] != IGNORE_INDEX).sum()  # packing drops no label
    loss_u, grads_u = _step(padded_trainer, qlora_model, padded, count)
    loss_p, grads_p = _step(packed_trainer, qlora_model, packed, count)
    assert torch.isclose(loss_p, loss_u, rtol=LOSS_RTOL), (loss_p, loss_u)
    assert grads_u.keys() == grads_p.keys() and grads_u
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6), name
    assert all(g.abs().sum() > 0 for g in grads_u.values())


def test_labels_only_loss_equals_the_full_loss(qlora_model, tok, tmp_path, tiny_splits):
    train, held_out = tiny_splits
    rows = [{"input_ids": train[i]["input_ids"], "labels": train[i]["labels"]} for i in range(6)]
    trainer, _ = _trainer(qlora_model, tok, tmp_path / "u", train, held_out, packing=False, labels_only=False)
    packed_trainer, _ = _trainer(qlora_model, tok, tmp_path / "p", train, held_out, packing=True)
    padded, packed = trainer.data_collator(rows), packed_trainer.data_collator(rows)
    # padded rows (mean over this batch's labels), and packed ones as one micro-batch of several under gradient
    # accumulation (divided by the whole step's label count: + 7 for the other micro-batches)
    for batch, extra in ((padded, None), (packed, 7)):
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        num_items = None if extra is None else torch.tensor(labelled + extra)
        qlora_model.train()
        qlora_model.zero_grad(set_to_none=True)
        ours, logits, targets = labels_only_loss(qlora_model, dict(batch), num_items)
        ours.backward()
        ours_grads = _grads(qlora_model)
        qlora_model.zero_grad(set_to_none=True)
        # the model's own loss: full logits at every position, transformers' shift + cross-entropy
        full = qlora_model(**batch, use_cache=False, num_items_in_batch=num_items).loss
        full.backward()
        full_grads = _grads(qlora_model)
        qlora_model.zero_grad(set_to_none=True)
        assert torch.isclose(ours, full, rtol=LOSS_RTOL), (ours, full)
        for name in full_grads:
            assert torch.allclose(ours_grads[name], full_grads[name], rtol=1e-4, atol=1e-7), name
        # the LM head ran on the labelled positions only: far fewer rows than positions
        assert logits.shape == (labelled, qlora_model.config.vocab_size) and targets.shape == (labelled,)
        assert labelled < batch["input_ids"].numel() / 2


def test_trainer_uses_the_labels_only_loss_on_cpu(qlora_model, tok, tmp_path, tiny_splits, monkeypatch):
    import core.training.loss

    train, held_out = tiny_splits
    trainer, _ = _trainer(qlora_model, tok, tmp_path, train, held_out, packing=True)
    assert isinstance(trainer, labels_only_trainer_class())
    calls = []
    real = core.training.loss.labels_only_loss
    monkeypatch.setattr(core.training.loss, "labels_only_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = next(iter(trainer.get_train_dataloader()))
    qlora_model.train()
    loss = trainer.compute_loss(qlora_model, dict(batch))
    assert calls and torch.isfinite(loss)
    with torch.no_grad():  # trl's fused head on the same batch gives the same value
        plain, _ = _trainer(qlora_model, tok, tmp_path / "plain", train, held_out, packing=True, labels_only=False)
        assert torch.isclose(plain.compute_loss(qlora_model, dict(batch)), loss.detach(), rtol=LOSS_RTOL)


# --- other fast-path switches --------------------------------------------------------------------------------------


def test_lora_dropout_zero_is_identity(qlora_model):
    dropouts = [m for name, m in qlora_model.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)


def test_liger_kernel_is_never_used_or_imported_without_cuda(qlora_model, tok, tmp_path, tiny_splits):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    assert resolve_liger("auto", cuda=False) is False
    assert resolve_liger(False, cuda=False) is False
    with pytest.raises(ValueError, match="use_liger_kernel is true.*CUDA GPU"):
        resolve_liger(True, cuda=False)
    train, held_out = tiny_splits
    trainer, _ = _trainer(qlora_model, tok, tmp_path, train, held_out, packing=True)
    assert not trainer.args.use_liger_kernel and not trainer.args.activation_offloading
    assert "liger_kernel" not in sys.modules


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_rows_are_isolated_on_cuda(tiny_model_dir):
    """bf16 on the GPU: a packed row's logits match the row alone (sdpa; varlen kernels when flash-attn is present)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    rows = [torch.randint(10, 1000, (n,), device="cuda") for n in (9, 14, 6)]
    packed = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(len(r), device="cuda") for r in rows])[None]
    with torch.no_grad():
        logits = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits[0].float()
        start = 0
        for r in rows:
            alone = model(input_ids=r[None], use_cache=False).logits[0].float()
            assert torch.allclose(logits[start : start + len(r)], alone, atol=5e-2)
            start += len(r)
