#!/usr/bin/env bash
# The MRL paper's per-dim comparison at CPU scale, on CIFAR-100 (100 classes: a regime where d = 8 is too small for
# the task), and the curves of where MRL's property emerges with training length. docs/results.md and the README's
# headline are written from its output by benchmarks/results_report.py.
#
#   data      CIFAR-100 (../shared/data/cifar100, the Hub's uoft-cs/cifar100 layout), all 45,000 training images
#             (5,000 held out for validation), evaluated on the 10,000 test images
#   model     ResNet-18 with the ImageNet stem at 32 px (--cifar_stem off: 4x fewer FLOPs than the CIFAR stem at
#             16 px and all of the image, ~390 img/s on 2 cores), 512-d embedding
#   budget    12 epochs, batch 128, AdamW 2e-3, the blog's ExponentialLR (x0.85 per epoch): the schedule does not
#             depend on the number of epochs, so the checkpoint after epoch k IS a k-epoch run (the curves)
#   variants  MRL, MRL-E, the single-head baseline (= FF-512), FF-8/16/32/64/128 (seed 0); MRL and the baseline again
#             with seed 1, for the spread
#
# Every stage resumes: a training run continues from its newest checkpoint, a finished run or evaluation is skipped,
# so an interrupted script is relaunched unchanged. Training runs in LANES parallel lanes of one thread each (two
# single-threaded runs train ~20% more images/s on 2 cores than one run on both). Stage timings go to timings.txt.
# Measured on 2 CPU cores: EPOCHS=4 about 2 hours (a 4-epoch run 12 min in one of two lanes; MRL's and the
# baseline's evaluation 42 min beside two trainings; each other variant's and each epoch's 2-3 min alone); the
# default 12 epochs triples the training, 4-7 hours (7 on a machine loaded with other work). ONLY=REGEX runs only
# the stages whose names match (e.g. ONLY=eval_epoch: the curves' evaluations, once the MRL and baseline runs are
# trained, while the others still train). VARIANTS="..." trains and evaluates fewer (or other) variants, e.g.
# VARIANTS="ff128 baseline:1" adds those two to a finished folder.
#   Usage: bash benchmarks/cifar100_results.sh [output folder, default runs/cifar100_results]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cifar100_results}
PYTHON=${PYTHON:-python}
LANES=${LANES:-2}
EPOCHS=${EPOCHS:-12}
DATA=${DATA:-../shared/data/cifar100}
mkdir -p "$OUT"
[ -f "$OUT/commit.txt" ] || git rev-parse --short HEAD > "$OUT/commit.txt"
[ -f "$OUT/date.txt" ] || date -u +%Y-%m-%d > "$OUT/date.txt"
touch "$OUT/timings.txt"

stage() {  # stage NAME COMMAND...: run it unless it finished before (or ONLY leaves it out); note how long it took
  local name=$1 start=$SECONDS
  shift
  if [[ -n ${ONLY:-} && ! $name =~ $ONLY ]]; then return; fi
  if grep -q "^$name " "$OUT/timings.txt"; then echo "$name: done before"; return; fi
  "$@"
  echo "$name $((SECONDS - start)) s $(git rev-parse --short HEAD)" | tee -a "$OUT/timings.txt"
}

COMMON=(--dataset cifar100 --dataset_path "$DATA" --report_to none)
TRAIN=(--cifar_stem off --image_size 32 --epochs "$EPOCHS" --batch_size 128 --grad_accum_steps 1 --lr 2e-3
       --num_workers 1 --checkpoints_total_limit 1000 --resume_from_checkpoint latest)

train() {  # train VARIANT [SEED]: one supervised run (seed 0 in VARIANT/, another in seed<SEED>_VARIANT/)
  local flags seed=${2:-0} name=$1
  [[ $seed == 0 ]] || name=seed${seed}_$1
  case $1 in
    mrl) flags=() ;;
    mrl-e) flags=(--tied) ;;
    baseline) flags=(--baseline) ;;
    ff*) flags=(--fixed_feature "${1#ff}") ;;
  esac
  stage "train_$name" env OMP_NUM_THREADS=$(( $(nproc) / LANES > 0 ? $(nproc) / LANES : 1 )) \
    "$PYTHON" train_supervised.py "${COMMON[@]}" "${TRAIN[@]}" "${flags[@]}" --seed "$seed" \
    --output_dir "$OUT/$name" > "$OUT/train_$name.log" 2>&1
}

# the curves' runs first (MRL against the baseline, and against FF-8/16 trained as long), then the rest; then MRL and
# the baseline with a second seed, whose spread says which of the first seed's differences are more than noise
read -r -a VARIANTS <<< "${VARIANTS:-mrl baseline ff8 ff16 mrl-e ff32 ff64 ff128 mrl:1 baseline:1}"
for lane in $(seq 0 $((LANES - 1))); do
  (for i in "${!VARIANTS[@]}"; do
     if (( i % LANES == lane )); then train ${VARIANTS[$i]/:/ }; fi
   done) &
done
wait

# the comparison at the full budget, on the 10,000 test images: MRL and the baseline by every protocol (probes, the
# PCA baseline, kNN and retrieval, adaptive retrieval and the quantized shortlists); each other variant by its own
# stage with what the tables read from it (its heads, the probe on its prefix, retrieval), which halves the time
EVAL=(--dims 8,16,32,64,128,512 --num_workers 2 --report_to none --no-retrieval_grid --no-compare)
label() {  # a variant as the report's columns name it
  case $1 in mrl) echo MRL ;; mrl-e) echo MRL-E ;; ff*) echo "FF-${1#ff}" ;; *) echo "$1" ;; esac
}
stage eval_final "$PYTHON" evaluate.py "${EVAL[@]}" --output_dir "$OUT/eval_final" \
  --checkpoint "$OUT"/{mrl,baseline} --labels MRL baseline
for variant in "${VARIANTS[@]}"; do
  [[ $variant == mrl || $variant == baseline || $variant == *:* ]] && continue
  stage "eval_$variant" "$PYTHON" evaluate.py "${EVAL[@]}" --no-pca --no-adaptive_retrieval \
    --output_dir "$OUT/eval_$variant" --checkpoint "$OUT/$variant" --labels "$(label "$variant")"
done

# the second seed: the variants trained again, evaluated as their first seed was, each in a stage of its own
for variant in "${VARIANTS[@]}"; do
  [[ $variant == *:1 ]] || continue
  name=${variant%:1}
  pca=(--no-pca) && [[ $name == baseline ]] && pca=()  # the baseline's PCA to d is a column of the comparison
  stage "eval_seed1_$name" "$PYTHON" evaluate.py "${EVAL[@]}" "${pca[@]}" --no-adaptive_retrieval \
    --output_dir "$OUT/eval_seed1_$name" --checkpoint "$OUT/seed1_$name" --labels "$(label "$name") (seed 1)"
done

# the curves: MRL's prefix and the baseline (cut to d, and PCA to d) probed after each epoch's checkpoint
for epoch in 1 2 4 8; do
  (( epoch < EPOCHS )) || continue  # the last point of the curves is eval_final
  first=$(ls "$OUT/mrl/checkpoints" | sort | head -1)  # step_<the steps of one epoch>
  step=$(printf "step_%08d" $(( epoch * 10#${first#step_} )))
  stage "eval_epoch$epoch" "$PYTHON" evaluate.py "${EVAL[@]}" --dims 8,16 --no-adaptive_retrieval \
    --output_dir "$OUT/eval_epoch$epoch" --labels MRL baseline \
    --checkpoint "$OUT/mrl/checkpoints/$step" "$OUT/baseline/checkpoints/$step"
done
[[ -n ${ONLY:-} ]] || "$PYTHON" benchmarks/results_report.py --cifar100 "$OUT"
