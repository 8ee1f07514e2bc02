#!/usr/bin/env bash
# The objective ablation at CPU scale (issue 16): every arm x seed on the main job's setting, each
# run's final checkpoint also evaluated out of domain (reasoning-gym `products`, 200 items), then one
# comparison table and the long-form docs/results/ablation.csv. Resumable: a run whose summary.json
# holds its final eval is not trained again, an unfinished one is started again, and the
# out-of-domain eval runs only where its eval.json is missing, so the script can be stopped and
# re-run at any time.
#   bash scripts/ablate.sh                                   # all arms x seeds 0 1 2
#   SEEDS="0" ARMS="rlvr rlcr_sum" bash scripts/ablate.sh
#   bash scripts/ablate.sh trainer.max_steps=10              # extra overrides go to every run
# The SFT warm-up (and the self-labelled warm-up) with their evals are shared by the arms of a seed
# (trainer.sft.cache=true), so only the first arm of each seed pays for them. Output:
# outputs/ablation/<arm>_seed<seed>/ (+ eval_ood/), outputs/ablation/comparison.{md,csv} and
# outputs/ablation/ablation.csv (copy it to docs/results/ to publish it).
set -euo pipefail
cd "$(dirname "$0")/.."
ARMS=${ARMS:-"rlvr rlcr_sum rlcr_expected rlcr_branch rlcr_selflabel"}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-outputs/ablation}
dirs=()
for seed in $SEEDS; do
  for arm in $ARMS; do
    dir="$OUT/${arm}_seed${seed}"
    dirs+=("$dir")
    if [ -f "$dir/summary.json" ] && grep -q '"final"' "$dir/summary.json"; then
      echo "ablate: $dir is trained, skipped"
    else
      rm -rf "$dir"
      echo "ablate: $arm seed $seed -> $dir"
      .venv/bin/calibrl-train "experiment=$arm" "seed=$seed" trainer.sft.cache=true logger.group=ablation \
        "hydra.run.dir=$dir" "$@"
    fi
    if [ ! -f "$dir/eval_ood/eval.json" ]; then
      echo "ablate: out-of-domain eval of $dir"
      .venv/bin/calibrl-eval "checkpoint=$dir" in_domain=false eval_sets=arithmetic_ood logger.group=ablation \
        "hydra.run.dir=$dir/eval_ood"
    fi
  done
done
.venv/bin/calibrl-compare "${dirs[@]}" --out "$OUT"
.venv/bin/python -m calibrl.report.ablation "${dirs[@]}" --out "$OUT/ablation.csv"
