import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.config import EvalConfig, GateConfig, MergeConfig
from core.evaluation.gate import QualityGateError, apply_gate, enforce_gate, failed_checks, may_promote
from core.evaluation.scoring import evaluate_adapter, text_scores
from core.merge.adapter import MergeMismatchError, merge_adapter
from core.models import load_base
from core.reports import ModelScores


@pytest.fixture(scope="module")
def report(trained_adapter, tiny_splits, tiny_source):
    adapter, _, _ = trained_adapter
    # the toy eval split has ~10 rows: below the default min_eval_rows, which test_gate_fails_on_too_few... covers
    cfg = EvalConfig(num_generate=4, max_new_tokens=12, gate=GateConfig(min_eval_rows=5))
    return evaluate_adapter(adapter, tiny_splits[1], tiny_source, cfg)


def test_fine_tuned_beats_base_on_held_out_loss(report, tiny_splits):
    assert report.eval_rows == len(tiny_splits[1])
    assert report.tuned.loss < report.base.loss - 0.1
    assert report.tuned.perplexity < report.base.perplexity
    assert len(report.samples) == 4 and all(s.reference for s in report.samples)
    assert report.gate_passed, report.gate_messages
    assert report.tuned.bleu is not None and 0 <= report.base.bleu <= 100 and 0 <= report.tuned.bleu <= 100
    # fine-tuned - base with seeded 95% paired-bootstrap intervals: the loss clearly fell
    loss = report.differences["loss"]
    assert loss.delta == pytest.approx(report.tuned.loss - report.base.loss, abs=1e-6)
    assert loss.low <= loss.delta <= loss.high < 0 and loss.rows == len(tiny_splits[1]) and loss.resamples == 1000
    assert set(report.differences) == {"loss", "rouge_l", "exact_match"} and report.differences["rouge_l"].rows == 4
    html = report.to_html()
    assert "95% CI" in html and "BLEU" in html
    assert "Side by side" in html and report.samples[0].reference.split()[0] in html


def test_text_scores():
    rouge, exact = text_scores(["Returns within 45 days.", "no idea"], ["Returns within 45 days.", "Call ext. 12."])
    assert exact == 0.5 and 0.5 <= rouge < 1.0


def test_gate_blocks_a_worse_candidate():
    better = ModelScores(loss=1.0, perplexity=2.7, rouge_l=0.6, exact_match=0.2)
    worse = ModelScores(loss=1.5, perplexity=4.5, rouge_l=0.5, exact_match=0.1)
    passed, msgs = apply_gate(worse, [("production (version 3)", better)], GateConfig())
    assert not passed and sum(m.endswith("FAIL") for m in msgs) == 2
    passed, _ = apply_gate(better, [("base", worse)], GateConfig(min_loss_improvement=0.1))
    assert passed
    passed, _ = apply_gate(better, [("base", worse)], GateConfig(min_loss_improvement=0.5))
    assert not passed  # 1.0 is not 50% below 1.5


def test_failed_gate_stops_merge_unless_warn(report):
    failed = report.model_copy(update={"gate_passed": False, "gate_messages": ["eval loss 2 vs base 1 -> FAIL"]})
    with pytest.raises(QualityGateError, match="eval loss 2 vs base 1"):
        enforce_gate(failed)
    enforce_gate(failed.model_copy(update={"on_fail": "warn"}))  # logs, does not raise


def test_merged_logits_match_base_plus_adapter(trained_adapter, tiny_splits, tiny_source, tmp_path):
    from peft import PeftModel

    adapter, _, _ = trained_adapter
    folder, info = merge_adapter(adapter, tiny_source, MergeConfig(), tiny_splits[1], tmp_path / "merged")
    assert info["dtype"] == "float16" and info["logit_max_rel_diff"] < 2e-2
    assert info["method"] == "streamed"  # the pipeline's own adapter is plain LoRA: no whole-model merge
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float16"
    assert {"tokenizer.json", "generation_config.json"} <= set(folder.files())
    merged = AutoModelForCausalLM.from_pretrained(folder.path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(load_base(tiny_source, quant=None, dtype=torch.float32), str(adapter.path))
    ids = torch.tensor([tiny_splits[1][0]["input_ids"]])
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (got - want).abs().max() / want.abs().max() < 1e-2
    base_logits = load_base(tiny_source, quant=None, dtype=torch.float32)(ids).logits
    assert (base_logits - want).abs().max() > 10 * (got - want).abs().max()  # the adapter mattered


def test_merge_mismatch_fails_before_writing(trained_adapter, tiny_splits, tiny_source, tmp_path):
    adapter, _, _ = trained_adapter
    with pytest.raises(MergeMismatchError, match="merge.logit_rtol"):
        merge_adapter(adapter, tiny_source, MergeConfig(logit_rtol=1e-9), tiny_splits[1], tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder it was staged in


def test_gate_stops_a_candidate_that_forgot_too_much_on_the_probe():
    better = ModelScores(loss=1.0, perplexity=2.7, rouge_l=0.6, exact_match=0.2)
    worse = ModelScores(loss=1.5, perplexity=4.5, rouge_l=0.5, exact_match=0.1)
    probe_base = ModelScores(loss=2.0, perplexity=7.4, rouge_l=0.7, exact_match=0.70)
    gate = GateConfig(max_general_loss_increase=0.25, max_general_em_drop=0.10)
    ok_probe = ModelScores(loss=2.4, perplexity=11.0, rouge_l=0.65, exact_match=0.61)  # +20%, -0.09
    passed, msgs = apply_gate(better, [("base", worse)], gate, general=(probe_base, ok_probe))
    assert passed, msgs
    assert any(m.startswith("general-ability loss 2.4000 vs base 2.0000 (+20.0%)") for m in msgs)
    # learned the task, forgot the rest: loss +30% and exact match -0.2 both fail
    forgot = ModelScores(loss=2.6, perplexity=13.5, rouge_l=0.4, exact_match=0.50)
    passed, msgs = apply_gate(better, [("base", worse)], gate, general=(probe_base, forgot))
    failed = [m for m in msgs if m.endswith("FAIL")]
    assert not passed and len(failed) == 2
    assert "max_general_loss_increase=0.25" in failed[0] and "max_general_em_drop=0.1" in failed[1]
    # None switches a check off
    off = GateConfig(max_general_loss_increase=None, max_general_em_drop=None)
    assert apply_gate(better, [("base", worse)], off, general=(probe_base, forgot))[0]


def test_probe_is_scored_for_both_models_and_reported(trained_adapter, tiny_splits, tiny_source):
    """The forgetting check end to end on the tiny model: every probe row answered by base and fine-tuned."""
    from core.config import PromptConfig
    from core.data.formatting import format_probe
    from core.data.ingest import load_rows
    from core.models import load_tokenizer

    adapter, _, _ = trained_adapter
    probe = load_rows(EvalConfig().general).select(range(12))  # the bundled probe set, first 12 rows
    general = format_probe(probe, load_tokenizer(tiny_source), PromptConfig())
    assert len(general) == 12 and all(len(m) == 2 for m in general["messages"])
    cfg = EvalConfig(num_generate=2, max_new_tokens=6, general_max_new_tokens=5, gate=GateConfig(min_eval_rows=5))
    report = evaluate_adapter(adapter, tiny_splits[1], tiny_source, cfg, general_ds=general)
    assert report.general_rows == 12 and len(report.general_samples) == 12
    assert report.general_base.loss > 0 and report.general_tuned.loss > 0
    assert set(report.general_differences) == {"loss", "rouge_l", "exact_match"}
    # the adapter changed the model: its probe loss moved; the gate quoted it either way
    assert report.general_tuned.loss != pytest.approx(report.general_base.loss, abs=1e-4)
    assert any(m.startswith("general-ability loss") for m in report.gate_messages)
    html = report.to_html()
    assert "General ability (forgetting check) on 12 probe rows" in html


def _negated_adapter(adapter, folder):
    """The trained adapter with its update reversed (lora_B * -1): base - delta instead of base + delta."""
    import shutil

    from safetensors.torch import load_file, save_file

    from core.artifacts import ModelFolder

    shutil.copytree(adapter.path, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    assert any("lora_B" in k for k in weights)
    save_file({k: -w if "lora_B" in k else w for k, w in weights.items()}, folder / "adapter_model.safetensors")
    return ModelFolder(path=str(folder))


def test_forgetting_gate_fails_a_candidate_worse_than_base_on_the_probe(
    trained_adapter, tiny_splits, tiny_source, probe_rows, tmp_path
):
    """The strict forgetting check through evaluate_adapter, on its failing side: the tiny base is random, so the
    trained adapter lowers the probe loss too (it would pass any max_general_loss_increase); its update reversed
    raises it. Every other check is loosened, so the forgetting check alone decides."""
    adapter, _, _ = trained_adapter
    gate = GateConfig(min_eval_rows=5, min_loss_improvement=-1.0, max_rouge_drop=1.0, max_general_loss_increase=0.0)
    cfg = EvalConfig(num_generate=1, max_new_tokens=4, general_max_new_tokens=4, bootstrap_resamples=0, gate=gate)
    forgot = _negated_adapter(adapter, tmp_path / "negated")
    report = evaluate_adapter(forgot, tiny_splits[1], tiny_source, cfg, general_ds=probe_rows)
    assert report.general_tuned.loss > report.general_base.loss  # on the failing side of the check, not by luck
    assert not report.gate_passed
    (fail,) = failed_checks(report)
    assert fail.startswith(
        f"general-ability loss {report.general_tuned.loss:.4f} vs base {report.general_base.loss:.4f}"
    )
    assert "(max_general_loss_increase=0.0) -> FAIL" in fail
    with pytest.raises(QualityGateError, match=r"general-ability loss .*max_general_loss_increase=0\.0\) -> FAIL"):
        enforce_gate(report)


def test_evaluate_adapter_fails_the_gate_on_fewer_held_out_rows_than_min_eval_rows(
    trained_adapter, tiny_splits, tiny_source
):
    """The toy held-out split (13 rows) under the default min_eval_rows (20): the adapter beats the base, yet the
    gate fails on the row count alone, and merge's enforce_gate stops the run quoting it (warn: not promoted)."""
    adapter, _, _ = trained_adapter
    held_out = tiny_splits[1]
    rows = len(held_out)
    cfg = EvalConfig(num_generate=1, max_new_tokens=4, bootstrap_resamples=0, gate=GateConfig())
    assert rows < cfg.gate.min_eval_rows == 20
    report = evaluate_adapter(adapter, held_out, tiny_source, cfg)
    assert report.eval_rows == rows and report.tuned.loss < report.base.loss
    assert not report.gate_passed
    (fail,) = failed_checks(report)
    assert fail.startswith(f"held-out rows {rows}: needs >= 20 (min_eval_rows): too few to decide anything")
    assert "data.eval_path" in fail and fail.endswith("-> FAIL")
    with pytest.raises(QualityGateError, match=rf"held-out rows {rows}: needs >= 20 \(min_eval_rows\)"):
        enforce_gate(report)
    warned = report.model_copy(update={"on_fail": "warn"})
    assert enforce_gate(warned) == ["candidate"] and not may_promote([warned])


def test_gate_fails_on_too_few_held_out_rows_and_says_how_to_get_more():
    better = ModelScores(loss=1.0, perplexity=2.7, rouge_l=0.6, exact_match=0.2)
    worse = ModelScores(loss=1.5, perplexity=4.5, rouge_l=0.5, exact_match=0.1)
    passed, msgs = apply_gate(better, [("base", worse)], GateConfig(), eval_rows=1)  # one row once passed a gate
    assert not passed
    (fail,) = [m for m in msgs if m.endswith("FAIL")]
    assert fail.startswith("held-out rows 1: needs >= 20 (min_eval_rows)") and "data.eval_path" in fail
    assert "data.eval_fraction" in fail
    assert apply_gate(better, [("base", worse)], GateConfig(), eval_rows=20)[0]
    assert apply_gate(better, [("base", worse)], GateConfig(min_eval_rows=1), eval_rows=1)[0]


def test_paired_bootstrap_is_seeded_and_covers_the_observed_difference():
    from core.evaluation.scoring import paired_bootstrap

    base = [(2.0 * n, n) for n in (3, 5, 4, 6, 2, 5, 3, 4)]  # 2.0 nats/token
    tuned = [(1.0 * n + (0.5 if i % 2 else -0.5), n) for i, (_, n) in enumerate(base)]  # ~1.0 nats/token
    base_rows = [(0.2, False), (0.3, False), (0.1, False), (0.4, True)]
    tuned_rows = [(0.8, True), (0.6, False), (0.9, True), (0.7, True)]
    a = paired_bootstrap(base, tuned, base_rows, tuned_rows, resamples=500, seed=7)
    b = paired_bootstrap(base, tuned, base_rows, tuned_rows, resamples=500, seed=7)
    assert a == b  # seeded: the same intervals on a rerun
    assert a["loss"].delta == pytest.approx(-1.0, abs=1e-9) and a["loss"].low < -1.0 + 1e-9 < a["loss"].high + 1e-9
    assert a["loss"].high < 0  # every resample improves
    assert a["rouge_l"].delta == pytest.approx(0.5) and a["rouge_l"].low > 0
    assert a["exact_match"].delta == pytest.approx(0.5) and a["exact_match"].low <= 0.5 <= a["exact_match"].high
    assert paired_bootstrap(base, tuned, base_rows, tuned_rows, resamples=500, seed=8) != a


def test_bleu_is_sacrebleu_corpus_bleu():
    from core.evaluation.scoring import bleu

    assert bleu(["Returns within 45 days of purchase."], ["Returns within 45 days of purchase."]) == pytest.approx(100)
    assert bleu(["no idea at all"], ["Returns within 45 days of purchase."]) == 0
    assert bleu([], []) == 0


@pytest.fixture(scope="module")
def probe_rows(tiny_source):
    """12 bundled probe rows on the tiny tokenizer: prompts and answers of many lengths."""
    from core.config import PromptConfig
    from core.data.formatting import format_probe
    from core.data.ingest import load_rows
    from core.models import load_tokenizer

    return format_probe(load_rows(EvalConfig().general).select(range(12)), load_tokenizer(tiny_source), PromptConfig())


def test_row_losses_batched_by_length_with_response_logits_only_match_one_row_at_a_time(tiny_source, probe_rows):
    """row_losses sorts rows into batches and runs the LM head on response positions only: each row's summed loss
    and token count must still be what the plain full-logits pass over that row alone gives, in row order."""
    from core.evaluation.scoring import row_losses

    model = load_base(tiny_source, quant=None).eval()
    assert len(set(len(x) for x in probe_rows["input_ids"])) > 3  # lengths differ: the batches are reordered
    expected = []
    with torch.no_grad():
        for ids, labels in zip(probe_rows["input_ids"], probe_rows["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            expected.append((float(loss), int((target != -100).sum())))
    for batch_size in (1, 5, 12):
        got = row_losses(model, probe_rows, batch_size, pad_id=0)
        assert [n for _, n in got] == [n for _, n in expected]
        assert [x for x, _ in got] == pytest.approx([x for x, _ in expected], rel=1e-4)


def test_batches_by_length_run_longest_first_and_return_in_row_order():
    from core.evaluation.scoring import by_length

    lengths, seen = [3, 9, 1, 9, 5, 7, 2], []

    def run(rows):
        seen.append(rows)
        return [f"row {i}: {lengths[i]}" for i in rows]

    assert by_length(lengths, 3, run) == [f"row {i}: {n}" for i, n in enumerate(lengths)]
    assert [[lengths[i] for i in rows] for rows in seen] == [[9, 9, 7], [5, 3, 2], [1]]
    with pytest.raises(ValueError):  # a batch that answers for fewer rows than it was given is an error
        by_length(lengths, 3, lambda rows: rows[:-1])
