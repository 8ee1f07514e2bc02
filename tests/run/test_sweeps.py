"""The Brier-weight sweep: the W&B spec and the Hydra recipe run the same grid with Hydra
override syntax, runs are grouped and tagged, and the local path ends in a comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from calibrl.run.validate import validate
from calibrl.run.pipeline import run_tags
from calibrl.cli import CONF_DIR
from helpers import REPO

SPEC = REPO / "sweeps" / "brier_weight.yaml"
GRID = {"reward.weights.brier": [0, 0.1, 0.25, 0.5, 1, 2], "seed": [0, 1, 2]}


def _agent_command(spec: dict, point: dict) -> list[str]:
    """The command line a W&B agent runs for one grid point (wandb's own macro expansion)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"], "${program}": [spec["program"]],
              "${args_no_hyphens}": args["args_no_hyphens"]}
    return [part for item in spec["command"] for part in macros.get(item, [item])]


def test_wandb_spec_is_the_grid_and_its_command_is_hydra_overrides():
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["method"] == "grid"
    assert {k: v["values"] for k, v in spec["parameters"].items()} == GRID
    command = _agent_command(spec, {"reward.weights.brier": 0.25, "seed": 2})
    assert command[:4] == ["/usr/bin/env", "python", "-m", "calibrl.train"]
    overrides = command[4:]
    assert not any(o.startswith("-") for o in overrides), "Hydra rejects --key=value"
    assert overrides[-2:] == ["reward.weights.brier=0.25", "seed=2"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
    assert cfg.reward.weights.brier == 0.25 and cfg.seed == 2 and cfg.experiment_name == "rlcr_sum"
    assert (cfg.logger.mode, cfg.logger.group, cfg.logger.job_type) == ("online", "brier_weight", "sweep")


def test_hydra_recipe_has_the_same_grid_and_groups_its_runs():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=brier_weight", "reward.weights.brier=0.5", "seed=1"],
                      return_hydra_config=True)
    params = {k: [float(x) if "." in x else int(x) for x in v.split(",")] for k, v in cfg.hydra.sweeper.params.items()}
    assert params == GRID  # the W&B sweep and the Hydra multirun cannot drift apart
    assert cfg.experiment_name == "rlcr_sum" and cfg.logger.group == "brier_weight"
    assert cfg.logger.name == "brier0.5-seed1" and cfg.trainer.sft.cache is True
    assert run_tags(cfg) == ["rlcr_sum", "combine:sum", "reward:brier+correctness+format"]


def test_run_tags_name_the_arm_and_drop_zero_weights_and_duplicates():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=rlcr_gdpo", "reward.weights.brier=0", "logger.tags=[mine,rlcr_gdpo]"])
    assert run_tags(cfg) == ["mine", "rlcr_gdpo", "combine:normalize_then_sum", "reward:correctness+format"]


def test_parallel_launcher_preset_composes():
    out = subprocess.run([sys.executable, "-m", "calibrl.train", "+sweep=brier_weight", "hydra/launcher=joblib",
                          "hydra.launcher.n_jobs=2", "--cfg", "hydra"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "JoblibLauncher" in out.stdout and "n_jobs: 2" in out.stdout


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {}, "The Brier-weight sweep"),
    (["wandb"], {"WANDB_MODE": "offline"}, "W&B sweeps need online W&B"),
])
def test_sweep_script_refuses_what_it_cannot_do(args, env, message):
    done = subprocess.run(["bash", str(REPO / "scripts" / "sweep.sh"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=os.environ | env | {"BIN": str(Path(sys.executable).parent)})
    assert done.returncode == 2 and message in done.stderr


def test_local_sweep_runs_the_grid_then_compares_it(tmp_path):
    # The README's local path, shrunk: two Brier weights x one seed on the tiny model, one run
    # after the other, W&B offline, then calibrl-compare by the swept key.
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "sweep.sh"), "hydra", "model=tiny", "debug=default", "seed=0",
         "reward.weights.brier=0,0.5", "logger.mode=offline", "trainer.num_threads=1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=os.environ | {"BIN": str(Path(sys.executable).parent), "SWEEP_DIR": str(sweep_dir)},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "compare")
    assert runs == ["brier0.0-seed0", "brier0.5-seed0"]
    for name, weight in zip(runs, (0.0, 0.5)):
        cfg = yaml.safe_load((sweep_dir / name / "config_resolved.yaml").read_text())
        assert cfg["reward"]["weights"]["brier"] == weight and cfg["logger"]["group"] == "brier_weight"
        assert len(list((sweep_dir / name / "wandb").glob("offline-run-*"))) == 1
    table = (sweep_dir / "compare" / "comparison.md").read_text()
    assert "reward.weights.brier=0.0" in table and "reward.weights.brier=0.5" in table
    assert "data:image/png;base64," in (sweep_dir / "compare" / "report.html").read_text()
