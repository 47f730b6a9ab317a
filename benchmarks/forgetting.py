"""Learning the task vs forgetting the rest: the default run's data under several training settings and methods.

    python benchmarks/forgetting.py --json bench-forgetting.json          # every row (~4-6 min a row on 2 cores)
    python benchmarks/forgetting.py --rows none,ssr-0.5,ssr-0.5-kl        # some rows only

Each row trains configs/default.yaml (SmolLM2-135M, Acme support data, QLoRA) with its method and settings changed
(its train.replay as the row says: none, replay of the bundled general set's written answers, self-synthesized
rehearsal, rehearsal + a KL term; or the cheaper levers: rank, target modules, learning rate, epochs), then scores
base and fine-tuned exactly as the pipeline's evaluate step does: the 56 held-out rows (response-token loss,
ROUGE-L and exact match of 16 greedy answers) and the general-ability probe (data/general_probe, 100 rows, every
one answered: what the gate reads), plus the held-out probe (data/general_probe_heldout, 60 rows), which no setting
was chosen on: do the gains hold on general tasks the first probe does not contain? Rows run one after another in
this process, seeded; the rehearsal's own answers are generated once and reused by every row that needs them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import common

from core import models
from core.config import DataSource, ReplayConfig, load_config
from core.data.formatting import format_dataset, format_probe, format_source
from core.data.ingest import load_rows
from core.data.mixing import REPLAY, Share, check_disjoint, mix
from core.data.rehearsal import synthesize
from core.evaluation.scoring import evaluate_adapter, score_model
from core.models import resolve_base
from core.training import train_adapter

CONFIG = common.REPO / "configs" / "default.yaml"
HELDOUT_PROBE = "data/general_probe_heldout/probe.jsonl"
HAVE_HELDOUT = (common.REPO / HELDOUT_PROBE).exists()
NO_REPLAY = {"train": {"replay": None}}  # the default config without its replay


def replay(answers: str, ratio: float, kl: float = 0.0) -> dict:
    return {"train": {"replay": {"answers": answers, "ratio": ratio, "kl": kl}}}


# row name -> overrides of the default config's lora / train settings ("train.replay": the method)
ROWS = {
    "none": NO_REPLAY,  # task data alone, the default config's other settings
    "ssr-0.5": replay("own", 0.5),
    "ssr-0.5-kl": replay("own", 0.5, kl=1.0),
    "ssr-1.0": replay("own", 1.0),
    "data-0.5": replay("data", 0.5),
    "ssr-0.25": replay("own", 0.25),
    "data-0.25": replay("data", 0.25),
    "data-1.0": replay("data", 1.0),
    "none-attn": {"train": {"replay": None}, "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "none-r4": {"train": {"replay": None}, "lora": {"r": 4, "alpha": 8}},
    "none-lr5e-4": {"train": {"replay": None, "learning_rate": 5e-4}},
    "none-1ep": {"train": {"replay": None, "num_epochs": 1}},
}
PRESETS = {"cpu": list(ROWS), "methods": ["none", "ssr-0.5", "ssr-0.5-kl", "data-0.5"]}


@cache
def setup():
    cfg = load_config(CONFIG)
    base = resolve_base(cfg.model)
    tokenizer = models.load_tokenizer(base)
    train_ds, eval_ds, _ = format_dataset(load_rows(cfg.data.without_mix()), tokenizer, cfg.prompt)
    probe = format_probe(load_rows(cfg.evaluate.general), tokenizer, cfg.prompt)
    heldout = format_probe(load_rows(DataSource(path=HELDOUT_PROBE)), tokenizer, cfg.prompt) if HAVE_HELDOUT else None
    return cfg, base, tokenizer, train_ds, eval_ds, probe, heldout


@cache
def replay_rows(answers: str, max_new_tokens: int):
    """The replay source formatted for training, with the seconds its own answers took to write (0 for data)."""
    cfg, base, tokenizer, _, eval_ds, probe, heldout = setup()
    settings = ReplayConfig(answers=answers, max_new_tokens=max_new_tokens)
    rows, seconds = load_rows(settings.data), 0.0
    if answers == "own":
        rows, stats = synthesize(rows, base, cfg.prompt, settings.max_new_tokens, settings.generate_batch_size)
        seconds = stats["seconds"]
    formatted = format_source(rows, tokenizer, cfg.prompt, REPLAY)
    protected = {"held-out split": eval_ds, "probe": probe} | ({"held-out probe": heldout} if heldout else {})
    check_disjoint(REPLAY, formatted, protected)
    return formatted, seconds


@cache
def base_heldout_scores():
    cfg, base, tokenizer, *_, heldout = setup()
    model = models.load_base(base, quant=None).eval()
    return score_model(model, tokenizer, heldout, probe_settings(cfg, heldout))[0]


def probe_settings(cfg, ds):
    return cfg.evaluate.model_copy(
        update={"num_generate": len(ds), "max_new_tokens": cfg.evaluate.general_max_new_tokens}
    )


def tuned_heldout_scores(adapter, cfg, base, tokenizer, heldout):
    from peft import PeftModel

    model = PeftModel.from_pretrained(models.load_base(base, quant=None), str(adapter.path)).merge_and_unload().eval()
    return score_model(model, tokenizer, heldout, probe_settings(cfg, heldout))[0]


def run_row(name: str, overrides: dict, work: Path) -> dict:
    cfg, base, tokenizer, task_ds, eval_ds, probe, heldout = setup()
    lora = cfg.lora.model_copy(update=overrides.get("lora", {}))
    train_over = dict(overrides.get("train", {}))
    replay_over = train_over.pop("replay", None)
    settings = ReplayConfig(**replay_over) if replay_over else None
    train = cfg.train.model_copy(update={**train_over, "replay": settings, "checkpoint_dir": str(work / "ckpt")})
    train_ds, rehearsal_s = task_ds, 0.0
    if settings is not None:
        rows, rehearsal_s = replay_rows(settings.answers, settings.max_new_tokens)
        train_ds, _ = mix(task_ds, [Share(REPLAY, rows, ratio=settings.ratio)], seed=train.seed)
    started = time.perf_counter()
    adapter, metrics = train_adapter(train_ds, eval_ds, base, cfg.quant, lora, train, work / name)
    train_s = time.perf_counter() - started
    report = evaluate_adapter(adapter, eval_ds, base, cfg.evaluate, general_ds=probe)
    g0, g1 = report.general_base, report.general_tuned
    h0, h1 = (
        (base_heldout_scores(), tuned_heldout_scores(adapter, cfg, base, tokenizer, heldout)) if heldout else (g0, g1)
    )
    return {
        "row": name,
        "overrides": overrides,
        "train_rows": len(train_ds),
        "steps": metrics.steps,
        "train_s": round(train_s, 1),
        "rehearsal_s": rehearsal_s,
        "heldout_loss": [round(report.base.loss, 4), round(report.tuned.loss, 4)],
        "heldout_exact_match": [report.base.exact_match, report.tuned.exact_match],
        "heldout_rouge_l": [round(report.base.rouge_l, 4), round(report.tuned.rouge_l, 4)],
        "probe_loss": [round(g0.loss, 4), round(g1.loss, 4)],
        "probe_loss_change": round(g1.loss / g0.loss - 1, 4),
        "probe_exact_match": [g0.exact_match, g1.exact_match],
        "probe_rouge_l": [round(g0.rouge_l, 4), round(g1.rouge_l, 4)],
        "heldout_probe_loss": [round(h0.loss, 4), round(h1.loss, 4)],
        "heldout_probe_exact_match": [h0.exact_match, h1.exact_match],
        "gate_passed": report.gate_passed,
        "gate_failed": [m for m in report.gate_messages if m.endswith("FAIL")],
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.preset_parser(__doc__, PRESETS, "cpu", "write the rows and the machine here")
    parser.add_argument("--rows", help="comma-separated rows (default: the preset's): " + ", ".join(ROWS))
    args = parser.parse_args(argv)
    rows = common.pick(parser, "--rows", args.rows, ROWS) if args.rows else PRESETS[args.preset]
    print(f"# forgetting: {common.device_name(threads=True)}; config {CONFIG.relative_to(common.REPO)}")
    print(f"# {common.describe(common.versions('torch', 'transformers', 'peft', 'bitsandbytes'))}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-forgetting-") as tmp:
        for name in rows:
            results.append(run_row(name, ROWS[name], Path(tmp)))
            r = results[-1]
            print(
                f"{name}: {r['train_rows']} rows, {r['steps']} steps in {r['train_s']} s; held-out loss "
                f"{r['heldout_loss'][1]}, ROUGE-L {r['heldout_rouge_l'][1]:.3f}, exact "
                f"{r['heldout_exact_match'][1]:.3f}; probe loss {r['probe_loss'][0]} -> {r['probe_loss'][1]} "
                f"({r['probe_loss_change']:+.1%}), probe exact {r['probe_exact_match'][0]:.2f} -> "
                f"{r['probe_exact_match'][1]:.2f}; held-out probe loss {r['heldout_probe_loss'][0]} -> "
                f"{r['heldout_probe_loss'][1]}, exact {r['heldout_probe_exact_match'][0]:.2f} -> "
                f"{r['heldout_probe_exact_match'][1]:.2f}; gate {'passed' if r['gate_passed'] else 'FAILED'}",
                flush=True,
            )
    head = [
        "row",
        "train rows",
        "train s",
        "held-out loss",
        "ROUGE-L",
        "exact",
        "probe loss (change)",
        "probe exact",
        "held-out probe loss",
        "held-out probe exact",
        "gate",
    ]
    table = [
        [
            r["row"],
            r["train_rows"],
            f"{r['train_s']:.0f}" + (f" + {r['rehearsal_s']:.0f}" if r["rehearsal_s"] else ""),
            f"{r['heldout_loss'][1]:.3f}",
            f"{r['heldout_rouge_l'][1]:.3f}",
            f"{r['heldout_exact_match'][1]:.3f}",
            f"{r['probe_loss'][0]:.3f} -> {r['probe_loss'][1]:.3f} ({r['probe_loss_change']:+.0%})",
            f"{r['probe_exact_match'][0]:.2f} -> {r['probe_exact_match'][1]:.2f}",
            f"{r['heldout_probe_loss'][0]:.3f} -> {r['heldout_probe_loss'][1]:.3f}",
            f"{r['heldout_probe_exact_match'][0]:.2f} -> {r['heldout_probe_exact_match'][1]:.2f}",
            "passed" if r["gate_passed"] else "FAILED",
        ]
        for r in results
    ]
    print("\n".join(common.format_table(head, table)))
    if args.json:
        common.write_json(args.json, {"machine": common.device_name(threads=True), "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
