"""The OpenAI and feedback routes over the tiny model, with a request log, as a server process a test can SIGKILL.

    python tests/support/feedback_server.py SPEC.json

SPEC.json holds {"base": <ModelSource dict>, "adapter": <adapter folder>, "url": <request log database URL>,
"port": <port on 127.0.0.1>, "key": <auth key>}. Used by tests/serving/test_feedback_crash.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def main(spec_path: str) -> None:
    import uvicorn
    from fastapi import FastAPI

    from core.config import ModelSource
    from core.serving.completion_log import open_request_log
    from core.serving.model import ServeConfig, build_served_model
    from core.serving.openai.routes import add_routes

    spec = json.loads(Path(spec_path).read_text())
    cfg = ServeConfig(context_length=96, max_new_tokens_limit=16, batch_wait_ms=0, request_log={"url": spec["url"]})
    served = build_served_model(cfg, ModelSource(**spec["base"]), adapter_dirs={"default": Path(spec["adapter"])})
    served.request_log = open_request_log(cfg)  # as the deployment's on_init hook does
    app = FastAPI()
    add_routes(app, lambda: spec["key"], lambda: served)
    uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1])
