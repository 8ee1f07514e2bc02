"""Several processes on CPU: the real entry point under torchrun and the deepspeed launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrl.distributed import free_port
from helpers import REPO

ENV = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
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


# A run whose weights keep moving although the random tiny model never writes a well-formed
# completion (every reward equal): a KL term to the reference plus weight decay (as in
# tests/run/test_checkpoint.py). The LR warms up over RL steps 1-2, so steps 3-4 carry the signal.
ZERO3_RUN = ("deepspeed=zero3", "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2",
             "algo.beta=0.1", "trainer.weight_decay=0.1", "trainer.lr=1e-3", "logger.mode=offline")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    done = _torchrun(*ZERO3_RUN, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_process_zero3_run_with_reference_and_evals_logs_once(zero3_run):
    from transformers import AutoModelForCausalLM

    records = _records(zero3_run)
    # SFT 1-2, eval at 2, RL 3-6 with an eval after RL step 2 (global step 4) and the final at 6
    assert [r["step"] for r in records] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    rl = [r for r in records if "train/rl_step" in r]
    assert [r["train/rl_step"] for r in rl] == [1, 2, 3, 4]
    assert all(r["train/kl"] > 0 for r in rl[2:])  # the reference model is used and the policy moved
    assert len(list((zero3_run / "wandb").glob("offline-run-*"))) == 1
    for stage in ("step2", "final"):  # evals under ZeRO-3: both ranks' shares, in order
        preds = [json.loads(line) for line in (zero3_run / f"eval_{stage}.jsonl").read_text().splitlines()]
        assert [p["id"] for p in preds] == [f"eval-{i}" for i in range(8)]
    assert sorted(p.name for p in (zero3_run / "checkpoints").iterdir()) == ["step00000004", "step00000006"]
    # the final HF checkpoint holds the gathered weights, not ZeRO-3's empty local placeholders
    model = AutoModelForCausalLM.from_pretrained(zero3_run / "checkpoint")
    assert model.get_input_embeddings().weight.shape == (49152, 64)


def test_sigkill_under_zero3_then_resume_continues_the_same_curve(tmp_path, zero3_run):
    # torchrun and both ranks SIGKILLed at once (a lost node) after the checkpoint at RL step 2
    # (torchrun starts each rank in a session of its own, so the kill walks its process tree)
    import psutil

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "calibrl.train", "model=tiny", "debug=default", *ZERO3_RUN, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file() or '"train/rl_step": 3' not in (run_dir / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "RL step 3 never logged"
            time.sleep(0.05)
    finally:
        tree = psutil.Process(proc.pid)
        for p in [tree, *tree.children(recursive=True)]:
            p.kill()
        proc.wait()
    done = _torchrun(*ZERO3_RUN, f"hydra.run.dir={run_dir}", "trainer.resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "step00000004" in done.stdout
    records, whole = _records(run_dir), _records(zero3_run)
    assert [r["step"] for r in records] == [r["step"] for r in whole]  # every step once, none twice
    rl, ref = ([r for r in rs if "train/rl_step" in r] for rs in (records, whole))
    for a, b in zip(rl, ref):  # the DeepSpeed state (sharded model and optimizer) and RNG restored
        for key in ("train/loss", "train/kl", "train/grad_norm", "train/lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-12), (a["train/rl_step"], key)
    # the same W&B run continued: offline, each launch writes a folder, all with the run's one id
    assert len({p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}) == 1


LAUNCHERS = {
    # each appends --local_rank=<r> (deepspeed) or sets only env ranks (accelerate, a torchrun
    # wrapper); the entry point strips the flag before Hydra parses and reads ranks from the env
    "deepspeed": lambda port: [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                               str(port), "--module", "calibrl.train"],
    "accelerate": lambda port: [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "calibrl.train"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launchers_with_hydra_overrides(tmp_path, launcher):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*LAUNCHERS[launcher](free_port()), "model=tiny", "debug=default", "deepspeed=zero2", "trainer.max_steps=1",
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
        (["deepspeed=zero2", "deepspeed.fp16=true"], "fp16 is not available on CPU"),
        (["trainer.device=gpu"], "unknown trainer.device 'gpu'; valid choices: auto, cpu, cuda"),
        (["deepspeed=zero2", "deepspeed.backend=mpi"], "unknown deepspeed.backend 'mpi'; valid choices: auto, gloo, nccl"),
    ],
)
def test_unsupported_deepspeed_settings_fail_at_start_up(overrides, match):
    from hydra import compose, initialize_config_dir

    from calibrl.config import ConfigError
    from calibrl.run.validate import validate
    from calibrl.cli import CONF_DIR

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
