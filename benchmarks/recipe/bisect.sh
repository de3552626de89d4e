#!/usr/bin/env bash
# The issue-19 diagnosis: the product's old recipe (P) and the plain recipe, then P with one factor at a time
# switched to the plain choice, 2 seeds each, 2 runs in parallel (1 thread each). Appends JSON lines to $1.
#   bash benchmarks/recipe/bisect.sh docs/results/recipe/bisect.jsonl
set -euo pipefail
out=${1:?output .jsonl}
common="--size ${SIZE:-64} --epochs ${EPOCHS:-30}"
P="--resize pad --aug product --class-weights --label-smoothing 0.1 --val fold0 --monitor bacc --patience 10 \
--warmup 2 --norm imagenet3 --opt adam --lr 1e-4 --wd 1e-4 --batch 16"
declare -A V=(
  [plain]=""
  [product]="$P"
  [P+stretch]="${P/--resize pad/}"
  [P+plain_aug]="${P/--aug product/}"
  [P-class_weights]="${P/--class-weights/}"
  [P-label_smoothing]="${P/--label-smoothing 0.1/}"
  [P+val_slice_acc]="${P/--val fold0 --monitor bacc/}"
  [P-patience]="${P/--patience 10/}"
  [P-warmup]="${P/--warmup 2/}"
  [P+grey3]="${P/--norm imagenet3/}"
  [P+adamw_1e-3_bs32]="${P/--opt adam --lr 1e-4 --wd 1e-4 --batch 16/}"
)
ORDER=${ORDER:-"plain product P+stretch P+plain_aug P-class_weights P-label_smoothing P+val_slice_acc P-patience P-warmup P+grey3 P+adamw_1e-3_bs32"}
for seed in ${SEEDS:-0 1}; do for tag in $ORDER; do
  echo "$common --seed $seed --tag $tag ${V[$tag]}" | sed "s/ *$//"  # xargs -L joins a line ending in a blank
done; done | xargs -P "${JOBS:-2}" -L 1 sh -c 'python benchmarks/recipe/plain.py "$@" >> '"$out"' || echo "FAILED: $*" >&2' _
