#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md in one command that fits a short lease of a GPU machine (about 7 minutes
# on an H100/H200; each part has its own time limit, so one failure does not cost the others). It writes a log and
# one text file per part to $OUT (default: runs/gpu_session).
#
#   1. env       GPU, driver, torch/accelerate/datasets versions
#   2. step      ReLIC + MRL training step, ResNet-18, batch 256, data already on the GPU (the ceiling): ours vs
#                mrl-pytorch 0.1.1 at fp16 (its only mixed precision), then ours at bf16, channels_last vs contiguous
#   3. augment   two-view augmentation: the PIL pipeline in DataLoader workers vs the batched --gpu_augment path
#   4. epochs    train_ssl.py --method relic on CIFAR-10 (50,000 images, batch 256), bf16, 2 epochs each:
#                CPU-worker augmentation; --gpu_augment; --gpu_augment + torch.compile (accelerate's
#                --dynamo_backend inductor). The second epoch's time is the steady-state number.
#
# The GPU machine has no internet, and its image lacks `datasets` (and mrl-pytorch). Prepare on a machine that has:
#   bash benchmarks/gpu_session.sh prepare     # wheels into .whl/, the CIFAR-10 copy into data/cifar10 (both ignored)
# then run on the GPU machine from the repository root, carrying .whl and data:
#   bash benchmarks/gpu_session.sh
# Quick check of the script itself on a CPU (tiny sizes, minutes): GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CIFAR_SOURCE=${CIFAR_SOURCE:-../shared/data/cifar10}

if [ "${1:-}" = prepare ]; then
  set -e
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # datasets and its two pure-Python needs the image lacks; accelerate pinned as in requirements.txt. The image has
  # pyarrow, pandas, fsspec, huggingface-hub, xxhash, safetensors and tqdm.
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 accelerate==1.15.0
  # the seed's wheel apart: its import package is also called `mrl`, so it must not be installed over ours
  $PY -m pip download -q --no-deps -d .whl/seed mrl-pytorch==0.1.1
  mkdir -p data && cp -r "$CIFAR_SOURCE" data/cifar10
  du -sh .whl data/cifar10
  exit 0
fi

OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
DATA=${DATA:-data/cifar10}
[ -d "$DATA" ] || DATA=$CIFAR_SOURCE

# sizes: the real ones, or tiny ones that check the script on a CPU
if [ -n "${GPU_SESSION_SMOKE:-}" ]; then
  DEVICE=cpu; BATCH=16; STEPS=2; WARMUP=1; AUG_BATCHES=2; WORKERS=2; TRAIN=(--max_train_samples 64 --knn_bank_samples 64
  --max_eval_samples 64 --image_size 16); LIMIT=900; PRECISION=no
else
  DEVICE=cuda; BATCH=256; STEPS=30; WARMUP=5; AUG_BATCHES=40; WORKERS=12; TRAIN=(); LIMIT=240; PRECISION=bf16
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output in $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

part env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo 'no GPU';
  $PY -c 'import torch, accelerate, datasets, pyarrow; print(\"torch\", torch.__version__, \"accelerate\",
  accelerate.__version__, \"datasets\", datasets.__version__, \"pyarrow\", pyarrow.__version__)'; nproc"

SSL_STEP=(benchmarks/bench_ssl_step.py --device "$DEVICE" --batch_size "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
          --rounds 2 --seed_wheel_dir .whl/seed)
if [ "$DEVICE" = cuda ]; then
  part step_fp16 "$LIMIT" $PY "${SSL_STEP[@]}" --precision fp16 --sides seed,ours
  part step_bf16 "$LIMIT" $PY "${SSL_STEP[@]}" --precision bf16 --sides ours,ours-contiguous
else
  part step_fp32 "$LIMIT" $PY "${SSL_STEP[@]}" --precision no --sides seed,ours
fi
part augment "$LIMIT" $PY benchmarks/bench_augment.py --dataset_path "$DATA" --batch_size "$BATCH" \
  --batches "$AUG_BATCHES" --workers "$WORKERS"

# Epoch times: train_ssl.py prints "epoch N: I images in S s (R img/s)" after each epoch.
EPOCHS=(--method relic --dataset cifar10 --dataset_path "$DATA" --epochs 2 --batch_size "$BATCH" --knn_every 0
        --num_workers "$WORKERS" --report_to none --overwrite "${TRAIN[@]}")
LAUNCH=(-m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION")
[ "$DEVICE" = cpu ] && LAUNCH+=(--cpu)
part epochs_cpu_augment "$LIMIT" $PY "${LAUNCH[@]}" --dynamo_backend no train_ssl.py "${EPOCHS[@]}" \
  --output_dir "$OUT/run_cpu_augment"
part epochs_gpu_augment "$LIMIT" $PY "${LAUNCH[@]}" --dynamo_backend no train_ssl.py "${EPOCHS[@]}" --gpu_augment \
  --output_dir "$OUT/run_gpu_augment"
part epochs_gpu_augment_compile "$LIMIT" $PY "${LAUNCH[@]}" --dynamo_backend inductor train_ssl.py "${EPOCHS[@]}" \
  --gpu_augment --output_dir "$OUT/run_gpu_augment_compile"
rm -rf "$OUT"/run_*  # weights and checkpoints are not results (and $OUT returns at most 8 files)

echo "=== summary"
grep -h "^ratio\|^ours\|^seed\|img/s" "$OUT"/step_*.txt "$OUT"/augment.txt 2>/dev/null
for f in "$OUT"/epochs_*.txt; do echo "$(basename "$f" .txt): $(grep -ao 'epoch [0-9]*: [0-9]* images in [0-9.]* s ([0-9,.]* img/s)' "$f" | tr '\n' ' ')"; done
