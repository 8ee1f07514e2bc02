"""Resumable checkpoints: atomic saves, pruning, metrics-file truncation, kill/SIGTERM and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calibrl.run.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from calibrl.rl.engine import TorchEngine
from calibrl.tracking import Tracker
from helpers import REPO



def _engine(seed: int = 0) -> TorchEngine:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return TorchEngine(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), max_grad_norm=1.0)


def _train_step(engine: TorchEngine) -> None:
    engine.backward(engine.module(torch.ones(4, 3)).pow(2).mean())
    engine.step()


def _save(run_dir: Path, engine: TorchEngine, step: int, keep_last: int = 2) -> Path:
    return save_checkpoint(run_dir, engine, global_step=step, rl_step=step - 10, trainer_state={"consumed": step},
                           wandb_id="abc", records=step + 1, results={"sft": {"accuracy": 0.5}}, keep_last=keep_last)


def test_save_load_round_trip_restores_model_optimizer_scheduler_and_state(tmp_path):
    a = _engine()
    _train_step(a)
    at = _save(tmp_path, a, 12)
    assert at == tmp_path / "checkpoints" / "step00000012"
    b = _engine(seed=1)  # different weights, fresh optimizer
    b.load(at)
    for x, y in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(x, y)
    assert b.lr() == a.lr() == pytest.approx(0.05)  # one StepLR step: 0.1 * 0.5
    _train_step(a), _train_step(b)  # same Adam moments -> the same next update
    for x, y in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(x, y)
    state = load_checkpoint(at)
    assert (state.global_step, state.rl_step, state.trainer, state.wandb_id, state.records) == (12, 2, {"consumed": 12}, "abc", 13)
    assert state.results == {"sft": {"accuracy": 0.5}}


def test_keep_last_prunes_and_an_unfinished_save_is_never_found(tmp_path):
    engine = _engine()
    for step in (11, 12, 13):
        _save(tmp_path, engine, step, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step00000012", "step00000013"]
    # a crash mid-save leaves a .tmp dir (even with a state.json in it): never picked
    crashed = tmp_path / "checkpoints" / ".tmp-step00000014"
    crashed.mkdir()
    (crashed / "state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step00000013"
    assert find_checkpoint(tmp_path / "checkpoints" / "step00000012") == tmp_path / "checkpoints" / "step00000012"
    assert find_checkpoint(tmp_path / "nowhere") is None
    with pytest.raises(FileNotFoundError, match="not a calibrl checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        _save(tmp_path, engine, 15, keep_last=0)


def test_tracker_resume_drops_records_logged_after_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "x": s}) for s in (1, 2, 3, 3, 4)] + ['{"step": 5, "x"']  # torn last line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    tracker = Tracker(tmp_path, {}, mode="disabled", resume_records=4)  # saved after the 2nd step-3 record
    assert tracker.records == 4
    with pytest.raises(ValueError, match="must not decrease"):
        tracker.log({"x": 2}, step=2)
    tracker.log({"x": 4}, step=4)
    tracker.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="holds 5 records, the checkpoint expects 9"):
        Tracker(tmp_path, {}, mode="disabled", resume_records=9)


# --------------------------------------------------------------------------- real runs, killed


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    # The random tiny model never writes a well-formed completion, so every reward is equal and
    # the policy-gradient term is 0. A KL term to the reference plus weight decay keeps the
    # weights, the Adam moments and the loss moving, so a resume that restored the wrong model,
    # reference or optimizer state would give a different curve.
    return [sys.executable, "-m", "calibrl.train", "model=tiny", "debug=default", "trainer.max_steps=8",
            "trainer.save_every=2", "trainer.num_threads=1", "algo.beta=0.1", "trainer.weight_decay=0.1",
            "trainer.lr=1e-3", f"hydra.run.dir={run_dir}", *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_rl_step(proc: subprocess.Popen, run_dir: Path, rl_step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(f'"train/rl_step": {rl_step}' in line for line in path.read_text().splitlines()):
            return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before RL step {rl_step}"
        time.sleep(0.05)
    raise AssertionError(f"RL step {rl_step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("whole")
    subprocess.run(_train_cmd(run_dir), cwd=REPO, check=True, capture_output=True, timeout=600)
    return _records(run_dir)


def _check_resumed(records: list[dict], whole: list[dict]) -> None:
    rl = [r for r in records if "train/rl_step" in r]
    assert [r["train/rl_step"] for r in rl] == list(range(1, 9)), "every RL step exactly once"
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    assert len(records) == len(whole)
    ref = [r for r in whole if "train/rl_step" in r]
    for a, b in zip(rl, ref):  # same data order, same RNG, same weights: the same curve
        assert a["step"] == b["step"]
        for key in ("train/loss", "train/kl", "train/grad_norm", "train/lr", "train/completion_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-12), (a["train/rl_step"], key)
    # (steps 1-2: the LR warms up from 0, so the weights are still the reference)
    assert all(r["train/kl"] > 0 for r in ref[2:]), "the curve must move for the comparison to mean anything"
    final = [r for r in records if "eval/chain_sum/accuracy" in r][-1]
    assert final["eval/chain_sum/accuracy"] == pytest.approx([r for r in whole if "eval/chain_sum/accuracy" in r][-1]["eval/chain_sum/accuracy"])


def test_sigkill_after_a_checkpoint_then_resume_auto_continues_the_same_curve(tmp_path, uninterrupted):
    proc = subprocess.Popen(_train_cmd(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_rl_step(proc, tmp_path, 5)  # checkpoint at RL step 4 written, step 5 logged after it
    proc.kill()
    proc.wait()
    assert find_checkpoint(tmp_path).name.startswith("step")
    done = subprocess.run(_train_cmd(tmp_path, "trainer.resume=auto"), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    _check_resumed(_records(tmp_path), uninterrupted)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # keep_last


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_by_path(tmp_path, uninterrupted):
    proc = subprocess.Popen(_train_cmd(tmp_path, "trainer.save_every=0"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_rl_step(proc, tmp_path, 1)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    saved = load_checkpoint(find_checkpoint(tmp_path))
    assert saved.rl_step >= 1 and (tmp_path / "summary.json").is_file()
    other = tmp_path / "elsewhere"  # a new Hydra dir; the run continues in the checkpoint's dir
    done = subprocess.run(_train_cmd(other, f"trainer.resume={saved.path}"), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_resumed(_records(tmp_path), uninterrupted)


def test_resume_from_a_path_without_a_checkpoint_is_a_one_line_error(tmp_path):
    done = subprocess.run(_train_cmd(tmp_path / "run", f"trainer.resume={tmp_path}"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "no checkpoint there" in done.stderr


@pytest.mark.parametrize(
    ("override", "match"),
    [("trainer.save_every=-1", "save_every must be >= 0"), ("trainer.keep_last=0", "keep_last must be >= 1")],
)
def test_bad_checkpoint_settings_fail_at_start_up(override, match):
    from hydra import compose, initialize_config_dir

    from calibrl.config import ConfigError
    from calibrl.run.validate import validate
    from calibrl.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "debug=default", override])
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
