"""LoRA (``model.lora``) against full fine-tuning: peak memory and RL step time, and the two ways
a LoRA run samples its rollouts.

Run from the repository root, with nothing else running (~6 min on 2 CPU cores)::

    .venv/bin/python benchmarks/lora.py                       # SmolLM2-135M, the rlcr_sum RL step
    .venv/bin/python benchmarks/lora.py --model tiny --steps 1 --warmup 0 --out /tmp/lora.json

Arms, each in its own subprocess (so peak RSS, ``ru_maxrss``, is its own), on the main job's
setting with the RLCR reward path (``experiment=rlcr_sum``: B x G rollouts, ``algo.max_new_tokens``,
bf16 autocast; the main job's recipe when ``benchmarks/results/lora_2026-12-07.json`` was measured)
from the raw model (no warm-up):

- ``full``: full fine-tuning, the bf16 sampling copy (as shipped);
- ``lora_merged``: LoRA (``model.lora.r``), the bf16 sampling copy with the adapters merged into it
  each step (``trainer.bf16_sampler=true``, the default);
- ``lora_adapter``: LoRA, rollouts sampled through the adapter model under autocast
  (``trainer.bf16_sampler=false``);
- ``full_kl`` / ``lora_kl``: ``algo.beta=0.04``: full fine-tuning keeps a frozen reference copy,
  LoRA uses the policy with its adapters off.

Every arm trains on every completion (the engine is marked ``collective``, the switch that makes
the loop run every row, as ``benchmarks/rl_step.py`` does): the raw model rarely writes the
format, and a loop that skipped zero-advantage rows would never build the optimizer state whose
memory is being compared. A step is ``GRPOTrainer.step()`` (wall clock); ``--warmup`` steps are
dropped, then the median of ``--steps``; ``generate`` and ``update`` are its ``perf/generate_s``
and ``perf/update_s``. Ratios are against ``full`` (memory, step) and ``lora_merged`` (generate),
measured in the same run. The results go to ``benchmarks/results/lora_<date>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _arms import arm_parser, run_arms, selected_arms, worker_args, write_report

ARMS: dict[str, list[str]] = {
    "full": [],
    "lora_merged": ["model.lora.enabled=true"],
    "lora_adapter": ["model.lora.enabled=true", "trainer.bf16_sampler=false"],
    "full_kl": ["algo.beta=0.04"],
    "lora_kl": ["model.lora.enabled=true", "algo.beta=0.04"],
}


def worker(arm: str, args: argparse.Namespace, out: Path) -> None:
    """One arm: build the run's parts and RL stage as ``calibrl-train`` does, time the steps."""
    import torch
    from hydra import compose, initialize_config_dir

    from calibrl.cli import CONF_DIR
    from calibrl.lora import parameter_counts
    from calibrl.run import stages
    from calibrl.run.build import build

    overrides = ["experiment=rlcr_sum", f"model={args.model}", "logger.mode=disabled", "trainer.sft.enabled=false",
                 f"trainer.num_threads={args.threads}", f"model.lora.r={args.rank}", *ARMS[arm], *args.overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        parts = build(cfg, Path(run_dir))
        state = stages.RunState()
        rl = stages.setup_rl(parts, state)
        rl.engine.collective = True  # train on every row (module docstring)
        steps = []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            metrics = rl.trainer.step()
            steps.append({"step_s": time.perf_counter() - start, "generate_s": metrics["perf/generate_s"],
                          "update_s": metrics["perf/update_s"]})
        parts.tracker.close()
    trainable, total = parameter_counts(parts.model)
    timed = steps[args.warmup:]
    out.write_text(json.dumps({
        "arm": arm, "overrides": overrides, "torch_threads": torch.get_num_threads(),
        "trainable_params": trainable, "total_params": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps, **{f"{k}_median": statistics.median(s[k] for s in timed) for k in ("step_s", "generate_s", "update_s")},
    }))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = arm_parser(__doc__, "lora", list(ARMS), steps=2)
    p.add_argument("--rank", type=int, default=16, help="model.lora.r (default 16, the config default)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args, args.worker_out)
        return {}
    arms = selected_arms(p, args.arms, list(ARMS))
    load_start = os.getloadavg()
    results = run_arms(__file__, arms, worker_args(args, "--rank", str(args.rank)))
    full, merged = results.get("full"), results.get("lora_merged")
    print(f"{'arm':<13} {'trainable':>12} {'peak RSS MB':>12} {'vs full':>8} {'step s':>8} {'vs full':>8} "
          f"{'generate s':>11} {'vs merged':>10} {'update s':>9}")
    for arm, r in results.items():
        rss = f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}" if full else ""
        step = f"{r['step_s_median'] / full['step_s_median']:.2f}" if full else ""
        gen = f"{r['generate_s_median'] / merged['generate_s_median']:.2f}" if merged else ""
        print(f"{arm:<13} {r['trainable_params']:>12,} {r['peak_rss_mb']:>12.0f} {rss:>8} {r['step_s_median']:>8.2f} "
              f"{step:>8} {r['generate_s_median']:>11.2f} {gen:>10} {r['update_s_median']:>9.2f}")
    return write_report("lora", args, results, load_start)


if __name__ == "__main__":
    main()
