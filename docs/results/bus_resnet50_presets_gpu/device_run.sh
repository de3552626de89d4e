#!/usr/bin/env bash
# The script that ran bus_resnet50_presets_gpu on the lent H100 (a record, not part of the product).
# It was called from the repository root of the device machine's copy as
#   bash .gpu_state/run.sh 430 bench          # call 1 (with --workers 6 at the time), then the train-step benchmark
#   bash .gpu_state/run.sh 550                # call 2
#   CELLS="--cell 21 --cell 22 --cell 23 --cell 18 --cell 19 --cell 20 --cell 10 --cell 11 --cell 12 --cell 13 \
#     --cell 14 --cell 15 --cell 16 --cell 17" bash .gpu_state/run.sh 490      # call 3: GCSAM and MSAM first
# .whl held the wheels of mlflow-skinny, monai, pydantic, pydicom and their dependencies; .gpu_data/busi the
# lossless BUSI copy; .gpu_state/state.txz the MLflow store returned by the previous call.
set -u
LIMIT=${1:-480}
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=/tmp/site:/work/main HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
mkdir -p /work/shared/data
mkdir -p /work/main; [ "$PWD" = /work/main ] || cp -a "$PWD/." /work/main/
[ -e /work/shared/data/busi ] || ln -s /work/main/.gpu_data/busi /work/shared/data/busi
cd /work/main
EXP=outputs/experiments/bus_resnet50_presets_gpu
if [ ! -d $EXP ] && [ -f .gpu_state/state.txz ]; then tar xJf .gpu_state/state.txz; echo "restored state"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, mlflow; print('torch', torch.__version__, 'timm', timm.__version__, 'mlflow', mlflow.__version__)"
echo "setup $(( $(date +%s) - t0 )) s"
if [ "${2:-}" = bench ]; then
  python3 benchmarks/train_step.py --device cuda --amp bf16 --model resnet50 --size 224 --batch 16 --channels-last \
    --optimizers adam,gc_adam,sam,asam,gsam,crsam,msam,gcsam --warmup 5 --steps 30 2>&1 | tee $OUT/train_step_resnet50_bs16.txt
fi
start=$(date +%s)
timeout $LIMIT python3 -m medgcsam experiment pipelines/paper/bus_resnet50_presets_gpu.yaml --workers 5 ${CELLS:-} > $OUT/experiment.log 2>&1
echo "experiment exit $? after $(( $(date +%s) - start )) s"
tail -45 $OUT/experiment.log
tar czf $OUT/state.tgz --exclude="*.pt" $EXP; tar cJf $OUT/state.txz $EXP/mlflow.db $EXP/mlartifacts
nvidia-smi --query-gpu=memory.used --format=csv,noheader
ls -la $OUT
