"""Fixtures of the report tests: the four runs of :data:`helpers.RUN_EVALS` as run directories
and as arms."""

from __future__ import annotations

import pytest

from calibrl.report.aggregate import group_runs
from calibrl.report.load import load_run
from helpers import RUN_EVALS, write_run_dir


@pytest.fixture
def run_dirs(tmp_path):
    """Run directories a0, a1, b0, b1 under ``tmp_path`` (all finished)."""
    return [write_run_dir(tmp_path, arm, seed) for arm, seed in RUN_EVALS]


@pytest.fixture
def arms(run_dirs):
    """``{"a": [a0, a1], "b": [b0, b1]}`` loaded from :func:`run_dirs`."""
    return group_runs([load_run(d) for d in run_dirs])
