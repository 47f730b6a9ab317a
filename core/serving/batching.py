"""Batched generation for the serving deployment: requests that arrive together share every forward pass.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes those that arrived within
`batch_wait_ms` of each other (up to `max_batch_size`, adapters mixed: peft's `adapter_names` applies each row's
LoRA, `__base__` none), left-pads them into one batch and decodes them together, token by token, with one KV cache.
Each request receives its text as it grows (streaming) through its own `sink`; a row that finishes (end of turn,
a stop string, max_new_tokens) or whose client went away leaves the batch at once, so the others stop paying for
it. A full queue refuses new requests (QueueFullError) instead of letting latency grow without bound.

On a 2-core CPU a decode step for 8 rows costs little more than for 1 (the weights are read once per step either
way), which is where the throughput comes from: benchmarks/serve_latency.py measures it against sequential.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core import models

logger = logging.getLogger(__name__)

BASE_ROW = "__base__"  # peft's adapter_names entry for "no adapter" in a mixed batch


class QueueFullError(RuntimeError):
    """The wait queue is full: the server is at capacity (answered as HTTP 503, retry later)."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped; no request is taken any more."""


class EngineUnavailableError(RuntimeError):
    """The generator is down for a moment (llama-server restarting): answered as HTTP 503, retry in a few seconds."""


@dataclass
class Generation:
    """One request to generate for, and what has been generated so far.

    `sink(kind, value)` is called from the engine's thread: ("delta", text) for each new piece of text, then exactly
    once ("done", finish_reason) with "stop" (end of turn or a stop string), "length" (max_new_tokens) or
    "cancelled", or ("error", message), or ("unavailable", message) when the generator went down meanwhile (the
    llama.cpp engine's child process: retry).
    """

    adapter: str  # a loaded adapter name, or core.serving.model.BASE_ADAPTER / MERGED_ADAPTER
    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    sink: Callable[[str, Any], None] = lambda kind, value: None
    tokens: list[int] = field(default_factory=list)  # generated token ids, the end-of-turn token included
    text: str = ""  # decoded so far, cut at a stop string
    sent: int = 0  # characters of `text` already passed to sink
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Tokens generated as the engine counted them, where `tokens` may miss some (llama-server streams a token that
    # splits a UTF-8 character only as text); None: len(tokens).
    completion_tokens: int | None = None

    @property
    def generated(self) -> int:
        """Tokens generated (the end-of-turn token included), for usage."""
        return len(self.tokens) if self.completion_tokens is None else self.completion_tokens

    def cancel(self) -> None:
        """The client went away: the worker drops this row before its next token."""
        self.cancelled.set()


class Engine:
    """What the serving code needs of a generation engine (BatchEngine here, core.serving.llamacpp_engine's
    LlamaCppEngine): `submit` a Generation (QueueFullError, EngineStoppedError, EngineUnavailableError), `stop`,
    and `stats`; `generate` waits for one."""

    stats: dict

    def submit(self, gen: Generation) -> Generation:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def generate(self, gen: Generation, timeout: float | None = None) -> Generation:
        """Submit and wait until it is done (for callers in a worker thread, e.g. the chat step)."""
        done = threading.Event()
        errors: list[tuple[str, str]] = []
        inner = gen.sink

        def sink(kind: str, value: Any) -> None:
            inner(kind, value)
            if kind in ("error", "unavailable"):
                errors.append((kind, value))
            if kind in ("done", "error", "unavailable"):
                done.set()

        gen.sink = sink
        self.submit(gen)
        if not done.wait(timeout):
            gen.cancel()
            raise TimeoutError(f"no answer within {timeout} s")
        if errors:
            kind, message = errors[0]
            raise (EngineUnavailableError if kind == "unavailable" else RuntimeError)(message)
        return gen


class BatchEngine(Engine):
    """The worker that batches Generations over one loaded model (a core.serving.model.ServedModel's)."""

    def __init__(
        self,
        model,
        tokenizer,
        lock: threading.Lock,
        is_peft: bool,
        base_name: str,
        max_batch_size: int = 8,
        max_queue: int = 32,
        batch_wait_ms: float = 20.0,
    ):
        self.model, self.tokenizer, self.lock = model, tokenizer, lock
        self.is_peft, self.base_name = is_peft, base_name
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_ms / 1000
        self.eos_ids = models.end_of_turn_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._waiting: collections.deque[Generation] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._generating = 0  # rows of the batch being decoded
        # what the engine did, for the service info and the benchmark: batches run, rows per batch, tokens made
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "tokens": 0, "refused": 0, "cancelled": 0}

    # -- the request side (any thread) -------------------------------------------------------------------------

    def submit(self, gen: Generation) -> Generation:
        """Queue a generation; QueueFullError when max_queue are already waiting."""
        with self._cv:
            if self._stopped:
                raise EngineStoppedError("the generation engine is stopped")
            waiting = sum(1 for g in self._waiting if not g.cancelled.is_set())
            if waiting >= self.max_queue:
                self.stats["refused"] += 1
                raise QueueFullError(
                    f"server at capacity: {waiting} requests waiting (serve config max_queued_requests="
                    f"{self.max_queue}) besides the {self.max_batch_size} being generated; retry shortly"
                )
            self._waiting.append(gen)
            self.stats["requests"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return gen

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._waiting) + self._generating

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the worker ----------------------------------------------------------------------------------------------

    def _take_batch(self) -> list[Generation] | None:
        with self._cv:
            while not self._waiting and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return None
        time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        batch = []
        with self._cv:
            while self._waiting and len(batch) < self.max_batch_size:
                gen = self._waiting.popleft()
                if gen.cancelled.is_set():
                    self._finish(gen, "cancelled")
                else:
                    batch.append(gen)
            self._generating = len(batch)  # counted from the moment they leave the queue
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                with self.lock, torch.inference_mode():
                    self._decode(batch)
            except Exception as err:  # a failed batch fails its requests, not the server
                logger.exception("generation failed for a batch of %d", len(batch))
                for gen in batch:
                    if gen.finish_reason is None:
                        gen.finish_reason = "error"
                        gen.sink("error", f"generation failed: {type(err).__name__}: {err}")
            finally:
                self._generating = 0

    def _finish(self, gen: Generation, reason: str) -> None:
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        finish(gen, reason)

    def _decode(self, batch: list[Generation]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        device = next(self.model.parameters()).device
        width = max(len(g.input_ids) for g in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, gen in enumerate(batch):  # left padding: every row's next token lands in the last column
            ids[row, width - len(gen.input_ids) :] = torch.tensor(gen.input_ids)
            mask[row, width - len(gen.input_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = list(batch)
        rngs = [torch.Generator().manual_seed(g.seed) if g.seed is not None else None for g in rows]
        from transformers import DynamicCache

        cache = DynamicCache()
        step_ids, step_positions = ids, positions
        while rows:
            self._generating = len(rows)
            extra = {"adapter_names": [self._row_adapter(g) for g in rows]} if self.is_peft else {}
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
            logits = out.logits[:, -1, :].float().cpu()
            keep, next_ids = [], []
            for row, gen in enumerate(rows):
                if gen.cancelled.is_set():
                    self._finish(gen, "cancelled")
                    continue
                token = self._pick(logits[row], gen, rngs[row])
                self.stats["tokens"] += 1
                if not self._append(gen, token):
                    keep.append(row)
                    next_ids.append(token)
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows, rngs = [rows[k] for k in keep], [rngs[k] for k in keep]
            step_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            step_positions = positions

    def _row_adapter(self, gen: Generation) -> str:
        return BASE_ROW if gen.adapter == self.base_name else gen.adapter

    @staticmethod
    def _pick(logits: torch.Tensor, gen: Generation, rng: torch.Generator | None) -> int:
        if gen.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / gen.temperature, dim=-1)
        if gen.top_p < 1:  # nucleus: the fewest most likely tokens whose mass reaches top_p
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= gen.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=rng))

    def _append(self, gen: Generation, token: int) -> bool:
        """Add a token to a row; True when the row is finished (and its sink told so)."""
        reason = take_token(gen, token, self.tokenizer, self.eos_ids)
        if reason is not None:
            self._finish(gen, reason)
        return reason is not None


def take_token(gen: Generation, token: int, tokenizer, eos_ids: set[int]) -> str | None:
    """Add a generated token to `gen` (every engine's text rules: end of turn, stop strings, max_new_tokens) and pass
    on the text that is final; the finish reason ("stop", "length") when this token ends it, else None."""
    gen.tokens.append(token)
    if token in eos_ids:
        return "stop"
    text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in gen.stop) if i >= 0]
    if hits:
        gen.text = text[: min(hits)]
        return "stop"
    gen.text = text
    if len(gen.tokens) >= gen.max_new_tokens:
        return "length"
    # Hold back what could still become a stop string, and a half-decoded character (U+FFFD).
    ready = len(text) - max((len(s) - 1 for s in gen.stop), default=0)
    while ready > gen.sent and text[ready - 1] == "\ufffd":
        ready -= 1
    if ready > gen.sent:
        gen.sink("delta", text[gen.sent : ready])
        gen.sent = ready
    return None


def finish(gen: Generation, reason: str) -> None:
    """Pass on the text not yet sent (unless cancelled), then tell the sink the generation is done."""
    gen.finish_reason = reason
    # A character whose bytes max_new_tokens (or the end of turn) cut off never completes: the answer does not end
    # in U+FFFD (stored by the request log, it would fail validation as training data)
    gen.text = gen.text.rstrip("\ufffd")
    gen.sent = min(gen.sent, len(gen.text))
    if reason != "cancelled" and gen.sent < len(gen.text):
        gen.sink("delta", gen.text[gen.sent :])
        gen.sent = len(gen.text)
    gen.sink("done", reason)
