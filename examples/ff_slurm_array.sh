#!/bin/bash
# The MRL paper's ImageNet-1k ResNet-50 comparison (its Figure 2 and Table 1) as one Slurm array job: the nine
# fixed-feature models FF-K (K = 8, 16, ..., 2048: a separate ResNet-50 whose single head reads only the first K of
# the 2048 embedding dims), the MRL and MRL-E models and the single-head baseline -- twelve independent trainings, one
# array task each, every task on one node with 8 GPUs.
#
#   jobid=$(sbatch --parsable examples/ff_slurm_array.sh --dataset_path /data/ILSVRC2012)
#   sbatch --dependency=afterok:$jobid --nodes=1 --gpus-per-node=8 --time=04:00:00 examples/ff_slurm_array.sh evaluate
#
# The second job runs once every training has finished: evaluate.py over the twelve runs draws the comparison
# (comparison.png, and the table in runs/figure2/results.md: MRL's and MRL-E's heads, the FF-K points, and the
# baseline's PCA to d with a linear probe) and, where the robustness sets are given as folders
# (ROBUSTNESS_DIR/imagenet-a etc.), the heads' top-1 on them.
#
# Each training task runs examples/slurm.sh (exec'd, so it is the batch shell): Slurm signals this batch shell two minutes before the time limit
# (--signal=B:USR1@120); the shell sends SIGTERM to the job step, whose task -- `python -m mrl.train.supervise accelerate
# launch ...` -- passes it to the training processes, which save a checkpoint at the next optimizer step and leave
# PREEMPTED in their --output_dir. The array task then requeues itself (each task has its own job id) and resumes
# from that checkpoint (--resume_from_checkpoint latest); the other tasks are not affected.
#
# Written for this repo's scripts; not tested on a cluster here (bash -n; examples/slurm.sh itself is run by
# tests/test_guards.py with stand-ins for srun and scontrol).
#
#SBATCH --job-name=mrl-fig2
#SBATCH --array=0-11
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out

set -u
RUNS=${RUNS:-runs}
ROBUSTNESS_DIR=${ROBUSTNESS_DIR:-}  # e.g. data/robustness with imagenet-v2/, imagenet-a/, imagenet-r/, sketch/
LAUNCH=(python -m mrl.train.supervise accelerate launch --config_file accelerate_configs/multi_gpu.yaml
        --num_processes "${SLURM_GPUS_ON_NODE:-8}")
# task i < 9 is FF-K with K = 8 * 2^i; then MRL, MRL-E (tied heads) and the baseline (one head on all 2048 dims)
FF_DIMS=(8 16 32 64 128 256 512 1024 2048)

if [ "${1:-}" = "evaluate" ]; then
    checkpoints=("$RUNS/mrl" "$RUNS/mrl_e" "$RUNS/baseline")
    for k in "${FF_DIMS[@]}"; do checkpoints+=("$RUNS/ff$k"); done
    robustness=()
    if [ -n "$ROBUSTNESS_DIR" ]; then
        robustness=(--robustness_path "imagenet_v2=$ROBUSTNESS_DIR/imagenet-v2" "imagenet_a=$ROBUSTNESS_DIR/imagenet-a"
                    "imagenet_r=$ROBUSTNESS_DIR/imagenet-r" "imagenet_sketch=$ROBUSTNESS_DIR/sketch")
    fi
    exec srun "${LAUNCH[@]}" evaluate.py --checkpoint "${checkpoints[@]}" --compare "${robustness[@]}" \
        --output_dir "$RUNS/figure2"
fi

task=${SLURM_ARRAY_TASK_ID:?submit with sbatch (an array job), or pass 'evaluate'}
if [ "$task" -lt 9 ]; then
    k=${FF_DIMS[$task]}
    name=ff$k
    args=(--fixed_feature "$k")
elif [ "$task" -eq 9 ]; then
    name=mrl
    args=()
elif [ "$task" -eq 10 ]; then
    name=mrl_e
    args=(--tied)
elif [ "$task" -eq 11 ]; then
    name=baseline
    args=(--baseline)
else
    echo "array task $task: this job has tasks 0-11 (9 FF-K, MRL, MRL-E, baseline)" >&2
    exit 2
fi
# The training itself is examples/slurm.sh's on this one node -- its launch under mrl.train.supervise, its preemption
# (USR1 -> SIGTERM to the step -> checkpoint) and its requeue of this task's own job id -- with the flags given to
# this script (e.g. --dataset_path /data/ILSVRC2012) after the task's own.
exec bash examples/slurm.sh train_supervised.py --dataset imagenet "${args[@]}" "$@" --output_dir "$RUNS/$name"
