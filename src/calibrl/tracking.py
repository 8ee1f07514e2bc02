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

    def log_media(
        self, images: dict[str, Path], tables: dict[str, list[dict[str, Any]]], step: int | None = None
    ) -> None:
        """Send images (PNG paths) and tables (rows as dicts, one column per key; nested values
        are JSON-encoded) to W&B. The metrics file only holds numbers, so this is a no-op
        without W&B; the files themselves stay in the run directory."""
        if self.wandb_run is None:
            return
        import wandb

        media: dict[str, Any] = {k: wandb.Image(str(p)) for k, p in images.items()}
        for key, rows in tables.items():
            columns = list(rows[0]) if rows else []
            data = [[json.dumps(r[c]) if isinstance(r[c], (dict, list)) else r[c] for c in columns] for r in rows]
            media[key] = wandb.Table(columns=columns, data=data)
        self.wandb_run.log(media, step=step if step is not None else max(self._last_step, 0))

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
