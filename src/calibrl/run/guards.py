"""The cross-cutting guards of the main job, each small and tested alone: the pre-emption flag
(SIGTERM), the non-finite stop, the resume state, and the eval / checkpoint cadence.

How the RL loop (:func:`calibrl.run.stages.rl_loop`) uses them, per RL step ``i`` (1-based):

- :class:`Cadence` says whether step ``i`` is followed by a held-out eval (every
  ``trainer.eval_every`` steps, never the last: the final eval follows it anyway), a resumable
  checkpoint (every ``trainer.save_every`` steps, or when pre-empted; never a step whose update was
  skipped as non-finite) or a stop on non-finite steps (``trainer.max_bad_steps_in_row`` in a row).
- :class:`SignalFlag` records a SIGTERM instead of dying on it; the loop checkpoints and stops with
  exit code ``128 + SIGTERM`` (:class:`RunStopped`).
- :func:`non_finite_message` is the one line printed when the run stops on non-finite steps
  (exit code :data:`EXIT_NON_FINITE`).
- :func:`resume_state` turns ``trainer.resume`` into the checkpoint to continue from.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl.config import ConfigError
from calibrl.run.checkpoint import CheckpointState, find_checkpoint, load_checkpoint

__all__ = ["EXIT_NON_FINITE", "Cadence", "RunStopped", "SignalFlag", "non_finite_message", "resume_state"]

EXIT_NON_FINITE = 3  # the run stopped on non-finite steps (2: a configuration error, 143: SIGTERM)


class RunStopped(SystemExit):
    """A run that stops on purpose (non-finite steps, pre-emption) with exit code ``code``; the
    pipeline closes the tracker with that code and lets it end the process."""


class SignalFlag:
    """Records that ``signum`` arrived instead of dying on it (installed in the main thread only;
    elsewhere it never fires); :meth:`restore` puts the previous handler back.

    Attributes:
        raised: the signal arrived since the flag was installed.
    """

    def __init__(self, signum: int) -> None:
        self.signum, self.raised, self._old = signum, False, None
        try:
            self._old = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def restore(self) -> None:
        """Put back the handler found at installation (once; later calls do nothing)."""
        if self._old is not None:
            signal.signal(self.signum, self._old)
            self._old = None


def non_finite_message(run_dir: Path, rl_step: int, why: str) -> str:
    """The one-line message of a run stopped on non-finite steps: why, the last good checkpoint
    (the newest one of ``run_dir``: a non-finite step is never saved) and how to resume from it."""
    last = find_checkpoint(run_dir)
    where = (f"last good checkpoint: {last} (resume with trainer.resume={last}, e.g. with a lower trainer.lr)"
             if last is not None else "no checkpoint was saved (trainer.save_every=N saves one every N RL steps)")
    return f"stopped at RL step {rl_step}: {why}; nothing saved after it; {where}"


def resume_state(resume: str | None, run_dir: Path) -> CheckpointState | None:
    """The checkpoint ``trainer.resume`` names: ``None`` -> none; ``auto`` -> the newest one of
    ``run_dir`` if any (else none: a fresh run); a path -> that checkpoint or the newest one of
    that run dir.

    Raises:
        ConfigError: a path with no checkpoint in it.
    """
    if resume is None:
        return None
    found = find_checkpoint(run_dir if resume == "auto" else Path(resume).expanduser())
    if found is None and resume != "auto":
        raise ConfigError(f"trainer.resume={resume}: no checkpoint there (a checkpoints/step* dir or a run dir holding one)")
    return load_checkpoint(found) if found is not None else None


@dataclass(frozen=True)
class Cadence:
    """When the RL loop evaluates, checkpoints and gives up (``trainer.*``; 0 turns each off).

    Attributes:
        max_steps: RL steps of the run.
        eval_every: RL steps between held-out evals.
        save_every: RL steps between resumable checkpoints.
        max_bad_steps_in_row: non-finite RL steps in a row that stop the run.
    """

    max_steps: int
    eval_every: int = 0
    save_every: int = 0
    max_bad_steps_in_row: int = 0

    def eval_due(self, rl_step: int) -> bool:
        """A held-out eval follows ``rl_step`` (not after the last step: the final eval does)."""
        return bool(self.eval_every) and rl_step % self.eval_every == 0 and rl_step < self.max_steps

    def save_due(self, rl_step: int, stopping: bool) -> bool:
        """A resumable checkpoint is due after ``rl_step``: on the cadence, or because the run is
        stopping on a signal (whether it may be written depends on the step being finite)."""
        return (bool(self.save_every) and rl_step % self.save_every == 0) or stopping

    def too_many_bad(self, bad_in_row: int) -> bool:
        """``bad_in_row`` consecutive non-finite steps stop the run."""
        return bool(self.max_bad_steps_in_row) and bad_in_row >= self.max_bad_steps_in_row
