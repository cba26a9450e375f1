#!/usr/bin/env bash
# Plain SLURM array without Hydra's launcher: one attention variant per array task. Submit from the repo root.
#   sbatch --array=0-2 scripts/slurm_array.sh [overrides...]
#   TRAINER=cpu sbatch --gpus=0 --cpus-per-task=2 --array=0-1 scripts/slurm_array.sh debug=tiny   # CPU nodes
# Requeue-safe: the run dir is derived from the overrides, so a requeued task resumes (resume=auto).
# Signals (README "Scaling out"): SIGUSR2 120 s before the time limit -> train.py saves last.ckpt and exits
# 140 -> this script requeues the task (at most MAX_REQUEUES times). SIGTERM (`scontrol requeue`, preemption)
# -> train.py saves and exits 143; SLURM requeues or not, this script does nothing more.
#SBATCH --job-name=ethos
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --output=slurm-%A_%a.out
set -uo pipefail
VARIANTS=(${VARIANTS:-mha mla mla_o})
MODEL=${VARIANTS[${SLURM_ARRAY_TASK_ID:-0}]}
echo "ethos: task ${SLURM_ARRAY_TASK_ID:-0} model=$MODEL restart ${SLURM_RESTART_COUNT:-0}"
srun python "${SLURM_SUBMIT_DIR:-.}/train.py" trainer="${TRAINER:-gpu}" model="$MODEL" "$@"
status=$?
if [ "$status" = 140 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES:-3}" ]; then
  echo "ethos: saved on the time-limit signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
