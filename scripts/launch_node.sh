#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with DS_ACCELERATOR=cpu), DeepSpeed ZeRO-2:
#   NPROC=8 bash scripts/launch_node.sh experiment=quickstart
#   DS_ACCELERATOR=cpu NPROC=2 bash scripts/launch_node.sh model=tiny debug=default
# Extra arguments are Hydra overrides. algo.prompts_per_step must be a multiple of NPROC.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
exec .venv/bin/torchrun --nproc_per_node "$NPROC" -m calibrl.train deepspeed=${DEEPSPEED:-zero2} "$@"
