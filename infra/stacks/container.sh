#!/usr/bin/env bash
# The local-container stack: production-shaped, on this one machine. Every step runs in its own
# Docker container (ZenML's local_docker orchestrator), artifacts go to an S3 bucket (moto's S3
# server on 127.0.0.1), pipeline metadata to a local ZenML server (REST API, `zenml login --local`).
#   bash infra/stacks/container.sh up       # start what is missing, build the step image, register the stack
#   bash infra/stacks/container.sh status   # what runs, and who started it
#   bash infra/stacks/container.sh down     # stop what `up` started, nothing else
#   zenml pipeline run <pipeline> -c <config> --stack local-container   # with the settings `up` prints
# Run it from the repo root as root (dockerd, debootstrap); the project's venv (`make setup`) is put
# on PATH. ZENML_CONFIG_PATH as the Makefile sets it (default .zenml-home/): `up` logs that config
# in to the local server (which then serves its SQLite store, so `make run` goes through the server
# too), `down` logs it out again (back to the SQLite store).
# `up` starts only what is missing and records what it started in $STACK_STATE/*.pid (.cache/stack/):
#   dockerd      --bridge=none --iptables=false --ip-masq=false (no bridge network here: builds and
#                containers use the host network); a Docker daemon already running is used as is.
#                Installs Debian's docker.io (and debootstrap) first when dockerd is missing.
#   moto         S3 on 127.0.0.1:$S3_PORT (4566), bucket $BUCKET (zenml-artifacts), with AWS IAM
#                authentication enforced: its first unauthenticated calls create the bucket, an IAM user
#                with an allow-all policy and that user's access key, which goes to
#                $STATE/s3-credentials.json (mode 600, never printed) and into the ZenML secret; every
#                later request must be signed with it (a wrong secret fails as it would on AWS). In
#                memory only: after a restart the bucket is new and empty, the key is new, and artifacts
#                of earlier runs are gone (disable caching or start a fresh ZENML_CONFIG_PATH then).
#   ZenML server 127.0.0.1:$ZENML_PORT (8237, as `make dashboard`), a daemon of ZENML_CONFIG_PATH.
#   step image   infra/Dockerfile (the GPU stack's too) on the local base: infra/stacks/base_image.sh makes
#                zenml-qlora-base:<hash of pyproject.toml> (Debian, every pin) and zenml-qlora-uv, tagged :latest;
#                `up` builds the Dockerfile on them offline, as configs/container.yaml has ZenML build it per
#                run, so a run's build finds every layer in Docker's cache.
# and registers (idempotently; an existing component is updated to the current ports and paths):
#   secret s3-moto (moto's access key; for an S3 endpoint not started here: AWS_ACCESS_KEY_ID /
#   AWS_SECRET_ACCESS_KEY), artifact store s3-moto (flavor s3, s3://$BUCKET, endpoint $S3_ENDPOINT in
#   client_kwargs), orchestrator local-container (flavor local_docker; run_args: host network,
#   $CACHE_DIR mounted at /cache, LORA_CACHE_DIR=/cache/models so the bundled model is converted once
#   for every step container, plain tracebacks, containers removed when done), image builder
#   local-docker (flavor local), stack local-container.
# The stack is not made active (like infra/stacks/mlflow.sh): pass --stack local-container.
# Other variables: STACK_STATE (pid files, logs, the key; default .cache/stack: a test suite runs a
# second stack next to this one with its own), S3_ENDPOINT (the endpoint the artifact store uses,
# default http://127.0.0.1:$S3_PORT; tests/infra/test_container_stack.py puts a TCP forwarder it can stop
# in between), CACHE_DIR, ZENML_PORT, S3_PORT, BUCKET.
set -euo pipefail

cd "$(dirname "$0")/../.."
[ -x .venv/bin/zenml ] && PATH="$PWD/.venv/bin:$PATH"
export ZENML_CONFIG_PATH="${ZENML_CONFIG_PATH:-$PWD/.zenml-home}"
export ZENML_ANALYTICS_OPT_IN="${ZENML_ANALYTICS_OPT_IN:-false}"
export ZENML_AUTO_OPEN_DASHBOARD=false
STATE="${STACK_STATE:-$PWD/.cache/stack}"
S3_PORT="${S3_PORT:-4566}"
S3_ENDPOINT="${S3_ENDPOINT:-http://127.0.0.1:$S3_PORT}"
ZENML_PORT="${ZENML_PORT:-8237}"
BUCKET="${BUCKET:-zenml-artifacts}"
CACHE_DIR="${CACHE_DIR:-$STATE/shared}"   # host folder at /cache in every step container (checkpoints, HF_HOME)
# moto's access key (JSON with the ZenML secret's keys), written when `up` starts moto; mode 600
CREDENTIALS="$STATE/s3-credentials.json"
STACK=local-container
BASE_REPO=zenml-qlora-base
UV_REPO=zenml-qlora-uv
# moto's S3 server; s3fs and boto3 as ZenML 0.98's s3 integration asks (s3fs resolves to the
# fsspec that datasets pins).
S3_PACKAGES=("moto[server]==5.2.5" "s3fs>2022.3.0,!=2025.3.1" boto3)
mkdir -p "$STATE"

log() { echo "container.sh: $*" >&2; }
die() { log "$*"; exit 1; }
# Every zenml call sees no repository (.zen/): its active stack/project ids belong to whichever
# store the repo was last used with, and ZenML rewrites them when they are not in this one.
zen() { ZENML_REPOSITORY_PATH="$STATE" zenml "$@"; }
# Runs a command, showing its output only when it fails.
quiet() {
    local out
    out="$("$@" 2>&1)" || { printf '%s\n' "$out" >&2; return 1; }
}

# $1: a pid file under $STATE; $2: a word its process's command line must contain (pid reuse).
ours() {
    local f="$STATE/$1.pid" pid
    [ -f "$f" ] || return 1
    pid="$(cat "$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}
# $1: pid file name; stops its process (TERM, then KILL after $2 seconds) and removes the file.
stop_ours() {
    local pid i
    pid="$(cat "$STATE/$1.pid")"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < $2 * 5; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { log "$1 ($pid) did not stop in $2 s, killing it"; kill -9 "$pid" 2>/dev/null || true; }
    rm -f "$STATE/$1.pid"
}
listening() { python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; }
server_pid() { cat "$ZENML_CONFIG_PATH/zen_server/daemon/service.pid" 2>/dev/null || true; }
server_alive() { local p; p="$(server_pid)"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then die "install $* (Debian: apt-get install $*)"; fi
    log "installing $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

docker_up() {
    if docker info >/dev/null 2>&1; then
        ours dockerd dockerd || log "docker: using the running daemon (not started here)"
        return
    fi
    command -v dockerd >/dev/null || apt_install docker.io
    log "starting dockerd (log: $STATE/dockerd.log)"
    setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false >>"$STATE/dockerd.log" 2>&1 </dev/null &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 1 150); do docker info >/dev/null 2>&1 && return; sleep 0.2; done
    die "dockerd did not come up in 30 s, see $STATE/dockerd.log"
}

moto_up() {
    python -c "import moto.server, s3fs, boto3" 2>/dev/null || pip install -q "${S3_PACKAGES[@]}"
    if ours moto moto_server && [ -s "$CREDENTIALS" ]; then
        :
    elif ours moto moto_server; then
        die "moto (pid $(cat "$STATE/moto.pid")) runs without an access key in $CREDENTIALS (started by an older container.sh?): run down, then up"
    elif listening "$S3_PORT"; then
        log "moto: something already listens on 127.0.0.1:$S3_PORT, using it as the S3 endpoint"
        if [ -n "${AWS_ACCESS_KEY_ID:-}" ]; then
            (umask 077 && python -c 'import json, os, sys; json.dump({k: os.environ[k.upper()] for k in ("aws_access_key_id", "aws_secret_access_key")}, open(sys.argv[1], "w"))' "$CREDENTIALS")
        fi
        [ -s "$CREDENTIALS" ] || die "no key for it: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    else
        log "starting moto on 127.0.0.1:$S3_PORT with IAM authentication (log: $STATE/moto.log)"
        rm -f "$CREDENTIALS"
        # moto serves the first 4 requests unauthenticated: exactly bootstrap_moto's 4 calls.
        INITIAL_NO_AUTH_ACTION_COUNT=4 setsid nohup moto_server -H 127.0.0.1 -p "$S3_PORT" >>"$STATE/moto.log" 2>&1 </dev/null &
        echo $! >"$STATE/moto.pid"
        for _ in $(seq 1 100); do listening "$S3_PORT" && break; sleep 0.2; done
        listening "$S3_PORT" || die "moto did not come up in 20 s, see $STATE/moto.log"
        bootstrap_moto
    fi
    # With the key: the bucket is there (an S3 endpoint not started here may lack it).
    python - "http://127.0.0.1:$S3_PORT" "$BUCKET" "$CREDENTIALS" <<'EOF'
import json, sys
import boto3
from botocore.exceptions import ClientError
with open(sys.argv[3]) as f:
    key = json.load(f)
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", **key)
try:
    s3.head_bucket(Bucket=sys.argv[2])
except ClientError as e:
    if e.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
        raise SystemExit(f"container.sh: S3 at {sys.argv[1]} refused the stored key: {e}")
    s3.create_bucket(Bucket=sys.argv[2])
EOF
}

# moto's 4 unauthenticated calls: the bucket, an IAM user, its allow-all inline policy, its access key
# (into $CREDENTIALS, mode 600; never printed).
bootstrap_moto() {
    (umask 077 && python - "http://127.0.0.1:$S3_PORT" "$BUCKET" "$CREDENTIALS") <<'EOF'
import json, sys
import boto3
bootstrap = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
boto3.client("s3", **bootstrap).create_bucket(Bucket=sys.argv[2])
iam = boto3.client("iam", **bootstrap)
iam.create_user(UserName="zenml")
policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
iam.put_user_policy(UserName="zenml", PolicyName="allow-all", PolicyDocument=json.dumps(policy))
key = iam.create_access_key(UserName="zenml")["AccessKey"]
with open(sys.argv[3], "w") as f:
    json.dump({"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}, f)
EOF
}

zenml_up() {
    if server_alive; then
        ours zenml-server local_daemon_entrypoint || log "ZenML server: using the one running for $ZENML_CONFIG_PATH (not started here)"
        return
    fi
    listening "$ZENML_PORT" && die "127.0.0.1:$ZENML_PORT is taken by something else: set ZENML_PORT"
    log "starting the local ZenML server on 127.0.0.1:$ZENML_PORT for $ZENML_CONFIG_PATH"
    (cd "$STATE" && quiet zen login --local --port "$ZENML_PORT" --ip-address 127.0.0.1)
    server_alive || die "the ZenML server did not start, see $ZENML_CONFIG_PATH/zen_server/daemon/service.log"
    server_pid >"$STATE/zenml-server.pid"
    echo "$ZENML_CONFIG_PATH" >"$STATE/zenml-server.config"
}

register() {
    local run_args
    # the key's values from the file, never on a command line
    if zen secret get s3-moto >/dev/null 2>&1; then
        quiet zen secret update s3-moto --values="@$CREDENTIALS"
    else
        quiet zen secret create s3-moto --values="@$CREDENTIALS"
    fi
    local endpoint="{\"endpoint_url\": \"$S3_ENDPOINT\"}"
    if zen artifact-store describe s3-moto >/dev/null 2>&1; then
        quiet zen artifact-store update s3-moto --authentication_secret=s3-moto --client_kwargs="$endpoint"
    else
        quiet zen artifact-store register s3-moto --flavor=s3 --path="s3://$BUCKET" \
            --authentication_secret=s3-moto --client_kwargs="$endpoint"
    fi
    # Host network: dockerd runs without a bridge, so a container has loopback only otherwise, and
    # reaches ZenML and S3 at 127.0.0.1 with it. remove: no exited container per step run.
    mkdir -p "$CACHE_DIR/huggingface"
    # LORA_CACHE_DIR: the bundled model's GGUF->HF conversion (core/models.py) lands on the volume, made
    # once for all step containers instead of once in each. Plain tracebacks: a failed step's stderr is
    # relayed to the console and kept in its log, where rich's boxes would wrap every line at 80 columns.
    mkdir -p "$CACHE_DIR/models"
    run_args="{\"network_mode\": \"host\", \"remove\": true, \"shm_size\": \"1g\", \"environment\": {\"LORA_CACHE_DIR\": \"/cache/models\", \"ZENML_ENABLE_RICH_TRACEBACK\": \"false\"}, \"volumes\": {\"$CACHE_DIR\": {\"bind\": \"/cache\", \"mode\": \"rw\"}}}"
    if zen orchestrator describe local-container >/dev/null 2>&1; then
        quiet zen orchestrator update local-container --run_args="$run_args"
    else
        quiet zen orchestrator register local-container --flavor=local_docker --run_args="$run_args"
    fi
    zen image-builder describe local-docker >/dev/null 2>&1 ||
        quiet zen image-builder register local-docker --flavor=local
    if zen stack describe "$STACK" >/dev/null 2>&1; then
        quiet zen stack update "$STACK" -o local-container -a s3-moto -i local-docker
    else
        quiet zen stack register "$STACK" -o local-container -a s3-moto -i local-docker
    fi
}

status() {
    local what
    if docker info >/dev/null 2>&1; then
        what="running"; ours dockerd dockerd && what="$what, started here (pid $(cat "$STATE/dockerd.pid"))"
    else what="not running"; fi
    echo "dockerd:      $what"
    if listening "$S3_PORT"; then
        what="127.0.0.1:$S3_PORT"; ours moto moto_server && what="$what, started here (pid $(cat "$STATE/moto.pid"))"
    else what="not running"; fi
    echo "moto (S3):    $what, bucket s3://$BUCKET; the artifact store's endpoint: $S3_ENDPOINT"
    if server_alive; then
        what="http://127.0.0.1:$(sed -n 's/.*"port": \([0-9]*\).*/\1/p' "$ZENML_CONFIG_PATH/zen_server/daemon/service.json" | head -n1)"
        ours zenml-server local_daemon_entrypoint && what="$what, started here (pid $(server_pid))"
    else what="not running"; fi
    echo "ZenML server: $what ($ZENML_CONFIG_PATH)"
    what="$(docker image inspect -f '{{index .RepoTags 0}}' "$BASE_REPO:latest" 2>/dev/null)" || what=none
    echo "base image:   $what"
    what="$(docker image inspect -f '{{.Id}}' zenml-qlora-step:latest 2>/dev/null | cut -c8-19)" || what=none
    echo "step image:   zenml-qlora-step:latest ($what, infra/Dockerfile on the base)"
}

# infra/Dockerfile on the local base, with configs/container.yaml's build arguments and the same context ZenML
# sends (the Dockerfile and pyproject.toml): offline, each layer finds its work done in the base. A run's build then
# takes every layer from Docker's cache (no container started); a pin missing from the base fails here.
step_image() {
    local out
    out="$(tar -c --transform 's|^infra/||' infra/Dockerfile pyproject.toml |
        docker build --network host --rm --build-arg "BASE_IMAGE=$BASE_REPO:latest" \
            --build-arg "UV_IMAGE=$UV_REPO:latest" --build-arg UV_OFFLINE=1 -t zenml-qlora-step:latest - 2>&1)" ||
        { printf '%s\n' "$out" >&2; die "infra/Dockerfile did not build on $BASE_REPO:latest (above)"; }
}

up() {
    docker_up
    command -v debootstrap >/dev/null || apt_install debootstrap
    moto_up
    zenml_up
    local image
    image="$(bash infra/stacks/base_image.sh)"
    docker tag "$image" "$BASE_REPO:latest"
    step_image
    register
    status
    cat <<EOF
stack $STACK: orchestrator local-container (local_docker), artifact store s3-moto, image builder local-docker
Run with --stack $STACK and the Docker settings of configs/container.yaml: infra/Dockerfile with build_args
BASE_IMAGE=$BASE_REPO:latest, UV_IMAGE=$UV_REPO:latest, UV_OFFLINE=1, build option network_mode: host; code travels
through the artifact store, so a code change builds nothing.
In the steps: /cache is $CACHE_DIR on this machine.
EOF
}

down() {
    if ours zenml-server local_daemon_entrypoint; then
        log "stopping the ZenML server (zenml logout --local)"
        (cd "$STATE" && ZENML_CONFIG_PATH="$(cat "$STATE/zenml-server.config")" quiet zen logout --local) || true
        ours zenml-server local_daemon_entrypoint && stop_ours zenml-server 30
        rm -f "$STATE/zenml-server.pid" "$STATE/zenml-server.config"
    fi
    if ours moto moto_server; then
        log "stopping moto (the bucket's contents and the access key go with it)"
        stop_ours moto 10
        rm -f "$CREDENTIALS"
    fi
    if ours dockerd dockerd; then
        log "stopping dockerd"
        stop_ours dockerd 60
    fi
    status
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*) die "usage: $0 up|down|status" ;;
esac
