"""What the deployment tests share: waiting for a deployment's server, and failing with its own last log lines when
it does not come up."""

from __future__ import annotations

import time

import pytest
import requests


def fail_with_server_logs(client, name: str, err: Exception) -> None:
    """pytest.fail with `err` and the last 60 lines of deployment `name`'s server log (the reason is usually there)."""
    try:
        logs = "\n".join(client.get_deployment_logs(name, tail=60))
    except Exception as log_err:  # no deployment, or no log file
        logs = f"(no logs: {log_err})"
    pytest.fail(f"{err}\nlast server log lines:\n{logs}")


def wait_answering(url: str, timeout_s: float = 120) -> requests.Response:
    """GET `url` until it answers 200 (a deployment's server listens once on_init has loaded the model)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = requests.get(url, timeout=5)
            if answer.status_code == 200:
                return answer
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)
