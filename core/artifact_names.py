"""Every artifact name the pipelines store, in one place: the steps' output names, and what reads them back.

These strings are stored in users' ZenML databases (artifact names, model-version links, lineage): renaming one
orphans every earlier run's artifact of that name, so a value never changes. Steps name their outputs with these
(`Annotated[..., RAW_DATASET]`); serving, the task summary and cli.summary find artifacts by the same constants.

A train or evaluate step names its outputs per candidate (core.config.Candidate): `adapter` in a single run,
`adapter_<task>` for a task (for_task), `sweep_adapter_<point>` for a sweep point (for_point). The step's
annotation is the template ZenML fills from the step's `substitutions` (per_candidate).
"""

from __future__ import annotations

# data preparation
RAW_DATASET = "raw_dataset"  # ingest: the source rows mapped into the canonical schema (id, split, messages)
CLEAN_DATASET = "clean_dataset"  # validate: the rows that passed (all of them, or the survivors of policy drop)
VALIDATION_REPORT = "validation_report"  # validate: every expectation's result (HTML)
TRAIN_DATASET = "train_dataset"  # format_prompts: the rendered, tokenized training rows
EVAL_DATASET = "eval_dataset"  # format_prompts: the rendered, tokenized held-out rows
GENERAL_DATASET = "general_dataset"  # load_probe: the general-ability probe, scored for forgetting
SOURCE_DATASET = "source_dataset"  # format_source: one mixed-in source's rows, rendered and tokenized
REHEARSAL_DATASET = "rehearsal_dataset"  # synthesize_rehearsal: replay prompts with the base model's own answers
MIXED_TRAIN_DATASET = "mixed_train_dataset"  # mix_data: the task's training rows plus the mixed-in sources
PREFERENCE_TRAIN = "preference_train"  # format_preference: the preference stage's rows as trl reads them
PREFERENCE_EVAL = "preference_eval"  # format_preference: the held-out preference rows

# training and evaluation: one of each per candidate (see per_candidate, for_task, for_point)
ADAPTER = "adapter"  # train: the LoRA adapter folder (also what serving loads by default)
TRAIN_METRICS = "train_metrics"  # train: loss curve, tokens/s, peak memory
EVAL_REPORT = "eval_report"  # evaluate: base vs fine-tuned scores and the quality gate's verdict

# sweep: select_best returns the best point under the single run's names above, plus these
LORA_SETTINGS = "lora_settings"  # select_best: the best point's LoRA settings
TRAIN_SETTINGS = "train_settings"  # select_best: the best point's training settings
SWEEP_TABLE = "sweep_table"  # select_best: every point side by side (HTML)

# multitask
TASK_SUMMARY = "task_summary"  # summarize_tasks: every task adapter's scores side by side (HTML)

# the product and its release
MERGED_MODEL = "merged_model"  # merge: the adapter merged into an fp16/bf16 copy of the base (serving's load: merged)
GGUF_MODEL = "gguf_model"  # export_gguf: the GGUF file(s) and the Ollama Modelfile
UPLOAD_BUNDLE = "upload_bundle"  # push: the folder uploaded to the Hub (or that would be, in dry_run)
PUSH_RESULT = "push_result"  # push: what was uploaded where (files, commit, pull request)
PROMOTION = "promotion"  # promote: the stage asked for, the stage reached, and why
MODEL_HISTORY = "model_history"  # promote: every version of the model, oldest first

# serving: the chat step's outputs, the `outputs` of a deployment's response
ANSWER = "answer"  # chat: the generated text
ADAPTER_NAME = "adapter_name"  # chat: the adapter that answered (not "adapter": that is the training artifact)
PROMPT_TOKENS = "prompt_tokens"  # chat: tokens in the rendered prompt
COMPLETION_TOKENS = "completion_tokens"  # chat: tokens generated

SWEEP_PREFIX = "sweep_"  # a sweep point's outputs: sweep_<name>_<point>


def for_task(name: str, task: str) -> str:
    """A task's own output in a multitask run: for_task(ADAPTER, "support") -> "adapter_support"."""
    return f"{name}_{task}"


def for_point(name: str, point: str) -> str:
    """A sweep point's own output: for_point(ADAPTER, "r8") -> "sweep_adapter_r8"."""
    return f"{SWEEP_PREFIX}{name}_{point}"


def per_candidate(name: str) -> str:
    """A train/evaluate output's name template, filled by the step's substitutions: "{prefix}adapter{suffix}"."""
    return "{prefix}" + name + "{suffix}"
