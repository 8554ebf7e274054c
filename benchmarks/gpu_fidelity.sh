#!/usr/bin/env bash
# Issue 13 on a GPU: benchmarks/fidelity_ssl.py on all 45,000 CIFAR-10 pre-training images (train minus the 10%
# validation split) at 32 px, ResNet-18 (CIFAR stem), batch 256, the same number of epochs for every side: ours in
# bf16 with --gpu_augment, mrl-pytorch 0.1.1 in fp16 (its only mixed precision) with its PIL pipeline in loader
# workers, the untrained network; then evaluate.py on each (probe, kNN, PCA; probe and bank on those 45,000 images,
# the 10,000 test images as queries). It writes $OUT/log, fidelity.md, fidelity.json (every per-dim number, the seed's
# per-epoch times) and parts.json (each part's seconds); ours' epoch times are in the log ("epoch N: ... img/s").
#
# Sized for about 9 minutes of an H200 with the defaults (EPOCHS=12, SEEDS=0): the seed at its measured 17.6 s per
# epoch is 3.5 minutes, ours at a few seconds per epoch about one, six evaluations and process start-ups the rest.
# EPOCHS, SEEDS (e.g. 0,1 for the two-seed noise), SIDES, WORKERS override. Every part (one training run, one
# evaluation) is skipped once done and train_ssl.py resumes from its per-epoch checkpoints, so a run cut off by the
# command's time limit continues when the same command runs again on the same machine (RUNS keeps the models).
#
# Prepare on a machine with PyPI and the CIFAR-10 copy (the GPU image lacks `datasets` and mrl-pytorch):
#   bash benchmarks/gpu_session.sh prepare      # wheels into .whl/ (mrl-pytorch apart in .whl/seed), data/cifar10
# then on the GPU machine, from the repository root, carrying .whl and data:
#   bash benchmarks/gpu_fidelity.sh
# Check the script itself on a CPU (digits at 8 px, a few minutes): GPU_FIDELITY_SMOKE=1 bash benchmarks/gpu_fidelity.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_fidelity}
RUNS=${RUNS:-runs/fidelity_gpu}  # model folders and caches: not results, and too big to bring back
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/log") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
DATA=${DATA:-data/cifar10}
[ -d "$DATA" ] || DATA=../shared/data/cifar10

if [ -n "${GPU_FIDELITY_SMOKE:-}" ]; then
  ARGS=(--dataset digits --dataset_path "" --image_size 8 --max_train_samples 256 --batch_size 32 --epochs 1
        --device cpu --num_workers 2 --monitor_samples 64 --max_eval_samples 128)
  LIMIT=1800
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
  ARGS=(--dataset cifar10 --dataset_path "$DATA" --image_size 32 --max_train_samples 0 --batch_size 256
        --epochs "${EPOCHS:-12}" --device cuda --precision bf16 --gpu_augment --num_workers "${WORKERS:-8}"
        --monitor_samples 2000)
  LIMIT=${LIMIT:-570}  # under a 600 s command limit, so that the files written so far come back
fi
start=$SECONDS
FIDELITY=($PY benchmarks/fidelity_ssl.py "${ARGS[@]}" --sides "${SIDES:-untrained,seed,ours}" --seeds "${SEEDS:-0}"
          --seed_wheel_dir .whl/seed --output_dir "$RUNS")
timeout "$LIMIT" "${FIDELITY[@]}"
status=$?
[ $status = 124 ] && echo "=== time limit: run the same command again to continue"
echo "=== fidelity_ssl.py: exit $status after $((SECONDS - start)) s"
[ $status = 0 ] || timeout 60 "${FIDELITY[@]}" --table_only  # the table of the parts that finished
cp "$RUNS"/fidelity.md "$RUNS"/fidelity.json "$RUNS"/parts.json "$OUT"/ 2>/dev/null
exit $status
