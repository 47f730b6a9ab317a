"""Data mixtures, replay and self-synthesized rehearsal (core/data/mixing.py, core/data/rehearsal.py) and the
replay KL term (core/training/loss.py), on the tiny model and the bundled data."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT, TINY_LORA, qa_rows
from datasets import Dataset
from pydantic import ValidationError

from core.config import DataSource, MixSource, PromptConfig, ReplayConfig, TrainConfig, validate_config
from core.data.formatting import format_probe, format_source
from core.data.ingest import FEATURES, load_rows
from core.data.mixing import REPLAY, MixtureError, Share, check_disjoint, draw, mix, prompt_key, source_of
from core.models import load_tokenizer

PROBE = "data/general_probe/probe.jsonl"
HELDOUT_PROBE = "data/general_probe_heldout/probe.jsonl"
REPLAY_SET = "data/general_replay/train.jsonl"
TASK_FILES = ["data/acme_support/train.jsonl", "data/acme_support/eval.jsonl"]


def rows(n: int, offset: int = 0) -> Dataset:
    r = qa_rows(n + offset)
    return Dataset.from_dict({k: v[offset:] for k, v in r.items()}, features=FEATURES)


@pytest.fixture(scope="module")
def tok(tiny_source):
    return load_tokenizer(tiny_source)


def formatted(tok, n: int, offset: int = 0) -> Dataset:
    return format_source(rows(n, offset), tok, PromptConfig(), "src")


def test_shares_are_exact_and_drawn_without_repeats_while_rows_last(tok):
    task, source = formatted(tok, 40), formatted(tok, 30, offset=100)
    mixed, record = mix(task, [Share("general", source, ratio=0.25), Share("extra", source, count=7)], seed=3)
    counts = {}
    for row_id in mixed["id"]:
        counts[source_of(row_id)] = counts.get(source_of(row_id), 0) + 1
    assert counts == {"task": 40, "general": 10, "extra": 7}
    assert mixed["id"][:40] == task["id"]  # every task row, once, in order
    general = [i for i in mixed["id"] if source_of(i) == "general"]
    assert len(set(general)) == 10  # no repeats while the source has rows
    assert record["sources"]["general"] == {
        "rows": 10,
        "available": 30,
        "repeated": 0,
        "ratio": 0.25,
        "fraction": round(10 / 57, 4),
    }
    assert record["rows"] == 57 and record["seed"] == 3


def test_drawing_is_seeded_and_cycles_through_a_small_source():
    assert draw(50, 20, seed=1) == draw(50, 20, seed=1)
    assert draw(50, 20, seed=1) != draw(50, 20, seed=2)
    cycled = draw(7, 17, seed=0)
    assert sorted(cycled[:7]) == list(range(7)) and sorted(cycled[7:14]) == list(range(7))  # whole passes first
    assert len(set(cycled[14:])) == 3


def test_mixing_is_deterministic_and_a_changed_ratio_changes_the_rows(tok):
    from core.artifacts import dataset_content_hash

    task, source = formatted(tok, 20), formatted(tok, 30, offset=100)
    a, _ = mix(task, [Share(REPLAY, source, ratio=0.5)], seed=42)
    b, _ = mix(task, [Share(REPLAY, source, ratio=0.5)], seed=42)
    c, _ = mix(task, [Share(REPLAY, source, ratio=0.75)], seed=42)
    assert dataset_content_hash(a) == dataset_content_hash(b)
    assert dataset_content_hash(a) != dataset_content_hash(c) and len(c) == 35


def test_a_source_holding_held_out_or_probe_prompts_is_refused_naming_the_rows(tok):
    held_out = formatted(tok, 5, offset=200)  # items 200..204
    leaky = formatted(tok, 10, offset=198)  # items 198..207: 200..204 are held-out prompts
    with pytest.raises(MixtureError) as err:
        check_disjoint("general", leaky, {"held-out split": held_out})
    message = str(err.value)
    assert "mix source 'general'" in message and "5 row(s) whose prompt is in the held-out split" in message
    assert "qa.jsonl:201 (= held-out split row qa.jsonl:201)" in message and "qa.jsonl:199" not in message
    check_disjoint("general", formatted(tok, 10), {"held-out split": held_out})  # disjoint: passes


def test_bundled_replay_set_shares_no_prompt_with_the_probes_or_the_task_data():
    def keys(path, **columns):
        ds = load_rows(DataSource(path=str(REPO_ROOT / path), **columns))
        return {prompt_key(m) for m in ds["messages"]}

    replay = keys(REPLAY_SET)
    assert len(replay) >= 250  # a few hundred distinct everyday instructions
    routing = {"instruction": "message", "output": "department"}
    others = {p: keys(p) for p in [PROBE, HELDOUT_PROBE, *TASK_FILES]}
    others |= {p: keys(p, columns=routing) for p in ["data/acme_routing/train.jsonl", "data/acme_routing/eval.jsonl"]}
    for path, prompts in others.items():
        shared = replay & prompts
        assert not shared, f"{REPLAY_SET} and {path} share prompts: {sorted(shared)[:5]}"
    shared = others[PROBE] & others[HELDOUT_PROBE]
    assert not shared, sorted(shared)[:5]


def test_mixture_config_is_checked_with_key_paths(tmp_path):
    with pytest.raises(ValidationError, match="exactly one of ratio"):
        MixSource(name="general", path="x.jsonl")
    with pytest.raises(ValidationError, match="never held out"):
        MixSource(name="general", path="x.jsonl", ratio=0.5, eval_path="y.jsonl")
    with pytest.raises(ValidationError, match="no mix, eval_path"):
        ReplayConfig(data=DataSource(path="x.jsonl", eval_path="y.jsonl"))
    with pytest.raises(Exception) as err:
        validate_config({"data": {"path": "t.jsonl", "mix": [{"name": "Bad Name", "path": "x.jsonl", "ratio": 1}]}})
    assert "parameters.config.data.mix.0.name" in str(err.value)
    ok = validate_config({"data": {"path": "t.jsonl", "mix": [{"name": "general", "path": "x.jsonl", "rows": 5}]}})
    assert ok.data.without_mix().mix == [] and ok.data.mix[0].as_data_source() == DataSource(path="x.jsonl")
    assert TrainConfig().replay is None  # the library trains on the task data alone unless asked


def test_self_synthesized_rehearsal_is_the_bases_own_greedy_answers(bundled_tokenizer_dir):
    """On the bundled SmolLM2 (the default run's base): a random tiny model never ends an answer."""
    from core.config import ModelSource
    from core.data.rehearsal import synthesize, whole_sentences
    from core.evaluation.scoring import generate_finished
    from core.models import load_base, resolve_base

    base = resolve_base(ModelSource())
    tok = load_tokenizer(base)
    every = load_rows(DataSource(path=str(REPO_ROOT / REPLAY_SET)))
    # short asks (synonyms) and long ones (explanations): some answers end within 24 tokens, some do not
    pick = [i for i, m in enumerate(every["messages"]) if m[0]["content"].startswith(("What is a synonym", "Why"))]
    prompts = every.select(pick[:4] + pick[-4:])
    prompt = PromptConfig(system_prompt="You answer Acme customer support questions.")
    out, stats = synthesize(prompts, base, prompt, max_new_tokens=24, batch_size=8)
    expected = generate_finished(load_base(base, quant=None).eval(), tok, format_probe(prompts, tok, prompt), 24, 8)
    finished = [(i, a) for i, (a, done) in zip(prompts["id"], expected) if done and a]
    cut = [(i, whole_sentences(a)) for i, (a, done) in zip(prompts["id"], expected) if not done and whole_sentences(a)]
    assert finished and cut  # some answers end within 24 tokens, some are cut to whole sentences: both branches ran
    assert sorted((i, m[-1]["content"]) for i, m in zip(out["id"], out["messages"])) == sorted(finished + cut)
    assert stats["rows"] == len(finished) + len(cut) and stats["cut_to_whole_sentences"] == len(cut)
    assert stats["dropped_unfinished"] + stats["dropped_empty"] == 8 - stats["rows"]
    assert stats["generation"]["max_new_tokens"] == 24 and stats["base_identity"] == base.identity
    assert whole_sentences("It rains. The sky is") == "It rains." and whole_sentences("No end") == ""
    originals = dict(zip(prompts["id"], prompts["messages"]))
    for row_id, written in zip(out["id"], out["messages"]):
        assert written[:-1] == originals[row_id][:-1] and written[-1]["content"] != originals[row_id][-1]["content"]


def test_rehearsal_that_finishes_no_answer_says_what_to_raise(tiny_source):
    from core.data.rehearsal import synthesize
    from core.models import resolve_base

    with pytest.raises(
        ValueError, match="no whole sentence in any of its 4 answers within max_new_tokens=2; raise train.replay"
    ):
        synthesize(rows(4), resolve_base(tiny_source), PromptConfig(), max_new_tokens=2, batch_size=4)


def test_replay_kl_is_zero_at_the_base_grows_as_the_adapter_moves_and_trains_only_lora(tiny_source, tok):
    from core.config import LoraSettings, QuantConfig
    from core.training.loss import ReplayKL
    from core.training.trainer import build_model

    model = build_model(tiny_source, QuantConfig(load_in_4bit=False), LoraSettings(**TINY_LORA), False)
    replay = formatted(tok, 12)
    kl = ReplayKL(replay["input_ids"], replay["labels"], weight=1.0, tokens=64, seed=0)
    assert kl.rows(3) == ReplayKL(replay["input_ids"], replay["labels"], 1.0, 64, 0).rows(3)  # seeded stream
    assert all(sum(len(replay["input_ids"][r]) for r in kl.rows(n)) <= 64 or len(kl.rows(n)) == 1 for n in range(6))
    assert kl.loss(model, 0).item() == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: the adapter is the base
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    term = kl.loss(model, 0)
    assert term.item() > 1e-4
    term.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)


@pytest.mark.long  # ~30 s: make test-integration
@pytest.mark.slow
def test_pipeline_mixes_replay_rows_and_a_changed_ratio_reruns_only_the_mix_onwards(
    zenml_home, tmp_path, tiny_model_dir
):
    import json

    from conftest import TINY_TRAIN, instruction_rows
    from zenml import Model
    from zenml.client import Client

    from pipelines import lora_pipeline

    for name, rows in (("train.jsonl", instruction_rows(40, 500)), ("eval.jsonl", instruction_rows(20, 540))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "data": {"path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl")},
        "prompt": {"system_prompt": "Mixing test."},  # its own load_probe: other modules' caches stay theirs
        "lora": TINY_LORA,
        "train": {
            **TINY_TRAIN,
            "max_steps": 2,
            "save_every": 100,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "replay": {"answers": "data", "ratio": 0.25},
        },
        "evaluate": {"num_generate": 1, "max_new_tokens": 2, "general_max_new_tokens": 2,
                     "gate": {"on_fail": "warn", "min_eval_rows": 1}},
        "promote_to": None,
    }  # fmt: skip

    def run(config):
        done = lora_pipeline.with_options(model=Model(name="tiny-mix"))(config=validate_config(config))
        run = Client().get_pipeline_run(done.id)
        return run, {name: step.status.value for name, step in run.steps.items()}

    first, statuses = run(raw)
    mixed = first.steps["mix_data"].outputs["mixed_train_dataset"][0]
    ids = mixed.load()["id"]
    assert len(ids) == 50 and sum(source_of(i) == REPLAY for i in ids) == 10  # 40 task rows + 0.25 x 40 replay
    assert mixed.run_metadata["sources"][REPLAY]["rows"] == 10 and mixed.run_metadata["seed"] == TINY_TRAIN.get(
        "seed", 42
    )
    assert first.steps["train"].inputs["train_dataset"][0].id == mixed.id  # train reads the mix
    eval_prompts = {prompt_key(m) for m in first.steps["format_prompts"].outputs["eval_dataset"][0].load()["messages"]}
    assert not eval_prompts & {prompt_key(m) for m in mixed.load()["messages"]}  # held-out rows never trained on

    raw["train"]["replay"]["ratio"] = 0.5
    _, statuses = run(raw)
    for step in ("ingest", "validate", "format_prompts", "load_probe", "ingest_replay", "format_replay"):
        assert statuses[step] == "cached", (step, statuses)
    assert statuses["mix_data"] == statuses["train"] == "completed"

    raw["train"]["replay"]["kl"] = 0.5  # the KL weight changes training, not the rows
    _, statuses = run(raw)
    assert statuses["mix_data"] == "cached" and statuses["train"] == "completed"
