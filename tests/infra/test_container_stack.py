"""The local-container stack for real, and its faults: every step in a Docker container, artifacts in S3 (moto, IAM
authentication on), the run on a local ZenML server (infra/stacks/container.sh, configs/container.yaml).

`make test-stack` (marker `container`; neither `make test` nor `make test-integration` runs it). The module brings
its own stack up with the project's container.sh under its own ZENML_CONFIG_PATH, ports, state folder and /cache
volume (a stack already running on this machine is left alone; a Docker daemon already running is used, not
stopped), and brings down exactly what it started. It skips, saying why, where Docker cannot be started (not root,
or no dockerd and no apt-get to install it). The artifact store reaches moto through a TCP forwarder this test owns
(tests/support/tcp_forwarder.py): stopping it is an S3 outage that keeps the data.

What each test shows: every step runs in its own container, its artifacts land in the S3 bucket and load back
through the server, the run and model version are on the server (REST), a rerun is cached but for promote (its one
container), the dashboard shows the run; a wrong S3 secret fails before any container with one line naming the store;
the S3 endpoint down at submit fails the same way in seconds, down during train fails that step (the error names the
endpoint and the object), registers none of its outputs, and a rerun after the restart resumes from the checkpoints;
a train container killed after its first checkpoint fails the run, and two identical reruns started together both
succeed: one resumes from the killed container's checkpoint (on the /cache volume), the other waits for the
folder's lock and resumes from the first one's last checkpoint.

Runs use a small config built from configs/container.yaml: the tests' tiny Llama (core/tiny.py, written to the /cache
volume, so every step container loads it from there: the stack is under test here, not the model, which `make
stack-run` runs), tests/data/stack/ (the first 48 training and 8 held-out rows of data/acme_support; in the repo, so
the step containers get it with the code), 200 optimizer steps (a few seconds: long enough to stop S3 or kill the
container in the middle) with a checkpoint every 20, no general probe, 2 generated answers of 8 tokens. Each test
trains into its own checkpoint folder under /cache/checkpoints (ingest .. format_prompts come from the cache after
the first run).
The runs use a snapshot of the working tree taken when the module starts (tracked and untracked files that git does
not ignore: what ZenML uploads as the code), so an edit made meanwhile cannot change their cache keys halfway.
Logs of every run and the timings: outputs/container_stack/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from support.browser import Browser, find_chromium

pytestmark = [pytest.mark.container]

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "outputs" / "container_stack"
STEPS = ["ingest", "validate", "format_prompts", "train", "evaluate", "merge", "push", "promote"]
ZENML = str(Path(sys.executable).with_name("zenml"))
IMAGE = "zenml:lora_pipeline-orchestrator"  # ZenML's tag of the image it builds from infra/Dockerfile
MAX_STEPS, SAVE_EVERY = 200, 20  # optimizer steps of every test run, and its checkpoint interval
TIMES: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _docker_unavailable() -> str | None:
    """Why the stack cannot be brought up here, or None."""
    running = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if os.geteuid() == 0:
        if running or shutil.which("apt-get") or (shutil.which("dockerd") and shutil.which("debootstrap")):
            return None
        return "no dockerd and no apt-get to install it (Debian: apt-get install docker.io debootstrap)"
    if not running:
        return "no running Docker daemon, and not root: container.sh cannot install or start dockerd"
    image = subprocess.run(["docker", "image", "inspect", "zenml-qlora-base:latest"], capture_output=True)
    if image.returncode != 0:
        return "the step image zenml-qlora-base is missing, and building it (debootstrap, chroot) needs root"
    return None


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@dataclass
class Run:
    name: str
    returncode: int
    output: str = field(repr=False)
    started: float  # unix time
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def _snapshot(dest: Path) -> Path:
    """The working tree's files that git does not ignore, copied to `dest`; the repo itself without git."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        return REPO
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():  # not a file deleted from the tree but still tracked
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@dataclass
class Stack:
    root: Path
    src: Path  # the code the runs use (_snapshot)
    env: dict = field(repr=False)
    zenml_port: int
    s3_port: int
    forwarder: object
    key: dict = field(default_factory=dict, repr=False)  # moto's access key: never in a test report

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.zenml_port}"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def zenml(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [ZENML, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def config(self, name: str, **train) -> Path:
        """configs/container.yaml, made small; checkpoints in /cache/checkpoints/<name>."""
        cfg = yaml.safe_load((self.src / "configs" / "container.yaml").read_text())
        cfg["model"]["name"] = "stack-test"
        params = cfg["parameters"]["config"]
        params["model"] = {"source": "local", "name": "/cache/tiny-llama"}  # written by the stack fixture
        params["data"].update(path="tests/data/stack/train.jsonl", eval_path="tests/data/stack/eval.jsonl")
        params["train"].update(
            max_steps=MAX_STEPS, save_every=SAVE_EVERY, checkpoint_dir=f"/cache/checkpoints/{name}", **train
        )
        # the stack's faults, not the recipe: no replay chain (4 more step containers a run); the recipe with its
        # replay runs in tests/pipelines/test_shipped_configs.py
        params["train"]["replay"] = None
        params["evaluate"].update(general=None, num_generate=2, max_new_tokens=8)
        params["evaluate"]["gate"].update(on_fail="warn", min_eval_rows=8)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start(self, config: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [ZENML, "pipeline", "run", "pipelines.lora_pipeline", "-c", str(config), *extra],
            env=self.env,
            cwd=self.src,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish(self, name: str, proc: subprocess.Popen, started: float, timeout: int = 900) -> Run:
        out, _ = proc.communicate(timeout=timeout)
        run = Run(name, proc.returncode, _clean(out), started, time.time())
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{name}.log").write_text(run.output)
        TIMES[name] = round(run.seconds, 1)
        return run

    def run(self, name: str, config: Path, *extra: str, timeout: int = 900) -> Run:
        started = time.time()
        return self.finish(name, self.start(config, *extra), started, timeout)

    def report(self, count: int = 1, *loads: str) -> list[dict]:
        """The newest `count` runs, as the ZenML client reads them from the server (tests/support/stack_report.py)."""
        out = self.root / "report.json"
        done = subprocess.run(
            [sys.executable, str(self.src / "tests" / "support" / "stack_report.py"), str(out), str(count), *loads],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return json.loads(out.read_text())

    def rest(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=30) as resp:  # the local server: no auth
            return json.load(resp)

    def s3(self):
        import boto3

        endpoint = f"http://127.0.0.1:{self.s3_port}"  # moto itself, not through the forwarder
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **self.key)

    def containers_started(self, since: float, until: float) -> list[dict]:
        """Container start events in [since, until]: their image and name (docker events)."""
        done = subprocess.run(
            ["docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}", "--filter", "type=container",
             "--filter", "event=start", "--format", "{{json .Actor.Attributes}}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def step_container(self, step: str, timeout: float = 600) -> str:
        """The id of the running container of `step` (its command names the step), once it runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ps = subprocess.run(
                ["docker", "ps", "--no-trunc", "--format", "{{.ID}}\t{{.Command}}"], capture_output=True, text=True
            ).stdout
            for line in ps.splitlines():
                cid, _, command = line.partition("\t")
                if f"--step_name {step} " in command.strip('"') + " ":  # docker quotes the command
                    return cid
            time.sleep(0.2)
        raise AssertionError(f"no container for step {step} within {timeout} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, bundled_tokenizer_dir):
    from conftest import build_tiny_model
    from support.tcp_forwarder import TcpForwarder

    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("container-stack")
    (root / "state").mkdir()
    src = _snapshot(root / "src")
    build_tiny_model(root / "cache" / "tiny-llama", bundled_tokenizer_dir)  # /cache/tiny-llama in the steps
    zenml_port, s3_port, forward_port = _free_port(), _free_port(), _free_port()
    forwarder = TcpForwarder(forward_port, s3_port).start()
    env = {
        **os.environ,
        "ZENML_CONFIG_PATH": str(root / "zenml-home"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_AUTO_OPEN_DASHBOARD": "false",
        "ZENML_LOGGING_VERBOSITY": "INFO",  # "Running step ... in Docker" and the steps' own lines
        "ZENML_LOGGING_COLORS_DISABLED": "true",
        "ZENML_ENABLE_RICH_TRACEBACK": "false",
        # no repository (.zen/) for these zenml processes: the repo's .zen/config.yaml belongs to another store
        "ZENML_REPOSITORY_PATH": str(root / "state"),
        "ZENML_CUSTOM_SOURCE_ROOT": str(src),
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the snapshot, so none in the uploaded code
        "STACK_STATE": str(root / "state"),
        "CACHE_DIR": str(root / "cache"),
        "ZENML_PORT": str(zenml_port),
        "S3_PORT": str(s3_port),
        "S3_ENDPOINT": f"http://127.0.0.1:{forward_port}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    container_sh = ["bash", str(src / "infra" / "stacks" / "container.sh")]
    started = time.monotonic()
    up = subprocess.run([*container_sh, "up"], env=env, cwd=src, capture_output=True, text=True, timeout=1200)
    TIMES["stack up"] = round(time.monotonic() - started, 1)
    stack = Stack(root, src, env, zenml_port, s3_port, forwarder)
    try:
        docker_ok = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        if up.returncode != 0 and not docker_ok:
            last = (up.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"Docker could not be installed or started here (container.sh up: {last})")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-5000:]
        key_file = root / "state" / "s3-credentials.json"
        assert key_file.stat().st_mode & 0o777 == 0o600
        stack.key = json.loads(key_file.read_text())
        assert stack.key["aws_secret_access_key"] not in up.stdout + up.stderr  # never printed
        stack.zenml("stack", "set", "local-container")  # this test's own global config, no --stack needed
        yield stack
    finally:
        started = time.monotonic()
        down = subprocess.run([*container_sh, "down"], env=env, cwd=src, capture_output=True, text=True, timeout=300)
        TIMES["stack down"] = round(time.monotonic() - started, 1)
        forwarder.stop()
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "stack.log").write_text(up.stdout + up.stderr + down.stdout + down.stderr)
        (OUT / "times.json").write_text(json.dumps(TIMES, indent=2))
        assert down.returncode == 0, down.stdout + down.stderr


def _checkpoints(stack: Stack, name: str) -> list[Path]:
    """Complete checkpoints (adapter, optimizer and trainer state) under /cache/checkpoints/<name> on the host."""
    markers = ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")
    found = (stack.cache / "checkpoints" / name).glob("*/checkpoint-*")
    return sorted((p for p in found if all((p / m).exists() for m in markers)), key=lambda p: int(p.name.split("-")[1]))


def _failed_run_had_no_train_outputs(run: dict) -> None:
    train = run["steps"]["train"]
    assert train["outputs"] == {}, f"a failed train step registered outputs: {train['outputs']}"
    downstream = [s for s in ("evaluate", "merge", "push", "promote") if s in run["steps"]]
    assert all(run["steps"][s]["status"] != "completed" for s in downstream)


@pytest.fixture(scope="module")
def first_run(stack):
    """The first run on the stack (the documented command, --stack included), and its report."""
    run = stack.run("e2e", stack.config("e2e"), "--stack", "local-container")
    assert run.returncode == 0, run.output[-6000:]
    report = stack.report(1, "train.train_metrics", "train.adapter")[0]
    return run, report


def test_every_step_runs_in_a_container_and_stores_its_artifacts_in_s3(stack, first_run):
    run, report = first_run
    assert report["store_url"] == stack.url and report["status"] == "completed"
    assert list(report["steps"]) == STEPS and {s["status"] for s in report["steps"].values()} == {"completed"}

    # every step ran in its own container of the step image: the orchestrator's line per step, one container
    # start per step (docker events), each step's code downloaded from S3 inside its container
    assert re.findall(r"Running step `?(\w+)`? in Docker", run.output) == STEPS
    started = stack.containers_started(run.started, run.ended)
    assert len(started) == len(STEPS) and {c["image"] for c in started} == {IMAGE}, started
    downloads = run.output.count("Downloading code from artifact store path s3://zenml-artifacts/code_uploads/")
    assert downloads == len(STEPS)

    # artifacts in the bucket, read with the stack's key; loaded back through the ZenML client
    s3 = stack.s3()
    for step in report["steps"].values():
        for versions in step["outputs"].values():
            uri = versions[0]["uri"]
            assert uri.startswith("s3://zenml-artifacts/"), uri
            listed = s3.list_objects_v2(Bucket="zenml-artifacts", Prefix=uri.removeprefix("s3://zenml-artifacts/"))
            assert listed["KeyCount"] > 0, f"nothing in S3 under {uri}"
    assert s3.list_objects_v2(Bucket="zenml-artifacts", Prefix="code_uploads/")["KeyCount"] >= 1
    metrics = report["loaded"]["train.train_metrics"]
    assert metrics["steps"] == MAX_STEPS and metrics["resumed_from_step"] == 0
    assert "adapter_model.safetensors" in report["loaded"]["train.adapter"]["files"]
    # checkpoints on the /cache volume, on this machine
    assert [p.name for p in _checkpoints(stack, "e2e")][-1] == f"checkpoint-{MAX_STEPS}"

    # the run and its model version on the server, over its REST API
    rest = stack.rest(f"runs/{report['id']}")
    assert rest["name"] == report["name"] and rest["body"]["status"] == "completed"
    mv = stack.rest(f"model_versions/{report['model_version']['id']}")
    assert mv["name"] == report["model_version"]["name"] and report["model_version"]["model"] == "stack-test"


def test_a_rerun_is_cached_but_promote_and_starts_only_its_container(stack, first_run):
    run = stack.run("cached rerun", stack.config("e2e"), "--stack", "local-container")
    assert run.returncode == 0, run.output[-6000:]
    report = stack.report(1)[0]
    assert report["id"] != first_run[1]["id"] and report["status"] == "completed"
    # promote runs in every run (it keeps the new model version whole), whatever the run config's enable_cache
    statuses = {name: s["status"] for name, s in report["steps"].items()}
    assert statuses.pop("promote") == "completed" and set(statuses.values()) == {"cached"}, statuses
    assert len(stack.containers_started(run.started, run.ended)) == 1


def test_the_dashboard_shows_the_run(stack, first_run):
    from test_dashboard import complete_account_form

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; `make browser` installs it when run as root)")
    _, report = first_run
    started = time.monotonic()
    with Browser(chromium, width=1600, height=1000) as browser:
        complete_account_form(browser, stack.url)
        browser.goto(report["url"])
        text = browser.wait_for_text(report["name"], *STEPS, "completed", timeout=90)
        assert report["id"] in text
        time.sleep(1)  # let the DAG layout settle
        png = browser.screenshot(OUT / "dashboard_run.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    TIMES["dashboard"] = round(time.monotonic() - started, 1)


def test_a_wrong_s3_secret_fails_before_any_container_naming_the_store(stack, first_run):
    wrong = json.dumps({**stack.key, "aws_secret_access_key": "not-the-key"})
    stack.zenml("secret", "update", "s3-moto", f"--values={wrong}")
    try:
        run = stack.run("wrong secret", stack.config("e2e"))
    finally:
        stack.zenml("secret", "update", "s3-moto", f"--values=@{stack.root / 'state' / 's3-credentials.json'}")
    assert run.returncode != 0
    endpoint = stack.env["S3_ENDPOINT"]
    line = (
        f"error: ArtifactStoreError: artifact store 's3-moto' (s3, s3://zenml-artifacts at {endpoint}) refused the "
        "credentials of secret 's3-moto': ClientError: An error occurred (SignatureDoesNotMatch)"
    )
    assert line in run.output, run.output[-4000:]
    assert "zenml secret update s3-moto" in run.output and "not-the-key" not in run.output
    assert "Traceback" not in run.output  # one line from the project's error hook (core/logs.py)
    assert "Uploading code" not in run.output and stack.containers_started(run.started, run.ended) == []


def test_s3_endpoint_down_during_train_fails_clearly_then_a_rerun_resumes(stack, first_run):
    config = stack.config("outage")
    # down before the run: the preflight says so in seconds, before anything is uploaded
    stack.forwarder.stop()
    try:
        early = stack.run("endpoint down at submit", config)
    finally:
        stack.forwarder.start()
    assert early.returncode != 0
    assert "error: ArtifactStoreError: artifact store 's3-moto'" in early.output
    assert f"is unreachable: cannot connect to 127.0.0.1:{stack.forwarder.listen_port}" in early.output

    # down while train runs: after its inputs were read (it holds its checkpoint folder's lock), before it saves
    # its outputs
    started, proc = time.time(), stack.start(config)
    try:
        stack.step_container("train")
        deadline = time.monotonic() + 300
        while not list((stack.cache / "checkpoints" / "outage").glob("*/.lock")) and time.monotonic() < deadline:
            time.sleep(0.2)
        stack.forwarder.stop()
        TIMES["outage started after"] = round(time.time() - started, 1)
    except BaseException:
        proc.kill()
        raise
    finally:
        run = stack.finish("endpoint down during train", proc, started)
        stack.forwarder.start()
    assert run.returncode != 0
    assert "Pipeline run has failed due to failure in step(s): train" in run.output
    failed = stack.report(1)[0]
    assert failed["status"] == "failed" and failed["steps"]["train"]["status"] == "failed"
    # The error, from the train container's stderr as the orchestrator relays it: which endpoint, which object.
    # (ZenML 0.98 stores no exception info for a step that fails while saving its outputs, and the step's log
    # upload to S3 failed too: the console is where it shows.)
    endpoint = f"http://127.0.0.1:{stack.forwarder.listen_port}"
    assert f'EndpointConnectionError: Could not connect to the endpoint URL: "{endpoint}/zenml-artifacts' in run.output
    _failed_run_had_no_train_outputs(failed)  # nothing half-written is visible through the server
    assert _checkpoints(stack, "outage"), "train wrote no checkpoint before the outage"

    rerun = stack.run("rerun after outage", config)
    assert rerun.returncode == 0, rerun.output[-6000:]
    report = stack.report(1, "train.train_metrics")[0]
    assert report["status"] == "completed"
    assert report["loaded"]["train.train_metrics"]["resumed_from_step"] > 0


@pytest.fixture(scope="module")
def killed(stack, first_run):
    """A run whose train container is killed (docker kill) right after its first checkpoint is on the volume; then
    two identical reruns at once. Returns (killed run, its report, the checkpoint step at the kill, reruns, reports)."""
    config = stack.config("kill")
    started, proc = time.time(), stack.start(config)
    try:
        container = stack.step_container("train")
        deadline = time.monotonic() + 600
        while not _checkpoints(stack, "kill") and time.monotonic() < deadline:
            time.sleep(0.1)
        saved = _checkpoints(stack, "kill")
        subprocess.run(["docker", "kill", container], check=True, capture_output=True)
    except BaseException:
        proc.kill()
        raise
    finally:
        run = stack.finish("train container killed", proc, started)
    assert saved, "no checkpoint before the kill"
    failed = stack.report(1)[0]

    # Two identical reruns at once (a retry and a schedule overlapping, say): the same checkpoint folder, one
    # training at a time under its lock (core/training/checkpoints.py), across containers: /cache is one volume.
    started = time.time()
    procs = [stack.start(config), stack.start(config)]
    reruns = [stack.finish(f"rerun {i + 1} after kill (two at once)", p, started) for i, p in enumerate(procs)]
    reports = stack.report(2, "train.train_metrics") if all(r.returncode == 0 for r in reruns) else []
    return run, failed, int(saved[-1].name.split("-")[-1]), reruns, reports


def test_a_killed_train_container_fails_the_run_and_a_rerun_resumes_from_the_volume(killed):
    run, failed, killed_at, reruns, reports = killed
    assert run.returncode != 0
    assert "Pipeline run has failed due to failure in step(s): train" in run.output
    # the client marks the run failed; the killed step never reported (ZenML leaves it `running`), no outputs
    assert failed["status"] == "failed" and failed["steps"]["train"]["outputs"] == {}
    assert 0 < killed_at < MAX_STEPS

    for rerun in reruns:
        assert rerun.returncode == 0, rerun.output[-6000:]
    metrics = [r["loaded"]["train.train_metrics"] for r in reports]
    assert {r["status"] for r in reports} == {"completed"} and {m["steps"] for m in metrics} == {MAX_STEPS}
    # the first to hold the folder resumed where the killed container stopped: its checkpoints were on the volume
    first = min(m["resumed_from_step"] for m in metrics)
    assert killed_at <= first < MAX_STEPS


def test_two_identical_runs_at_once_share_the_checkpoint_folder_safely(killed):
    _, _, _, reruns, reports = killed
    assert [r.returncode for r in reruns] == [0, 0]
    assert {r["status"] for r in reports} == {"completed"}
    # one trained to the end; the other waited for the folder's lock, then resumed from the finished checkpoint
    assert max(r["loaded"]["train.train_metrics"]["resumed_from_step"] for r in reports) == MAX_STEPS
    waited = [r for r in reruns if "is in use" in r.output]
    assert len(waited) == 1 and "waiting for that training to end, then resuming" in waited[0].output
