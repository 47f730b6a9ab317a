"""The llama.cpp engine: llama.cpp's own llama-server as a child process, behind the same engine interface as the
batch engine (core.serving.batching.Engine), so the OpenAI routes, /invoke, auth, limits and checks stay the same.

    ServeConfig(engine="llama_cpp", gguf_type="q8_0", parallel=8)   # configs/serve.yaml, docs/serving.md

- The child: `llama-server` (core.export.llamacpp.server_binary(), built for this CPU) on a free loopback port
  (127.0.0.1 only), `--parallel N` slots with continuous batching, the version's GGUF, and every adapter as a GGUF
  LoRA loaded with `--lora FILE --lora-init-without-apply` (all at scale 0 until a request names one). Its
  stdout/stderr go to this process's logger, line by line. It gets SIGTERM when this process dies (Linux).
- A request: the prompt goes as token ids, rendered by the project's own prompt code (core.serving.model's
  prompt_ids / conversation_ids, the tokens training saw), to `POST /completion` with `stream: true`, the
  adapter as `"lora": [{"id": i, "scale": 1.0}]`, OpenAI's sampling (temperature, top_p, seed; no other sampler),
  stop strings; the text comes back piece by piece to the Generation's sink, as from the batch engine.
- Failures: a monitor thread restarts the child when it exits. Meanwhile new requests get EngineUnavailableError
  and requests cut off get ("unavailable", ...), both answered HTTP 503 with Retry-After. More than `max_queue`
  requests waiting for a slot: QueueFullError (503 server_overloaded).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from core.serving.batching import (
    Engine,
    EngineStoppedError,
    EngineUnavailableError,
    Generation,
    QueueFullError,
    finish,
)

logger = logging.getLogger(__name__)

SEED_RANGE = 2**32 - 1  # llama.cpp seeds are uint32; 2**32 - 1 itself means "random" (LLAMA_DEFAULT_SEED)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the child binds it a moment later; a lost race is retried by start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a killed server leaves no llama-server behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class LlamaCppEngine(Engine):
    """llama-server as a child process; `submit` Generations as to core.serving.batching.BatchEngine."""

    def __init__(
        self,
        model_file: Path,
        loras: dict[str, Path],
        *,
        slots: int,
        ctx_size: int,
        max_queue: int,
        threads: int | None = None,
        binary: Path | None = None,
        startup_timeout_s: float = 180.0,
        log: logging.Logger = logger,
    ):
        from core.export import llamacpp

        self.model_file = Path(model_file)
        # llama-server numbers the --lora files in the order given: that order is the id a request names
        self.lora_files = [Path(loras[name]) for name in sorted(loras)]
        self.lora_ids = {name: i for i, name in enumerate(sorted(loras))}
        self.slots, self.ctx_size, self.max_queue = slots, ctx_size, max_queue
        self.threads = threads
        self.binary = Path(binary) if binary else llamacpp.server_binary()
        self.startup_timeout_s, self.log = startup_timeout_s, log
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._up = threading.Event()  # set while the child answers /health
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()  # one start / restart at a time
        self._count_lock = threading.Lock()
        self._active = 0  # requests submitted and not finished (in a slot or waiting for one)
        self._monitor_thread: threading.Thread | None = None
        self.stats = {"requests": 0, "tokens": 0, "refused": 0, "cancelled": 0, "unavailable": 0, "restarts": 0}

    # -- the child process ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self, port: int) -> list[str]:
        from core.cpus import usable_cpus

        cmd = [str(self.binary), "--model", str(self.model_file), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--parallel", str(self.slots), "--cont-batching", "--ctx-size", str(self.ctx_size)]
        cmd += ["--threads", str(self.threads or usable_cpus()), "--no-webui"]
        # No host-RAM prompt cache: it keys saved prompt states by tokens alone, so a prompt computed under one
        # adapter was reused for another (wrong answers, seen in tests/serving/test_llamacpp_engine.py). Each slot
        # still reuses its own prefix, and llama-server clears that when the slot's adapters change.
        cmd += ["--cache-ram", "0"]
        for lora in self.lora_files:
            cmd += ["--lora", str(lora)]
        if self.lora_files:
            cmd.append("--lora-init-without-apply")  # scale 0 for all: each request names its own adapter
        return cmd

    def start(self) -> LlamaCppEngine:
        """Start the child and wait until it answers /health; from then on the monitor restarts it when it exits.
        The monitor thread spawns every child: Linux sends the parent-death signal when the spawning *thread*
        ends, and the monitor lives as long as the engine."""
        if self._stopping.is_set():
            raise EngineStoppedError("the llama.cpp engine is stopped")
        if self._monitor_thread is None:
            first: dict[str, Exception | None] = {}
            started = threading.Event()
            self._monitor_thread = threading.Thread(
                target=self._monitor, args=(first, started), name="llama-server-monitor", daemon=True
            )
            self._monitor_thread.start()
            started.wait()
            if first.get("error") is not None:
                self._monitor_thread.join(timeout=10)
                raise first["error"]
        return self

    def health(self) -> bool:
        """Requests are taken: the child is running, its /health answers 200 (model loaded), not restarting."""
        proc = self._proc
        if not self._up.is_set() or proc is None or proc.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def restart(self, timeout_s: float | None = None) -> None:
        """Kill the child and wait (up to timeout_s, default the startup timeout) for the monitor's new one;
        requests cut off are answered as unavailable."""
        old = self._proc
        if old is not None and old.poll() is None:
            self._up.clear()
            old.kill()
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while not (self._up.is_set() and self._proc is not old):
            if self._stopping.is_set() or time.monotonic() > deadline:
                raise EngineUnavailableError("llama-server did not come back")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop taking requests, stop the child (SIGTERM, then SIGKILL after 10 s) and the monitor."""
        self._stopping.set()
        self._up.clear()
        with self._spawn_lock:
            self._kill()
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout=15)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _spawn(self) -> None:
        with self._spawn_lock:
            self._up.clear()
            self._kill()
            errors = []
            for _ in range(3):  # another process may take the free port before the child binds it
                if self._stopping.is_set():
                    raise EngineStoppedError("the llama.cpp engine is stopped")
                port = free_port()
                proc = subprocess.Popen(
                    self.command(port),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
                threading.Thread(target=self._forward, args=(proc,), name="llama-server-log", daemon=True).start()
                self._proc, self.port = proc, port
                failure = self._wait_ready(proc)
                if failure is None:
                    self._up.set()
                    self.log.info("llama-server pid %d ready on %s (%s)", proc.pid, self.url, self.model_file.name)
                    return
                errors.append(failure)
                self._kill()
            raise RuntimeError(f"llama-server did not start: {'; '.join(errors)} (its output is in this log)")

    def _wait_ready(self, proc: subprocess.Popen) -> str | None:
        """None once /health answers 200; else why not (the child exited, or the startup timeout passed)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"exit status {proc.returncode}"
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return None
            except requests.RequestException:
                pass
            time.sleep(0.1)
        return f"no /health answer within {self.startup_timeout_s:.0f} s"

    def _forward(self, proc: subprocess.Popen) -> None:
        """The child's output, one log record per line."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.log.info("llama-server[%d]: %s", proc.pid, line)

    def _monitor(self, first: dict, started: threading.Event) -> None:
        """Spawn the child, then restart it whenever it exits on its own (crash, OOM kill, restart()), backing
        off up to 10 s a try when a restart fails."""
        try:
            self._spawn()
        except Exception as err:
            first["error"] = err
            return
        finally:
            started.set()
        delay = 0.5
        while not self._stopping.wait(0.1):
            proc = self._proc
            if proc is not None and proc.poll() is None:
                continue
            self._up.clear()
            if proc is not None:
                self.log.warning("llama-server pid %d exited with status %s; restarting", proc.pid, proc.returncode)
            self.stats["restarts"] += 1
            try:
                self._spawn()
                delay = 0.5
            except EngineStoppedError:
                return
            except Exception:
                self.log.exception("llama-server restart failed; trying again in %.1f s", delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    # -- requests --------------------------------------------------------------------------------------------------

    def submit(self, gen: Generation) -> Generation:
        """Send a generation to llama-server (from its own thread); the errors are BatchEngine.submit's, plus
        EngineUnavailableError while the child is down."""
        if self._stopping.is_set():
            raise EngineStoppedError("the generation engine is stopped")
        if not self._up.is_set():
            self.stats["unavailable"] += 1
            raise EngineUnavailableError("llama-server is (re)starting; retry in a few seconds")
        with self._count_lock:
            waiting = self._active - self.slots
            if waiting >= self.max_queue:
                self.stats["refused"] += 1
                raise QueueFullError(
                    f"server at capacity: {waiting} requests waiting (serve config max_queued_requests="
                    f"{self.max_queue}) besides the {self.slots} being generated; retry shortly"
                )
            self._active += 1
            self.stats["requests"] += 1
        threading.Thread(target=self._run, args=(gen,), name="llama-request", daemon=True).start()
        return gen

    @property
    def in_flight(self) -> int:
        return self._active

    def payload(self, gen: Generation) -> dict[str, Any]:
        """The /completion body: token-id prompt, OpenAI's sampling only (top_p, then temperature; 0: greedy).
        An adapter name not among the LoRAs (the base, the merged model) applies none (all at scale 0)."""
        # Every adapter named, the others at scale 0: llama-server clears a slot's cached prompt when its adapter list
        # changes, but not when a request names none (an empty list keeps the last adapter's cache).
        wanted = self.lora_ids.get(gen.adapter)
        lora = [{"id": i, "scale": 1.0 if i == wanted else 0.0} for i in range(len(self.lora_ids))]
        return {
            "prompt": list(gen.input_ids),
            "n_predict": gen.max_new_tokens,
            "stream": True,
            "return_tokens": True,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "samplers": ["top_p", "temperature"],
            "seed": gen.seed % SEED_RANGE if gen.seed is not None else SEED_RANGE,
            "stop": list(gen.stop),
            "lora": lora,
            "cache_prompt": True,
        }

    def _run(self, gen: Generation) -> None:
        try:
            self._stream(gen)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            if gen.finish_reason is None:
                self.stats["unavailable"] += 1
                gen.finish_reason = "unavailable"
                gen.sink("unavailable", f"llama-server went away while generating ({type(err).__name__}); it is "
                                        "restarting: retry in a few seconds")  # fmt: skip
        except Exception as err:  # a failed request fails itself, not the server
            self.log.exception("llama-server request failed")
            if gen.finish_reason is None:
                gen.finish_reason = "error"
                gen.sink("error", f"generation failed: {type(err).__name__}: {err}")
        finally:
            with self._count_lock:
                self._active -= 1

    def _stream(self, gen: Generation) -> None:
        # timeout: (connect, read between two chunks) in seconds; a long prompt may queue for a slot meanwhile
        with requests.post(self.url + "/completion", json=self.payload(gen), stream=True, timeout=(5, 600)) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"llama-server answered {resp.status_code}: {resp.text[:500]}")
            for line in resp.iter_lines():
                if gen.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    finish(gen, "cancelled")  # closing the response frees the slot
                    return
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"llama-server: {chunk['error']}")
                gen.tokens.extend(chunk.get("tokens") or [])
                piece = chunk.get("content") or ""
                if piece:
                    gen.text += piece
                    gen.sink("delta", piece)
                    gen.sent = len(gen.text)
                if chunk.get("stop"):
                    # tokens_predicted counts every token made (the end-of-turn one included, as the batch engine's
                    # tokens do); a token that split a UTF-8 character is streamed with the next one's text only
                    gen.completion_tokens = int(chunk.get("tokens_predicted") or len(gen.tokens))
                    self.stats["tokens"] += gen.completion_tokens
                    finish(gen, "length" if chunk.get("stop_type") == "limit" else "stop")
                    return
        raise requests.exceptions.ChunkedEncodingError("the stream ended before its last chunk")


# ---------------------------------------------------------------------------------------------------------------
# The files llama-server loads: the model as GGUF of the wanted type, each adapter as a GGUF LoRA
# ---------------------------------------------------------------------------------------------------------------

# Questions the made GGUF must answer like the model in transformers (export's check), rendered as served prompts.
CHECK_QUESTIONS = ["Hello! What can you help me with?", "Can I return an item I bought last month?"]
HOW_TO_EXPORT = (
    "serve a version that has a gguf_model artifact of that type (train with export.enabled: true and export.types "
    "including it), or install llama.cpp's converter so the deployment makes it on first start (make gguf-setup)"
)


def content_key(folder: Path, *extra: str) -> str:
    """A digest of a model or adapter folder's files (names and sha256), plus `extra`: the cache key of its GGUF."""
    import hashlib

    from core.models import sha256_file

    digest = hashlib.sha256("\n".join(extra).encode())
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\n{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16]


def gguf_cache() -> Path:
    """Where the made GGUF files are kept: LORA_PIPELINE_GGUF_CACHE, else the llama.cpp cache's serve/ folder."""
    import os

    from core.export import llamacpp

    return Path(os.environ.get("LORA_PIPELINE_GGUF_CACHE") or llamacpp.cache_dir() / "serve")


def model_gguf(model_dir: Path, kind: str, check_prompts: list[list[int]], name: str = "served") -> Path:
    """The HF model folder as a GGUF file of `kind`, made once by export's llama.cpp path (convert, quantize, check
    greedy answers and perplexity against transformers) and cached by the folder's content."""
    from core.config import ExportConfig
    from core.export import llamacpp
    from core.export.gguf import export_llamacpp, gguf_file_name

    dest = gguf_cache() / content_key(model_dir, kind)
    made = dest / gguf_file_name(name, kind)
    if made.exists():
        return made
    if not llamacpp.converter_available():
        from core.serving.model import ServeLoadError

        raise ServeLoadError(f"engine llama_cpp needs a {kind} GGUF of {model_dir} and cannot make one here "
                             f"(llama.cpp's converter is not installed): {HOW_TO_EXPORT}")  # fmt: skip
    dest.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".make-", dir=dest.parent) as tmp:
        logger.info("making the %s GGUF of %s for llama-server (once; cached in %s)", kind, model_dir, dest)
        cfg = ExportConfig(types=[kind], check_rows=len(check_prompts), perplexity_rows=len(check_prompts))
        files, _ = export_llamacpp(model_dir, check_prompts, check_prompts, cfg, Path(tmp), name)
        Path(tmp, "made").mkdir()
        files[kind].replace(Path(tmp, "made", made.name))
        Path(tmp, "made").replace(dest)  # whole or absent
    return made


def lora_gguf(adapter_dir: Path, base_dir: Path) -> Path:
    """The peft adapter folder as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py), made once, cached by content."""
    from core.export import llamacpp

    dest = gguf_cache() / "lora" / content_key(adapter_dir, content_key(base_dir))
    made = dest / "adapter-F16.gguf"
    if made.exists():
        return made
    if not llamacpp.converter_available():
        from core.serving.model import ServeLoadError

        raise ServeLoadError(f"engine llama_cpp needs the adapter {adapter_dir} as a GGUF LoRA and llama.cpp's "
                             "converter is not installed: make gguf-setup")  # fmt: skip
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".make-", dir=dest.parent) as tmp:
        Path(tmp, "made").mkdir()
        llamacpp.convert_lora(adapter_dir, base_dir, Path(tmp, "made", made.name))
        Path(tmp, "made").replace(dest)
    return made


def gguf_of_type(folder: Path, kind: str) -> Path | None:
    """The file of `kind` in a gguf_model artifact folder (`<name>-Q8_0.gguf`), or None."""
    from core.export.llamacpp import TYPES

    found = sorted(Path(folder).glob(f"*-{TYPES[kind][1]}.gguf"))
    return found[0] if found else None
