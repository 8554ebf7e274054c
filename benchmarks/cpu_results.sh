#!/usr/bin/env bash
# The CPU-sized results of docs/results.md and the README's figure: CIFAR-10 (the copy in ../shared/data/cifar10) at
# 16x16 px, a seeded 5,000-image train subset, ResNet-18 with the CIFAR stem (512-d embedding), everything at today's
# defaults except the budget flags below; evaluated per dim by evaluate.py on the 10,000-image test split.
#   supervised: MRL, MRL-E, the single-head baseline (= FF-512) and FF-8/64, 6 epochs each, one comparison
#   self-supervised: ReLIC, SimCLR, BYOL, VICReg, Barlow Twins, 2 epochs of 3,000 images each, and the untrained
#   network; probes and kNN banks fit on the 5,000-image subset
# Then benchmarks/results_report.py writes the tables (with this commit and date) and docs/results.png.
# About 70 minutes on 2 CPU cores, alone. Usage: bash benchmarks/cpu_results.sh [output folder, default runs/cpu_results]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cpu_results}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
git rev-parse --short HEAD > "$OUT/commit.txt"
date -u +%Y-%m-%d > "$OUT/date.txt"
: > "$OUT/timings.txt"

stage() {  # stage NAME COMMAND...: run it, and note how long it took
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}

COMMON=(--dataset cifar10 --dataset_path ../shared/data/cifar10 --image_size 16 --max_train_samples 5000 --seed 0
        --num_workers 2 --report_to none --overwrite)
SUP=(--epochs 6 --batch_size 128 --grad_accum_steps 1 --lr 2e-3)
for variant in mrl mrl-e baseline ff8 ff64; do
  case $variant in
    mrl) flags=() ;;
    mrl-e) flags=(--tied) ;;
    baseline) flags=(--baseline) ;;
    ff*) flags=(--fixed_feature "${variant#ff}") ;;
  esac
  stage "supervised_$variant" "$PYTHON" train_supervised.py "${COMMON[@]}" "${SUP[@]}" "${flags[@]}" \
    --output_dir "$OUT/supervised_$variant"
done

SSL=(--epochs 2 --batch_size 128 --knn_every 0 --max_train_samples 3000)
for method in relic simclr byol vicreg barlow_twins; do
  stage "ssl_$method" "$PYTHON" train_ssl.py --method "$method" "${COMMON[@]}" "${SSL[@]}" --output_dir "$OUT/ssl_$method"
done
# the untrained network: weights as initialized, BatchNorm statistics of the training images (lr 0 moves nothing)
stage ssl_untrained "$PYTHON" train_ssl.py --method relic "${COMMON[@]}" "${SSL[@]}" --epochs 1 --lr 0 \
  --output_dir "$OUT/ssl_untrained"

EVAL=(--max_train_samples 5000 --dims 8,32,64,128,512 --num_workers 2 --report_to none)
stage eval_supervised "$PYTHON" evaluate.py "${EVAL[@]}" --compare --output_dir "$OUT/eval_supervised" \
  --checkpoint "$OUT"/supervised_{mrl,mrl-e,baseline,ff8,ff64} --labels MRL MRL-E baseline FF-8 FF-64
stage eval_ssl "$PYTHON" evaluate.py "${EVAL[@]}" --output_dir "$OUT/eval_ssl" \
  --checkpoint "$OUT"/ssl_{relic,simclr,byol,vicreg,barlow_twins,untrained} \
  --labels ReLIC SimCLR BYOL VICReg "Barlow Twins" untrained
"$PYTHON" benchmarks/results_report.py --cifar10 "$OUT"
