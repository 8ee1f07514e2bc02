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
        resume_records: continue a run whose checkpoint was taken when ``metrics.jsonl`` held this
            many records: the records after them (logged after the checkpoint by the run that
            died, and a torn last line) are dropped, so every step is in the file exactly once.
        run_id: W&B run id to continue (``resume="allow"``). Online, the run continues; offline,
            W&B cannot resume (wandb/wandb#2423): a second offline directory with the same id is
            written, to sync after the first with ``wandb sync --id <id> --append``; the metrics
            file is the complete record either way.
        writer: this process writes (global rank 0). Other ranks pass ``False``: no metrics file,
            no W&B run; their ``log`` calls only check the step order.

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
        resume_records: int | None = None,
        run_id: str | None = None,
        writer: bool = True,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"unknown logger.mode {mode!r}; valid choices: disabled, offline, online")
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._last_step = -1
        self.records = 0  # records in the metrics file
        self.wandb_run = None
        self._file = None
        if not writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_records is not None:
            self._truncate(resume_records)
        elif self.metrics_path.is_file():  # appending to an earlier file: count what is there
            self.records = len(self.metrics_path.read_text().splitlines())
        self._file = self.metrics_path.open("a")
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
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(quiet=True, console="off"),
            )

    def _truncate(self, n: int) -> None:
        """Keep the first ``n`` records of the metrics file (atomic rewrite).

        Raises:
            ValueError: the file holds fewer than ``n`` complete records (it is not the file the
                checkpoint was taken with).
        """
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.is_file() else []
        kept = lines[:n]
        try:
            steps = [json.loads(line)["step"] for line in kept]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{self.metrics_path}: record unreadable before the checkpoint's {n}: {err}") from err
        if len(kept) < n:
            raise ValueError(f"{self.metrics_path} holds {len(kept)} records, the checkpoint expects {n}")
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.metrics_path)
        self.records, self._last_step = n, max(steps, default=-1)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (``None`` without W&B)."""
        return self.wandb_run.id if self.wandb_run is not None else None

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
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.records += 1
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
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
