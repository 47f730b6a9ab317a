"""Serving: load a model version's adapters once, answer chat requests, switch adapters per request.

Used by pipelines/serve_pipeline.py (a ZenML deployment: its `on_init` hook calls `load_served_model`,
each `POST /invoke` runs `steps/chat.py:chat`, which calls `answer`; core/serving/openai/routes.py serves the OpenAI
endpoints) and by benchmarks/serve_latency.py. Generation itself is one engine per server: core/serving/batching.py's
BatchEngine (`engine: transformers`, batching whatever requests arrive together), or core/serving/llamacpp_engine.py's
LlamaCppEngine (`engine: llama_cpp`: llama.cpp's llama-server as a child process, on GGUF files; only the tokenizer
is loaded here, to render prompts as training did).

What gets loaded, from the ZenML Model version named by `ServeConfig` (`model_name` at `stage`, or `version`):
- load: adapters (default): the base model once, plus every adapter artifact linked to that version, each
  under its own peft adapter name: the artifact `adapter` (the single-task pipeline) as `default`, and
  `adapter_<task>` (one per task) as `<task>`. A request picks one by name; in a batch each row gets its own
  (peft's mixed-adapter batches), nothing is reloaded. The name `base` answers with no adapter.
- load: merged: the version's `merged_model` artifact (adapter folded into fp16/bf16 weights), served as `merged`.

The base model is, in order: `ServeConfig.base` when set; else the `model` parameter (a ModelSource) of the
step that produced the adapter; else the `base_model_name_or_path` recorded in the adapter's adapter_config.json.

Prompts are rendered exactly as training rendered them (core/prompts.py: the chat template, or Alpaca
for models without one, and the same system prompt option), so served answers follow the trained format.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, model_validator

from core import artifact_names, models
from core.config import ModelSource, StrictModel
from core.feedback.config import RequestLogConfig
from core.prompts import check_template
from core.serving.batching import BatchEngine, Engine, Generation

ADAPTER_ARTIFACT = artifact_names.ADAPTER  # single-task pipeline output (steps/train.py)
ADAPTER_PREFIX = artifact_names.for_task(artifact_names.ADAPTER, "")  # multi-task outputs: adapter_<task>
MERGED_ARTIFACT = artifact_names.MERGED_MODEL  # steps/merge.py output
GGUF_ARTIFACT = (
    artifact_names.GGUF_MODEL
)  # steps/export_gguf.py output: the merged model as GGUF (engine llama_cpp, load merged)
DEFAULT_ADAPTER = "default"  # served name of the artifact `adapter`
MERGED_ADAPTER = "merged"  # served name of the merged model (load: merged)
BASE_ADAPTER = "base"  # served name of the base with every adapter disabled (load: adapters)


class ServeConfig(StrictModel):
    """What the serving deployment loads and how it answers (configs/serve.yaml: `on_init_kwargs.config`)."""

    # The ZenML Model whose version is served (`model.name` of the training config).
    model_name: str = "smollm2-acme-support"
    # Stage of the version to serve; ignored when `version` is set. latest: the newest version, any stage.
    stage: Literal["staging", "production", "latest"] = "staging"
    # A version number or name to serve instead of a stage (pins exactly what runs; no surprise on promotion).
    version: int | str | None = None
    # adapters: base + every adapter of the version, switchable per request (one base in memory for all tasks);
    # merged: the version's merged_model, one fixed adapter, no LoRA overhead per token.
    load: Literal["adapters", "merged"] = "adapters"
    # Base model override; None: the ModelSource the adapter was trained on (see module docstring).
    base: ModelSource | None = None
    # Adapter used when a request names none; None: "default" if loaded, else the first task name in sorted order.
    default_adapter: str | None = None
    # Prompt rendering: keep these equal to the training config's `prompt:` block, or answers drift in format.
    # auto / chat / alpaca, or a template string such as "### Question: {instruction}\n### Answer: "
    template: Annotated[str, AfterValidator(check_template)] = "auto"
    system_prompt: str | None = None
    # Per-adapter system prompt (adapter name -> text), for tasks trained with their own; overrides system_prompt.
    system_prompts: dict[str, str] = Field(default_factory=dict)
    # Weights dtype. auto: bf16 on a CUDA GPU that supports it, else fp32 (bf16 on CPU is ~20x slower).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 4-bit NF4 base (bitsandbytes), adapters mode only: ~0.5 byte/param instead of 2 (bf16), but every matmul
    # dequantizes first, so each token costs more compute. For a GPU too small for the 16-bit base.
    load_in_4bit: bool = False
    # Largest max_new_tokens a request may ask for (tokens): bounds the time one request can hold the model.
    max_new_tokens_limit: int = Field(512, ge=1)
    # Largest sampling temperature accepted; 0 means greedy (deterministic).
    max_temperature: float = Field(2.0, gt=0)
    # Prompt + max_new_tokens must fit here (tokens); None: the model's max_position_embeddings.
    context_length: int | None = Field(None, ge=8)
    # Requests generated together (rows of one batch; core/serving/batching.py). More rows: more tokens/s in total on the
    # same cores, but each row's tokens come slower. 1: one request at a time.
    max_batch_size: int = Field(8, ge=1)
    # Requests that may wait for a batch (llama_cpp: for a slot); beyond that a request is refused at once (HTTP 503,
    # retry) rather than queued behind minutes of work.
    max_queued_requests: int = Field(32, ge=1)
    # Milliseconds the engine waits after the first request of a batch for others sent at the same time.
    batch_wait_ms: float = Field(20.0, ge=0, le=1000)
    # Who generates. transformers: the batch engine above, in this process (any base, 4-bit, GPU). llama_cpp:
    # llama.cpp's llama-server as a child process on loopback, on the version's GGUF with each adapter as a GGUF
    # LoRA (core/serving/llamacpp_engine.py): several times the tokens/s on CPU (docs/serving.md); needs
    # `make gguf-setup`.
    engine: Literal["transformers", "llama_cpp"] = "transformers"
    # llama_cpp: the GGUF type served (the version's gguf_model file of that type, else made on first deploy).
    # f16 answers token for token as transformers does; q8_0 is ~half the bytes per token read, nearly the same.
    gguf_type: Literal["f16", "q8_0", "q4_k_m"] = "q8_0"
    # llama_cpp: llama-server's slots (requests generated together, continuous batching); None: max_batch_size.
    parallel: int | None = Field(None, ge=1)
    # llama_cpp: llama-server's KV cache in tokens, shared by all slots (each gets ctx_size / parallel);
    # None: context_length x parallel, so every slot holds a whole context.
    ctx_size: int | None = Field(None, ge=64)
    # The request log (core/feedback/requestlog.py, docs/serving.md): every completion served is recorded, and
    # POST /v1/feedback rates or corrects it. false: nothing is recorded and the feedback routes answer 404.
    log_requests: bool = Field(True, description="Record every completion served; false turns the log off.")
    request_log: RequestLogConfig = Field(
        default_factory=RequestLogConfig, description="Where completions are recorded, redaction, retention, buffer."
    )

    @model_validator(mode="after")
    def _4bit_only_with_adapters(self) -> ServeConfig:
        if self.load == "merged" and self.load_in_4bit:
            raise ValueError("load_in_4bit applies to load: adapters (the merged model loads in `dtype`)")
        if self.engine == "llama_cpp" and self.load_in_4bit:
            raise ValueError("load_in_4bit applies to engine: transformers (llama_cpp serves gguf_type)")
        return self

    @property
    def slots(self) -> int:
        """llama-server's --parallel."""
        return self.parallel or self.max_batch_size


class ServeLoadError(RuntimeError):
    """The deployment cannot load what the config names (no such model version, no adapters, mixed bases)."""


class ServeRequestError(ValueError):
    """A bad request: the message says which field and why; the server keeps serving."""


def served_name(artifact_name: str) -> str | None:
    """Adapter name a request uses for an artifact: `adapter` -> default, `adapter_<task>` -> <task>; else None."""
    if artifact_name == ADAPTER_ARTIFACT:
        return DEFAULT_ADAPTER
    if artifact_name.startswith(ADAPTER_PREFIX) and len(artifact_name) > len(ADAPTER_PREFIX):
        return artifact_name[len(ADAPTER_PREFIX) :]
    return None


def source_from_adapter_config(adapter_dir: Path) -> ModelSource:
    """The base recorded by peft in adapter_config.json: the bundled name, a local folder, or a Hub id."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise ServeLoadError(f"{adapter_dir}: no adapter_config.json; is this a peft adapter folder?")
    name = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not name:
        raise ServeLoadError(f"{cfg_file}: no base_model_name_or_path; set `base` in the serve config")
    if name == models.BUNDLED_NAME:
        return ModelSource(source="bundled")
    if Path(name).is_dir():
        return ModelSource(source="local", name=name)
    return ModelSource(source="hub", name=name)


# ---------------------------------------------------------------------------------------------------------------
# Finding the model version and its artifacts in ZenML
# ---------------------------------------------------------------------------------------------------------------


def find_model_version(cfg: ServeConfig):
    """The ZenML model version to serve, or a ServeLoadError that says how to get one."""
    from zenml.client import Client
    from zenml.enums import ModelStages

    wanted = cfg.version if cfg.version is not None else ModelStages(cfg.stage)
    try:
        return Client().get_model_version(cfg.model_name, wanted)
    except KeyError:
        what = f"no version {cfg.version}" if cfg.version is not None else f"no version at stage '{cfg.stage}'"
        raise ServeLoadError(
            f"ZenML model '{cfg.model_name}' has {what}. Train one (zenml pipeline run pipelines.lora_pipeline "
            f"-c configs/default.yaml promotes to staging when it passes the gate), promote one "
            f"(zenml model version update {cfg.model_name} <version> --stage {cfg.stage}), or set `version`."
        ) from None


def linked_artifacts(model_version) -> dict[str, Any]:
    """Newest artifact version per name among the model artifacts (ArtifactType.MODEL) linked to the version."""
    from zenml.client import Client
    from zenml.enums import ArtifactType
    from zenml.utils.pagination_utils import depaginate

    found: dict[str, Any] = {}
    for av in depaginate(
        Client().list_artifact_versions, model_version_id=model_version.id, type=ArtifactType.MODEL, hydrate=True
    ):
        if av.name not in found or av.created > found[av.name].created:
            found[av.name] = av
    return found


def producer_model_source(artifact_version) -> ModelSource | None:
    """The base the artifact's producing step loaded: its `base` parameter (a core.models.BaseModelRef), or the
    `model` parameter (a ModelSource) of steps from before the base was a typed reference; None if neither."""
    from zenml.client import Client

    step_id = getattr(artifact_version, "producer_step_run_id", None)
    if step_id is None:
        return None
    parameters = Client().get_run_step(step_id).config.parameters
    base = parameters.get("base")
    raw = base.get("source") if isinstance(base, dict) else parameters.get("model")
    return ModelSource.model_validate(raw) if isinstance(raw, dict) else None


def materialize(artifact_version) -> Path:
    """A local copy of a folder artifact (ModelFolder)."""
    import materializers  # noqa: F401  (registers the folder materializer)

    return Path(artifact_version.load().path)


# ---------------------------------------------------------------------------------------------------------------
# The loaded model and per-request generation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """Everything one server holds in memory: built once (on_init), shared by every request."""

    model: Any  # a peft PeftModel (adapters) or a plain transformers model (merged)
    tokenizer: Any
    adapters: list[str]  # names a request may use (sorted), `base` included in adapters mode
    default_adapter: str
    prompt_format: str  # "chat", "alpaca" or the user's template string, as format_prompts decided for training
    context_length: int
    config: ServeConfig
    info: dict[str, Any] = field(default_factory=dict)  # model version, base, artifact ids, load seconds
    # Held by the batch engine while it generates: nothing else may change the model (set_adapter) meanwhile.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The engine every request goes through: a BatchEngine made on first use, or (engine: llama_cpp) the
    # LlamaCppEngine started at load.
    _engine: Engine | None = None
    # Where every completion served is recorded (core/feedback/requestlog.py's RequestLog); None: log_requests off.
    request_log: Any = None

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def engine(self) -> Engine:
        """The one engine every request of this server goes through (the batch engine starts on first use)."""
        if self._engine is None:
            cfg = self.config
            self._engine = BatchEngine(
                self.model,
                self.tokenizer,
                self.lock,
                is_peft=self.is_peft,
                base_name=BASE_ADAPTER,
                max_batch_size=cfg.max_batch_size,
                max_queue=cfg.max_queued_requests,
                batch_wait_ms=cfg.batch_wait_ms,
            )
        return self._engine


def build_served_model(
    cfg: ServeConfig,
    base: ModelSource | None,
    adapter_dirs: dict[str, Path] | None = None,
    merged_dir: Path | None = None,
    info: dict[str, Any] | None = None,
    gguf_file: Path | None = None,
) -> ServedModel:
    """Load the base with each adapter under its name (or the merged folder). Plain function: no ZenML needed.
    engine llama_cpp: start llama-server on their GGUF files instead (`gguf_file`: the merged model's, if made)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.config import QuantConfig
    from core.prompts import prompt_format

    if cfg.engine == "llama_cpp":
        return build_llamacpp_served_model(cfg, base, adapter_dirs, merged_dir, info, gguf_file)
    started = time.perf_counter()
    dtype = models.compute_dtype(cfg.dtype)
    if merged_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype)
        if torch.cuda.is_available():
            model = model.to(torch.cuda.current_device())
        names = [MERGED_ADAPTER]
    else:
        if not adapter_dirs:
            raise ServeLoadError("no adapters to serve")
        if base is None:
            raise ServeLoadError("no base model: set `base` in the serve config")
        if BASE_ADAPTER in adapter_dirs:
            raise ServeLoadError(f"an adapter may not be named '{BASE_ADAPTER}' (reserved for the bare base model)")
        tokenizer = models.load_tokenizer(base)
        quant = QuantConfig(load_in_4bit=True, compute_dtype=cfg.dtype) if cfg.load_in_4bit else None
        base_model = models.load_base(base, quant=quant, dtype=dtype)
        first, *rest = sorted(adapter_dirs)
        model = PeftModel.from_pretrained(base_model, str(adapter_dirs[first]), adapter_name=first)
        for name in rest:
            model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        names = sorted([*adapter_dirs, BASE_ADAPTER])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    default = default_adapter(cfg, names)
    context = cfg.context_length or getattr(model.config, "max_position_embeddings", None)
    context = context or tokenizer.model_max_length
    fmt = prompt_format(tokenizer, cfg.template)
    facts = {"dtype": str(dtype).replace("torch.", "")}
    return _loaded(cfg, model, tokenizer, names, default, fmt, int(context), info, started, facts)


def default_adapter(cfg: ServeConfig, names: list[str]) -> str:
    """The adapter a request without `model` gets; checks the config's adapter names against those loaded."""
    own = [n for n in names if n != BASE_ADAPTER]  # never `base` by default: the point is the adapters
    default = cfg.default_adapter or (DEFAULT_ADAPTER if DEFAULT_ADAPTER in own else own[0])
    if default not in names:
        raise ServeLoadError(f"default_adapter '{default}' is not loaded; loaded: {', '.join(names)}")
    unknown = sorted(set(cfg.system_prompts) - set(names))
    if unknown:
        raise ServeLoadError(f"system_prompts names adapters that are not loaded: {unknown}; loaded: {names}")
    return default


def local_model_dir(src: ModelSource) -> Path:
    """The base's HF folder on disk (llama.cpp's converters read files): local, bundled, or the Hub's cached copy."""
    where = models.resolve_model(src)
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(where, revision=src.revision))


def build_llamacpp_served_model(
    cfg: ServeConfig,
    base: ModelSource | None,
    adapter_dirs: dict[str, Path] | None = None,
    merged_dir: Path | None = None,
    info: dict[str, Any] | None = None,
    gguf_file: Path | None = None,
) -> ServedModel:
    """engine llama_cpp: the tokenizer here (prompts rendered as training rendered them), the weights in llama-server
    (core/serving/llamacpp_engine.py): the model as a `gguf_type` GGUF (`gguf_file`, else made once from the HF
    folder), each adapter as a GGUF LoRA."""
    from transformers import AutoConfig, AutoTokenizer

    from core.prompts import prompt_format
    from core.serving import llamacpp_engine

    started = time.perf_counter()
    if merged_dir is not None:
        model_dir, names, adapter_dirs = Path(merged_dir), [MERGED_ADAPTER], {}
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    else:
        if not adapter_dirs:
            raise ServeLoadError("no adapters to serve")
        if base is None:
            raise ServeLoadError("no base model: set `base` in the serve config")
        if BASE_ADAPTER in adapter_dirs:
            raise ServeLoadError(f"an adapter may not be named '{BASE_ADAPTER}' (reserved for the bare base model)")
        model_dir, names = local_model_dir(base), sorted([*adapter_dirs, BASE_ADAPTER])
        tokenizer = models.load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    default = default_adapter(cfg, names)
    fmt = prompt_format(tokenizer, cfg.template)
    context = cfg.context_length or getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    context = int(context or tokenizer.model_max_length)
    ctx_size = cfg.ctx_size or context * cfg.slots
    context = min(context, ctx_size // cfg.slots)  # each slot holds ctx_size / parallel tokens
    if gguf_file is None:
        probe = ServedModel(None, tokenizer, names, default, fmt, context, cfg)
        checks = [prompt_ids(probe, q, default) for q in llamacpp_engine.CHECK_QUESTIONS]
        gguf_file = llamacpp_engine.model_gguf(model_dir, cfg.gguf_type, checks)
    loras = {name: llamacpp_engine.lora_gguf(folder, model_dir) for name, folder in adapter_dirs.items()}
    engine = llamacpp_engine.LlamaCppEngine(
        gguf_file,
        loras,
        slots=cfg.slots,
        ctx_size=ctx_size,
        max_queue=cfg.max_queued_requests,
    ).start()
    facts = {"engine": "llama_cpp", "gguf": str(gguf_file), "gguf_type": cfg.gguf_type, "llama_server_pid": engine.pid}
    return _loaded(cfg, None, tokenizer, names, default, fmt, context, info, started, facts, engine)


def _loaded(
    cfg, model, tokenizer, names, default, fmt, context: int, info, started: float, facts: dict, engine=None
) -> ServedModel:
    """The ServedModel either engine loaded, its info extended with what was loaded and how long it took (s)."""
    info = {
        **(info or {}),
        "adapters": names,
        "default_adapter": default,
        **facts,
        "context_length": context,
        "load_seconds": round(time.perf_counter() - started, 2),
        "loaded_at": int(time.time()),
    }
    return ServedModel(
        model=model,
        tokenizer=tokenizer,
        adapters=names,
        default_adapter=default,
        prompt_format=fmt,
        context_length=context,
        config=cfg,
        info=info,
        _engine=engine,
    )


def load_served_model(cfg: ServeConfig) -> ServedModel:
    """Find the model version in ZenML, fetch its adapters (or merged model), load them once."""
    version = find_model_version(cfg)
    artifacts = linked_artifacts(version)
    where = f"model '{cfg.model_name}' version {version.name}"
    info: dict[str, Any] = {"model_name": cfg.model_name, "model_version": version.name, "stage": version.stage}
    if cfg.load == "merged":
        if MERGED_ARTIFACT not in artifacts:
            raise ServeLoadError(
                f"{where} has no '{MERGED_ARTIFACT}' artifact (model artifacts: {sorted(artifacts) or 'none'}); "
                "serve its adapters instead (load: adapters)"
            )
        info["artifacts"] = {MERGED_ADAPTER: str(artifacts[MERGED_ARTIFACT].id)}
        gguf_file = None
        if cfg.engine == "llama_cpp" and GGUF_ARTIFACT in artifacts:  # the export step's file, if of that type
            from core.serving.llamacpp_engine import gguf_of_type

            gguf_file = gguf_of_type(materialize(artifacts[GGUF_ARTIFACT]), cfg.gguf_type)
            if gguf_file is not None:
                info["artifacts"][GGUF_ARTIFACT] = str(artifacts[GGUF_ARTIFACT].id)
        merged_dir = materialize(artifacts[MERGED_ARTIFACT])
        return build_served_model(cfg, None, merged_dir=merged_dir, info=info, gguf_file=gguf_file)

    chosen: dict[str, Any] = {}
    for artifact_name, av in sorted(artifacts.items()):
        name = served_name(artifact_name)
        if name is None:
            continue
        if name in chosen:
            raise ServeLoadError(
                f"{where}: artifacts '{chosen[name].name}' and '{artifact_name}' both serve as '{name}'"
            )
        chosen[name] = av
    if not chosen:
        raise ServeLoadError(
            f"{where} has no adapter artifacts (named '{ADAPTER_ARTIFACT}' or '{ADAPTER_PREFIX}<task>'); "
            f"its model artifacts: {sorted(artifacts) or 'none'}"
        )
    dirs = {name: materialize(av) for name, av in chosen.items()}
    base = cfg.base
    if base is None:
        sources = {}
        for name, av in chosen.items():
            src = producer_model_source(av) or source_from_adapter_config(dirs[name])
            sources[name] = src
        distinct = {s.model_dump_json() for s in sources.values()}
        if len(distinct) > 1:
            detail = ", ".join(f"{n}: {s.source}:{s.name or ''}" for n, s in sorted(sources.items()))
            raise ServeLoadError(f"{where}: adapters were trained on different bases ({detail}); serve one base")
        base = next(iter(sources.values()))
    info["base"] = base.model_dump()
    info["artifacts"] = {name: str(av.id) for name, av in chosen.items()}
    return build_served_model(cfg, base, adapter_dirs=dirs, info=info)


def check_request(
    served: ServedModel, prompt: Any, adapter: Any, max_new_tokens: Any, temperature: Any
) -> tuple[str, str, int, float]:
    """Validate one request's fields; returns (prompt, adapter name, max_new_tokens, temperature)."""
    cfg = served.config
    if not isinstance(prompt, str):
        raise ServeRequestError(f"prompt: must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ServeRequestError("prompt: must not be empty")
    if adapter is None or adapter == "":
        adapter = served.default_adapter
    if not isinstance(adapter, str):
        raise ServeRequestError(f"adapter: must be a string, got {type(adapter).__name__}")
    if adapter not in served.adapters:
        raise ServeRequestError(f"adapter: unknown adapter '{adapter}'; known adapters: {', '.join(served.adapters)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ServeRequestError(f"max_new_tokens: must be an integer, got {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= cfg.max_new_tokens_limit:
        raise ServeRequestError(
            f"max_new_tokens: must be between 1 and {cfg.max_new_tokens_limit} (max_new_tokens_limit), "
            f"got {max_new_tokens}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ServeRequestError(f"temperature: must be a number, got {temperature!r}")
    if not 0 <= temperature <= cfg.max_temperature:
        raise ServeRequestError(
            f"temperature: must be between 0 (greedy) and {cfg.max_temperature} (max_temperature), got {temperature}"
        )
    return prompt, adapter, max_new_tokens, float(temperature)


def conversation_ids(served: ServedModel, messages: list[dict], adapter: str) -> list[int]:
    """Token ids of the generation prompt for a conversation, rendered as format_prompts rendered training prompts:
    the adapter's system prompt first unless the conversation brings its own."""
    from core.prompts import render_prompt, with_system

    system = served.config.system_prompts.get(adapter, served.config.system_prompt)
    text = render_prompt(with_system(messages, system), served.tokenizer, served.prompt_format)
    # The chat template carries its own special tokens; Alpaca adds BOS if the tokenizer uses one (as in training).
    return served.tokenizer(text, add_special_tokens=served.prompt_format != "chat")["input_ids"]


def prompt_ids(served: ServedModel, prompt: str, adapter: str) -> list[int]:
    """Token ids of the generation prompt for one user message."""
    return conversation_ids(served, [{"role": "user", "content": prompt}], adapter)


@dataclass
class ChatRequest:
    """A request that passed every check: ready to generate."""

    adapter: str
    input_ids: list[int]
    max_new_tokens: int
    temperature: float


def validate_request(
    served: ServedModel, prompt: Any, adapter: Any = "", max_new_tokens: Any = 128, temperature: Any = 0.0
) -> ChatRequest:
    """Every check a request must pass (fields, adapter, context length); ServeRequestError says what failed."""
    prompt, adapter, max_new_tokens, temperature = check_request(served, prompt, adapter, max_new_tokens, temperature)
    ids = prompt_ids(served, prompt, adapter)
    if len(ids) + max_new_tokens > served.context_length:
        raise ServeRequestError(
            f"prompt: {len(ids)} tokens (after the chat template) + max_new_tokens {max_new_tokens} exceeds the "
            f"context length of {served.context_length} tokens; shorten the prompt or lower max_new_tokens"
        )
    return ChatRequest(adapter=adapter, input_ids=ids, max_new_tokens=max_new_tokens, temperature=temperature)


def answer(
    served: ServedModel, prompt: Any, adapter: Any = "", max_new_tokens: Any = 128, temperature: Any = 0.0
) -> dict[str, Any]:
    """One chat turn: {answer, adapter, prompt_tokens, completion_tokens}; ServeRequestError on a bad request."""
    req = validate_request(served, prompt, adapter, max_new_tokens, temperature)
    gen = served.engine.generate(
        Generation(
            adapter=req.adapter,
            input_ids=req.input_ids,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
        )
    )
    return {
        "answer": gen.text.strip(),
        "adapter": req.adapter,
        "prompt_tokens": len(req.input_ids),
        "completion_tokens": gen.generated,
    }
