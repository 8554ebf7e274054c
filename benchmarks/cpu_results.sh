#!/usr/bin/env bash
# CPU-sized results for the README: CIFAR-10 (the copy in ../shared/data/cifar10) at 16x16 px on a 5,000-image
# train subset, ResNet-18 with the CIFAR stem. Supervised MRL vs MRL-E vs the single-head baseline, and ReLIC + MRL,
# each evaluated per dim (probe, kNN, retrieval, PCA) by evaluate.py on the 10,000-image test split.
# 84 minutes on 2 CPU cores (shared with other jobs). Usage: bash benchmarks/cpu_results.sh [output folder, default runs/cpu_results]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cpu_results}
DATA=(--dataset cifar10 --dataset_path ../shared/data/cifar10 --image_size 16 --max_train_samples 5000 --seed 0)
SUP=(--epochs 8 --batch_size 128 --grad_accum_steps 1 --lr 2e-3 --report_to none --num_workers 2)
for variant in mrl tied baseline; do
  flag=$([ $variant = tied ] && echo --tied || ([ $variant = baseline ] && echo --baseline) || true)
  python train_supervised.py "${DATA[@]}" "${SUP[@]}" $flag --output_dir "$OUT/sup_$variant" --overwrite
done
python train_ssl.py --method relic "${DATA[@]}" --epochs 8 --batch_size 128 --knn_every 4 --report_to none \
  --num_workers 2 --output_dir "$OUT/relic" --overwrite
python evaluate.py --checkpoint "$OUT/sup_mrl" "$OUT/sup_tied" "$OUT/sup_baseline" --labels MRL MRL-E baseline \
  --max_train_samples 5000 --output_dir "$OUT/eval_supervised" --report_to none
python evaluate.py --checkpoint "$OUT/relic" --labels ReLIC-MRL --max_train_samples 5000 \
  --output_dir "$OUT/eval_relic" --report_to none
