"""Print what the latest lora_pipeline run produced: scores, artifacts, where to look.

python -m cli.summary            # `make run` calls this after the run
"""

from __future__ import annotations

from zenml.client import Client

from core.artifact_names import (
    ADAPTER,
    EVAL_REPORT,
    MERGED_MODEL,
    MIXED_TRAIN_DATASET,
    PROMOTION,
    PUSH_RESULT,
    SWEEP_TABLE,
    TRAIN_METRICS,
    UPLOAD_BUNDLE,
)


def candidates(run) -> list[str]:
    """The run's candidates by step suffix: "" for a single run, the task names, or the sweep points, in run order."""
    names = [name for name in run.steps if name == "train" or name.startswith("train_")]
    return [name[len("train") :].lstrip("_") for name in names]


def named_output(steps, step: str, fragment: str):
    """`step`'s output whose name holds `fragment` (train_metrics_support, sweep_eval_report_r8, ...), loaded."""
    if step not in steps:
        return None
    for name, artifacts in steps[step].outputs.items():
        if fragment in name:
            return artifacts[0].load()
    return None


def train_lines(m) -> list[str]:
    lines = [
        f"  train: {m.steps} steps, {m.train_tokens} tokens in {m.seconds:.0f} s ({m.tokens_per_s:.1f} tokens/s), "
        f"final loss {m.final_train_loss:.3f}, {m.trainable_params:,} trainable params"
    ]
    if m.resumed_from_step:  # train.checkpoint_dir held this run's checkpoints from an earlier attempt
        lines.append(
            f"  (resumed from checkpoint step {m.resumed_from_step}: tokens, time and loss count this attempt only)"
        )
    return lines


def evaluate_lines(r) -> list[str]:
    lines = [f"  evaluate on {r.eval_rows} held-out rows:      base -> fine-tuned"]
    for metric in ("loss", "perplexity", "rouge_l", "exact_match", "bleu"):
        base, tuned = getattr(r.base, metric, None), getattr(r.tuned, metric, None)
        if base is not None and tuned is not None:
            lines.append(f"    {metric:<12} {base:>10.3f} -> {tuned:.3f}")
    for metric, d in getattr(r, "differences", {}).items():
        lines.append(f"    {metric + ' change':<19} {d.delta:+.3f}  (95% CI {d.low:+.3f} to {d.high:+.3f})")
    if getattr(r, "general_base", None) is not None:  # the forgetting check
        lines.append(f"  general-ability probe, {r.general_rows} rows:  base -> fine-tuned")
        for metric in ("loss", "rouge_l", "exact_match"):
            base, tuned = getattr(r.general_base, metric), getattr(r.general_tuned, metric)
            lines.append(f"    {metric:<12} {base:>10.3f} -> {tuned:.3f}")
    lines.append(f"  quality gate vs {r.reference_name}: {'passed' if r.gate_passed else 'FAILED'}")
    return lines


def mixture_lines(steps) -> list[str]:
    """What each mix_data step drew (its dataset's metadata), one line per mix."""
    lines = []
    for name, step in steps.items():
        if not name.startswith("mix_data"):
            continue
        meta = step.outputs[MIXED_TRAIN_DATASET][0].run_metadata
        drawn = ", ".join(f"{v['rows']} {k}" for k, v in (meta.get("sources") or {}).items())
        lines.append(f"  {name}: {meta.get('rows')} training rows = {meta.get('task_rows')} task + {drawn}")
    return lines


def summarize(run) -> str:
    steps = run.steps
    lines = [f"lora_pipeline run {run.name} ({run.id}): {run.status}"]
    lines += mixture_lines(steps)

    def output(step: str, name: str):
        if step not in steps or name not in steps[step].outputs:
            return None
        return steps[step].outputs[name][0]

    several = candidates(run) != [""]
    for name in candidates(run):
        if several:
            lines.append(f"{'task' if 'summarize_tasks' in steps else 'sweep point'} {name}:")
        suffix = f"_{name}" if name else ""
        if m := named_output(steps, f"train{suffix}", TRAIN_METRICS):
            lines += train_lines(m)
        if r := named_output(steps, f"evaluate{suffix}", EVAL_REPORT):
            lines += evaluate_lines(r)
    if art := output("select_best", SWEEP_TABLE):
        lines.append(f"  sweep: {art.load().best} went on to merge and push")
    for step, name in (("merge", MERGED_MODEL), ("push", UPLOAD_BUNDLE), ("train", ADAPTER)):
        if art := output(step, name):
            lines.append(f"  {name}: {art.uri}")
    if art := output("push", PUSH_RESULT):
        p = art.load()
        lines.append(
            f"  push ({p.mode}): {len(p.files)} files, {p.total_bytes / 1e6:.1f} MB"
            + (f", commit {p.commit_url}" if p.commit_url else "")
        )
    if art := output("promote", PROMOTION):
        p = art.load()
        lines.append(f"  promotion: {p.stage or 'not promoted'} ({p.reason})")
    if run.model_version:
        mv = run.model_version
        lines.append(f"  model version: {mv.model.name} #{mv.number} (stage: {mv.stage or 'none'})")
    lines.append("  dashboard: zenml login --local   (or: make dashboard), then open the run above")
    return "\n".join(lines)


def main() -> None:
    run = Client().get_pipeline("lora_pipeline").last_run
    print(summarize(run))


if __name__ == "__main__":
    main()
