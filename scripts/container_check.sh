#!/usr/bin/env bash
# Build the project's Dockerfile and run it, on a machine with buildah + podman and no image registry.
#
#   sudo scripts/container_check.sh [WORKDIR]        # WORKDIR default: /var/tmp/medgcsam-container-check
#
# 1. A base image from Debian packages (debootstrap bookworm, python3 venv in /opt/venv, torch/torchvision at
#    the pyproject.toml pins from pip), committed as localhost/medgcsam-base:bookworm and reused on later runs
#    (REBUILD_BASE=1 rebuilds it). PIP_LOCAL_INDEXES="/dir ..." bind-mounts local PEP 503 mirrors (each with a
#    simple/ folder) read-only into the base build so the torch wheels need not be downloaded.
#    PIP_CA_BUNDLE=FILE: where HTTPS goes through an intercepting proxy, that CA bundle is copied into the base
#    (/etc/ssl/certs/pip-ca.crt, env PIP_CERT) so pip in the base and in the Dockerfile's RUN trusts it.
# 2. `buildah bud --isolation chroot --build-arg BASE_IMAGE=...` of ./Dockerfile -> localhost/medgcsam:check.
# 3. In the image, without network: `medgcsam --help`; the main job (train + evaluate + register the shipped
#    BUSI sample on CPU, then predict with models:/medgcsam-busi-mini@champion); `predict` as the image's
#    non-root user from a read-only model volume; the uid and the read-only mount are shown; then
#    scripts/container_serve_check.py: `mlflow models serve` of that model answers a POST of a PNG as predict
#    did, and the compose file's basic-auth tracking server refuses a request without a login.
# Prints each command, its exit code and time, the image size; exits 1 when any command failed.
# PODMAN_RUNTIME=runc and CONTAINER_RUN_OPTS="--ulimit nofile=1024:1024 ..." adapt `podman run` to hosts that refuse
# crun's defaults (a VM with hybrid cgroups that forbids raising rlimits: see docs/container.md).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/var/tmp/medgcsam-container-check}
BASE=localhost/medgcsam-base:bookworm
IMAGE=localhost/medgcsam:check
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FAILED=0

step() {  # step NAME CMD...: run, print exit code and seconds, remember a failure
    local name=$1 start rc
    shift
    echo "=== $name: $*"
    start=$(date +%s)
    "$@"
    rc=$?
    echo "=== $name: exit $rc in $(( $(date +%s) - start )) s"
    [ "$rc" -eq 0 ] || FAILED=1
    return "$rc"
}

pin() {  # the == version pyproject.toml gives a package
    sed -n "s/^ *\"$1==\([^\"]*\)\",*$/\1/p" "$ROOT/pyproject.toml"
}

build_base() {
    local ctr mnt mounts=() extra=()
    ctr=$(buildah from scratch) || return 1
    mnt=$(buildah mount "$ctr") || return 1
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$mnt" "$MIRROR" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; return 1; }
    for dir in ${PIP_LOCAL_INDEXES:-}; do
        mounts+=(-v "$dir:$dir:ro")
        extra+=(--extra-index-url "file://$dir/simple")
    done
    if [ -n "${PIP_CA_BUNDLE:-}" ]; then
        cp "$PIP_CA_BUNDLE" "$mnt/etc/ssl/certs/pip-ca.crt" || return 1
        buildah config --env PIP_CERT=/etc/ssl/certs/pip-ca.crt "$ctr"
    fi
    buildah run --isolation chroot "$ctr" -- python3 -m venv /opt/venv || return 1
    buildah run --isolation chroot "${mounts[@]}" "$ctr" -- /opt/venv/bin/pip install --no-cache-dir -q \
        "${extra[@]}" "torch==$(pin torch)" "torchvision==$(pin torchvision)" || return 1
    rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/*
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd python3 "$ctr"
    buildah commit --rm "$ctr" "$BASE"
}

in_image() {  # in_image [podman run options...] -- ARGS...: the image, offline, its own user and entrypoint
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    # shellcheck disable=SC2086 # CONTAINER_RUN_OPTS is a list of options
    podman ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"} run --rm --network none ${CONTAINER_RUN_OPTS:-} \
        "${opts[@]}" "$IMAGE" "$@"
}

mkdir -p "$WORK"
echo "container check of $ROOT in $WORK at $(date -u +%FT%TZ); $(buildah --version); $(podman --version)"
total=$(date +%s)
if [ -n "${REBUILD_BASE:-}" ] || ! buildah inspect --type image "$BASE" > /dev/null 2>&1; then
    step "base image" build_base || exit 1
fi
commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
step "build" buildah bud --isolation chroot --layers --build-arg "BASE_IMAGE=$BASE" --build-arg "GIT_COMMIT=$commit" \
    -t "$IMAGE" "$ROOT" || exit 1
podman image ls --format "{{.Repository}}:{{.Tag}} {{.Size}}" "$IMAGE"
podman image ls --format "{{.Repository}}:{{.Tag}} {{.Size}}" "$BASE"

rm -rf "$WORK/run" && mkdir -p "$WORK/run/outputs" "$WORK/run/predict" && chown -R 10001:10001 "$WORK/run"
samples="$ROOT/data_manifests/samples/busi_mini"

step "help" in_image -- --help
step "user" in_image --entrypoint id -- -u
step "main job: train" in_image -v "$ROOT/data_manifests:/opt/medgcsam/data_manifests:ro" \
    -v "$WORK/run/outputs:/outputs" -w /outputs -- train /opt/medgcsam/pipelines/busi_mini.yaml
step "main job: predict models:/" in_image -v "$ROOT/data_manifests:/opt/medgcsam/data_manifests:ro" \
    -v "$WORK/run/outputs:/outputs" -w /outputs -e MLFLOW_TRACKING_URI=sqlite:////outputs/outputs/mlflow.db -- \
    predict --model models:/medgcsam-busi-mini@champion --input /opt/medgcsam/data_manifests/samples/busi_mini \
    --output /outputs/outputs/busi-mini/predictions.csv --num-workers 0

model=$(find "$WORK/run/outputs" -name MLmodel -print -quit)
[ -n "$model" ] || { echo "no registered model under $WORK/run/outputs"; exit 1; }
model=$(dirname "$model")
echo "registered model folder: $model ($(du -sh "$model" | cut -f1))"
step "model volume is read-only" in_image -v "$model:/model:ro" --entrypoint sh -- \
    -c 'if touch /model/x 2>/dev/null; then echo "/model is writable"; exit 1; else echo "/model: read-only"; fi'
step "predict: non-root, read-only model" in_image -v "$model:/model:ro" -v "$samples:/data:ro" \
    -v "$WORK/run/predict:/out" -- predict --model /model --input /data --output /out/predictions.csv \
    --num-workers 0
ls -ln "$WORK/run/predict"
head -3 "$WORK/run/predict/predictions.csv"
cmp "$WORK/run/predict/predictions.csv" "$WORK/run/outputs/outputs/busi-mini/predictions.csv" \
    && echo "same CSV from models:/ and from the read-only model folder"

step "serve: models serve POST + basic-auth tracking server" in_image -v "$model:/model:ro" -v "$samples:/data:ro" \
    -v "$WORK/run/predict:/out:ro" -v "$ROOT/scripts/container_serve_check.py:/check.py:ro" -e HOME=/tmp \
    --entrypoint python -- /check.py

echo "container check finished in $(( $(date +%s) - total )) s; failed: $FAILED"
df -h "$WORK" | tail -1
exit "$FAILED"
