"""Fault injection for the robustness tests and the soak run (test-only; nothing here is imported
by ``calibrl``). Each helper patches one seam through pytest's ``monkeypatch``, so the faults end
with the test:

- :func:`fake_wandb`: ``wandb.init`` returns a :class:`FakeWandbRun` whose ``log`` raises from a
  given call on (a W&B sink failing mid-run), or ``wandb.init`` itself raises.
- :func:`nan_losses`: the policy loss of chosen RL steps becomes NaN (the graph is kept, so a
  backward would spread NaN into every gradient).
- :func:`scripted_answers`: the tiny random model never writes the completion format, so every
  reward would be the same and neither the verifier nor the update would ever run; this rewrites
  each sampled completion's *text* into a well-formed answer (right or wrong, seeded) while its
  tokens stay the sampled ones, so rewards vary, the verifier sees every answer and every step
  updates the policy.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

import calibrl.rl.grpo as grpo


class FakeWandbRun:
    """The part of a ``wandb`` run the tracker uses; ``log`` raises from call ``fail_at`` on
    (1-based; ``None``: never), with ``message`` as the error text."""

    def __init__(self, run_dir: Path, fail_at: int | None = None, message: str = "W&B unreachable") -> None:
        self.id = "fakerun1"
        self.dir = str(run_dir / "wandb" / "offline-run-fake" / "files")
        self.fail_at, self.message = fail_at, message
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict[str, Any] = {}
        self.finished = False
        self.init_kwargs: dict[str, Any] = {}

    def log(self, metrics: dict, step: int) -> None:
        if self.fail_at is not None and len(self.logged) + 1 >= self.fail_at:
            raise ConnectionError(self.message)
        self.logged.append((step, metrics))

    def finish(self, exit_code: int = 0) -> None:
        self.finished = True


def fake_wandb(monkeypatch, run_dir: Path, fail_at: int | None = None, message: str = "W&B unreachable",
               init_error: Exception | None = None) -> FakeWandbRun:
    """Patch ``wandb.init`` to return (and record its arguments on) a :class:`FakeWandbRun`, or
    to raise ``init_error``."""
    import wandb

    run = FakeWandbRun(run_dir, fail_at, message)

    def init(**kwargs: Any) -> FakeWandbRun:
        run.init_kwargs = kwargs
        if init_error is not None:
            raise init_error
        return run

    monkeypatch.setattr(wandb, "init", init)
    return run


@dataclasses.dataclass
class _StepCounter:
    step: int = 0  # RL steps started by GRPOTrainer.step in this test (1-based once running)


def _count_steps(monkeypatch) -> _StepCounter:
    counter = _StepCounter()
    original = grpo.GRPOTrainer.step

    def step(self):
        counter.step += 1
        return original(self)

    monkeypatch.setattr(grpo.GRPOTrainer, "step", step)
    return counter


@dataclasses.dataclass
class NaNLosses:
    """Which losses were made NaN: ``injected`` lists the RL step of each."""

    injected: list[int] = dataclasses.field(default_factory=list)


def nan_losses(monkeypatch, steps: set[int] | None = None, from_step: int | None = None, once: bool = False) -> NaNLosses:
    """Make the policy loss NaN in RL steps ``steps`` (or every step from ``from_step`` on); with
    ``once``, only the first loss computed in one of those steps."""
    counter = _count_steps(monkeypatch)
    record = NaNLosses()
    original = grpo.clipped_policy_loss

    def loss(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        hit = (steps is not None and counter.step in steps) or (from_step is not None and counter.step >= from_step)
        if hit and not (once and record.injected):
            record.injected.append(counter.step)
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(grpo, "clipped_policy_loss", loss)
    return record


def scripted_answers(monkeypatch, seed: int = 0, special: dict[int, str] | None = None, keyed: bool = False) -> None:
    """Rewrite every sampled completion text into ``<think>..</think><answer>A</answer>
    <confidence>q</confidence>``: A is the reference answer or a wrong one (even odds), q uniform;
    ``special`` maps a completion's index over the run (0-based) to an answer to write instead.
    ``keyed``: each text is drawn from a generator seeded by (``seed``, example id, row), not from
    one stream over the run, so a resumed run gets the texts the uninterrupted one got."""
    rng = random.Random(seed)
    original = grpo.GRPOTrainer.generate
    seen = [0]

    def generate(self, examples):
        nonlocal rng
        rollout = original(self, examples)
        g = self.algo.group_size
        texts = []
        for i in range(len(rollout)):
            if keyed:
                rng = random.Random(f"{seed}-{examples[i // g].id}-{i}")
            answer = examples[i // g].answer if rng.random() < 0.5 else "wrong"
            answer = (special or {}).get(seen[0], answer)
            seen[0] += 1
            texts.append(f"<think>ok</think><answer>{answer}</answer><confidence>{rng.random():.2f}</confidence>")
        return dataclasses.replace(rollout, texts=texts)

    monkeypatch.setattr(grpo.GRPOTrainer, "generate", generate)


def out_of_memory_above(monkeypatch, max_prompts: int) -> list[int]:
    """Make the rollout decode loop (``calibrl.rl.rollout.decode_groups``) raise
    ``torch.OutOfMemoryError`` on more than ``max_prompts`` prompts; returns the list of prompt
    counts it was called with."""
    from calibrl.rl import rollout

    original = rollout.decode_groups
    calls: list[int] = []

    def decode_groups(model: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any):
        n = input_ids.shape[0]
        calls.append(n)
        if n > max_prompts:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {n} prompts > {max_prompts})")
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(rollout, "decode_groups", decode_groups)
    return calls
