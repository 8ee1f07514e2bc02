"""Soak run: many RL steps of ``model=tiny`` on CPU (``debug=soak``) with faults injected along the
way, and the run must finish with every RL step in ``metrics.jsonl`` exactly once.

Faults (test-only patches, ``tests/faults.py``):

- a verifier that hangs on some answers (the verifier guard's ``reward.verifier_timeout_s`` must
  cut each one off, counted in ``rewards/verifier_timeouts``);
- a W&B sink whose ``log`` raises from some step on (one warning, training goes on);
- one NaN loss (that step's update is skipped, counted, and not checkpointed).

The tiny random model never writes the completion format, so the soak rewrites sampled texts
into well-formed answers (``faults.scripted_answers``): rewards vary, the verifier sees every
answer, and every step updates the policy.

    nice python -m pytest tests/run/test_soak.py            # 20 steps, part of the default run (< 60 s)
    nice python -m pytest tests/run/test_soak.py -m slow -s # the 500-step soak; prints its wall time
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest
import reasoning_gym  # noqa: F401  (heavy imports at collection, not inside the timed run)
import torch
import transformers
from hydra import compose, initialize_config_dir

import calibrl.run.build as build
import calibrl.run.pipeline as pipeline
from calibrl.cli import CONF_DIR
from faults import fake_wandb, nan_losses, scripted_answers

transformers.LlamaForCausalLM  # noqa: B018  (resolve the lazy module now)

HANG = "HANG"  # the answer on which the injected verifier hangs
COMPLETIONS_PER_STEP = 4  # debug=soak: 2 prompts x 2 completions


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _hanging_verifier(monkeypatch) -> None:
    """Wrap the run's verifier so that it sleeps for an hour on the answer ``HANG``."""
    original = build.build_splits

    def build_splits(*args, **kwargs):
        splits = original(*args, **kwargs)
        verify = splits.verify

        def hanging(answer, example):
            if answer == HANG:
                time.sleep(3600)
            return verify(answer, example)

        splits.verify = hanging
        return splits

    monkeypatch.setattr(build, "build_splits", build_splits)


def soak(tmp_path: Path, monkeypatch, caplog, steps: int, save_every: int, eval_every: int, nan_step: int,
         hang_steps: list[int], wandb_fails_at: int) -> float:
    """Run ``steps`` RL steps of ``debug=soak`` with the faults; check the metrics file; return
    the wall time of the run in seconds."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny", "debug=soak", f"trainer.max_steps={steps}", f"trainer.save_every={save_every}",
            f"trainer.eval_every={eval_every}", "reward.verifier_timeout_s=1.0",
        ])
    _hanging_verifier(monkeypatch)
    # one completion of each hang step (its first) answers HANG
    scripted_answers(monkeypatch, seed=0, special={(s - 1) * COMPLETIONS_PER_STEP: HANG for s in hang_steps})
    fake = fake_wandb(monkeypatch, tmp_path, fail_at=wandb_fails_at)
    nan = nan_losses(monkeypatch, steps={nan_step}, once=True)

    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        results = pipeline.run(cfg, tmp_path)
    wall = time.perf_counter() - start

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if "train/rl_step" in r]
    # every RL step exactly once, in order; no SFT, so the global step is the RL step
    assert [r["train/rl_step"] for r in rl] == list(range(1, steps + 1))
    assert [r["step"] for r in rl] == list(range(1, steps + 1))
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert "final" in results and (tmp_path / "eval_final.json").is_file()
    assert sorted(r["step"] for r in records if "eval/chain_sum/accuracy" in r) == [
        0, *range(eval_every, steps, eval_every), steps]
    # the updates ran: rewards varied and the verifier saw well-formed answers
    assert sum(r["train/zero_std_groups"] < 1 for r in rl) > steps // 2
    # one NaN loss: that step alone skipped, the streak ended by the next step
    assert nan.injected == [nan_step]
    assert [r["train/rl_step"] for r in rl if math.isnan(r["train/loss"])] == [nan_step]
    assert rl[-1]["train/skipped_steps"] == 1 and max(r["train/bad_steps_in_row"] for r in rl) == 1
    if nan_step % save_every == 0:
        assert f"RL step {nan_step} skipped its update as non-finite: not checkpointed" in caplog.text
    # every hang cut off by the verifier guard, in its step
    timeouts = {r["train/rl_step"]: r["rewards/verifier_timeouts"] for r in rl if r.get("rewards/verifier_timeouts")}
    assert timeouts == {s: 1.0 for s in hang_steps}
    # W&B failed once, said so once, and the run went on with the metrics file complete
    assert len(fake.logged) == wandb_fails_at - 1
    warnings = [r for r in caplog.records if r.name == "calibrl.tracking"]
    assert len(warnings) == 1 and "wandb sync" in warnings[0].getMessage()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"step{steps - save_every:08d}", f"step{steps:08d}"]
    return wall


def test_soak_short(tmp_path, monkeypatch, caplog):
    wall = soak(tmp_path, monkeypatch, caplog, steps=20, save_every=5, eval_every=10, nan_step=10,
                hang_steps=[4, 13], wandb_fails_at=7)
    print(f"soak: 20 RL steps in {wall:.1f} s")


@pytest.mark.slow
def test_soak_500_steps(tmp_path, monkeypatch, caplog):
    wall = soak(tmp_path, monkeypatch, caplog, steps=500, save_every=50, eval_every=100, nan_step=250,
                hang_steps=[11, 252, 445], wandb_fails_at=120)
    print(f"soak: 500 RL steps in {wall:.1f} s ({wall / 500:.2f} s per step, evals and checkpoints included)")
