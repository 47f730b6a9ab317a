"""Learning the task vs forgetting the rest: the default run's data under several training settings.

    python benchmarks/forgetting.py --json bench-forgetting.json          # the cpu grid (~4 min a row on 2 cores)
    python benchmarks/forgetting.py --rows lr1.5e-3-2ep,lr3e-4-2ep       # some rows only

Each row trains the default config (configs/default.yaml: SmolLM2-135M, Acme support data, QLoRA) with a few
settings changed, then scores base and fine-tuned exactly as the pipeline's evaluate step does: the 56 held-out
rows (response-token loss, exact match of 16 greedy answers) and the general-ability probe set
(data/general_probe, 100 rows, every one answered): did the model learn the task, and what did it forget? The
columns the quality gate reads: held-out loss, probe loss change (gate.max_general_loss_increase) and probe exact
match change (gate.max_general_em_drop). Rows run one after another in this process, seeded.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common

from core.config import load_config
from core.data.formatting import format_dataset, format_probe
from core.data.ingest import load_rows
from core.evaluation import evaluate_adapter
from core.models import load_tokenizer, resolve_base
from core.training import train_adapter

# row name -> overrides of the default config's lora / train settings
ROWS = {
    "lr1.5e-3-2ep": {},  # the default config as it was: 2 epochs at 1.5e-3
    "lr1.5e-3-1ep": {"train": {"num_epochs": 1}},
    "lr5e-4-2ep": {"train": {"learning_rate": 5e-4}},
    "lr3e-4-2ep": {"train": {"learning_rate": 3e-4}},
    "lr2e-4-3ep": {"train": {"learning_rate": 2e-4, "num_epochs": 3}},
    "r4-lr1.5e-3-2ep": {"lora": {"r": 4, "alpha": 8}},
}
PRESETS = {"cpu": list(ROWS)}
CONFIG = common.REPO / "configs" / "default.yaml"


def run_row(name: str, overrides: dict, work: Path) -> dict:
    cfg = load_config(CONFIG)
    lora = cfg.lora.model_copy(update=overrides.get("lora", {}))
    train = cfg.train.model_copy(update={**overrides.get("train", {}), "checkpoint_dir": str(work / "ckpt")})
    base = resolve_base(cfg.model)
    tokenizer = load_tokenizer(base)
    train_ds, eval_ds, _ = format_dataset(load_rows(cfg.data), tokenizer, cfg.prompt)
    probe = format_probe(load_rows(cfg.evaluate.general), tokenizer, cfg.prompt)
    started = time.perf_counter()
    adapter, metrics = train_adapter(train_ds, eval_ds, base, cfg.quant, lora, train, work / name)
    train_s = time.perf_counter() - started
    report = evaluate_adapter(adapter, eval_ds, base, cfg.evaluate, general_ds=probe)
    g0, g1 = report.general_base, report.general_tuned
    return {
        "row": name,
        "overrides": overrides,
        "steps": metrics.steps,
        "train_s": round(train_s, 1),
        "heldout_loss": [round(report.base.loss, 4), round(report.tuned.loss, 4)],
        "heldout_exact_match": [report.base.exact_match, report.tuned.exact_match],
        "heldout_rouge_l": [round(report.base.rouge_l, 4), round(report.tuned.rouge_l, 4)],
        "probe_loss": [round(g0.loss, 4), round(g1.loss, 4)],
        "probe_loss_change": round(g1.loss / g0.loss - 1, 4),
        "probe_exact_match": [g0.exact_match, g1.exact_match],
        "probe_rouge_l": [round(g0.rouge_l, 4), round(g1.rouge_l, 4)],
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
                f"{name}: {r['steps']} steps in {r['train_s']} s; held-out loss {r['heldout_loss'][1]}, exact "
                f"{r['heldout_exact_match'][1]:.3f}; probe loss {r['probe_loss'][0]} -> {r['probe_loss'][1]} "
                f"({r['probe_loss_change']:+.1%}), probe exact {r['probe_exact_match'][0]:.2f} -> "
                f"{r['probe_exact_match'][1]:.2f}; gate {'passed' if r['gate_passed'] else 'FAILED'}",
                flush=True,
            )
    head = ["row", "steps", "held-out loss", "held-out exact", "probe loss (change)", "probe exact", "gate"]
    table = [
        [
            r["row"],
            r["steps"],
            f"{r['heldout_loss'][0]:.3f} -> {r['heldout_loss'][1]:.3f}",
            f"{r['heldout_exact_match'][0]:.3f} -> {r['heldout_exact_match'][1]:.3f}",
            f"{r['probe_loss'][0]:.3f} -> {r['probe_loss'][1]:.3f} ({r['probe_loss_change']:+.0%})",
            f"{r['probe_exact_match'][0]:.2f} -> {r['probe_exact_match'][1]:.2f}",
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
