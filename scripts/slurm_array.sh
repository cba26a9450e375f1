#!/usr/bin/env bash
# Plain SLURM array without Hydra's launcher: one attention variant per array task.
#   sbatch --array=0-2 scripts/slurm_array.sh
# Requeue-safe: the run dir is derived from the overrides, so a requeued task resumes (resume=auto).
#SBATCH --job-name=ethos
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=SIGTERM@120
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
VARIANTS=(mha mla mla_o)
MODEL=${VARIANTS[${SLURM_ARRAY_TASK_ID:-0}]}
srun python train.py trainer=gpu model="$MODEL" "$@"
