"""Device resolution, autocast, and RNG state capture (calibrl.device)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from calibrl.device import autocast, default_backend, module_device, resolve_device, rng_state, set_rng_state


def test_cpu_and_auto_without_cuda_resolve_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    assert default_backend(torch.device("cpu")) == "gloo"


def test_auto_with_cuda_takes_the_local_rank_gpu_and_makes_it_current(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert current == [1]
    assert default_backend(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="local rank 2 but only 2 CUDA devices"):
        resolve_device("cuda", local_rank=2)


@pytest.mark.parametrize(("name", "match"), [("gpu", "unknown trainer.device 'gpu'; valid choices: auto, cpu, cuda"),
                                             ("cuda", "torch sees no CUDA device")])
def test_bad_device_names_are_errors(monkeypatch, name, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=match):
        resolve_device(name)


def test_module_device_prefers_the_device_attribute_then_the_first_parameter():
    layer = torch.nn.Linear(2, 2)
    assert module_device(layer) == torch.device("cpu")

    class Wrapper(torch.nn.Module):  # e.g. a DeepSpeed engine: a device attribute
        device = torch.device("meta")

    assert module_device(Wrapper()) == torch.device("meta")


def test_autocast_follows_the_device_type_and_is_off_without_a_dtype():
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (x @ x).dtype == torch.float32


def test_rng_state_round_trip_replays_every_generator():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    saved = rng_state()
    first = draws()
    assert draws() != first  # the generators moved on
    set_rng_state(saved)
    assert draws() == first


def test_a_run_asking_for_cuda_without_it_stops_before_loading_anything(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from calibrl.config import ConfigError
    from calibrl.run.pipeline import run
    from calibrl.cli import CONF_DIR

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "debug=default", "trainer.device=cuda"])
    with pytest.raises(ConfigError, match="trainer.device=cuda but torch sees no CUDA device"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
