"""The feedback loop on the bundled model: the staging version answers users, a reviewer corrects it, the retrain
run learns from the corrections, and the held-out score on those questions rises.

    make run                                         # once: a staging version of smollm2-acme-support (~8 min)
    python benchmarks/feedback_loop.py --json feedback-loop.json   # ~25 min on 2 CPU cores

In the current ZenML store (ZENML_CONFIG_PATH, as `make run` uses it), one step after another:
1. `configs/serve.yaml` deployed with ZenML's local deployer on 127.0.0.1 (the staging version, its request log in
   the model's default feedback store), under its own deployment name, removed at the end.
2. The `openai` client asks the 70 questions of data/acme_feedback/questions.jsonl (users after launch: 60 about 20
   policies the training data never had, 10 about known ones), greedily, 8 at a time, and the 20 held-out
   paraphrases of data/acme_feedback/heldout.jsonl (scored, never rated).
3. A scripted reviewer rates every answer to a question through POST /v1/feedback: `up` when it says what the
   reference answer says (exact match after normalisation, or ROUGE-L >= 0.8), else `down` with the reference as
   the correction (source "reviewer").
4. `zenml pipeline run pipelines.lora_pipeline -c configs/retrain_from_feedback.yaml`, as shipped: the task data
   plus this feedback (SFT rows), then DPO on the correction pairs, gated; its exit status and new version kept.
5. The new version deployed the same way (pinned by number), asked the same questions again.
6. The table: exact match and ROUGE-L on the held-out paraphrases and on the asked questions, before and after;
   and `python -m cli.trace` of one corrected answer (it names both versions).
Scores: core/evaluation/scoring.py's row_scores, the pipeline's own. Nothing here is cached: every answer is new.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

DATA = common.REPO / "data" / "acme_feedback"
SERVE_CONFIG = common.REPO / "configs" / "serve.yaml"
RETRAIN_CONFIG = common.REPO / "configs" / "retrain_from_feedback.yaml"
REVIEWER = "reviewer"
MAX_TOKENS = 48  # tokens per answer; every reference answer is under 20
CLIENTS = 8  # concurrent requests: the deployment's max_batch_size
RIGHT_ROUGE = 0.8  # ROUGE-L F1 at or above which the reviewer accepts an answer that is not word for word


def load_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def deploy(name: str, version: int | None) -> str:
    """configs/serve.yaml (its stage, or `version`) deployed as `name`; the URL once /health answers."""
    import yaml
    from serve_latency import serving_stack, wait_healthy

    from pipelines.serve_pipeline import serve_pipeline

    doc = yaml.safe_load(SERVE_CONFIG.read_text())
    if version is not None:
        doc["on_init_kwargs"]["config"]["version"] = version
    doc["settings"]["deployer.local"]["port"] = None  # any free port: never a running `make serve`'s 8000
    path = Path(tempfile.mkdtemp(prefix="feedback-loop-")) / "serve.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.environ["ZENML_ACTIVE_STACK_ID"] = serving_stack()  # this process only; the store's active stack stays
    deployment = serve_pipeline.with_options(config_path=str(path)).deploy(deployment_name=name, timeout=900)
    url = deployment.url.rstrip("/")
    wait_healthy(url)
    return url


def undeploy(name: str) -> None:
    from zenml.client import Client

    try:
        Client().delete_deployment(name, force=True)
    except KeyError:
        pass


def ask(url: str, questions: list[str]) -> list[dict]:
    """Each question once through the OpenAI client, CLIENTS at a time: [{id, answer}] in question order."""
    import openai

    oa = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=2, timeout=600)

    def one(question: str) -> dict:
        reply = oa.chat.completions.create(
            model="default", messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0
        )
        return {"id": reply.id, "answer": (reply.choices[0].message.content or "").strip()}

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, questions))


def accepted(rouge_l: float, exact: bool) -> bool:
    """The reviewer's verdict on one answer (row_scores' pair for it)."""
    return exact or rouge_l >= RIGHT_ROUGE


def score(answers: list[str], references: list[str]) -> dict:
    from core.evaluation.scoring import row_scores, text_scores

    rouge_l, exact_match = text_scores(answers, references)
    return {
        "rows": len(references),
        "exact_match": round(exact_match, 3),
        "rouge_l": round(rouge_l, 3),
        "right": sum(accepted(r, e) for r, e in row_scores(answers, references)),
    }


def review(url: str, asked: list[dict], references: list[str]) -> tuple[dict, list[str]]:
    """The scripted reviewer: `up` for a right answer, else `down` with the reference as the correction. Returns
    the counts and the corrected completions' ids."""
    import openai

    from core.evaluation.scoring import row_scores

    oa = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=2, timeout=60)
    counts, corrected = {"up": 0, "corrected": 0}, []
    for reply, reference, (rouge, exact) in zip(
        asked, references, row_scores([a["answer"] for a in asked], references)
    ):
        body = {"completion_id": reply["id"], "source": REVIEWER}
        if accepted(rouge, exact):
            body["rating"] = "up"
            counts["up"] += 1
        else:
            body |= {"rating": "down", "correction": reference}
            counts["corrected"] += 1
            corrected.append(reply["id"])
        oa.post("/feedback", body=body, cast_to=object)
    return counts, corrected


def retrain(log_path: Path) -> tuple[int, float]:
    """configs/retrain_from_feedback.yaml through the zenml CLI: (exit status, seconds); output to log_path."""
    zenml = Path(sys.executable).parent / "zenml"
    env = {k: v for k, v in os.environ.items() if k != "ZENML_ACTIVE_STACK_ID"}  # the store's active stack, as make run
    start = time.monotonic()
    with log_path.open("w") as log:
        done = subprocess.run(
            [str(zenml), "pipeline", "run", "pipelines.lora_pipeline", "-c", str(RETRAIN_CONFIG)],
            cwd=common.REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return done.returncode, time.monotonic() - start


def staged_version(model: str) -> int | None:
    from zenml.client import Client

    versions = Client().list_model_versions(model=model, stage="staging", size=1).items
    return versions[0].number if versions else None


def gate_messages(model: str, version: int) -> list[str] | None:
    """The evaluate step's gate verdict, check by check (its eval_report artifact); None if it did not run."""
    from zenml.client import Client

    report = Client().get_model_version(model, version).get_data_artifact("eval_report")
    return report.load().gate_messages if report else None


def print_table(result: dict) -> None:
    head = ["questions", "rows", "EM before", "EM after", "ROUGE-L before", "ROUGE-L after"]
    rows = [
        [name, s["before"]["rows"], s["before"]["exact_match"], s["after"]["exact_match"], s["before"]["rouge_l"],
         s["after"]["rouge_l"]]
        for name, s in result["scores"].items()
    ]  # fmt: skip
    print(f"\nversion {result['served_version']} -> {result['new_version']} ({result['device']}), "
          f"retrain exit {result['retrain_exit']} in {result['retrain_s'] / 60:.1f} min, "
          f"reviewer: {result['feedback']}")  # fmt: skip
    print("\n".join(common.format_table(head, rows)))
    print("gate:\n  " + "\n  ".join(result["gate"] or ["(did not run)"]))


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--log", default="outputs/feedback-loop-retrain.log", help="the retrain run's output")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: the deployment is still removed (finally)
    os.environ.setdefault("ZENML_CONFIG_PATH", str(common.REPO / ".zenml-home"))  # the store `make run` uses
    os.environ.update(common.bench_env())
    os.chdir(common.REPO)  # the deployment imports pipelines/ from its working directory

    import yaml
    from zenml.client import Client

    from core.logs import quiet_libraries

    quiet_libraries()
    model = yaml.safe_load(SERVE_CONFIG.read_text())["on_init_kwargs"]["config"]["model_name"]
    served = staged_version(model)
    if served is None:
        raise SystemExit(f"no version of {model} at staging in this ZenML store: run `make run` first (~8 min)")
    questions, heldout = load_rows("questions.jsonl"), load_rows("heldout.jsonl")
    sets = {"held-out paraphrases": heldout, "asked (reviewed)": questions}
    name = f"feedback-loop-{os.getpid()}"

    try:
        url = deploy(name, None)
        before = {k: ask(url, [r["instruction"] for r in rows]) for k, rows in sets.items()}
        feedback, corrected = review(url, before["asked (reviewed)"], [r["output"] for r in questions])
    finally:
        undeploy(name)
    print(f"version {served} answered {len(questions) + len(heldout)} questions; the reviewer: {feedback}")
    if not corrected:  # before the retrain: with nothing corrected there is nothing to learn
        raise SystemExit("the reviewer corrected nothing: the served version already knew every answer")

    log_path = common.REPO / args.log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"retraining: configs/retrain_from_feedback.yaml (output: {log_path})")
    exit_code, seconds = retrain(log_path)
    run = Client().get_pipeline("lora_pipeline").last_run
    new = run.model_version.number if run.model_version else None
    # a run its gate stopped still trained its adapter: it is served pinned and compared, and reported as refused
    if new in (None, served) or Client().get_model_version(model, new).get_model_artifact("adapter") is None:
        raise SystemExit(f"the retrain run failed before training an adapter (exit {exit_code}): see {log_path}")
    if exit_code != 0:
        print(f"the retrain run failed (exit {exit_code}; its gate?): version {new} is compared all the same")

    try:
        url = deploy(name, new)
        after = {k: ask(url, [r["instruction"] for r in rows]) for k, rows in sets.items()}
    finally:
        undeploy(name)

    scores = {
        k: {
            "before": score([a["answer"] for a in before[k]], [r["output"] for r in rows]),
            "after": score([a["answer"] for a in after[k]], [r["output"] for r in rows]),
        }
        for k, rows in sets.items()
    }
    trace = subprocess.run(
        [sys.executable, "-m", "cli.trace", corrected[0]], cwd=common.REPO, capture_output=True, text=True
    ).stdout
    result = {
        "device": common.device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "model": model,
        "served_version": served,
        "new_version": new,
        "new_version_stage": str(Client().get_model_version(model, new).stage),
        "retrain_run": run.name,
        "retrain_exit": exit_code,
        "gate": gate_messages(model, new),
        "retrain_s": round(seconds, 1),
        "feedback": feedback,
        "scores": scores,
        "answers": {
            k: [
                {"question": r["instruction"], "reference": r["output"], "before": b["answer"], "after": a["answer"]}
                for r, b, a in zip(rows, before[k], after[k])
            ]
            for k, rows in sets.items()
        },
        "trace": trace,
    }
    print_table(result)
    print(f"\npython -m cli.trace {corrected[0]}\n{trace}")
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
