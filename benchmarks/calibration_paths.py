"""RL step time of the calibration paths on the main job's setting: ``reward`` (RLCR, the scoring
rule in the GRPO reward) against ``expected`` (the exact expected Brier score over the confidence
grid), the latter with its grid on the policy forward's KV cache (as shipped) and with the
contexts run again on their own (the gradient-checkpointing fallback, and the first
implementation everywhere).

Run from the repository root, with nothing else running (~6 min on 2 CPU cores once the SFT cache
holds the warm-up; the first run trains and caches it, ~9 min more)::

    .venv/bin/python benchmarks/calibration_paths.py
    .venv/bin/python benchmarks/calibration_paths.py --model tiny --steps 1 --warmup 0 --out /tmp/cal.json

Arms, each in its own subprocess, from the same SFT warm-up (``trainer.sft.cache=true``: the main
job's warm-up, so the model writes the format and most rollouts have a confidence context):

- ``reward``: ``experiment=rlcr_sum``;
- ``expected``: ``experiment=quickstart`` (``objective.calibration=expected``), as shipped;
- ``expected_apart``: the same, its loss from its own forwards of the contexts
  (``CalibrationPath.fuses_forward`` off).

A step is ``GRPOTrainer.step()`` (wall clock); ``--warmup`` steps are dropped, then the median of
``--steps``; ``update`` is its ``perf/update_s``. Step 1 of every arm samples the same rollouts
(same weights and seed); later steps differ as the arms' updates do. Ratios are against
``reward`` (step, update), measured in the same run. The results go to
``benchmarks/results/calibration_paths_<date>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _arms import arm_parser, run_arms, selected_arms, worker_args, write_report

ARMS: dict[str, list[str]] = {
    "reward": ["experiment=rlcr_sum"],
    "expected": ["experiment=quickstart"],
    "expected_apart": ["experiment=quickstart"],
}


def worker(arm: str, args: argparse.Namespace, out: Path) -> None:
    """One arm: build the run's parts, take the SFT warm-up (cache), time the RL steps."""
    import torch
    from hydra import compose, initialize_config_dir

    from calibrl.cli import CONF_DIR
    from calibrl.run import stages
    from calibrl.run.build import build

    overrides = [*ARMS[arm], f"model={args.model}", "logger.mode=disabled", "trainer.sft.cache=true",
                 f"trainer.num_threads={args.threads}", *args.overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        parts = build(cfg, Path(run_dir))
        state = stages.RunState()
        stages.sft_warm_up(parts, state)
        rl = stages.setup_rl(parts, state)
        if arm == "expected_apart":
            rl.trainer.calibration.fuses_forward = False
        steps = []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            metrics = rl.trainer.step()
            steps.append({"step_s": time.perf_counter() - start, "generate_s": metrics["perf/generate_s"],
                          "update_s": metrics["perf/update_s"],
                          "contexts": metrics["train/expected_confidence/coverage"],
                          "format_rate": metrics["train/format_rate"]})
        parts.tracker.close()
    timed = steps[args.warmup:]
    out.write_text(json.dumps({
        "arm": arm, "overrides": overrides, "torch_threads": torch.get_num_threads(), "steps": steps,
        **{f"{k}_median": statistics.median(s[k] for s in timed) for k in ("step_s", "generate_s", "update_s")},
    }))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = arm_parser(__doc__, "calibration_paths", list(ARMS), steps=3)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.worker:
        worker(args.worker, args, args.worker_out)
        return {}
    arms = selected_arms(p, args.arms, list(ARMS))
    load_start = os.getloadavg()
    results = run_arms(__file__, arms, worker_args(args))
    base = results.get("reward")
    print(f"{'arm':<15} {'step s':>8} {'vs reward':>10} {'update s':>9} {'vs reward':>10} {'generate s':>11}")
    for arm, r in results.items():
        step = f"{r['step_s_median'] / base['step_s_median']:.2f}" if base else ""
        upd = f"{r['update_s_median'] / base['update_s_median']:.2f}" if base and base["update_s_median"] > 0 else ""
        print(f"{arm:<15} {r['step_s_median']:>8.2f} {step:>10} {r['update_s_median']:>9.2f} {upd:>10} "
              f"{r['generate_s_median']:>11.2f}")
    return write_report("calibration_paths", args, results, load_start)


if __name__ == "__main__":
    main()
