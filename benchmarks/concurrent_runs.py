"""Training runs sharing the same cores: what N runs at once cost against one run alone.

    python benchmarks/concurrent_runs.py --json bench-concurrent.json     # cpu preset: 2 runs of 10 steps each
    python benchmarks/concurrent_runs.py --preset smoke                   # tiny model: checks that every row runs

Each run is benchmarks/train_throughput.py's `ours` row (the pipeline's train step on identical seeded data), in
its own process, as a schedule overlapping a manual run, or two sweep pods on one node, would be. Rows:
- `alone`: one run, with OMP_WAIT_POLICY=PASSIVE;
- `N at once, passive`: N runs started together with OMP_WAIT_POLICY=PASSIVE: OpenMP threads that wait at a
  barrier sleep;
- `N at once, active`: the same with OMP_WAIT_POLICY=ACTIVE: waiting threads spin, as libgomp lets them by
  default (what a run gets unless the variable is set).
Per row: wall seconds from the first start to the last end, its ratio to `alone`, and each run's real tokens/s and
held-out loss after training (identical runs must reach identical losses). Sharing the cores ideally costs about
N x one run (the work is N times larger); much more means the processes fight over the cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

PRESETS = {
    "smoke": {"train_preset": "smoke", "steps": 2, "runs": 2},
    "cpu": {"train_preset": "cpu", "steps": 10, "runs": 2},
}
TRAIN = Path(__file__).with_name("train_throughput.py")


def run_together(n: int, preset: dict, policy: str, work: Path) -> dict:
    """n train-benchmark runs started at once; wall seconds and each run's result."""
    env = common.bench_env(OMP_WAIT_POLICY=policy)
    outs = [work / f"{policy}-{n}-{i}.json" for i in range(n)]
    args = [
        "--preset",
        preset["train_preset"],
        "--rows",
        "ours",
        "--workloads",
        "chat",
        "--steps",
        str(preset["steps"]),
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
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    n = preset["runs"]
    print(f"preset {args.preset}: {n} runs of train_throughput --preset {preset['train_preset']} --rows ours, "
          f"{preset['steps']} steps each")  # fmt: skip
    print(f"device: {common.device_name(cuda=False)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        for name, count, policy in (
            ("alone", 1, "PASSIVE"),
            (f"{n} at once, passive", n, "PASSIVE"),
            (f"{n} at once, active", n, "ACTIVE"),
        ):
            rows[name] = run_together(count, preset, policy, Path(tmp)) | {"runs": count, "omp_wait_policy": policy}
            print(f"  {name}: {rows[name]['wall_s']:.0f} s", flush=True)
    alone = rows["alone"]["wall_s"]
    table = [
        [name, r["runs"], r["omp_wait_policy"], f"{r['wall_s']:.1f}", f"{r['wall_s'] / alone:.2f}x",
         " / ".join(f"{t:.1f}" for t in r["tokens_per_s"]), " / ".join(f"{x:.4f}" for x in r["loss_after"])]
        for name, r in rows.items()
    ]  # fmt: skip
    head = ["row", "runs", "OMP_WAIT_POLICY", "wall s", "x alone", "tokens/s per run", "held-out loss after"]
    print("\n".join(common.format_table(head, table, align="<><>>>>")))
    if args.json:
        common.write_json(
            Path(args.json), {"preset": args.preset, "device": common.device_name(cuda=False), "rows": rows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
