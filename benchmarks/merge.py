"""Merge benchmark: peft's merge_and_unload (the baseline) vs the streamed merge (core/merge/stream.py).

    python benchmarks/merge.py --preset cpu                  # SmolLM2-135M (bundled), LoRA r16 all-linear
    python benchmarks/merge.py --preset smoke --json out.json  # tiny model: checks that both rows run
    python benchmarks/merge.py --preset gpu                  # Llama-3.2-1B shape, random weights; needs CUDA

Both rows merge the same base and adapter into the same dtype and shard size, each in a fresh
subprocess so that its peak RSS is its own:

- peft: load the base in the merge dtype (on the GPU when there is one), PeftModel.from_pretrained,
  merge_and_unload, save_pretrained: what the merge step did before.
- streamed: core.merge.stream.stream_merge: one chunk of one tensor in memory at a time, B @ A on the
  GPU when there is one.

Reported per row: seconds (the merge itself, imports excluded), peak host RSS of the process, its RSS
after imports, the largest input shard, peak RSS / largest shard, CUDA peak allocated memory, and the
max |difference| between the two rows' output weights. The adapter's B is random (not peft's zeros)
so that the merge changes every targeted weight. Neither row includes the merge step's logit check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

PRESETS = {
    # tiny Llama built from a config, several input and output shards: seconds on a CPU
    "smoke": dict(model="tiny", dtype="float16", max_shard_size="300KB", input_shard_size="500KB", r=8, alpha=16),
    # the bundled SmolLM2-135M-Instruct (fp32, one 538 MB shard) into fp16, the pipeline's defaults
    "cpu": dict(model="bundled", dtype="float16", max_shard_size="2GB", input_shard_size=None, r=16, alpha=32),
    # Llama-3.2-1B's shape (tied embeddings), random bf16 weights in one shard as the Hub ships it
    "gpu": dict(model="llama-1b", dtype="bfloat16", max_shard_size="2GB", input_shard_size="5GB", r=16, alpha=32),
}
ROWS = ("peft", "streamed")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- one row, in its own process


def run_row(row: str, base: Path, adapter: Path, out: Path, dtype_name: str, max_shard_size: str, device: str) -> dict:
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if row == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    else:
        from core.merge import stream as merge_stream
    # Imports are not timed, in either row: resolving the model class imports transformers' modeling stack.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(base))]
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    rss_start = _rss_bytes()
    start = time.perf_counter()
    if row == "peft":
        dtype = getattr(torch, dtype_name)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": 0} if dev == "cuda" else None)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(out, max_shard_size=max_shard_size)
        del model
        stats = {}
    else:
        stats = merge_stream.stream_merge(base, adapter, out, dtype_name, max_shard_size, device=dev)
    seconds = time.perf_counter() - start
    return {
        "row": row,
        "device": dev,
        "seconds": seconds,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "rss_start_bytes": rss_start,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        "output_shards": len(list(out.glob("*.safetensors"))),
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "merged_tensors": stats.get("merged_tensors"),
    }


def spawn_row(row: str, base: Path, adapter: Path, out: Path, preset: dict, device: str) -> dict:
    args = ["--row", row, "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    args += ["--dtype", preset["dtype"], "--max-shard-size", preset["max_shard_size"], "--device", device]
    proc = common.run_fresh(__file__, args, common.bench_env(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"row {row} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- inputs


def _random_adapter(model, r: int, alpha: int, out: Path, seed: int = 0) -> Path:
    """LoRA r/alpha on all linear layers with a random B, so the merge changes every targeted weight."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(out)
    return out


def build_inputs(preset: dict, work: Path) -> tuple[Path, Path, str]:
    """(base folder, adapter folder, description of the base)."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.tiny import build_tiny_model

    kind = preset["model"]
    if kind == "bundled":
        from core.models import bundled_model_dir

        base, dtype, label = bundled_model_dir(), torch.float32, "SmolLM2-135M-Instruct (bundled, fp32)"
    else:  # random weights, no tokenizer: the tiny Llama with a 4096 vocabulary, or Llama-3.2-1B's shape on the GPU
        if kind == "tiny":
            shape, device = dict(vocab_size=4096), "cpu"
            dtype, label = torch.float32, "tiny Llama (2 layers, hidden 64, fp32)"
        else:
            shape, device = dict(common.LLAMA_SHAPES["llama-1b"], max_position_embeddings=131072), "cuda"
            dtype, label = torch.bfloat16, "Llama-3.2-1B shape (random bf16 weights)"
        base = build_tiny_model(
            work / "base",
            tokenizer=False,
            dtype=dtype,
            device=device,
            max_shard_size=preset["input_shard_size"],
            **shape,
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    adapter = _random_adapter(model, preset["r"], preset["alpha"], work / "adapter")
    del model
    return base, adapter, label


def largest_shard(base: Path) -> int:
    return max(p.stat().st_size for p in base.glob("*.safetensors"))


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over every weight, read one tensor at a time; the key sets must match."""
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update(dict.fromkeys(f.keys(), shard))
        return out

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        raise RuntimeError(f"the outputs hold different tensors: {sorted(set(wa) ^ set(wb))[:10]}")
    worst = 0.0
    for key in sorted(wa):
        with safe_open(wa[key], "pt") as fa, safe_open(wb[key], "pt") as fb:
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            raise RuntimeError(f"{key}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
        if ta.numel():
            worst = max(worst, float((ta.float() - tb.float()).abs().max()))
    return worst


# ---------------------------------------------------------------- report


def environment(device: str) -> dict:
    versions = common.versions("torch", "transformers", "peft", "safetensors")
    return {"device": common.device_name(cuda=device == "cuda"), **versions}


def _mb(n) -> str:
    return common.fmt(None if n is None else n / 1e6, ",.0f")


def print_table(result: dict) -> None:
    env = result["environment"]
    print(
        f"\nmerge benchmark, preset {result['preset']}: {result['base']}, LoRA r={result['r']} alpha={result['alpha']}"
    )
    print(f"  -> {result['dtype']}, max_shard_size {result['max_shard_size']}; command: {result['command']}")
    print("  " + common.describe(env))
    head = ["row", "device", "seconds", "peak RSS MB", "RSS after imports MB", "largest shard MB", "peak/shard"]
    head += ["CUDA peak MB", "max |diff|"]
    rows = []
    for r in result["rows"]:
        rows.append(
            [
                r["row"],
                r["device"],
                f"{r['seconds']:.2f}",
                _mb(r["peak_rss_bytes"]),
                _mb(r["rss_start_bytes"]),
                _mb(r["largest_input_shard_bytes"]),
                f"{r['peak_over_largest_shard']:.2f}",
                _mb(r["cuda_peak_bytes"]),
                common.fmt(r.get("max_abs_diff"), ".3g"),
            ]
        )
    for line in common.format_table(head, rows):
        print("  " + line)
    by = {r["row"]: r for r in result["rows"]}
    if {"peft", "streamed"} <= set(by):
        p, s = by["peft"], by["streamed"]
        print(
            f"  streamed / peft: time {s['seconds'] / p['seconds']:.2f}x, "
            f"peak RSS {s['peak_rss_bytes'] / p['peak_rss_bytes']:.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    ap = common.preset_parser(__doc__, PRESETS, "cpu", "also write the results here")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a temp folder, removed)")
    # internal: one row in this process
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--max-shard-size", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.row:
        res = run_row(args.row, args.base, args.adapter, args.out, args.dtype, args.max_shard_size, args.device)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch

    preset = PRESETS[args.preset]
    rows = common.pick(ap, "--rows", args.rows, ROWS)
    cuda = torch.cuda.is_available()
    if (args.preset == "gpu" or args.device == "cuda") and not cuda:
        return common.needs_cuda(f"preset {args.preset!r} / device {args.device!r}")
    device = args.device if args.device != "auto" else ("cuda" if cuda else "cpu")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter, label = build_inputs(preset, work)
        shard = largest_shard(base)
        results = []
        for row in rows:
            out = work / f"out-{row}"
            shutil.rmtree(out, ignore_errors=True)
            res = spawn_row(row, base, adapter, out, preset, device)
            res["largest_input_shard_bytes"] = shard
            res["peak_over_largest_shard"] = res["peak_rss_bytes"] / shard
            res["max_abs_diff"] = None
            results.append(res)
        if {"peft", "streamed"} <= set(rows):
            diff = max_abs_diff(work / "out-peft", work / "out-streamed")
            for res in results:
                if res["row"] == "streamed":
                    res["max_abs_diff"] = diff
        result = {
            "preset": args.preset,
            "base": label,
            "r": preset["r"],
            "alpha": preset["alpha"],
            "dtype": preset["dtype"],
            "max_shard_size": preset["max_shard_size"],
            "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])]),
            "environment": environment(device),
            "rows": results,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
