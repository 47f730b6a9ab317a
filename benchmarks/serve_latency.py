"""Serving latency: the same prompts through the ZenML deployment and through direct in-process generation.

    python benchmarks/serve_latency.py --preset smoke                        # tiny 2-layer model: seconds
    python benchmarks/serve_latency.py --preset cpu --json bench-serve.json  # bundled SmolLM2-135M + a LoRA adapter
    python benchmarks/serve_latency.py --preset cpu --threads 2             # pin torch threads (both sides)
    ZENML_CONFIG_PATH=$PWD/.zenml-home python benchmarks/serve_latency.py --serve-config configs/serve.yaml
                                                                             # the trained model version itself

One run, one machine, sequentially (never both at once). Rows:
- `direct`: core.serving.model.answer() in this process, on a model built by the same loader the server uses.
- `deployment`: POST /invoke on pipelines/serve_pipeline.py deployed with ZenML's local deployer on 127.0.0.1;
  each request is a ZenML pipeline run whose outputs are stored as artifacts (ZenML's default).
- `deployment-in-memory`: the same with `skip_artifact_materialization: true` (outputs kept in memory).
- `openai, N clients` (N = 1, 4, 8): POST /v1/chat/completions on the same deployment with the official `openai`
  client, N client threads each sending its next request as soon as its last one is answered (closed loop), every
  client answering every prompt once. Requests that arrive together are generated in one batch
  (core/serving/batching.py); `openai, 1 client` is the sequential baseline of the concurrent rows.
- `--engine llama_cpp`: the same deployment with `engine: llama_cpp` (llama.cpp's llama-server as its child, on the
  `--gguf-type` GGUF of the base and the adapter as a GGUF LoRA), `llama_cpp: openai, N clients` rows.
- `--engine llama-server`: that llama-server alone (same files, same slots), asked on its own OpenAI endpoint (it
  renders the chat template itself): `llama-server: openai, N clients`, what llama.cpp gives without the deployment.
  `--engine transformers llama_cpp llama-server` runs all three, one server at a time.
- `--request-log both`: a second transformers deployment with `log_requests: false`, up next to the logged one
  (an idle server costs nothing), its OpenAI rows named `no request log: openai, N clients`. The two take turns:
  for each client count, one row on each, in `--rounds` rounds, the order swapped every round, so that drift of
  the machine's speed falls on both alike. Each logged row gets `request_log_cost`, the share of tokens/s the
  request log (core/feedback/requestlog.py) costs against the unlogged row of the same round and clients; the
  result's `request_log_cost` has them per client count and their mean. `on` (default) / `off`: only that
  deployment. The log writes to a SQLite file in the run's scratch folder, never the store's own log.
Every row answers every prompt greedily (temperature 0) with the same max_new_tokens, after one warm-up request.
Per row: p50 / p95 / mean latency per request (seconds, client side) and generated tokens/s (completion tokens of
all requests / the row's wall time from first request to last answer). `same answers` checks the deployment's
answers equal direct ones (sequential rows; in a batch, padding may change the last digits of a logit).

Presets (a temporary ZenML store is used, removed afterwards):
- smoke: a randomly initialised 2-layer Llama with SmolLM2's tokenizer, a LoRA adapter r=8 on all linear layers.
- cpu: the bundled SmolLM2-135M-Instruct with an adapter of configs/default.yaml's LoRA shape (r, alpha, targets).
  The adapter is untrained (peft's initialisation, LoRA B = 0): the same matrices and cost per token as a trained
  one; what it answers is the base model's answer.
`--serve-config FILE` instead benchmarks the model version FILE names (e.g. after `make run`) in the ZenML store
of ZENML_CONFIG_PATH, with a `local-serve` stack (registered like `make serve` does when missing).
Prompts: the questions of data/acme_support/eval.jsonl, in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import common

PRESETS = {
    "smoke": {"model": "tiny", "prompts": 6, "max_new_tokens": 16},
    "cpu": {"model": "bundled", "prompts": 12, "max_new_tokens": 48},
}
MODEL_NAME = "serve-bench"
ROWS = ("direct", "deployment", "deployment-in-memory")
CLIENTS = (1, 4, 8)  # concurrent OpenAI clients per row


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def load_prompts(n: int) -> list[str]:
    rows = [
        json.loads(line) for line in (common.REPO / "data" / "acme_support" / "eval.jsonl").read_text().splitlines()
    ]
    return [r["instruction"] for r in rows if r.get("instruction")][:n]


def make_adapter(base, lora, out: Path) -> Path:
    """A peft LoRA adapter folder on `base` (untrained: LoRA B = 0), as the train step saves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core import models

    torch.manual_seed(0)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.target_modules, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(models.load_base(base, quant=None), config)
    peft_model.peft_config["default"].base_model_name_or_path = models.display_name(base)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


def register_version(adapter_dir: Path) -> None:
    """Model MODEL_NAME, one version at staging, holding the adapter as the training pipeline links it."""
    from zenml import save_artifact
    from zenml.client import Client
    from zenml.model.utils import link_artifact_version_to_model_version

    import materializers  # noqa: F401
    from core.artifacts import ModelFolder

    client = Client()
    client.create_model(name=MODEL_NAME)
    version = client.create_model_version(model_name_or_id=MODEL_NAME)
    link_artifact_version_to_model_version(save_artifact(ModelFolder(adapter_dir), name="adapter"), version)
    client.update_model_version(model_name_or_id=MODEL_NAME, version_name_or_id=version.id, stage="staging")


def serving_stack() -> str:
    """Id of a stack with the local deployer (`local-serve`, as `make serve` registers it)."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    client = Client()
    try:
        return str(client.get_stack("local-serve").id)
    except KeyError:
        pass
    try:
        client.get_stack_component(StackComponentType.DEPLOYER, "local-deployer")
    except KeyError:
        client.create_stack_component(
            name="local-deployer", flavor="local", component_type=StackComponentType.DEPLOYER, configuration={}
        )
    stack = client.create_stack(
        name="local-serve",
        components={
            StackComponentType.ORCHESTRATOR: "default",
            StackComponentType.ARTIFACT_STORE: "default",
            StackComponentType.DEPLOYER: "local-deployer",
        },
    )
    return str(stack.id)


def wait_healthy(url: str, timeout_s: float = 600) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer /health within {timeout_s:.0f} s")


def summarize(name: str, latencies: list[float], tokens: list[int], answers: list[str], wall: float = 0) -> dict:
    total = wall or sum(latencies)  # sequential rows: the sum of the latencies is the wall time
    return {
        "row": name,
        "requests": len(latencies),
        "p50_s": round(percentile(latencies, 50), 4),
        "p95_s": round(percentile(latencies, 95), 4),
        "mean_s": round(statistics.mean(latencies), 4),
        "completion_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / total, 2) if total else 0.0,
        "answers": answers,
    }


def run_direct(served, prompts: list[str], max_new_tokens: int) -> dict:
    from core.serving.model import answer

    answer(served, prompts[0], "", max_new_tokens)  # warm-up
    latencies, tokens, answers = [], [], []
    for p in prompts:
        t = time.perf_counter()
        out = answer(served, p, "", max_new_tokens)
        latencies.append(time.perf_counter() - t)
        tokens.append(out["completion_tokens"])
        answers.append(out["answer"])
    return summarize("direct", latencies, tokens, answers)


def run_deployment(url: str, prompts: list[str], max_new_tokens: int, in_memory: bool) -> dict:
    import requests

    def post(prompt: str) -> dict:
        body = {"parameters": {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.0}}
        if in_memory:
            body["skip_artifact_materialization"] = True
        reply = requests.post(url + "/invoke", json=body, timeout=600)
        reply.raise_for_status()
        data = reply.json()
        if not data["success"]:
            raise RuntimeError(f"deployment error: {data['error']}")
        return data["outputs"]

    post(prompts[0])  # warm-up
    latencies, tokens, answers = [], [], []
    for p in prompts:
        t = time.perf_counter()
        out = post(p)
        latencies.append(time.perf_counter() - t)
        tokens.append(out["completion_tokens"])
        answers.append(out["answer"])
    return summarize("deployment-in-memory" if in_memory else "deployment", latencies, tokens, answers)


def run_openai(
    url: str,
    prompts: list[str],
    max_new_tokens: int,
    clients: int,
    engine: str = "transformers",
    system: str | None = None,
    extra_body: dict | None = None,
) -> dict:
    """`clients` threads, each asking every prompt once through the OpenAI client, in a closed loop. `system`: a
    system message to send (llama-server's own endpoint renders the prompt itself); `extra_body`: its LoRA pick."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    oa = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    head = [{"role": "system", "content": system}] if system else []

    def ask(prompt: str) -> tuple[float, int, str]:
        t = time.perf_counter()
        reply = oa.chat.completions.create(
            model="default",
            messages=[*head, {"role": "user", "content": prompt}],
            max_tokens=max_new_tokens,
            temperature=0,
            extra_body=extra_body,
        )
        return time.perf_counter() - t, reply.usage.completion_tokens, reply.choices[0].message.content.strip()

    def client(offset: int) -> list[tuple[float, int, str]]:
        return [ask(prompts[(offset + k) % len(prompts)]) for k in range(len(prompts))]

    ask(prompts[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    done = [r for per_client in results for r in per_client]
    name = f"openai, {clients} client{'s' if clients > 1 else ''}"
    if engine != "transformers":
        name = f"{engine}: {name}"
    row = summarize(name, [r[0] for r in done], [r[1] for r in done], [r[2] for r in results[0]], wall=wall)
    row["clients"], row["engine"] = clients, engine
    return row


def run_llama_server(cfg, base, adapter: Path, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """llama.cpp's own llama-server, the same child the llama_cpp engine runs (same GGUF, LoRA, slots), asked on its
    own OpenAI endpoint: the speed without the deployment in front."""
    from core.serving.model import build_served_model

    served = build_served_model(cfg.model_copy(update={"engine": "llama_cpp"}), base, adapter_dirs={"default": adapter})
    try:
        lora = {"lora": [{"id": 0, "scale": 1.0}]}
        return [
            run_openai(served.engine.url, prompts, max_new_tokens, n, "llama-server", cfg.system_prompt, lora)
            for n in CLIENTS
        ]
    finally:
        served.engine.stop()


def print_table(result: dict) -> None:
    rows = result["rows"]
    direct = next((r for r in rows if r["row"] == "direct"), rows[0])
    head = ["row", "requests", "p50 s", "p95 s", "mean s", "tokens", "tokens/s", "p50 vs direct"]
    cells = []
    for r in rows:
        delta = "" if r is direct else f"{r['p50_s'] - direct['p50_s']:+.3f} s"
        seconds = [f"{r[k]:.3f}" for k in ("p50_s", "p95_s", "mean_s")]
        cells.append([r["row"], r["requests"], *seconds, r["completion_tokens"], f"{r['tokens_per_s']:.1f}", delta])
    print(
        f"\nserve latency: {result['preset']} ({result['model']}), max_new_tokens={result['max_new_tokens']}, "
        f"{result['device']}, torch threads {result['torch_threads']}, GGUF {result['gguf_type']}"
    )
    print("\n".join(common.format_table(head, cells, widths=[34, 8, 8, 8, 8, 7, 9, 14], align="<>>>>>>>", sep=" ")))
    for r in rows:
        if "same_answers_as_direct" in r:
            print(f"{r['row']}: same answers as direct: {r['same_answers_as_direct']}")
        if r.get("clients", 1) > 1 and "throughput_vs_sequential" in r:
            print(f"{r['row']}: {r['throughput_vs_sequential']:.2f}x the tokens/s of 1 client")
    for clients, c in result.get("request_log_cost", {}).items():
        each = ", ".join(f"{100 * x:+.1f}%" for x in c["rounds"])
        print(f"the request log costs {100 * c['mean']:+.1f}% of the tokens/s without it at {clients} client(s) "
              f"(mean of {len(c['rounds'])} round(s): {each})")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = common.preset_parser(__doc__, PRESETS, "smoke", "write the result here")
    ap.add_argument("--serve-config", help="benchmark the model version this serve config names (current store)")
    ap.add_argument("--prompts", type=int, help="number of prompts (default: the preset's)")
    ap.add_argument("--max-new-tokens", type=int, help="tokens per answer at most (default: the preset's)")
    ap.add_argument("--threads", type=int, help="torch CPU threads, here and in the server (default: torch's)")
    ap.add_argument(
        "--engine",
        nargs="+",
        choices=["transformers", "llama_cpp", "llama-server"],
        default=["transformers"],
        help="rows to run: transformers (the deployment's batch engine: direct, /invoke and OpenAI rows), llama_cpp "
        "(the deployment with engine: llama_cpp, OpenAI rows), llama-server (llama.cpp's own server on the same "
        "GGUF, its OpenAI endpoint)",
    )
    ap.add_argument("--gguf-type", choices=["f16", "q8_0", "q4_k_m"], default="q8_0", help="llama_cpp rows' GGUF")
    ap.add_argument(
        "--request-log",
        choices=["on", "off", "both"],
        default="on",
        help="the transformers deployment with the request log (on), without (off), or both, taking turns",
    )
    ap.add_argument("--rounds", type=int, default=1, help="OpenAI rows per deployment and client count, in turns")
    args = ap.parse_args(argv)
    if args.threads:  # before torch is imported, here and in the server process (it inherits the environment)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    preset = dict(PRESETS[args.preset])
    n_prompts = args.prompts or preset["prompts"]
    max_new_tokens = args.max_new_tokens or preset["max_new_tokens"]

    scratch = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    # before zenml is imported; a throwaway ZenML store unless the model version comes from the current one
    os.environ.update(common.bench_env(None if args.serve_config else scratch / "zenml"))
    os.chdir(common.REPO)  # the server process imports pipelines/ from its working directory

    import torch
    import yaml
    from zenml.client import Client

    from core.config import ModelSource, load_config
    from core.logs import quiet_libraries
    from core.serving.model import ServeConfig, build_served_model, load_served_model
    from pipelines.serve_pipeline import serve_pipeline

    quiet_libraries()
    default = load_config(common.REPO / "configs" / "default.yaml")
    if args.serve_config:
        doc = yaml.safe_load(Path(args.serve_config).read_text())
        cfg = ServeConfig.model_validate(doc["on_init_kwargs"]["config"])
        model_desc = f"{cfg.model_name} at {cfg.version or cfg.stage} from the store"
        served = load_served_model(cfg) if "transformers" in args.engine else None
        preset_name = "serve-config"
        base = adapter = None
    else:
        if preset["model"] == "tiny":
            from core.config import LoraSettings
            from core.tiny import build_tiny_model

            base = ModelSource(source="local", name=str(build_tiny_model(scratch / "tiny")))
            lora = LoraSettings(r=8, alpha=16, target_modules="all-linear")
            model_desc = "tiny 2-layer Llama, LoRA r=8 all-linear"
        else:
            base = ModelSource(source="bundled")
            lora = default.lora
            model_desc = f"SmolLM2-135M-Instruct, LoRA r={lora.r} {lora.target_modules} (untrained)"
        adapter = make_adapter(base, lora, scratch / "adapter")
        register_version(adapter)
        cfg = ServeConfig(
            model_name=MODEL_NAME,
            template=default.prompt.template,
            system_prompt=default.prompt.system_prompt,
            max_new_tokens_limit=max(512, max_new_tokens),
        )
        served = (
            build_served_model(cfg, base, adapter_dirs={"default": adapter}) if "transformers" in args.engine else None
        )
        preset_name = args.preset
    prompts = load_prompts(n_prompts)

    client = Client()
    os.environ["ZENML_ACTIVE_STACK_ID"] = serving_stack()  # this process and the server only; no config file edits
    name = f"serve-bench-{uuid.uuid4().hex[:6]}"
    request_log = {"url": f"sqlite:///{scratch / 'request-log.db'}"}  # never the store's own log
    logged = {"on": [True], "off": [False], "both": [True, False]}[args.request_log]
    engines = [e for e in args.engine if e != "llama-server"]
    names = {log: name if log else f"{name}-nolog" for log in logged}  # both: two deployments, up together
    rows = []

    def deploy(engine: str, log_requests: bool) -> str:
        update = {"engine": engine, "gguf_type": args.gguf_type, "log_requests": log_requests}
        engine_cfg = cfg.model_copy(update=update | {"request_log": cfg.request_log.model_copy(update=request_log)})
        pipe = serve_pipeline.with_options(
            on_init_kwargs={"config": engine_cfg.model_dump()}, settings={"deployer.local": {"port": None}}
        )
        url = pipe.deploy(deployment_name=names[log_requests], timeout=600).url.rstrip("/")
        wait_healthy(url)
        return url

    try:
        if "transformers" in args.engine:
            rows.append(run_direct(served, prompts, max_new_tokens))
        del served  # the server holds its own copy
        for engine in engines:
            urls = {log: deploy(engine, log) for log in (logged if engine == "transformers" else [True])}
            if engine == "transformers" and True in urls:
                rows.append(run_deployment(urls[True], prompts, max_new_tokens, in_memory=False))
                rows.append(run_deployment(urls[True], prompts, max_new_tokens, in_memory=True))
            for round_ in range(args.rounds):
                turns = list(urls) if round_ % 2 == 0 else list(reversed(urls))  # who goes first alternates
                for clients in CLIENTS:
                    for log_requests in turns:
                        label = engine if log_requests or args.request_log == "off" else "no request log"
                        row = run_openai(urls[log_requests], prompts, max_new_tokens, clients, label)
                        if args.rounds > 1:
                            row |= {"row": f"{row['row']} #{round_ + 1}", "round": round_ + 1}
                        rows.append(row)
            for deployment in names.values():  # one engine at a time: never two engines on the cores
                client.delete_deployment(deployment, force=True)
        if "llama-server" in args.engine:
            if adapter is None:
                raise SystemExit("--engine llama-server needs a preset (its adapter folder), not --serve-config")
            gguf_cfg = cfg.model_copy(update={"gguf_type": args.gguf_type})
            rows += run_llama_server(gguf_cfg, base, adapter, prompts, max_new_tokens)
    finally:
        for deployment in names.values():
            try:
                client.delete_deployment(deployment, force=True)
            except KeyError:
                pass
        shutil.rmtree(scratch, ignore_errors=True)
    for r in rows[1:]:
        if (
            rows[0]["row"] == "direct"
            and r.get("clients", 1) == 1
            and r.get("engine", "transformers") == "transformers"
        ):
            r["same_answers_as_direct"] = r["answers"] == rows[0]["answers"]

    def same(engine: str, clients: int, r: dict):  # the row of that engine and clients in r's round
        match = (
            b for b in rows if (b.get("engine"), b.get("clients"), b.get("round")) == (engine, clients, r.get("round"))
        )
        return next(match, None)

    for r in rows:  # each engine's concurrent rows against its own 1-client row
        sequential = same(r.get("engine"), 1, r)
        if sequential and r.get("clients"):
            r["throughput_vs_sequential"] = round(r["tokens_per_s"] / sequential["tokens_per_s"], 2)
    costs: dict[int, list[float]] = {}
    for r in rows:  # the request log's cost: logged transformers rows against the same clients without it
        bare = same("no request log", r.get("clients"), r)
        if bare and r.get("engine") == "transformers" and bare["tokens_per_s"]:
            r["request_log_cost"] = round(1 - r["tokens_per_s"] / bare["tokens_per_s"], 4)
            costs.setdefault(r["clients"], []).append(r["request_log_cost"])
    request_log_cost = {clients: {"rounds": c, "mean": round(statistics.mean(c), 4)} for clients, c in costs.items()}
    result = {
        "preset": preset_name,
        "model": model_desc,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "device": common.device_name(),
        "torch_threads": torch.get_num_threads(),
        "gguf_type": args.gguf_type,
        "engines": args.engine,
        "request_log": args.request_log,
        "rounds": args.rounds,
        "request_log_cost": request_log_cost,
        **common.versions("torch"),
        "rows": rows,
    }
    print_table(result)
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
