#!/usr/bin/env bash
# ONE GPU check for issue 23 (run from the repo root on the GPU machine; <= 8 minutes).
#   bash benchmarks/gpu_check.sh               # H100/H200: the figures of the issue
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # CPU dry run: every section at tiny sizes (no Python errors)
# Wheels the GPU image lacks are carried in .whl/ (benchmarks/gpu_wheels.sh fills it here).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1
status=0
run() {  # a section that fails is reported and the next one still runs
  echo "=== $1"; shift
  local t0=$SECONDS
  timeout "${SECTION_TIMEOUT:-170}" "$@" || { echo "!!! section failed (exit $?)"; status=1; }
  echo "--- $((SECONDS - t0)) s"
}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ "$DRY" = 1 ]; then
  A=(--device cpu --model resnet18 --size 32 --warmup 1 --steps 1)
  BS=(4)
  B=(--device cpu --tiny)
else
  A=(--device cuda --amp bf16 --channels-last --model resnet50 --size 224 --warmup 5 --steps 25)
  BS=(16 64)
  B=(--device cuda)
fi
for bs in "${BS[@]}"; do
  run "(a) ResNet-50 224 px bf16 channels_last, batch $bs: eager Adam, eager GCSAM, graphed GCSAM, hand-written graphed GCSAM" \
    "$PY" benchmarks/train_step.py "${A[@]}" --batch "$bs" --optimizers adam,gcsam,graph:gcsam,hand:gcsam
done
echo "targets: bs16 graph:gcsam/adam >= 1.8 (stretch 2.0), graph:gcsam/hand:gcsam >= 0.95; bs64 graph:gcsam/adam >= 0.8"
run "(b)+(c) eager-vs-graphed weights, graphed evaluation forward" "$PY" benchmarks/gpu_graph_check.py "${B[@]}"
if [ "$DRY" = 1 ]; then
  run "CPU tests of the graph/device-cache paths" "$PY" -m pytest -q -x -p no:warnings tests/test_graphed.py tests/test_device_cache.py
else
  run "CUDA tests (graphed == eager, capture fallback, device cache on CUDA)" "$PY" -m pytest -q -x -p no:warnings \
    tests/test_graphed.py tests/test_device_cache.py -k "cuda or graphed_equals or falls_back"
fi
echo "(d) medgcsam train epoch on BUSI from the device cache, (e) 24-cell presets comparison: not in this build"
exit $status
