#!/usr/bin/env bash
# The objective ablation at CPU scale (issue 4): every arm x seed on the quickstart setting, then
# one comparison table. Resumable: a run whose summary.json holds its final eval is skipped, an
# unfinished one is started again, so the script can be stopped and re-run at any time.
#   bash scripts/ablate.sh                                   # all arms, seed 0
#   SEEDS="0 1 2" ARMS="rlvr rlcr_sum" bash scripts/ablate.sh
#   bash scripts/ablate.sh trainer.max_steps=10              # extra overrides go to every run
# The SFT warm-up and its eval are shared by the arms of a seed (trainer.sft.cache=true), so only
# the first arm of each seed pays for them. Output: outputs/ablation/<arm>_seed<seed>/ and
# outputs/ablation/comparison.{md,csv}.
set -euo pipefail
cd "$(dirname "$0")/.."
ARMS=${ARMS:-"rlvr rlcr_sum rlcr_sum_std rlcr_gdpo rlcr_segment rlcr_log abstain"}
SEEDS=${SEEDS:-"0"}
OUT=${OUT:-outputs/ablation}
dirs=()
for seed in $SEEDS; do
  for arm in $ARMS; do
    dir="$OUT/${arm}_seed${seed}"
    dirs+=("$dir")
    if [ -f "$dir/summary.json" ] && grep -q '"final"' "$dir/summary.json"; then
      echo "ablate: $dir is done, skipped"
      continue
    fi
    rm -rf "$dir"
    echo "ablate: $arm seed $seed -> $dir"
    .venv/bin/calibrl-train "experiment=$arm" "seed=$seed" trainer.sft.cache=true logger.group=ablation \
      "hydra.run.dir=$dir" "$@"
  done
done
.venv/bin/calibrl-compare "${dirs[@]}" --out "$OUT"
