#!/usr/bin/env bash
# Every GPU measurement of issue 16 ("The GPU numbers") in one command that fits a short lease of a GPU machine: at
# most GPU_SESSION_SECONDS (default 540 s = 9 min) from start to summary. Each part has its own time limit and the
# parts run most important first, so a failure or a slow part costs only itself; a part that no longer fits in what
# is left of the budget is skipped and named in the summary.
#
#   env                 GPU, driver, library versions; imports everything the parts need
#   gpu_paths           every code path only a GPU runs, a few steps each, PASS/FAIL/SKIP per path
#                       (benchmarks/gpu_paths.py: bf16, fp16, --data_on_device + resume, inductor + from_pretrained,
#                       embed.py; with 2+ GPUs --sync_bn and 2 compiled processes preempted and resumed)
#   seed_epoch          mrl-pytorch 0.1.1 end to end, CIFAR-10 (50,000 images, batch 256, fp16 as its
#                       --fp16_precision, its PIL pipeline in $WORKERS workers): seconds per epoch, the yardstick
#   epochs_device       train_ssl.py --method relic, ResNet-18, CIFAR-10 (49,500 images: --val_fraction 0.01),
#                       batch 256, bf16, channels_last, 2 epochs (the 2nd is the steady state): --data_on_device
#   epochs_device_compile         the same + accelerate's --dynamo_backend inductor (torch.compile)
#   epochs_gpu_augment            --gpu_augment (CPU workers decode, the GPU augments)
#   epochs_cpu_augment            the default: the PIL two-view pipeline in the CPU workers
#   supervised_step     the blog's 4-conv CNN at 256x256 with its 8 heads: train_supervised.py's step in bf16 +
#                       channels_last against a plain fp32 PyTorch loop (images/s)
#   resume_fp16         a 2-epoch fp16 run of train_ssl.py and of train_supervised.py (CIFAR-10, 5,120 images),
#                       each resumed from a mid-epoch checkpoint and compared with the uninterrupted run
#   step                the ReLIC + MRL step alone, data already on the GPU: mrl-pytorch vs ours at fp16, ours at
#                       bf16 with and without channels_last (what bounds an epoch that misses its target)
#   loader              the data path alone per epoch: --data_on_device vs the DataLoader worker paths
#   imagenet_loader     decode + RandomResizedCrop per CPU core (PIL, TorchCodec) and --decode_on_device on the GPU
#   epochs_gpu_augment_compile    --gpu_augment + inductor, if time is left
#
# It writes $OUT/log (everything, progress bars reduced to their last state) and $OUT/summary.txt (default OUT:
# runs/gpu_session); runs and checkpoints go to $WORK (default /tmp/gpu_session), not to $OUT.
#
# The GPU machine has no internet and its image lacks `datasets` (and mrl-pytorch). On a machine that has both, once:
#   bash benchmarks/gpu_session.sh prepare     # wheels into .whl/, the CIFAR-10 copy into data/cifar10 (both ignored)
# then, on the GPU machine, from the repository root, carrying .whl and data (about 56 MiB with the working tree):
#   bash benchmarks/gpu_session.sh
# Check the script itself on a CPU (tiny sizes; 30 minutes on 2 busy cores, the CPU compile runs are most of it):
#   GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CIFAR_SOURCE=${CIFAR_SOURCE:-../shared/data/cifar10}

if [ "${1:-}" = prepare ]; then
  set -e
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # datasets and the pure-Python needs the image lacks or may hold in another version (its pins: dill < 0.4.2,
  # multiprocess < 0.70.20, fsspec <= 2026.9.0); accelerate and timm as in requirements.txt. The image has pyarrow, pandas,
  # huggingface-hub 1.33, xxhash, requests, filelock, pyyaml, safetensors, tqdm, matplotlib and scikit-learn.
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 accelerate==1.15.0 timm==1.0.31
  # TorchCodec for the image's torch 2.11 (its table: torchcodec 0.x pairs with torch 2.x); PyPI's build, whose FFmpeg
  # and CUDA needs are untested on the image: where it does not load, mrl.batches.decode falls back to PIL and says so
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "torchcodec==0.11.*"
  # the seed's wheel apart: its import package is also called `mrl`, so it must not be installed over ours
  $PY -m pip download -q --no-deps -d .whl/seed mrl-pytorch==0.1.1
  if [ -d data/cifar10 ]; then chmod -R u+w data/cifar10 && rm -rf data/cifar10; fi
  mkdir -p data && cp -r "$CIFAR_SOURCE" data/cifar10 && chmod -R u+w data/cifar10
  # What the device tool carries: the working tree (tracked and untracked-not-ignored files) + .whl + data <= 64 MiB
  tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' du -cb 2>/dev/null \
          | tail -1 | cut -f1)
  carried=$(du -sb .whl data | awk '{s += $1} END {print s}')
  echo "travels: $(( (tree + carried) / 1048576 )) MiB of 64 (working tree $((tree / 1024)) KiB, .whl + data" \
       "$((carried / 1048576)) MiB); carry: [\".whl\", \"data\"]"
  [ $((tree + carried)) -lt $((64 * 1048576)) ] || { echo "error: over the device tool's 64 MiB"; exit 1; }
  exit 0
fi

OUT=${OUT:-runs/gpu_session}
WORK=${WORK:-/tmp/gpu_session}
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
# tqdm redraws its bars with carriage returns: keep each line's last state only, so the log stays readable
exec > >(sed -u 's/.*\r//' | tee "$OUT/log") 2>&1
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
if ls .whl/*.whl >/dev/null 2>&1 && $PY -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then  # the image's
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false \
  HF_DATASETS_DISABLE_PROGRESS_BARS=1
DATA=${DATA:-data/cifar10}
[ -d "$DATA" ] || DATA=$CIFAR_SOURCE

# sizes: the real ones, or tiny ones that check the script on a CPU
if [ -n "${GPU_SESSION_SMOKE:-}" ]; then
  BUDGET=${GPU_SESSION_SECONDS:-3600}; SCALE=8; DEVICE=cpu; PRECISION=no; FP16=no; BATCH=16; WORKERS=2
  TRAIN=(--max_train_samples 64 --image_size 16)
  SEED=(--max_samples 64 --batch_size 16 --epochs 1)
  SUPERVISED=(--image_size 128 --batch_size 2 --steps 2)  # the blog's CNN needs >= 113 px
  RESUME=(--dataset digits --image_size 8 --max_train_samples 96 --max_eval_samples 32 --batch_size 16
          --checkpointing_steps 4)
  STEP=(--batch_size 16 --steps 2 --warmup 1 --rounds 1)
  LOADER=(--max_samples 256 --batch_size 64 --epochs 1)
else
  BUDGET=${GPU_SESSION_SECONDS:-540}; SCALE=1; DEVICE=cuda; PRECISION=bf16; FP16=fp16; BATCH=256; WORKERS=8
  TRAIN=()
  SEED=(--epochs 2)
  SUPERVISED=(--image_size 256 --batch_size 32 --steps 40)
  RESUME=(--dataset_path "$DATA" --max_train_samples 5120 --batch_size 256 --checkpointing_steps 7)
  STEP=(--batch_size 256 --steps 30 --warmup 5 --rounds 1)
  LOADER=(--epochs 1)
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit (x SCALE, cut to what is left of the budget); output
  local name=$1 limit=$(($2 * SCALE)); shift 2  # to $WORK/NAME.txt
  local left=$((BUDGET - SECONDS - 15))  # 15 s for the summary
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, ${left} s left of the ${BUDGET} s budget" | tee -a "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit $limit s, $SECONDS s into the session): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | sed -u 's/.*\r//' | tee "$WORK/$name.txt"
  local status=${PIPESTATUS[0]}
  echo "=== $name: exit $status after $((SECONDS - start)) s$([ "$status" = 124 ] && echo ' (time limit)')"
  [ "$status" = 0 ] || echo "$name: exit $status after $((SECONDS - start)) s" >> "$SUMMARY"
}

report_env() {  # the machine and the library versions; imports everything the training parts import
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
  echo "$(nproc) CPUs"
  $PY - <<'PYTHON'
import accelerate, datasets, fsspec, huggingface_hub, pyarrow, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "accelerate", accelerate.__version__,
      "datasets", datasets.__version__, "pyarrow", pyarrow.__version__, "fsspec", fsspec.__version__,
      "huggingface_hub", huggingface_hub.__version__, "cuda", torch.cuda.is_available())
import train_ssl, train_supervised, mrl.batches.device_data  # noqa: F401
PYTHON
}
export -f report_env
export PY
part env 60 bash -c report_env
part gpu_paths 300 $PY benchmarks/gpu_paths.py --dataset_path "$DATA" --device "$DEVICE" --work "$WORK/paths"

part seed_epoch 150 $PY benchmarks/bench_seed_epoch.py --device "$DEVICE" --precision "$FP16" --workers "$WORKERS" \
  --dataset_path "$DATA" --seed_wheel_dir .whl/seed "${SEED[@]}"

# train_ssl.py prints "epoch N: I images in S s (R img/s)" after each epoch; no checkpoints (not timed, but disk)
EPOCHS=(--method relic --dataset cifar10 --dataset_path "$DATA" --val_fraction 0.01 --epochs 2 --batch_size "$BATCH"
        --knn_every 0 --knn_bank_samples 1000 --max_eval_samples 1000 --num_workers "$WORKERS" --report_to none
        --checkpointing_steps 1000000 --overwrite "${TRAIN[@]}")
LAUNCH=(-m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION")
[ "$DEVICE" = cpu ] && LAUNCH+=(--cpu)
epochs() {  # epochs NAME LIMIT DYNAMO_BACKEND FLAGS...
  local name=$1 limit=$2 backend=$3; shift 3
  part "epochs_$name" "$limit" $PY "${LAUNCH[@]}" --dynamo_backend "$backend" train_ssl.py "${EPOCHS[@]}" "$@" \
    --output_dir "$WORK/run_$name"
}
epochs device 120 no --data_on_device
epochs device_compile 240 inductor --data_on_device
epochs gpu_augment 120 no --gpu_augment
epochs cpu_augment 150 no

part supervised_step 90 $PY benchmarks/bench_supervised_step.py --precision "$PRECISION" --memory_format channels_last \
  "${SUPERVISED[@]}"
part resume_fp16 200 $PY benchmarks/check_resume.py --precision "$FP16" --num_workers "$WORKERS" \
  --output_dir "$WORK/resume" "${RESUME[@]}"

SSL_STEP=(benchmarks/bench_ssl_step.py --device "$DEVICE" --seed_wheel_dir .whl/seed "${STEP[@]}")
if [ "$DEVICE" = cuda ]; then
  part step 150 bash -c "$PY ${SSL_STEP[*]} --precision fp16 --sides seed,ours &&
    $PY ${SSL_STEP[*]} --precision bf16 --sides ours,ours-contiguous"
else
  part step 150 $PY "${SSL_STEP[@]}" --precision no --sides seed,ours
fi
part loader 120 $PY benchmarks/bench_loader.py --dataset_path "$DATA" --workers "$WORKERS" "${LOADER[@]}"
# issue 21: ImageNet decoding per core and --decode_on_device's batched decode on the GPU (needs a TorchCodec built
# for the image's torch; without one the script says so and times the CPU paths only)
part imagenet_loader 120 $PY benchmarks/bench_imagenet_loader.py --rounds 1 --images 200
epochs gpu_augment_compile 240 inductor --gpu_augment

{
  echo "=== summary ($SECONDS s; the 2nd epoch of each run is the steady state; s/50k: seconds per 50,000 images)"
  grep -h "^PASS\|^FAIL\|^SKIP" "$WORK"/gpu_paths.txt 2>/dev/null
  for f in "$WORK"/seed_epoch.txt "$WORK"/epochs_*.txt; do
    [ -f "$f" ] || continue
    grep -ao 'epoch [0-9]*: [0-9]* images in [0-9.]* s ([0-9,.]* img/s)' "$f" | tr -d , | awk -v n="$(basename "$f" .txt)" \
      '{rate = substr($8, 2); printf "%-28s epoch %s %7.1f s  %8.1f img/s  %6.1f s/50k\n", n, $2, $6, rate, 50000 / rate}'
  done
  grep -h "^plain\|^train_supervised\|^ratio ours" "$WORK"/supervised_step.txt 2>/dev/null
  grep -h "^===\|^finite\|^skipped\|^resumed\|^final\|^verdict" "$WORK"/resume_fp16.txt 2>/dev/null
  grep -h "^ReLIC\|^seed \|^ours\|^ratio" "$WORK"/step.txt 2>/dev/null
  grep -h "^data path\|^workers\|^device\|^  device\|^ratio" "$WORK"/loader.txt 2>/dev/null
  cat "$SUMMARY"
} > "$WORK/summary" 2>&1
cp "$WORK/summary" "$SUMMARY"
cat "$SUMMARY"
