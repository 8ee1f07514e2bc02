"""DeepSpeed engine: derived config, and 2 processes x micro-batch b == 1 process x 2b (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from calibrl.distributed import free_port
from calibrl.rl.deepspeed_engine import deepspeed_config
from helpers import REPO

WORKER = REPO / "tests" / "workers" / "ds_step.py"


def test_config_is_derived_from_calibrl_config():
    cfg = deepspeed_config(stage=2, offload=False, micro_batch_size=4, accumulation_steps=3, max_grad_norm=0.5)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 2}
    assert "bf16" not in cfg and "fp16" not in cfg  # bf16 is calibrl's autocast, fp32 master weights
    off = deepspeed_config(stage=3, offload=True, micro_batch_size=1, accumulation_steps=1, max_grad_norm=1.0)
    assert off["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fp16": True}, "fp16 is not available on CPU"),
        ({"stage": 4}, "stage must be 0, 1, 2 or 3"),
        ({"stage": 2, "offload": True}, "offload needs stage 3"),
        ({"accumulation_steps": 0}, "must be >= 1"),
        ({"max_grad_norm": 0.0}, "max_grad_norm > 0"),
    ],
)
def test_bad_settings_are_start_up_errors(kwargs, match):
    base = dict(stage=2, offload=False, micro_batch_size=2, accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=match):
        deepspeed_config(**(base | kwargs))


@pytest.fixture(scope="module")
def single_process_step(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "single.pt"
    subprocess.run([sys.executable, str(WORKER), "single", str(out)], cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    return torch.load(out)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one_process_with_twice_the_rows(stage, single_process_step, tmp_path):
    # 8 rows of unequal length: one process, micro-batch 2 (4 micro-batches) vs 2 ranks x 4 rows,
    # micro-batch 2 (2 accumulated micro-batches each). Losses are normalised by the global token
    # count and multiplied by the world size (DeepSpeed averages gradients over ranks), so one
    # AdamW step must land on the same parameters up to float32 reduction-order noise.
    out = tmp_path / f"{stage}.pt"
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), stage, str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dist = torch.load(out)
    assert single_process_step["grad_norm"] > 0.5  # a real gradient, so equal parameters mean something
    assert dist["grad_norm"] == pytest.approx(single_process_step["grad_norm"], rel=1e-5)
    ref = single_process_step["params"]
    assert set(dist["params"]) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(dist["params"][name], value, rtol=0, atol=1e-6, msg=name)


def test_zero3_generation_gathers_the_weights_and_ranks_generate_different_lengths(tmp_path):
    # Rank 0 generates 3 new tokens, rank 1 13: with ZeRO-3's per-module hooks in place each
    # forward would be a collective and the ranks would hang; inside generation() the weights are
    # gathered once, so each rank's greedy tokens equal those of an unsharded copy, before and
    # after an update.
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "workers" / "ds_generate.py"), str(tmp_path / "gen")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank, n_new in ((0, 3), (1, 13)):
        result = json.loads((tmp_path / f"gen.rank{rank}.json").read_text())
        assert result["grad_norm"] > 0.5  # the update changed the weights
        for when in ("before", "after"):
            assert result[when] == {"shape": [2, 3 + n_new], "equal": True}, (rank, when)


EXPECTED_WORKER = REPO / "tests" / "workers" / "ds_expected.py"
ENV_1T = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def single_process_expected(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single_expected") / "single.pt"
    subprocess.run([sys.executable, str(EXPECTED_WORKER), "single", str(out)], cwd=REPO, env=ENV_1T, check=True,
                   capture_output=True, timeout=300)
    return torch.load(out)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_expected_path_under_deepspeed_matches_one_process(stage, single_process_expected, tmp_path):
    # objective.calibration=expected: its loss on each micro-batch's policy forward, scaled like the
    # policy loss. Rank 0 holds the only confidence context, rank 1 runs the zero-weighted tree
    # (ZeRO-3 would hang on unequal model calls). SGD lr 1: the parameter change is the clipped
    # gradient, whose calibration part moves some weights by ~1e-3 (checked by hand), so equal
    # parameters to 1e-6 mean the calibration loss reached DeepSpeed's update with its right scale.
    out = tmp_path / f"{stage}.pt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(EXPECTED_WORKER), stage, str(out)],
        cwd=REPO, env=ENV_1T, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dist, ref = torch.load(out), single_process_expected
    assert ref["contexts"] == 1 and dist["contexts"] == 1  # rank 0's share: one context
    assert dist["calibration_loss"] == pytest.approx(ref["calibration_loss"], rel=1e-6) and ref["calibration_loss"] > 0
    assert dist["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    for name, value in ref["params"].items():
        torch.testing.assert_close(dist["params"][name], value, rtol=0, atol=1e-6, msg=name)
