#!/bin/bash
# Multi-node training under Slurm with `accelerate launch`: one Slurm task per node, each starting one training
# process per GPU. Preemption-safe: Slurm signals this batch shell two minutes before the time limit
# (--signal=B:USR1@120); the shell sends SIGTERM to the job step, and srun to every node's task. Each task is
# `python -m mrl.train.supervise accelerate launch ...` (README, "Preemption"): it passes the signal to its training
# processes, which save a checkpoint at the next optimizer step, and it exits only after they have -- the step ends,
# and its processes are killed, when the tasks exit, so the launcher alone (which dies of the signal at once) would
# lose the checkpoint. Whenever a run stopped for a preemption -- this time limit, or a signal from anywhere else,
# such as Slurm preempting the job for another -- the tasks exit with status 75 and the run leaves the file
# PREEMPTED in its --output_dir; the job then requeues itself and the next start resumes from that checkpoint
# (--resume_from_checkpoint latest).
#
#   sbatch examples/slurm.sh train_ssl.py --method relic --model resnet50 --output_dir runs/relic_r50
#
# Written for this repo's scripts; not tested on a cluster here. tests/test_guards.py runs this script on one
# machine with stand-ins for srun and scontrol: USR1 to it, then the checkpoint, the marker and the requeue.
#
#SBATCH --job-name=mrl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

set -u
SCRIPT=$1; shift
OUTPUT_DIR=""
args=("$@")
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        --output_dir|-save_model_dir|--save_model_dir) OUTPUT_DIR=${args[$((i + 1))]:-} ;;
        --output_dir=*) OUTPUT_DIR=${args[$i]#--output_dir=} ;;
    esac
done
if [ -z "$OUTPUT_DIR" ]; then
    echo "pass --output_dir: a requeued job resumes from the checkpoints there" >&2
    exit 2
fi
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

preempted=0
trap 'preempted=1; kill -TERM "$step" 2>/dev/null' USR1

srun --kill-on-bad-exit=0 bash -c "exec python -m mrl.train.supervise accelerate launch \
    --config_file accelerate_configs/multi_node.yaml \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_ADDR --main_process_port 29500 \
    $SCRIPT $* --resume_from_checkpoint latest" &
step=$!
# `wait` returns as soon as the trap runs: keep waiting until the step has really ended.
while wait "$step"; status=$?; kill -0 "$step" 2>/dev/null; do :; done

if [ "$preempted" -eq 1 ] || [ "$status" -eq 75 ] || [ -f "$OUTPUT_DIR/PREEMPTED" ]; then
    echo "preempted: checkpoint saved ($(cat "$OUTPUT_DIR/PREEMPTED" 2>/dev/null)), requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
