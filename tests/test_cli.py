"""The shared entry logic of ``calibrl-train`` and ``calibrl-eval`` (:mod:`calibrl.cli`): every
configuration mistake is one line on stderr and exit code 2, and a refused run leaves no run
directory behind unless that directory holds something of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibrl.cli import _remove_run_dir, config_error_message
from helpers import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}  # the tests may run from another directory
NEGATIVE_BRIER = ["model=tiny", "debug=default", "reward.weights.brier=-1", "reward.weights.format=2"]


def _cli(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=ENV)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- refused settings


def test_negative_brier_weight_is_one_line_and_leaves_no_run_dir(tmp_path):
    # format=2 makes the format-failure ordering hold, so only the sign check refuses this run.
    line = _one_line(_cli("calibrl.train", *NEGATIVE_BRIER, f"hydra.run.dir={tmp_path / 'x'}"))
    assert line == ("calibrl-train: reward.weights.brier=-1: a proper scoring rule's weight must be >= 0 "
                    "(a negative weight rewards miscalibration)")
    assert not (tmp_path / "x").exists()
    assert tmp_path.is_dir()  # the parent named on the command line is the user's: kept


@pytest.mark.parametrize(
    "module, args, expected",
    [
        ("calibrl.train", ["model=nonexistent"],
         "calibrl-train: unknown model option 'nonexistent'; available: hf, smollm2_135m, tiny"),
        ("calibrl.eval", ["checkpoint=tiny", "model=nonexistent"],
         "calibrl-eval: unknown model option 'nonexistent'; available: hf, smollm2_135m, tiny"),
        ("calibrl.train", ["-m", "model=tiny,nonexistent"],
         "calibrl-train: unknown model option 'nonexistent'; available: hf, smollm2_135m, tiny"),
    ],
    ids=["train", "eval", "train-multirun"],
)
def test_unknown_group_option_is_one_line_exit_2(module, args, expected, tmp_path):
    assert _one_line(_cli(module, *args, f"hydra.run.dir={tmp_path / 'x'}")) == expected
    assert not (tmp_path / "x").exists()


def test_unknown_experiment_lists_the_experiments_in_sub_folders():
    message = config_error_message(["experiment=nope"])
    assert message is not None and message.startswith("unknown experiment option 'nope'; available: abstain, ")
    names = message.split("available: ")[1].split(", ")
    assert "paper/hotpotqa_rlcr" in names and "quickstart" in names
    assert not any(n.rsplit("/", 1)[-1].startswith("_") for n in names)  # paper/_common is no run


def test_unknown_key_is_one_line():
    message = config_error_message(["model=tiny", "trainer.max_stepz=3"])
    assert message is not None and "\n" not in message
    assert message.startswith("unknown config key 'trainer.max_stepz'. Did you mean trainer.max_steps? "
                              "Valid keys under 'trainer': ")


@pytest.mark.parametrize(
    "argv",
    [
        ["model=tiny", "reward.weights.brier=0"],  # a zero weight (RLVR) is a setting, not a mistake
        ["-m", "model=tiny,hf", "seed=0,1"],
        ["+sweep=brier_weight", "hydra/launcher=joblib", "--cfg", "hydra"],
    ],
)
def test_valid_overrides_pass(argv):
    assert config_error_message(argv) is None


# --------------------------------------------------------------------------- run-dir clutter


def test_eval_refused_leaves_no_run_dir(tmp_path):
    line = _one_line(_cli("calibrl.eval", "checkpoint=/no/such/dir", f"hydra.run.dir={tmp_path / 'x'}"))
    assert line.startswith("calibrl-eval: ") and "is not a run directory" in line
    assert not (tmp_path / "x").exists()


def test_refused_run_keeps_a_dir_that_holds_a_file_of_its_own(tmp_path):
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    _one_line(_cli("calibrl.train", *NEGATIVE_BRIER, f"hydra.run.dir={run_dir}"))
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_refused_run_keeps_a_dir_whose_log_was_written_before(tmp_path):
    # A run dir of an earlier run that got as far as logging (e.g. one being resumed) is not ours.
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("[2025-01-01 00:00:00] step 1\n")
    _one_line(_cli("calibrl.train", *NEGATIVE_BRIER, f"hydra.run.dir={run_dir}"))
    assert (run_dir / "train.log").read_text().startswith("[2025-01-01 00:00:00] step 1")


def test_refused_run_in_the_default_run_dir_removes_its_date_folder(tmp_path):
    _one_line(_cli("calibrl.train", *NEGATIVE_BRIER, cwd=tmp_path))
    # outputs/<date>/<time>_default/ is gone, and <date>/ with it; outputs/ itself is the user's.
    assert list((tmp_path / "outputs").iterdir()) == []


def test_remove_run_dir_keeps_a_dated_parent_with_other_runs(tmp_path):
    pattern = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}_${experiment_name}"
    date = tmp_path / "outputs" / "2025-01-31"
    (date / "10-00-00_default").mkdir(parents=True)
    (date / "09-00-00_earlier").mkdir()
    _remove_run_dir(date / "10-00-00_default", pattern)
    assert [p.name for p in date.iterdir()] == ["09-00-00_earlier"]
    _remove_run_dir(date / "09-00-00_earlier", pattern)
    assert not date.exists() and (tmp_path / "outputs").is_dir()


# --------------------------------------------------------------------------- found by a new user


@pytest.mark.parametrize("module, args", [("calibrl.train", ["model=hf", "debug=default"]),
                                          ("calibrl.eval", ["checkpoint=hf"])], ids=["train", "eval"])
def test_hf_preset_without_a_path_names_the_key_to_set(module, args, tmp_path):
    """``model=hf`` leaves ``model.name_or_path`` unset and ``model.name: ${.name_or_path}`` cannot
    resolve: one line naming the key, exit 2 (it was a traceback and exit 1), no run dir."""
    prog = "calibrl-train" if module == "calibrl.train" else "calibrl-eval"
    line = _one_line(_cli(module, *args, f"hydra.run.dir={tmp_path / 'x'}"))
    assert line == (f"{prog}: model.name_or_path is not set (model.name refers to it); set it on the command "
                    "line, e.g. model.name_or_path=...")
    assert not (tmp_path / "x").exists()


def test_new_key_in_an_open_mapping_says_to_add_it_with_plus():
    """``reward.weights`` is a mapping: a component it does not list yet is added with ``+``, and
    the message says so instead of calling a real component unknown."""
    message = config_error_message(["model=tiny", "reward.weights.spherical_score=0.5"])
    assert message == ("reward.weights has no key 'spherical_score' yet; add one with a leading '+': "
                       "+reward.weights.spherical_score=<value>. Keys under 'reward.weights' now: "
                       "brier, correctness, format")
    assert config_error_message(["model=tiny", "+reward.weights.spherical_score=0.5"]) is None


def test_a_shared_part_is_not_an_option():
    """``experiment/paper/_common.yaml`` is included by the paper's experiments; chosen on its own it
    ran silently as experiment ``default``."""
    assert config_error_message(["experiment=paper/_common"]) == (
        "experiment option 'paper/_common' is a shared part of other options (its name starts with '_'), "
        "not one to choose")
    assert config_error_message(["experiment=paper/hotpotqa_rlcr"]) is None
    assert config_error_message(["prompt.system=_not_a_group_option"]) is None  # a value, not an option
