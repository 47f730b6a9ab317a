"""Preference stages against SFT: tokens/s, seconds per step and peak memory on the same rows, on this machine.

    python benchmarks/preference.py --preset cpu --json bench-preference-cpu.json   # SmolLM2-135M, fp32 on CPU
    python benchmarks/preference.py --preset smoke                                 # tiny model: every row runs
    python benchmarks/preference.py --preset gpu-1b --json bench-preference-1b.json  # CUDA: Llama-3.2-1B shape

Rows, each in a fresh subprocess (so its peak memory is its own), on the bundled preference pairs
(data/acme_preference/train.jsonl) rendered with configs/default.yaml's prompt settings:
- `sft`: core.training.train_adapter on each pair's prompt + chosen answer, micro-batches of `--micro` rows, no
  packing (the preference trainers cannot pack: a like-for-like baseline).
- `sft-packed`: the same rows with the default config's packing (its token budget per micro-batch).
- `dpo`, `orpo`: core.training.preference.train_preference_adapter on `--micro` pairs per step (each pair is two
  sequences: chosen and rejected); dpo also scores every pair under the reference (the adapter-disabled base).
- `kto`: the pairs as KTO's rows (chosen desirable, rejected not), `--micro` x 2 rows per step: the same sequences.
Every row: the same base (4-bit nf4, as the pipeline), LoRA settings, learning rate schedule shape, seed and number
of optimizer steps (--steps). Per row: real tokens/s (prompt + answer tokens of every sequence trained on, the
trainers' own count), seconds per optimizer step, peak memory (CPU: the process's peak RSS; CUDA: max allocated),
the first and last logged loss. Prints one table with each row's ratio to `sft`; --json writes every row.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import common

ROWS = ("sft", "sft-packed", "dpo", "kto", "orpo")
PRESETS = {
    "cpu": {"model": "bundled", "steps": 10, "micro": 4},
    "smoke": {"model": "tiny", "steps": 2, "micro": 2},
    "gpu-1b": {"model": "llama-1b", "steps": 20, "micro": 8},
}
PAIRS = common.REPO / "data" / "acme_preference" / "train.jsonl"
CONFIG = common.REPO / "configs" / "default.yaml"


def model_source(preset: str, work: Path):
    """The preset's base: the bundled SmolLM2, or a random-weight tiny / Llama-shape model built here."""
    from core.config import ModelSource
    from core.tiny import build_tiny_model

    name = PRESETS[preset]["model"]
    if name == "bundled":
        return ModelSource(source="bundled")
    import torch

    shape = {} if name == "tiny" else common.LLAMA_SHAPES[name]
    dtype = None if name == "tiny" else torch.bfloat16
    device = "cuda" if name != "tiny" else "cpu"
    return ModelSource(source="local", name=str(build_tiny_model(work / name, dtype=dtype, device=device, **shape)))


def shipped():
    """configs/default.yaml's validated config: its prompt, quant, LoRA and train settings."""
    from core.config import load_config

    return load_config(CONFIG)


def rows_for(kind: str, source, config):
    """The training rows of a benchmark row: SFT rows (prompt + chosen) or preference pairs / KTO rows."""
    from datasets import Dataset

    from core.config import DataSource
    from core.data.formatting import format_all
    from core.data.ingest import FEATURES, load_rows
    from core.data.preference import format_preference, kto_rows
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(source)
    canonical = load_rows(DataSource(path=str(PAIRS), format="pairs"))
    if kind.startswith("sft"):
        messages = [p + [{"role": "assistant", "content": c}] for p, c in zip(canonical["prompt"], canonical["chosen"])]
        rows = Dataset.from_dict(
            {"id": canonical["id"], "split": [""] * len(messages), "messages": messages}, features=FEATURES
        )
        return format_all(rows, tokenizer, config.prompt, "benchmark rows")
    from datasets import concatenate_datasets

    pairs = concatenate_datasets(list(format_preference(canonical, tokenizer, config.prompt, 512, "dpo")[:2]))
    return kto_rows(pairs) if kind == "kto" else pairs


def train_settings(kind: str, preset: str, config, work: Path):
    """train settings of one row: the shipped schedule's shape at the preset's steps and micro-batch."""
    p = PRESETS[preset]
    common_settings = dict(
        max_steps=p["steps"], save_every=10_000, logging_steps=1, eval_every=0, checkpoint_dir=str(work / "ckpt"),
        replay=None, grad_accum=1,
    )  # fmt: skip
    train = config.train.model_copy(update=common_settings)
    if kind == "sft":
        return train.model_copy(update={"packing": False, "micro_batch_size": p["micro"]})
    if kind == "sft-packed":
        return train
    from core.config import PreferenceConfig

    micro = p["micro"] * (2 if kind == "kto" else 1)  # kto: one sequence per row, dpo/orpo: two per pair
    preference = PreferenceConfig(max_steps=p["steps"], micro_batch_size=micro, max_length=512)
    return train.model_copy(update={"method": kind, "preference": preference})


def run_row(kind: str, preset: str) -> dict:
    """Train one row in this process; its measurements."""
    import torch

    from core.training import train_adapter
    from core.training.preference import train_preference_adapter

    work = Path(tempfile.mkdtemp(prefix=f"bench-preference-{kind}-"))
    config = shipped()
    source = model_source(preset, work)
    rows = rows_for(kind, source, config)
    train = train_settings(kind, preset, config, work)
    held_out = rows.select(range(4))  # scored once after training, outside the timed steps
    started = time.perf_counter()
    if kind.startswith("sft"):
        _, metrics = train_adapter(rows, held_out, source, config.quant, config.lora, train, work / "adapter")
    else:
        _, metrics = train_preference_adapter(
            rows, held_out, source, config.quant, config.lora, train, work / "adapter"
        )
    losses = [loss for _, loss in metrics.loss_curve]
    return {
        "row": kind,
        "device": common.device_name(torch.cuda.is_available(), threads=True),
        "versions": common.versions("torch", "transformers", "trl", "peft", "bitsandbytes"),
        "steps": metrics.steps,
        "train_tokens": metrics.train_tokens,
        "real_tokens_per_s": metrics.tokens_per_s,
        "s_per_step": metrics.seconds / max(metrics.steps, 1),
        "peak_mem_bytes": metrics.peak_mem_bytes,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "wall_s": time.perf_counter() - started,
    }


def main() -> int:
    parser = common.preset_parser(__doc__, PRESETS, "cpu", "write every row's measurements here")
    parser.add_argument("--rows", help=f"comma-separated, of {', '.join(ROWS)} (default: all)")
    parser.add_argument("--row", help=argparse_hidden())
    args = parser.parse_args()
    if args.row:  # one row, inside its fresh process
        print("ROW " + json.dumps(run_row(args.row, args.preset)))
        return 0
    if args.preset.startswith("gpu"):
        import torch

        if not torch.cuda.is_available():
            return common.needs_cuda(f"--preset {args.preset}")
    results = []
    for kind in common.pick(parser, "--rows", args.rows, ROWS):
        done = common.run_fresh(__file__, ["--preset", args.preset, "--row", kind], common.bench_env())
        line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
        if done.returncode != 0 or line is None:
            print(done.stdout[-2000:] + done.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[4:]))
        print(f"{kind}: {results[-1]['s_per_step']:.2f} s/step", file=sys.stderr)
    print_table(results, args.preset)
    if args.json:
        common.write_json(args.json, results)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def print_table(results: list[dict], preset: str) -> None:
    base = next((r for r in results if r["row"] == "sft"), results[0])
    head = ["row", "tokens/s", "x sft", "s/step", "peak memory", "x sft", "loss first -> last"]
    rows = [
        [
            r["row"],
            common.fmt(r["real_tokens_per_s"], ".1f"),
            common.fmt(r["real_tokens_per_s"] / base["real_tokens_per_s"], ".2f"),
            common.fmt(r["s_per_step"], ".2f"),
            f"{r['peak_mem_bytes'] / 2**20:.0f} MiB",
            common.fmt(r["peak_mem_bytes"] / base["peak_mem_bytes"], ".2f"),
            f"{common.fmt(r['first_loss'], '.3f')} -> {common.fmt(r['last_loss'], '.3f')}",
        ]
        for r in results
    ]
    print(f"preset {preset}, {results[0]['device']}, {results[0]['steps']} steps per row")
    print("\n".join(common.format_table(head, rows)))


if __name__ == "__main__":
    sys.exit(main())
