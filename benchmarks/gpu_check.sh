#!/usr/bin/env bash
# ONE GPU check for issue 23 (run from the repo root on the GPU machine; the whole script <= 8.5 minutes).
#   bash benchmarks/gpu_check.sh                   # H100/H200: the figures of the issue
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # CPU dry run: every section at tiny sizes (no Python errors)
# Carried (ignored) paths: .whl/ (wheels the GPU image lacks, and Ray as ray_trim.tar.xz) and .gpu_data/busi
# (BUSI PNGs, grey ones as 1-channel PNG), both filled by
# benchmarks/gpu_wheels.sh. Environment:
#   GPU_CHECK_BUDGET  seconds for the whole script (default 510); every section is time-limited inside it
#   E_LIMIT           hard limit of section (e), the 24-cell presets comparison (default 300 s)
#   E_WORKERS         cells at once in (e) (default: the sizing rule on the peak memory measured in (d))
#   RECIPE_EXPERIMENT an experiment yaml run like (e) and beside it (default: none); its report table is printed
#   OUT               when set, the full logs are copied there
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
SLOW=1; [ "$DRY" = 1 ] && SLOW=4  # section limits are GPU times; shared CPU cores need longer
BUDGET="${GPU_CHECK_BUDGET:-510}"
E_LIMIT="${E_LIMIT:-300}"
RECIPE_EXPERIMENT="${RECIPE_EXPERIMENT:-}"  # HOOK (issue 19): e.g. pipelines/paper/bus_resnet50_recipe_gpu.yaml
LOGS="$(mktemp -d /tmp/gpu_check.XXXXXX)"
T0=$SECONDS
if [ "$DRY" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the CPU dry run uses its own env
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
  [ -f .whl/ray_trim.tar.xz ] && tar -xJf .whl/ray_trim.tar.xz -C /tmp/site  # Ray, trimmed (gpu_wheels.sh)
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
left() { echo $((BUDGET - (SECONDS - T0))); }
run() {  # run NAME LIMIT CMD...: time-limited, output to the screen and $LOGS/NAME.log; a failure is reported
  local name=$1 limit=$(( $2 * SLOW )); shift 2
  local room=$(( $(left) - 20 ))
  [ "$limit" -gt "$room" ] && limit=$room
  [ "$limit" -lt 5 ] && { echo "!!! $name skipped: the time budget is spent"; status=1; return; }
  echo "=== $name (limit ${limit} s)"
  local t=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!!! $name failed (exit $rc$([ "$rc" = 124 ] && echo ': time limit'))"; status=1; }
  echo "--- $name $((SECONDS - t)) s"
}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# BUSI where the pipelines expect it (pipelines/paper/bus_gpu_base.yaml: data.root ../../../shared/data/busi,
# i.e. ../shared/data/busi from the repo root); data_manifests/busi.csv paths are relative to that folder.
BUSI="$PWD/.gpu_data/busi"
[ -d "$BUSI" ] || BUSI="$(cd ../shared/data/busi 2>/dev/null && pwd)"
if [ ! -e ../shared/data/busi ] && [ -d "$BUSI" ]; then
  mkdir -p ../shared/data && ln -s "$BUSI" ../shared/data/busi && echo "linked ../shared/data/busi -> $BUSI"
fi
[ -d ../shared/data/busi/benign ] || echo "!!! no BUSI at ../shared/data/busi (run benchmarks/gpu_wheels.sh here first)"

if [ "$DRY" = 1 ]; then
  A=(--device cpu --model resnet18 --size 32 --warmup 1 --steps 1); BS=(4)
  B=(--device cpu --tiny)
  D=(--set model.name=resnet18 --set data.image_size=32 --set train.epochs=1 --set data.batch_size=8)
  E_LIMIT=$(( E_LIMIT < 40 ? E_LIMIT : 40 ))
else
  A=(--device cuda --amp bf16 --channels-last --model resnet50 --size 224 --warmup 5 --steps 25); BS=(16 64)
  B=(--device cuda)
  D=(--set train.epochs=3)
fi

# (a) alone on the GPU: its images/s are the reference of (d)
for bs in "${BS[@]}"; do
  run "a_bs$bs" 75 "$PY" benchmarks/train_step.py "${A[@]}" --batch "$bs" --optimizers adam,gcsam,graph:gcsam,hand:gcsam
done
echo "targets: bs16 graph:gcsam/adam >= 1.8 (stretch 2.0), graph:gcsam/hand:gcsam >= 0.95; bs64 graph:gcsam/adam >= 0.8"

# (d) a real `medgcsam train` on BUSI, 224 px, from the device cache, alone on the GPU
rm -rf /tmp/gpu_check_d /tmp/gpu_check_d.db
run d_train 100 "$PY" -m medgcsam train pipelines/paper/bus_gpu_base.yaml --tracking-uri sqlite:////tmp/gpu_check_d.db \
  --set name=gpu_check_busi --set output_dir=/tmp/gpu_check_d --set optimizer.name=gcsam --set data.num_workers=2 \
  --set train.warmup_epochs=0 --set train.early_stopping_patience=null --set evaluation.enabled=false \
  --set sharpness.enabled=false --set tracking.log_model=false --set tracking.register_as=null "${D[@]}"
"$PY" - "$LOGS" <<'EOF' | tee "$LOGS/d_summary.log"
import re, sys, pathlib
logs = pathlib.Path(sys.argv[1])
def text(name):
    p = logs / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""
rates = [float(r) for r in re.findall(r"train ([\d.]+) images/s", text("d_train"))]
synthetic = next((float(m) for m in re.findall(r"^graph:gcsam\s+[\d.]+\s+([\d.]+)", text("a_bs16") or text("a_bs4"), re.M)), None)
peak = None
try:
    import mlflow
    client = mlflow.MlflowClient("sqlite:////tmp/gpu_check_d.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    hist = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "gpu/peak_memory_mb")]
    peak = max(hist) if hist else None
except Exception as exc:  # the figure is optional; say why it is missing
    print(f"(d) peak memory not read: {type(exc).__name__}: {exc}")
steady = rates[1:] or rates
print(f"(d) BUSI train images/s per epoch: {', '.join(f'{r:.0f}' for r in rates) or 'none'}; "
      f"steady (epochs 2+) {max(steady) if steady else float('nan'):.0f} vs synthetic graph:gcsam "
      f"{synthetic if synthetic else float('nan'):.0f} -> RATIO "
      f"{(max(steady) / synthetic) if steady and synthetic else float('nan'):.3f} (target >= 0.9)")
print(f"(d) peak GPU memory of the cell: {peak if peak is not None else float('nan'):.0f} MiB")
(logs / "d_peak_mb").write_text(str(peak or ""))
EOF

# (c) timings alone on the GPU: evaluation forward and Hessian-vector product, eager vs graphed
run c_speedups 90 "$PY" benchmarks/gpu_graph_check.py "${B[@]}" --sections c

# (e) the 24-cell presets comparison (and the RECIPE_EXPERIMENT hook) in the background, while (b) and the CUDA
# tests (correctness only, no timings) share the GPU with them
FREE_MB=$("$PY" -c "import torch; print(int(torch.cuda.mem_get_info()[0] / 2**20) if torch.cuda.is_available() else 0)")
PEAK_MB=$(cat "$LOGS/d_peak_mb" 2>/dev/null)
if [ -z "${E_WORKERS:-}" ]; then  # the sizing rule (docs/gpu.md), capped by the 16 CPU cores (a host thread per cell)
  E_WORKERS=$("$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from gpu_experiment_report import cells_per_gpu
free, peak = float('${FREE_MB:-0}' or 0), float('${PEAK_MB:-0}' or 0)
print(min(12, cells_per_gpu(free, peak)) if free and peak else 8)")
fi
[ "$DRY" = 1 ] && E_WORKERS=1
RECIPE_WORKERS=0
if [ -n "$RECIPE_EXPERIMENT" ]; then  # the recipe's cells first: all at once (RECIPE_WORKERS), the rest to (e)
  RECIPE_WORKERS=${RECIPE_WORKERS_MAX:-9}
  [ "$DRY" = 1 ] && RECIPE_WORKERS=1
  E_WORKERS=$(( E_WORKERS - RECIPE_WORKERS > 2 ? E_WORKERS - RECIPE_WORKERS : 2 ))
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # 16 cores shared by every cell's process
E_LIMIT=$(( E_LIMIT < $(left) - 40 ? E_LIMIT : $(left) - 40 ))
E_YAML=pipelines/paper/bus_resnet50_presets_gpu.yaml
echo "=== (e) $E_YAML: $E_WORKERS workers (free ${FREE_MB} MiB, peak per cell from (d) ${PEAK_MB:-?} MiB), hard limit ${E_LIMIT} s"
rm -f /tmp/gpu_check_e.db /tmp/gpu_check_recipe.db
E_START=$SECONDS
timeout -k 10 "$E_LIMIT" "$PY" -m medgcsam experiment "$E_YAML" --workers "$E_WORKERS" \
  --tracking-uri sqlite:////tmp/gpu_check_e.db >"$LOGS/e_experiment.log" 2>&1 &
E_PID=$!
if [ -n "$RECIPE_EXPERIMENT" ]; then
  echo "=== recipe hook: $RECIPE_EXPERIMENT, $RECIPE_WORKERS workers, hard limit ${E_LIMIT} s"
  timeout -k 10 "$E_LIMIT" "$PY" -m medgcsam experiment "$RECIPE_EXPERIMENT" --workers "$RECIPE_WORKERS" \
    --tracking-uri sqlite:////tmp/gpu_check_recipe.db >"$LOGS/recipe_experiment.log" 2>&1 &
  R_PID=$!
fi

run b_weights 150 "$PY" benchmarks/gpu_graph_check.py "${B[@]}" --sections b
if [ "$DRY" = 1 ]; then
  run tests 120 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_graphed.py tests/test_device_cache.py \
    -k "not graphed_equals"
else
  run tests 90 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_graphed.py tests/test_device_cache.py \
    tests/test_sharpness_hessian.py -k "cuda or graphed or falls_back or capture"
fi

wait "$E_PID"; E_RC=$?
E_WALL=$((SECONDS - E_START))
[ "$E_RC" = 0 ] || echo "(e) experiment exit $E_RC$([ "$E_RC" = 124 ] && echo ' (hard time limit reached)')"
tail -5 "$LOGS/e_experiment.log"
"$PY" benchmarks/gpu_experiment_report.py "$E_YAML" --tracking-uri sqlite:////tmp/gpu_check_e.db --wall "$E_WALL" \
  --free-mb "${FREE_MB:-0}" 2>&1 | tee "$LOGS/e_report.log"
if [ -n "$RECIPE_EXPERIMENT" ]; then
  wait "$R_PID"; R_RC=$?
  echo "recipe experiment exit $R_RC"; tail -5 "$LOGS/recipe_experiment.log"
  "$PY" benchmarks/gpu_experiment_report.py "$RECIPE_EXPERIMENT" --tracking-uri sqlite:////tmp/gpu_check_recipe.db \
    --wall "$E_WALL" 2>&1 | tee "$LOGS/recipe_report.log"
fi

if [ -n "${OUT:-}" ]; then  # at most 8 files come back: one log of everything, one archive of the cell logs
  for f in "$LOGS"/*.log; do echo "##### $(basename "$f")"; cat "$f"; done >"$OUT/gpu_check_full.log"
  find outputs /tmp/gpu_check_d -name "*.log" 2>/dev/null | tar -czf "$OUT/gpu_check_cell_logs.tar.gz" -T - 2>/dev/null
  # the experiments' MLflow stores and reports (no checkpoints), to rebuild the reports with --report-only
  tar -czf "$OUT/gpu_check_experiments.tar.gz" --exclude="*.pt" /tmp/gpu_check_e.db /tmp/gpu_check_recipe.db \
    outputs/experiments 2>/dev/null
fi

echo
echo "================================ SUMMARY ($((SECONDS - T0)) s of ${BUDGET} s) ================================"
grep -h "^RATIO\|^graph:gcsam\|^hand:gcsam\|^adam \|^gcsam " "$LOGS"/a_bs*.log 2>/dev/null
grep -h "^(d)" "$LOGS/d_summary.log" 2>/dev/null
grep -h "^(c)" "$LOGS/c_speedups.log" 2>/dev/null
grep -h "graphed-vs-eager" "$LOGS/b_weights.log" 2>/dev/null
grep -h "passed\|failed\|error" "$LOGS/tests.log" 2>/dev/null | tail -2
head -1 "$LOGS/e_report.log" 2>/dev/null; grep -h "sizing rule" "$LOGS/e_report.log" 2>/dev/null
[ -n "$RECIPE_EXPERIMENT" ] && cat "$LOGS/recipe_report.log" 2>/dev/null
echo "exit status $status (logs in $LOGS${OUT:+, copied to \$OUT})"
exit $status
