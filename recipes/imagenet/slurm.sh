#!/bin/bash
# Two nodes of 8 GPUs on SLURM: one task per node, each starting `accelerate launch` with its node's rank.
#   sbatch recipes/imagenet/slurm.sh scripts/train_vqvae.py --output_dir outputs/hypervq-imagenet ...
#SBATCH --job-name=hypervq-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
set -euo pipefail
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# single quotes: $SLURM_NODEID is read on each node, not here
srun bash -c 'accelerate launch --config_file recipes/imagenet/two_nodes_8_gpus.yaml \
    --machine_rank "$SLURM_NODEID" --main_process_ip '"$MAIN_PROCESS_IP"' "$@"' _ "$@"
