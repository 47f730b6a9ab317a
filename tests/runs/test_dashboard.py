"""Lineage in the dashboard: a local ZenML server, the tiny pipeline run against it, the run's page in headless Chromium.

1. `zenml login --local` starts ZenML's local server on a free loopback port, with its own
   temporary ZENML_CONFIG_PATH (the test session's SQLite store is left alone).
2. tests/support/dashboard_run.py runs the tiny pipeline against that server in a child process and reports,
   through the ZenML client, each step's input and output artifact versions and the model version.
3. Chromium (Debian's package, driven by playwright through tests/support/browser.py) opens the
   dashboard, fills in the first-start account form as a person would, opens the run's page
   and the training report, and keeps screenshots in outputs/dashboard/ (git-ignored).
Without Chromium the browser test skips (with the reason); the lineage test still runs.
"""

from __future__ import annotations

import html
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_LORA, TINY_TRAIN, instruction_rows
from support.browser import Browser, find_chromium

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # a ZenML server and Chromium: make test-integration

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "outputs" / "dashboard"
STEPS = ["ingest", "validate", "format_prompts", "train", "evaluate", "merge", "push", "promote"]
ARTIFACTS = ["raw_dataset", "clean_dataset", "validation_report", "train_dataset", "eval_dataset", "adapter"]
ARTIFACTS += [
    "train_metrics",
    "eval_report",
    "merged_model",
    "upload_bundle",
    "push_result",
    "promotion",
    "model_history",
]
CHROMIUM = find_chromium()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local ZenML server on loopback; yields (url, env of a client logged in to it)."""
    home = tmp_path_factory.mktemp("zenml-server-home")
    port = _free_port()
    env = {
        **os.environ,
        "ZENML_CONFIG_PATH": str(home),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_AUTO_OPEN_DASHBOARD": "false",  # it would start a browser of its own
    }
    zenml = str(Path(sys.executable).with_name("zenml"))
    login = [zenml, "login", "--local", "--port", str(port), "--ip-address", "127.0.0.1"]
    # cwd outside the repo, here and below: ZenML would otherwise record the server's stack in the
    # repo's .zen/config.yaml, which the developer's own runs read.
    started = subprocess.run(login, env=env, cwd=home, capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stdout + started.stderr
    pid_file = home / "zen_server" / "daemon" / "service.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    try:
        yield f"http://127.0.0.1:{port}", env
    finally:
        if pid is None:
            subprocess.run([zenml, "logout", "--local"], env=env, cwd=home, capture_output=True, timeout=120)
        else:  # the daemon this fixture started: SIGTERM is what `zenml logout --local` sends, minus ~8 s of imports
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def run_report(server, tmp_path_factory, tiny_model_dir):
    """The tiny pipeline, run against the server; its lineage as reported by the ZenML client."""
    _, env = server
    root = tmp_path_factory.mktemp("dashboard-run")
    for name, rows in (("train.jsonl", instruction_rows(40)), ("eval.jsonl", instruction_rows(8, offset=40))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"source": "local", "name": str(tiny_model_dir)},
        "data": {"path": str(root / "train.jsonl"), "eval_path": str(root / "eval.jsonl")},
        "lora": TINY_LORA,
        # 4 steps: enough for a loss curve; the dashboard, not the training, is under test here
        "train": {**TINY_TRAIN, "max_steps": 4, "checkpoint_dir": str(root / "ckpt")},
        "evaluate": {
            "general": None,
            "num_generate": 2,
            "max_new_tokens": 8,
            "gate": {"on_fail": "warn", "min_eval_rows": 1},
        },
        "push": {"mode": "dry_run", "repo_id": "tests/tiny"},
        "promote_to": "staging",
    }
    (root / "config.json").write_text(json.dumps({"model_name": "tiny-dashboard", "config": config}))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "support" / "dashboard_run.py"),
            str(root / "config.json"),
            str(root / "out.json"),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((root / "out.json").read_text())


def test_run_links_every_artifact_from_ingest_to_push(server, run_report):
    url, _ = server
    assert run_report["store_url"] == url  # the run went to the server, not a local file
    steps = run_report["steps"]
    assert list(steps) == STEPS and {s["status"] for s in steps.values()} == {"completed"}
    assert run_report["status"] == "completed"

    producer = {a: name for name, s in steps.items() for ids in s["outputs"].values() for a in ids}
    outputs = {out for s in steps.values() for out in s["outputs"]}
    assert outputs == set(ARTIFACTS)
    # every input of every step is an artifact version some earlier step of this run produced
    assert steps["ingest"]["inputs"] == {}
    parents = {}
    for name, s in steps.items():
        ids = [a for v in s["inputs"].values() for a in v]
        assert ids or name == "ingest", f"{name} has no inputs"
        assert all(a in producer for a in ids), f"{name} reads an artifact this run did not make"
        parents[name] = {producer[a] for a in ids}
        assert all(STEPS.index(p) < STEPS.index(name) for p in parents[name])

    def ancestors(step):
        return set().union(*({p} | ancestors(p) for p in parents[step])) if parents[step] else set()

    assert ancestors("push") == set(STEPS) - {"push", "promote"}  # push descends from every step, ingest included
    # promote reads the eval report (ordering after push is not an artifact link)
    assert ancestors("promote") == set(STEPS[: STEPS.index("evaluate") + 1])

    mv = run_report["model_version"]
    assert mv["model"] == "tiny-dashboard" and mv["stage"] == "staging"
    assert set(producer) <= set(mv["linked"])  # every artifact version is on the model version


def complete_account_form(browser: Browser, base_url: str) -> None:
    """The first-start survey of a fresh local server: filled in and sent as a person would."""
    browser.goto(base_url)
    browser.wait_for_text("Add your account details", timeout=90)  # before anything else on a fresh server
    browser.type_into("input[name=fullName]", "Dashboard Test")
    browser.type_into("input[name=email]", "dashboard.test@example.com")
    box = "[role=checkbox]"  # the visible box; the <input type=checkbox> behind it is 1x1 px and hidden
    if browser.eval(f"document.querySelector('{box}').getAttribute('aria-checked')") == "true":
        browser.click(box)  # no newsletter
    assert browser.eval(f"document.querySelector('{box}').getAttribute('aria-checked')") == "false"
    browser.click_text("Continue")
    browser.wait_for_text("What are you building", timeout=30)
    browser.click_text("ML Engineer", selector="label")
    browser.click_text("My Laptop\nStart local, no infra needed", selector="label")
    browser.click_text("Continue")
    browser.wait_until_gone("What are you building", timeout=30)
    if browser.wait_for_any("Skip this step", "Pipelines", timeout=30) == "Skip this step":
        browser.click_text("Skip this step", selector="button, a")  # the Slack invitation
    browser.wait_for_text("Go to Dashboard", timeout=30)
    browser.click_text("Go to Dashboard", selector="button, a")
    browser.wait_until_gone("Go to Dashboard", timeout=30)


def _current_user(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/api/v1/current-user", timeout=10) as resp:  # NO_AUTH local server
        return json.load(resp)


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; `make test` installs it when run as root)")
    return CHROMIUM


def open_report(browser, artifact: str, needle: str) -> str:
    """On a run's DAG page: click `artifact`, open its HTML report (report.html) and load it, as a person would;
    returns the rendered report's HTML once it contains `needle` (or whatever it has after 30 s)."""
    node = browser.eval(
        "(() => { const n = [...document.querySelectorAll('.react-flow__node')]"
        f".find(e => e.innerText.trim().startsWith({artifact!r}));"
        " const r = n.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    browser.click_at(*node)
    browser.wait_for_text("Producer Step", timeout=30)
    browser.click_text("Visualization")
    browser.wait_for_text("Load Preview", timeout=30)
    browser.click_text("data_v2.json")  # the visualization picker; the HTML report is the second entry
    browser.click_text("report.html", selector="[role=option]")
    browser.click_text("Load Preview")  # the dashboard asks before rendering HTML
    deadline = time.monotonic() + 30
    srcdoc = ""
    while needle not in srcdoc and time.monotonic() < deadline:
        time.sleep(0.5)
        srcdoc = browser.eval("(document.querySelector('iframe') || {}).srcdoc || ''")
    return srcdoc


def test_dashboard_shows_the_run_and_its_training_report(chromium, server, run_report):
    url, _ = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Browser(chromium, width=1600, height=1000) as browser:
        complete_account_form(browser, url)
        user = _current_user(url)
        assert user["metadata"]["user_metadata"]["finished_onboarding_survey"] is True
        assert user["body"]["full_name"] == "Dashboard Test" and user["body"]["email_opted_in"] is False

        # The run's page: DAG with every step and artifact, run name and status.
        browser.goto(run_report["url"])
        text = browser.wait_for_text(run_report["run_name"], *STEPS, *ARTIFACTS, "completed", timeout=90)
        assert run_report["run_id"] in text
        time.sleep(1)  # let the DAG layout settle before the picture
        run_png = browser.screenshot(SHOTS / "run.png")

        # The training report (loss curve): click the artifact in the DAG, as a person would.
        srcdoc = open_report(browser, "train_metrics", "<svg")
        assert "<svg" in srcdoc and "polyline" in srcdoc and "optimizer step" in srcdoc and "nats/token" in srcdoc
        frame = browser.eval(
            "(() => { const r = document.querySelector('iframe').getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        browser.scroll_at(*frame, dy=600)  # down to the loss curve
        time.sleep(1)
        report_png = browser.screenshot(SHOTS / "train_metrics.png")

        # What the open-source dashboard has instead of a Models page: the run's Metadata tab and the
        # model_history artifact written by promote.
        browser.goto(run_report["url"])
        browser.wait_for_text(run_report["run_name"], "model_history", timeout=60)
        browser.click_text("Metadata", selector="button, [role=tab], a")
        browser.wait_for_text("tuned_loss", "stage", "model_version", timeout=30)
        time.sleep(1)
        metadata_png = browser.screenshot(SHOTS / "run_metadata.png")
        browser.goto(run_report["url"])
        browser.wait_for_text("model_history", timeout=60)
        time.sleep(1)
        srcdoc = open_report(browser, "model_history", "newest first")
        assert "newest first" in srcdoc and "staging" in srcdoc and "#1" in srcdoc
        time.sleep(1)
        history_png = browser.screenshot(SHOTS / "model_history_dashboard.png")

    for png in (run_png, report_png, metadata_png, history_png):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == (1600, 1000)
        assert len(data) > 50_000, f"{png} is suspiciously small for a rendered page"
    print(f"screenshots: {run_png} {report_png} {metadata_png} {history_png}")


# What each report must show a person (issue: reports readable at a glance), checked in the rendered page.
REPORTS = {
    "validation_report": ["guards against", "parameters", "leakage"],
    "train_metrics": ["optimizer step", "loss (nats/token)", "held-out loss, trainer's eval", "tokens/s"],
    "eval_report": ["rows it covers", "generated answers", "exact"],
    "train_dataset": ["prompt masked from the loss"],
    "model_history": ["newest first", "staging"],
    "promotion": ["every candidate passed its gate"],
    "push_result": ["Push (dry_run)"],
}


def test_every_report_renders_readably_in_a_browser(chromium, run_report):
    """Each HTML visualization the run stored, opened in Chromium as the dashboard's preview shows it: its key
    content is there, and a screenshot of each lands in outputs/dashboard/<artifact>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    pages = run_report["visualizations"]
    assert set(REPORTS) <= set(pages), sorted(pages)
    with Browser(chromium, width=1280, height=900) as browser:
        for name, needles in REPORTS.items():
            browser.goto(Path(pages[name][-1]).resolve().as_uri())
            browser.wait_for_text(*needles, timeout=30)
            png = browser.screenshot(SHOTS / f"{name}.png")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = (Path(pages["model_history"][-1])).read_text()
    assert "#1" in history  # the run's own version is listed
    # and links to the run's page on the server it ran against
    assert run_report["url"] and f"<a href='{html.escape(run_report['url'])}'>{run_report['run_name']}</a>" in history
