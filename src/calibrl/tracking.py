"""Metric sinks: a JSONL file in the run directory and Weights & Biases.

Every ``log`` call carries an explicit, non-decreasing global step. The JSONL file is flushed
and fsync'ed after every line, so a crash leaves it complete up to the last logged step.
Non-finite floats are written as JSON ``NaN``/``Infinity`` tokens (Python's ``json`` default),
which ``json.loads`` reads back.

W&B: ``mode`` is ``offline`` (default; sync later with ``wandb sync <run dir>/wandb/offline-run-*``),
``online`` or ``disabled``. The resolved config is logged; the run is always finished, also when
training raises.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["Tracker"]

log = logging.getLogger(__name__)


class Tracker:
    """Writes metrics to the run directory and, unless disabled, to W&B.

    Args:
        run_dir: Hydra run directory; ``metrics.jsonl`` is written there.
        config: resolved config as a plain dict (no interpolations left).
        mode: W&B mode: ``offline`` | ``online`` | ``disabled``.
        project, entity, group, name, tags, job_type: W&B run fields.

    Raises:
        ValueError: unknown ``mode``.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str = "offline",
        project: str = "calibrl",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        job_type: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"unknown logger.mode {mode!r}; valid choices: disabled, offline, online")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a")
        self._last_step = -1
        self.wandb_run = None
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                name=name,
                tags=tags,
                job_type=job_type,
                mode=mode,
                dir=str(self.run_dir),
                config=config,
                settings=wandb.Settings(quiet=True, console="off"),
            )

    @property
    def wandb_dir(self) -> str | None:
        """Local directory of the W&B run (the offline run to sync), or ``None``."""
        return str(Path(self.wandb_run.dir).parent) if self.wandb_run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at global ``step``.

        Raises:
            ValueError: ``step`` is smaller than the last logged step.
        """
        if step < self._last_step:
            raise ValueError(f"step {step} logged after step {self._last_step}; steps must not decrease")
        self._last_step = step
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set W&B run summary values (e.g. final metrics)."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self, exit_code: int = 0) -> None:
        """Close the metrics file and finish the W&B run (safe to call twice)."""
        if not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
