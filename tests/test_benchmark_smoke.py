"""Smoke test of ``benchmarks/rl_step.py``: one step of the tiny model through each framework
(TRL only where it is installed), and the results JSON has every field, with positive numbers.

The two workers run at once (``--parallel``) to stay well under a minute on 2 CPU cores; their
timings are meaningless here, only their presence and sign are checked.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HAS_TRL = importlib.util.find_spec("trl") is not None

SUMMARY_POSITIVE = (
    "step_s_median", "generate_s_median", "update_s_median", "steps_per_s", "rollout_tokens_per_s",
    "training_tokens_per_s", "generation_gflops", "training_gflops", "peak_rss_mb", "completion_length",
    "rows_trained", "completion_tokens",
)


@pytest.fixture(scope="module")
def rl_step():
    sys.path.insert(0, str(BENCH))
    try:
        import rl_step

        yield rl_step
    finally:
        sys.path.remove(str(BENCH))


def test_rl_step_benchmark_writes_complete_json(rl_step, tmp_path):
    if not HAS_TRL:
        pytest.skip("trl is not installed: only the calibrl half can run (pip install trl==1.16.0)")
    frameworks = ["calibrl", "trl"]
    out = tmp_path / "rl_step.json"
    rl_step.main([
        "--model", "tiny", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8", "--micro-batch-size", "4",
        "--steps", "1", "--warmup", "0", "--threads", "1", "--train-size", "600", "--peak-sizes", "256", "--peak-seconds", "0.05",
        "--frameworks", ",".join(frameworks), "--parallel", "--out", str(out),
    ])
    report = json.loads(out.read_text())

    for key in ("cpu", "logical_cpus", "usable_cpus", "torch_threads", "load_avg_start", "load_avg_end"):
        assert key in report["machine"], key
    for pkg in ("torch", "transformers", "trl", "calibrl"):
        assert report["versions"][pkg] != "not installed", pkg
    assert report["workload"]["model"] == "tiny" and report["workload"]["steps"] == 1
    for dtype in ("fp32", "bf16"):
        assert report["matmul_peak"][dtype]["peak_gflops"] > 0
    assert all(v > 0 for v in report["matmul_peak"]["model_shapes_bf16"].values())
    assert set(report["summary"]) == set(frameworks)
    for f in frameworks:
        s = report["summary"][f]
        for key in SUMMARY_POSITIVE:
            assert s[key] > 0, (f, key, s[key])
        run = report["runs"][f]
        assert len(run["records"]) == 1 and run["settings"]
        assert run["generation_bf16"] is True  # bf16 (autocast or bf16 weights) reached generation's forwards
        assert run["params"]["n_body"] > 0 and run["params"]["n_head"] > 0
    # the same prompts in step k of both, and the same work: every completion is trained
    assert report["runs"]["calibrl"]["records"][0]["example_ids"] == report["runs"]["trl"]["records"][0]["example_ids"]
    assert report["summary"]["calibrl"]["rows_trained"] == report["summary"]["trl"]["rows_trained"] == 4
    assert report["speedup_trl_over_calibrl_step_s"] > 0


def test_rl_step_benchmark_calibrl_only(rl_step, tmp_path):
    out = tmp_path / "rl_step.json"
    rl_step.main([
        "--model", "tiny", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8", "--micro-batch-size", "4",
        "--steps", "1", "--warmup", "0", "--threads", "1", "--train-size", "600", "--peak-sizes", "256", "--peak-seconds", "0.05",
        "--frameworks", "calibrl", "--skip-zero-adv", "--out", str(out),
    ])
    report = json.loads(out.read_text())
    s = report["summary"]["calibrl"]
    assert s["step_s_median"] > 0 and s["rollout_tokens_per_s"] > 0 and s["peak_rss_mb"] > 0
    assert "speedup_trl_over_calibrl_step_s" not in report
    assert report["runs"]["calibrl"]["variant"].startswith("skips zero-advantage rows")


def test_lora_benchmark_measures_every_arm_with_peft_s_counts(tmp_path):
    """``benchmarks/lora.py`` on the tiny model, one timed step per arm: every arm reports a
    positive peak RSS and step time, full fine-tuning trains every parameter, LoRA peft's count."""
    sys.path.insert(0, str(BENCH))
    try:
        import lora
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "lora.json"
    lora.main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1", "--rank", "4", "--out", str(out),
               "algo.prompts_per_step=2", "algo.group_size=2", "algo.max_new_tokens=8"])
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {"full", "lora_merged", "lora_adapter", "full_kl", "lora_kl"}
    for name, r in arms.items():
        assert r["peak_rss_mb"] > 0 and r["step_s_median"] > 0 and r["generate_s_median"] > 0, name
    assert arms["full"]["trainable_params"] == arms["full"]["total_params"]
    # r=4 on every linear layer of the tiny model's 2 layers (see tests/run/test_lora_run.py): 8192
    assert arms["lora_merged"]["trainable_params"] == arms["lora_kl"]["trainable_params"] == 8192
    assert arms["lora_merged"]["total_params"] == arms["full"]["total_params"] + 8192


def test_calibration_paths_benchmark_times_every_arm(tmp_path, monkeypatch):
    """``benchmarks/calibration_paths.py`` on the tiny model (debug sizes, its own SFT cache), one
    timed step per arm: every arm reports positive times; the ``expected`` arms log the grid
    readout's coverage, the ``reward`` arm too (every path logs it)."""
    monkeypatch.setenv("CALIBRL_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(BENCH))
    try:
        import calibration_paths
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "cal.json"
    calibration_paths.main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(out),
                            "debug=default"])
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"reward", "expected", "expected_apart"}
    for name, r in report["arms"].items():
        assert r["step_s_median"] > 0 and r["generate_s_median"] > 0 and len(r["steps"]) == 1, name
        assert 0.0 <= r["steps"][0]["contexts"] <= 1.0
    assert "experiment=rlcr_sum" in report["arms"]["reward"]["overrides"]
    with pytest.raises(SystemExit):
        calibration_paths.main(["--arms", "reward,nope"])
