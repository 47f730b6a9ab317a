"""llama.cpp in the loop: its own converter makes the GGUF, its quantizer makes Q8_0 / Q4_K_M, and llama.cpp
itself (through llama-cpp-python) loads every file to check it against the merged model.

    make gguf-setup     # python -m core.export.llamacpp install-runtime (builds llama.cpp: ~13 min on 2 cores the
                        # first time, then seconds from its own wheel cache), pip install -e ".[gguf]",
                        # python -m core.export.llamacpp install-converter and install-server
    python -m core.export.llamacpp check   # exit 0 when the runtime, the converter and llama-server are there

- The converter: `convert_hf_to_gguf.py` with its `conversion/` package and the matching `gguf-py`, exactly as
  shipped in the source distribution of the installed llama-cpp-python (`install_converter` copies them into
  `<venv>/share/llama.cpp/`). It covers every architecture llama.cpp supports (Llama 3.1's RoPE scaling
  included); the converter needs `sentencepiece` importable, which the `gguf` extra installs.
- The runtime: llama-cpp-python built from its source distribution for this machine's CPU (`GGML_NATIVE`)
  with Intel AMX left out (`BUILD_CMAKE_ARGS`), cached under `~/.cache/lora-pipeline/llama-cpp/` by version,
  build flags and CPU flags, never taken from pip's wheel cache (a wheel built elsewhere or with other flags).
- The server: llama.cpp's `llama-server` (`server_binary`, for serving with `engine: llama_cpp`,
  core/serving/llamacpp_engine.py), built from the same source distribution's vendored tree with the same flags,
  statically linked (~14 min on 2 busy cores at nice 19, 2026-12-06), only the binary kept under
  `~/.cache/lora-pipeline/llama-cpp/server/<build_key>/`.
- Quantizing: `llama_cpp.llama_model_quantize` from the f16 file (llama.cpp's recommended source for k-quants).
- Checking (`check_file`): greedy answers to eval prompts, token for token, and the perplexity of eval rows,
  each against the merged model in transformers (fp32).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# export type -> (llama.cpp ftype name, file suffix); f16 is what the converter writes, the others quantize it
TYPES = {
    "f16": ("LLAMA_FTYPE_MOSTLY_F16", "F16"),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_M"),
}
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
SETUP_HINT = (
    'make gguf-setup (python -m core.export.llamacpp install-runtime, pip install -e ".[gguf]", then '
    "python -m core.export.llamacpp install-converter)"
)
VERSION = "0.3.36"  # llama-cpp-python; the same pin as pyproject's `gguf` extra
# GGML_NATIVE compiles for the build machine's instruction set, less Intel AMX: llama.cpp's AMX kernels die with
# SIGILL (`tilezero`) on the Sapphire Rapids VMs this project runs on, in greedy decoding of a 135M model (measured
# 2026-12-06); without AMX it takes the AVX-512 kernels. GCC 12 needs each AMX flag named (-mno-amx-tile alone
# leaves AMX-INT8 on). The build reads CMAKE_ARGS with shlex.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_CMAKE_ARGS = f"-DGGML_NATIVE=ON '-DCMAKE_C_FLAGS={NO_AMX}' '-DCMAKE_CXX_FLAGS={NO_AMX}'"


class LlamaCppMissingError(RuntimeError):
    """llama-cpp-python or llama.cpp's converter is not installed."""


def tools_dir() -> Path:
    """Where install_converter puts llama.cpp's converter: inside the environment that has llama-cpp-python."""
    return Path(os.environ.get("LLAMA_CPP_TOOLS", Path(sys.prefix) / "share" / "llama.cpp"))


def runtime_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def converter_available() -> bool:
    return (tools_dir() / "convert_hf_to_gguf.py").exists() and importlib.util.find_spec("sentencepiece") is not None


def available() -> bool:
    """llama-cpp-python and the converter are both installed."""
    return runtime_available() and converter_available()


def require() -> None:
    missing = [
        what
        for what, ok in (("llama-cpp-python", runtime_available()), ("the converter", converter_available()))
        if not ok
    ]
    if missing:
        raise LlamaCppMissingError(
            f"{' and '.join(missing)} not installed (looked for {tools_dir() / 'convert_hf_to_gguf.py'} and the "
            f"sentencepiece package): {SETUP_HINT}"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_PIPELINE_CACHE", Path.home() / ".cache" / "lora-pipeline")) / "llama-cpp"


def cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), part of the build key: a native build runs only where it was made."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    return platform.machine()


def build_key(version: str = VERSION, cmake_args: str = BUILD_CMAKE_ARGS) -> str:
    digest = hashlib.sha256(f"{version}\n{cmake_args}\n{cpu_flags()}".encode()).hexdigest()[:16]
    return f"{version}-{digest}"


def source_archive(version: str = VERSION) -> Path:
    """llama-cpp-python's source distribution (the whole llama.cpp tree under vendor/), downloaded once."""
    dest = cache_dir() / "sdist"
    archive = dest / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                 f"llama-cpp-python=={version}"],
                check=True,
            )  # fmt: skip
            (got,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            got.replace(archive)  # whole or absent: a killed download leaves no archive behind
    return archive


def runtime_wheel(version: str = VERSION, cmake_args: str = BUILD_CMAKE_ARGS) -> Path:
    """The llama-cpp-python wheel built from source for this CPU with `cmake_args`, built on first use."""
    dest = cache_dir() / "wheels" / build_key(version, cmake_args)
    wheels = sorted(dest.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    archive = source_archive(version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        logger.info("building llama-cpp-python %s from source (CMAKE_ARGS=%s)", version, cmake_args)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", tmp, str(archive)],
            check=True,
            env={**os.environ, "CMAKE_ARGS": cmake_args, "FORCE_CMAKE": "1"},
        )
        (wheel,) = Path(tmp).glob("llama_cpp_python-*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        wheel.replace(dest / wheel.name)
    return dest / wheel.name


def install_runtime(version: str = VERSION) -> Path:
    """Install llama-cpp-python from runtime_wheel() into this environment (replacing any other build of it)."""
    wheel = runtime_wheel(version)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True
    )
    return wheel


def server_path(version: str = VERSION, cmake_args: str = BUILD_CMAKE_ARGS) -> Path:
    """Where server_binary() keeps llama.cpp's llama-server for this version, build flags and CPU."""
    return cache_dir() / "server" / build_key(version, cmake_args) / "llama-server"


def server_binary(version: str = VERSION, cmake_args: str = BUILD_CMAKE_ARGS, jobs: int = 2) -> Path:
    """llama.cpp's own llama-server, built from the vendored tree of llama-cpp-python's source distribution with
    the runtime's flags (native, no AMX), statically linked, built on first use (~5-8 min on 2 cores) and cached
    by build_key() like the wheel. Only the binary is kept; it is built in a temporary folder and renamed into
    place, so a killed build leaves nothing half-made behind."""
    binary = server_path(version, cmake_args)
    if binary.exists():
        return binary
    archive = source_archive(version)
    binary.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=binary.parent.parent) as tmp:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
        src = Path(tmp) / prefix
        flags = shlex.split(cmake_args)  # the same shlex reading as the wheel build
        logger.info("building llama-server %s from source (%s)", version, " ".join(flags))
        subprocess.run(
            ["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF", *flags],
            check=True,
        )  # fmt: skip
        subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-server", f"-j{jobs}"], check=True)
        (built,) = (src / "build").glob("bin/llama-server")
        staged = Path(tmp) / "llama-server"
        built.replace(staged)
        binary.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(binary)
    return binary


def server_available() -> bool:
    return server_path().exists()


def install_converter(dest: Path | None = None) -> Path:
    """Copy the converter of the installed llama-cpp-python's own source distribution (from pip's cache or the
    package index) into `dest` (default tools_dir()). Same version as the runtime, so the two agree on GGUF."""
    from importlib.metadata import version

    dest = Path(dest or tools_dir())
    wanted = version("llama_cpp_python")
    stamp = dest / "VERSION"
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return dest
    archive = source_archive(wanted)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-src-") as tmp:
        prefix = f"llama_cpp_python-{wanted}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            keep = [m for m in members if m.name[len(prefix) :].split("/")[0] in CONVERTER_FILES]
            tar.extractall(tmp, members=keep, filter="data")
        staged = Path(tmp) / prefix
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, dest)
    stamp.write_text(wanted + "\n")
    return dest


def convert(model_dir: Path, out_file: Path, name: str | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: the HF model folder as one f16 GGUF file."""
    require()
    tools = tools_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tools / "gguf-py"), str(tools)]), NO_LOCAL_GGUF="")
    command = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f16"]
    command += ["--outfile", str(out_file)] + (["--model-name", name] if name else [])
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.exists():
        out_file.unlink(missing_ok=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}):\n{tail}")
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path) -> Path:
    """llama.cpp's convert_lora_to_gguf.py: a peft LoRA folder as one f16 GGUF LoRA for `base_dir`'s model (only
    its config is read), loadable with llama-server's --lora."""
    require()
    tools = tools_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tools / "gguf-py"), str(tools)]), NO_LOCAL_GGUF="")
    command = [sys.executable, str(tools / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
               "--outtype", "f16", "--outfile", str(out_file)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.exists():
        out_file.unlink(missing_ok=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"llama.cpp's convert_lora_to_gguf.py failed on {adapter_dir} (exit {proc.returncode}):\n{tail}"
        )
    return out_file


@contextlib.contextmanager
def native_output_to(path: Path):
    """Send what native code writes to stdout/stderr (llama.cpp's loader and quantizer print hundreds of lines)
    to `path` instead of the console, for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quantize(src: Path, dst: Path, kind: str, threads: int | None = None) -> Path:
    """llama.cpp's quantizer: `src` (f16 GGUF) to `dst` in `kind` (q8_0, q4_k_m)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[kind][0])
    params.nthread = threads or 0  # 0: llama.cpp's default (every core)
    log = dst.with_name(f".{dst.name}.log")
    with native_output_to(log):
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-10:])
    log.unlink()
    if status != 0 or not dst.exists():
        dst.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {kind} (status {status}):\n{tail}")
    return dst


def load(path: Path, n_ctx: int, threads: int | None = None):
    """The file in llama.cpp, every position's logits kept (for perplexity)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False, seed=0)


def greedy_ids(llm, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of the prompt, as token ids (end-of-turn token included, as transformers)."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in eos_ids or len(out) >= max_new_tokens:
            break
    return out


def row_nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given the logits at positions 0..n-2, and its token count."""
    x = logits[: len(ids) - 1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def perplexity_llama(llm, rows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        nll, n = row_nll(np.asarray(llm.scores[: len(ids)]), ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def perplexity_hf(model, rows: list[list[int]]) -> float:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            nll, n = row_nll(logits, ids)
            total, count = total + nll, count + n
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["install-runtime", "install-converter", "install-server", "check"])
    args = parser.parse_args(argv)
    if args.command == "install-runtime":
        print(f"llama-cpp-python installed from {install_runtime()}")
        return 0
    if args.command == "install-converter":
        print(f"llama.cpp converter in {install_converter()}")
        return 0
    if args.command == "install-server":
        print(f"llama-server in {server_binary()}")
        return 0
    try:
        require()
    except LlamaCppMissingError as err:
        print(err)
        return 1
    print(f"llama.cpp ready: runtime and converter ({tools_dir()})")
    if not server_available():
        print(
            f"llama-server not built (serving with engine: llama_cpp needs it): python -m core.export.llamacpp "
            f"install-server (looked for {server_path()})"
        )
        return 1
    print(f"llama-server ready: {server_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
