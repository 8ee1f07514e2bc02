#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (passwordless ssh to every host in the hostfile,
# the repository and .venv at the same path on each, a shared file system for the run dir):
#   HOSTFILE=hosts.txt bash scripts/launch_multinode.sh experiment=quickstart hydra.run.dir=/shared/runs/x
# hosts.txt has one line per node: "<hostname> slots=<GPUs>". hydra.run.dir must be on the shared
# file system (checkpoints are written there by every rank).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --module calibrl.train \
  deepspeed=${DEEPSPEED:-zero2} trainer.save_every=${SAVE_EVERY:-10} trainer.resume=auto "$@"
