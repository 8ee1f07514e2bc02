#!/usr/bin/env bash
# The RLCR paper's main comparison (arXiv:2507.16806: RLVR vs RLCR) at CPU scale on the embedded
# default (SmolLM2-135M, reasoning-gym chain_sum), 3 seeds each, then calibrl-compare (tables,
# curves, trade-off plane, reliability diagrams, report.html). A different scale from the paper
# (Qwen2.5-7B on HotpotQA / Big-Math: conf/experiment/paper/), so compare directions, not values.
#   bash scripts/reproduce_rlcr_cpu.sh                   # 6 runs, about 1.5 h on 2 cores
#   SEEDS="0" bash scripts/reproduce_rlcr_cpu.sh         # one seed
#   OUT=outputs/ablation bash scripts/reproduce_rlcr_cpu.sh   # reuse the objective ablation's runs
# Resumable (finished runs are skipped); runs share each seed's SFT warm-up. Output:
# $OUT/<arm>_seed<seed>/ and $OUT/comparison.{md,csv}, $OUT/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
ARMS="rlvr rlcr_sum" SEEDS=${SEEDS:-"0 1 2"} OUT=${OUT:-outputs/reproduce_rlcr} exec bash scripts/ablate.sh "$@"
