"""What the benchmarks that run each arm in its own subprocess share (``lora.py``,
``calibration_paths.py``): picking the arms, running the workers one at a time (so each peak RSS,
``ru_maxrss``, is its own arm's), and writing the results JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def arm_parser(doc: str, name: str, arms: Sequence[str], steps: int) -> argparse.ArgumentParser:
    """The options every such benchmark takes: ``--model``, ``--arms``, ``--steps`` (default
    ``steps``), ``--warmup``, ``--threads``, ``--out`` (default ``benchmarks/results/<name>_<date>.json``),
    Hydra overrides for every arm, and the hidden ``--worker``/``--worker-out`` of a worker
    process. ``doc``: the script's docstring (first paragraph: description, the rest: epilog)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--model", default="smollm2_135m", help="a conf/model preset (default: smollm2_135m)")
    p.add_argument("--arms", default=",".join(arms), help=f"comma-separated, of {', '.join(arms)}")
    p.add_argument("--steps", type=int, default=steps, help="timed RL steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--out", type=Path, default=None, help=f"results JSON (default benchmarks/results/{name}_<date>.json)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm (e.g. algo.prompts_per_step=2)")
    p.add_argument("--worker", choices=sorted(arms), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def worker_args(args: argparse.Namespace, *extra: str) -> list[str]:
    """The options of :func:`arm_parser` to hand to a worker process, plus ``extra``."""
    return ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
            str(args.threads), *extra, *args.overrides]


def selected_arms(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated arms of ``text``; an unknown one is a usage error (``SystemExit`` 2)."""
    arms = text.split(",")
    unknown = sorted(set(arms) - set(known))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return arms


def run_arms(script: str, arms: Sequence[str], worker_args: Sequence[str]) -> dict[str, Any]:
    """Run ``python SCRIPT --worker ARM --worker-out FILE *worker_args`` for each arm in turn (from the
    repository root, ``src/`` on the path); returns ``{arm: the JSON its worker wrote}``.

    Raises:
        SystemExit: a worker failed (with the end of its stderr).
    """
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            out = Path(tmp) / f"{arm}.json"
            done = subprocess.run([sys.executable, script, "--worker", arm, "--worker-out", str(out), *worker_args],
                                  cwd=REPO, capture_output=True, text=True,
                                  env=os.environ | {"PYTHONPATH": str(REPO / "src")})
            if done.returncode != 0:
                raise SystemExit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
            results[arm] = json.loads(out.read_text())
    return results


def write_report(name: str, args: argparse.Namespace, results: dict[str, Any], load_start: tuple[float, ...]) -> dict[str, Any]:
    """Write ``{"date", "load_avg_start", "load_avg_end", "cpu_count", "settings", "arms"}`` to
    ``args.out`` (default ``benchmarks/results/<name>_<date>.json``), print its path; return it."""
    report = {"date": dt.date.today().isoformat(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
              "cpu_count": os.cpu_count(), "settings": vars(args) | {"out": str(args.out)}, "arms": results}
    out = args.out or REPO / "benchmarks" / "results" / f"{name}_{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"results: {out}")
    return report
