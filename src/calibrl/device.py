"""Where a process computes (the CPU, or one CUDA device per rank) and the random state that goes
with it.

A run resolves ``trainer.device`` once (:func:`resolve_device`) and moves the policy there; the
rest of the code follows the model: inputs go to :func:`module_device`, autocast is opened for
that device's type (:func:`autocast`). Random state (:func:`rng_state`) covers Python, NumPy,
the CPU generator and, on a CUDA machine, every CUDA generator, because sampling on a GPU draws
from the CUDA generator.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["autocast", "default_backend", "device_type", "module_device", "resolve_device", "rng_state", "set_rng_state"]

DEVICES = ("auto", "cpu", "cuda")


def device_type(name: str) -> str:
    """``cpu`` or ``cuda``: what ``name`` (``auto`` | ``cpu`` | ``cuda``) means on this machine.

    Raises:
        ValueError: an unknown name.
    """
    if name not in DEVICES:
        raise ValueError(f"unknown trainer.device {name!r}; valid choices: {', '.join(DEVICES)}")
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this process: ``cuda:<local_rank>`` or ``cpu``; a CUDA device is made current.

    Args:
        name: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        local_rank: the rank within the node (one GPU per process).

    Raises:
        ValueError: an unknown name, ``cuda`` without a CUDA device, or a local rank beyond the
            node's CUDA devices.
    """
    if device_type(name) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def default_backend(device: torch.device) -> str:
    """The process-group backend for ``deepspeed.backend=auto``: ``nccl`` on CUDA, ``gloo`` on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def module_device(model: Any) -> torch.device:
    """The device a model's inputs belong on: its ``device`` attribute (HF models, DeepSpeed
    engines), else that of its first parameter. Under ZeRO-3 the sharded parameters keep an empty
    placeholder on the compute device, so the answer holds there too."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` for ``device``'s type with ``dtype``; disabled when ``dtype`` is ``None``."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when CUDA is available) all CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (CUDA states only when saved and CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
