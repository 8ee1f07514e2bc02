"""Update engines: what turns accumulated gradients into an optimizer step, and saves/loads it.

The RL and SFT loops talk to an engine, never to an optimizer directly, so the same loop runs on
one process (:class:`TorchEngine`) or under DeepSpeed ZeRO (``calibrl.rl.deepspeed_engine``).
The protocol (:class:`Engine`):

- ``module``: the model to call for log-probs and generation.
- ``collective``: every rank must run the same micro-batches (DeepSpeed: each forward/backward
  takes part in collectives, and its accumulation count is fixed), so the loop may not skip rows.
- ``backward(loss)``: accumulate gradients of one micro-batch; the loss is already normalised
  over the whole step (no extra division by the number of micro-batches).
- ``step() -> grad_norm``: clip the accumulated gradient to ``max_grad_norm``, take one optimizer
  and scheduler step, zero the gradients. A non-finite norm skips the update (gradients zeroed,
  optimizer and scheduler untouched) and is returned as is, so the caller can count it.
- ``zero_grad()``.
- ``lr() -> float``: the current learning rate (of the first parameter group).
- ``generation()``: context manager around ``generate``, evaluation and the final HF save (a
  no-op here; under ZeRO-3 the full parameters are gathered inside it).
- ``save(dir)`` / ``load(dir)``: model, optimizer and scheduler state in ``dir``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from calibrl.lora import adapter_state_dict, is_peft, load_adapter_state_dict

__all__ = ["Engine", "TorchEngine"]


class Engine(Protocol):
    """The update-engine protocol (module docstring)."""

    module: Any
    collective: bool

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...

    def zero_grad(self) -> None: ...

    def lr(self) -> float: ...

    def generation(self) -> contextlib.AbstractContextManager[None]: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class TorchEngine:
    """One process: a torch optimizer and an optional LR scheduler over ``module``.

    Args:
        module: the policy.
        optimizer: optimizer over ``module``'s trainable parameters.
        scheduler: stepped once per optimizer step, or ``None``.
        max_grad_norm: global L2 norm the gradient is clipped to (> 0).

    Raises:
        ValueError: ``max_grad_norm <= 0``.
    """

    collective = False

    def __init__(self, module: Any, optimizer: torch.optim.Optimizer, scheduler: Any = None, max_grad_norm: float = 1.0) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.module, self.optimizer, self.scheduler, self.max_grad_norm = module, optimizer, scheduler, max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm))
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.zero_grad()
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        yield

    def save(self, directory: Path) -> None:
        """Write ``model.pt`` (state dict; of a LoRA policy the adapter weights only, its frozen
        base being reloaded from the model files), ``optimizer.pt`` and ``scheduler.pt`` to
        ``directory``."""
        directory = Path(directory)
        state = adapter_state_dict(self.module) if is_peft(self.module) else self.module.state_dict()
        torch.save(state, directory / "model.pt")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        if self.scheduler is not None:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        """Load what :meth:`save` wrote.

        Raises:
            FileNotFoundError: a file is missing.
            KeyError: a LoRA policy's adapter weight is missing from ``model.pt``.
        """
        directory = Path(directory)
        state = torch.load(directory / "model.pt", weights_only=True)
        if is_peft(self.module):
            load_adapter_state_dict(self.module, state)
        else:
            self.module.load_state_dict(state)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
