#!/usr/bin/env bash
# The Brier-weight sweep (docs/sweeps-and-compare.md), then calibrl-compare over its runs.
#
#   bash scripts/sweep.sh hydra [OVERRIDES...]   # Hydra multirun of conf/sweep/brier_weight.yaml,
#                                                 # W&B offline, one run after another
#   JOBS=2 bash scripts/sweep.sh hydra ...        # JOBS runs at a time (joblib launcher; pip install -e .[sweep])
#   bash scripts/sweep.sh wandb [COUNT]           # online W&B: create sweeps/brier_weight.yaml and
#                                                 # run an agent here (COUNT runs, default: all)
#
# Hydra overrides narrow or widen the grid, e.g. `seed=0 reward.weights.brier=0,1`, or shrink the
# runs, e.g. `model=tiny debug=default`. The Hydra path writes its runs to SWEEP_DIR
# (default multirun/brier_weight/<time>) and the comparison (tables, curves, report.html) to
# SWEEP_DIR/compare. W&B sweeps need an online account (`wandb login`); more agents, on other
# machines: `wandb agent <entity>/<project>/<sweep id>` with the id this script prints.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}   # the environment calibrl is installed in
mode=${1:-}
shift || true
case "$mode" in
  hydra)
    SWEEP_DIR=${SWEEP_DIR:-multirun/brier_weight/$(date +%Y-%m-%d_%H-%M-%S)}
    JOBS=${JOBS:-1}
    launcher=()
    if [ "$JOBS" -gt 1 ]; then
      threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
      launcher=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" "trainer.num_threads=$threads")
    fi
    "$BIN/calibrl-train" -m +sweep=brier_weight "hydra.sweep.dir=$SWEEP_DIR" "${launcher[@]}" "$@"
    "$BIN/calibrl-compare" "$SWEEP_DIR"/*/ --by reward.weights.brier --out "$SWEEP_DIR/compare"
    ;;
  wandb)
    if [ "${WANDB_MODE:-}" = offline ] || [ "${WANDB_MODE:-}" = disabled ]; then
      echo "sweep.sh wandb: W&B sweeps need online W&B (WANDB_MODE=$WANDB_MODE); offline, use: bash scripts/sweep.sh hydra" >&2
      exit 2
    fi
    if ! "$BIN/python" -c "import wandb, sys; sys.exit(0 if wandb.Api(timeout=20).api_key else 1)" 2>/dev/null; then
      echo "sweep.sh wandb: no W&B login (run \`wandb login\` or set WANDB_API_KEY); offline, use: bash scripts/sweep.sh hydra" >&2
      exit 2
    fi
    out=$("$BIN/wandb" sweep --project "${WANDB_PROJECT:-calibrl}" sweeps/brier_weight.yaml 2>&1) || { echo "$out" >&2; exit 1; }
    echo "$out"
    agent=$(echo "$out" | grep -o 'wandb agent [^ ]*' | tail -n 1 | cut -d' ' -f3)
    [ -n "$agent" ] || { echo "sweep.sh wandb: no sweep id in the output above" >&2; exit 1; }
    echo "sweep $agent: compare with  calibrl-compare --wandb ${agent%/*} --group brier_weight --by reward.weights.brier"
    PATH="$PWD/$BIN:$PATH" exec "$BIN/wandb" agent ${1:+--count "$1"} "$agent"
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
