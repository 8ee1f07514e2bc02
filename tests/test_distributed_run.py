"""Several processes on CPU: the real entry point under torchrun and the deepspeed launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "calibrl.train", "model=tiny", "debug=default", *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_zero2_run_logs_once_in_one_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    done = _torchrun("deepspeed=zero2", "logger.mode=offline", f"hydra.run.dir={run_dir}", "trainer.save_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(run_dir)
    # debug: 2 SFT steps, eval at 2, RL steps at 3-4, final eval at 4: each written once (rank 0)
    assert [r["step"] for r in records] == [1, 2, 2, 3, 4, 4]
    assert [r["train/rl_step"] for r in records if "train/rl_step" in r] == [1, 2]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    preds = [json.loads(line) for line in (run_dir / "eval_final.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"eval-{i}" for i in range(8)]  # both ranks' shares, in order
    ckpt = run_dir / "checkpoints" / "step00000004"
    assert {"rng_rank0.pt", "rng_rank1.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}
    assert (ckpt / "deepspeed").is_dir()


def test_deepspeed_launcher_with_hydra_overrides(tmp_path):
    # the launcher appends --local_rank=<r>; the entry point strips it before Hydra parses
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port()),
         "--module", "calibrl.train", "model=tiny", "debug=default", "deepspeed=zero2", "trainer.max_steps=1",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert [r["train/rl_step"] for r in _records(run_dir) if "train/rl_step" in r] == [1]


def test_two_processes_without_deepspeed_is_a_start_up_error(tmp_path):
    done = _torchrun(f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0 and "2 processes need a DeepSpeed preset" in done.stderr


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["deepspeed=zero3"], "generation under ZeRO-3 is not supported yet"),
        (["deepspeed=zero3_offload"], "generation under ZeRO-3 is not supported yet"),
        (["deepspeed=zero2", "deepspeed.fp16=true"], "fp16 is not available on CPU"),
    ],
)
def test_unsupported_deepspeed_settings_fail_at_start_up(overrides, match):
    from hydra import compose, initialize_config_dir

    from calibrl.config import ConfigError, validate
    from calibrl.train import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "debug=default", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}, (5, 16, 5)),  # submitit tasks
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 2, 0)),  # torchrun in SLURM
    ],
)
def test_ranks_come_from_the_launcher_environment(monkeypatch, env, expected):
    from calibrl.distributed import dist_info

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    info = dist_info()
    assert (info.rank, info.world_size, info.local_rank) == expected
    assert info.is_main is (expected[0] == 0)


def test_rank_outside_the_world_is_an_error(monkeypatch):
    from calibrl.distributed import dist_info

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        dist_info()


def test_slurm_launcher_preset_composes():
    # Hydra's submitit launcher (extra `slurm`): the preset composes with a training config
    out = subprocess.run([sys.executable, "-m", "calibrl.train", "hydra/launcher=slurm", "model=tiny", "--cfg", "hydra"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SlurmLauncher" in out.stdout and "tasks_per_node: 8" in out.stdout


def test_deepspeed_preset_in_one_plain_process(tmp_path):
    # no launcher: a one-process group is made for DeepSpeed on a free local port
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "calibrl.train", "model=tiny", "debug=default", "deepspeed=zero2",
                           "trainer.max_steps=1", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["train/rl_step"] for r in _records(tmp_path) if "train/rl_step" in r] == [1]
