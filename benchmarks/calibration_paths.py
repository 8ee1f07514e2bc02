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
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="smollm2_135m", help="a conf/model preset (default: smollm2_135m)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, default=3, help="timed RL steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/calibration_paths_<date>.json)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm (e.g. algo.prompts_per_step=2)")
    p.add_argument("--worker", choices=sorted(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.worker:
        worker(args.worker, args, args.worker_out)
        return {}
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    results: dict[str, Any] = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            out = Path(tmp) / f"{arm}.json"
            cmd = [sys.executable, __file__, "--worker", arm, "--worker-out", str(out), "--model", args.model,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   *args.overrides]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env=os.environ | {"PYTHONPATH": str(REPO / "src")})
            if done.returncode != 0:
                raise SystemExit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
            results[arm] = json.loads(out.read_text())
    base = results.get("reward")
    print(f"{'arm':<15} {'step s':>8} {'vs reward':>10} {'update s':>9} {'vs reward':>10} {'generate s':>11}")
    for arm, r in results.items():
        step = f"{r['step_s_median'] / base['step_s_median']:.2f}" if base else ""
        upd = f"{r['update_s_median'] / base['update_s_median']:.2f}" if base and base["update_s_median"] > 0 else ""
        print(f"{arm:<15} {r['step_s_median']:>8.2f} {step:>10} {r['update_s_median']:>9.2f} {upd:>10} "
              f"{r['generate_s_median']:>11.2f}")
    report = {"date": dt.date.today().isoformat(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
              "cpu_count": os.cpu_count(), "settings": vars(args) | {"out": str(args.out)}, "arms": results}
    out = args.out or REPO / "benchmarks" / "results" / f"calibration_paths_{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"results: {out}")
    return report


if __name__ == "__main__":
    main()
