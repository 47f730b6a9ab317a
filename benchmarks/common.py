"""Plumbing the benchmarks share: arguments, the machine's description, memory, tables, JSON, fresh processes.

Each benchmark imports it as `common` (run as `python benchmarks/<name>.py`, its folder is on sys.path);
importing it puts the repository root on sys.path, so that the benchmarks import `core`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Llama shapes with random weights, built by core.tiny.build_tiny_model as overrides of its tiny config (nothing
# downloaded). Vocabulary as the real models'.
LLAMA_SHAPES = {
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


# --- arguments --------------------------------------------------------------------------------------------------------


def preset_parser(doc: str, presets, default: str, json_help: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: --preset (one of `presets`) and --json; --help shows `doc`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=default)
    parser.add_argument("--json", type=Path, help=json_help)
    return parser


def pick(parser: argparse.ArgumentParser, flag: str, text: str | None, known) -> list[str]:
    """The names of a comma-separated option (every one of `known` when it is not given); unknown names: usage error."""
    known = list(known)
    if not text:
        return known
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"{flag}: unknown {unknown}; choose from {known}")
    return names


def needs_cuda(what: str) -> int:
    """Say on stderr that `what` needs a CUDA GPU; the exit status to return."""
    import torch

    print(
        f"{what} needs a CUDA GPU and none is visible (torch {torch.__version__}); use --preset cpu or --preset smoke.",
        file=sys.stderr,
    )
    return 2


# --- the machine ------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu shows it), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(cuda: bool | None = None, threads: bool = False) -> str:
    """The GPU's name when `cuda` (default: when one is visible), else `cpu: <model>, <n> cores[, torch threads t]`."""
    import torch

    if torch.cuda.is_available() if cuda is None else cuda:
        return torch.cuda.get_device_name()
    name = f"cpu: {cpu_name()}, {os.cpu_count()} cores"
    return name + (f", torch threads {torch.get_num_threads()}" if threads else "")


def versions(*packages: str) -> dict[str, str]:
    """Python's version and each installed package's ('-' when it is not installed)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- processes --------------------------------------------------------------------------------------------------------


def bench_env(zenml_home: Path | None = None, **force: str) -> dict[str, str]:
    """This process's environment for a benchmark process: ZenML analytics off and warnings only, tokenizers on one
    thread (each unless already set), a throwaway ZenML store in `zenml_home` when given, then `force`."""
    env = dict(os.environ)
    for key, value in {
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_LOGGING_VERBOSITY": "WARN",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        env.setdefault(key, value)
    if zenml_home is not None:
        env["ZENML_CONFIG_PATH"] = str(zenml_home)
    env.update(force)
    return env


def run_fresh(
    script: str, args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`script` with `args` in a fresh Python process (so that its peak memory is its own), its output captured."""
    command = [sys.executable, str(Path(script).resolve()), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


# --- output -----------------------------------------------------------------------------------------------------------


def fmt(x, spec: str = ".2f") -> str:
    """`x` formatted, '-' for None or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def describe(values: dict) -> str:
    """'key value, key value' (the versions line of a header)."""
    return ", ".join(f"{k} {v}" for k, v in values.items())


def format_table(head: list[str], rows: list, widths: list[int] | None = None, align: str = "", sep: str = " | "):
    """The lines of a text table: header, rule, rows. A row is a list of cells, or a str printed as it is (a failure).

    widths: each column's least width (a column grows to fit its widest cell); align: '<' or '>' per column
    (default all '<'); sep: between columns (the rule crosses it with '-' and '+').
    """
    align = align or "<" * len(head)
    cells = [[str(c) for c in row] for row in [head, *rows] if not isinstance(row, str)]
    widths = [max([len(row[i]) for row in cells] + [widths[i] if widths else 0]) for i in range(len(head))]

    def line(row) -> str:
        return sep.join(c.ljust(w) if a == "<" else c.rjust(w) for c, a, w in zip(row, align, widths))

    rule = sep.replace(" ", "-").replace("|", "+").join("-" * w for w in widths)
    return [line(cells[0]), rule, *(row if isinstance(row, str) else line([str(c) for c in row]) for row in rows)]


def write_json(path: Path, data) -> None:
    """Write `data` as indented JSON (creating the folder) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
