"""Golden runs: seeded tiny runs log the same metrics, value for value, as the committed record.

The records under ``tests/fixtures/golden/`` were written by this test (``CALIBRL_WRITE_GOLDEN=1``)
on the code *before* the house redesign (issue 15), so a refactor that changes what a run
computes fails here. Timings (``perf/*``) are left out; everything else must match to float
rounding (rel 1e-5). Regenerate only for a change that is meant to alter the numbers, and say so in
the commit.

Variants:

- ``plain``: ``model=tiny debug=default`` as a user types it (a random model: every reward is the
  same, so RL has no signal; this pins SFT, evals and the zero-advantage path);
- ``plain_segment``: the same under the ``segment`` combiner (its token segments are computed);
- ``scripted_sum``, ``scripted_beta``: the sampled texts are rewritten into well-formed answers
  (``faults.scripted_answers``), so rewards vary and every RL step updates the policy, under the
  ``sum`` combiner with a mid-run eval, and with a KL reference (``algo.beta``) and 2 PPO epochs;
- ``scripted_expected``, ``scripted_branch``: the same scripted answers under the calibration
  paths of issue 16 (written when they were added; the records of the four variants above gained
  only the new ``train/expected_confidence/*`` keys then, every earlier value unchanged).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from helpers import FIXTURES, compose_config, read_records
from faults import scripted_answers

GOLDEN_DIR = FIXTURES / "golden"
WRITE = os.environ.get("CALIBRL_WRITE_GOLDEN") == "1"

VARIANTS: dict[str, tuple[list[str], bool]] = {
    "plain": ([], False),
    "scripted_sum": (["trainer.max_steps=3", "trainer.eval_every=2"], True),
    "plain_segment": (["objective=segment"], False),
    "scripted_beta": (["algo.beta=0.1", "trainer.max_steps=3", "algo.ppo_epochs=2"], True),
    "scripted_expected": (["objective.calibration=expected", "trainer.max_steps=3"], True),
    "scripted_branch": (["objective.calibration=branch", "objective.branches=2", "trainer.max_steps=3"], True),
}


def _run(cfg, run_dir: Path):
    from calibrl.run.pipeline import run

    return run(cfg, run_dir)


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    return a == b


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_run(variant, tmp_path, monkeypatch, restore_torch_threads):
    overrides, scripted = VARIANTS[variant]
    if scripted:
        scripted_answers(monkeypatch, seed=0)
    cfg = compose_config(["model=tiny", "debug=default", "trainer.save_checkpoint=false", *overrides])
    _run(cfg, tmp_path)
    records = _comparable(read_records(tmp_path / "metrics.jsonl"))
    path = GOLDEN_DIR / f"{variant}.json"
    if WRITE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert [r["step"] for r in records] == [r["step"] for r in golden]
    for got, want in zip(records, golden):
        assert sorted(got) == sorted(want), f"step {want['step']}: keys differ: {set(got) ^ set(want)}"
        bad = {k: (got[k], want[k]) for k in want if not _same(got[k], want[k])}
        assert not bad, f"step {want['step']}: {bad}"
    if scripted:  # the golden must exercise learning: some RL step moved the policy
        assert any(r.get("train/grad_norm", 0) > 0 for r in golden)
