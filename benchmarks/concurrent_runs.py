"""Training runs sharing the same cores: what N runs at once cost against one run alone.

    python benchmarks/concurrent_runs.py --json bench-concurrent.json     # 2 runs of 30 default-config steps each
    python benchmarks/concurrent_runs.py --preset smoke                   # tiny model: checks that every row runs

Each run is benchmarks/train_throughput.py's `ours` row (the pipeline's train step on identical seeded data), in
its own process, as a schedule overlapping a manual run, or two sweep pods on one node, would be. Rows:
- `alone`: one run with the default `train.cpu_threads: auto`;
- `N at once`: N runs started together, the default: each run's torch threads follow the cores the others leave
  free (core.training.cpu_share.CpuShare);
- `N at once, fixed threads`: the same with `train.cpu_threads` fixed at this process's usable cores, what every
  run did before CpuShare: OpenMP threads spin at barriers waiting for a partner whose core the other run holds.
Per row: wall seconds from the first start to the last end, its ratio to `alone`, and each run's real tokens/s and
held-out loss after training. Sharing the cores ideally costs about N x one run (the work is N times larger); much
more means the processes fight over the cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import yaml

from core.cpus import usable_cpus

PRESETS = {
    "smoke": {"train_preset": "smoke", "steps": 2, "runs": 2},
    # the default run's own micro-batches (one packed sequence of up to 192 tokens): short matmuls, where threads
    # wait at barriers most often, so where spinning waiters hurt most; 30 steps each
    "cpu": {"train_preset": "cpu", "workload": "support", "steps": 30, "runs": 2, "config_geometry": True},
    # the train benchmark's chat rows and micro-batches (about 640 tokens), 30 steps each
    "cpu-long": {"train_preset": "cpu", "steps": 30, "runs": 2},
}
TRAIN = Path(__file__).with_name("train_throughput.py")
DEFAULT_CONFIG = common.REPO / "configs" / "default.yaml"


def run_together(n: int, preset: dict, config: Path, work: Path, wait_policy: str | None = None) -> dict:
    """n train-benchmark runs of `config`'s settings started at once; wall seconds and each run's result."""
    env = common.bench_env(**({"OMP_WAIT_POLICY": wait_policy} if wait_policy else {}))
    outs = [work / f"{config.stem}-{n}-{i}.json" for i in range(n)]
    args = [
        "--config",
        str(config),
        "--preset",
        preset["train_preset"],
        "--rows",
        "ours",
        "--workloads",
        preset.get("workload", "chat"),
        "--steps",
        str(preset["steps"]),
        *(["--config-geometry"] if preset.get("config_geometry") else []),
    ]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(TRAIN), *args, "--json", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for out in outs
    ]
    logs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"a run failed (exit {p.returncode}):\n{log[-2000:]}")
    runs = [json.loads(out.read_text())[0] for out in outs]
    return {
        "wall_s": wall,
        "tokens_per_s": [r["real_tokens_per_s"] for r in runs],
        "loss_after": [r["last_loss"] for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.preset_parser(__doc__, PRESETS, "cpu", "write every row (wall seconds, tokens/s, losses) here")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["ACTIVE", "PASSIVE"],
        help="OMP_WAIT_POLICY for every run (default: unset, libgomp's own spin-then-sleep); ACTIVE spins hardest",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    n = preset["runs"]
    print(f"preset {args.preset}: {n} runs of train_throughput --preset {preset['train_preset']} --rows ours, "
          f"{preset['steps']} steps each")  # fmt: skip
    print(f"device: {common.device_name(cuda=False)}; OMP_WAIT_POLICY {args.omp_wait_policy or 'unset'}")
    fixed = usable_cpus()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        configs = {"auto": DEFAULT_CONFIG, fixed: Path(tmp) / "fixed-threads.yaml"}
        raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
        raw.setdefault("train", {})["cpu_threads"] = fixed
        configs[fixed].write_text(yaml.safe_dump(raw))
        for name, count, threads in (
            ("alone", 1, "auto"),
            (f"{n} at once", n, "auto"),
            (f"{n} at once, fixed threads", n, fixed),
        ):
            rows[name] = run_together(count, preset, configs[threads], Path(tmp)) | {
                "runs": count,
                "cpu_threads": threads,
            }
            print(f"  {name}: {rows[name]['wall_s']:.0f} s", flush=True)
    alone = rows["alone"]["wall_s"]
    table = [
        [name, r["runs"], r["cpu_threads"], f"{r['wall_s']:.1f}", f"{r['wall_s'] / alone:.2f}x",
         " / ".join(f"{t:.1f}" for t in r["tokens_per_s"]), " / ".join(f"{x:.4f}" for x in r["loss_after"])]
        for name, r in rows.items()
    ]  # fmt: skip
    head = ["row", "runs", "train.cpu_threads", "wall s", "x alone", "tokens/s per run", "held-out loss after"]
    print("\n".join(common.format_table(head, table, align="<><>>>>")))
    if args.json:
        common.write_json(
            Path(args.json),
            {
                "preset": args.preset,
                "omp_wait_policy": args.omp_wait_policy,
                "device": common.device_name(cuda=False),
                "rows": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
