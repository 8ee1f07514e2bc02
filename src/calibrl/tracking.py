"""Metric sinks: a JSONL file in the run directory and Weights & Biases.

Every ``log`` call carries an explicit, non-decreasing global step. The JSONL file is flushed
and fsync'ed after every line, so a crash leaves it complete up to the last logged step.
Non-finite floats are written as JSON ``NaN``/``Infinity`` tokens (Python's ``json`` default),
which ``json.loads`` reads back.

W&B: ``mode`` is ``offline`` (default; sync later with ``wandb sync <run dir>/wandb/offline-run-*``),
``online`` or ``disabled``. The resolved config is logged; the run is always finished, also when
training raises. W&B is a second copy, never a reason to stop training: a W&B call that raises
(at start-up, or mid-run: network, disk, a W&B bug) logs one warning that says how to sync what
W&B recorded, turns W&B off for the rest of the run, and training goes on; the metrics file is
written before W&B is called, so it stays complete.

Credentials: the value of every environment variable whose name says it holds one (``*API_KEY*``,
``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, e.g. ``WANDB_API_KEY``, ``HF_TOKEN``) is replaced by
``<NAME redacted>`` wherever calibrl writes text it did not make itself: the resolved config (a
``${oc.env:...}`` interpolation resolves to the key), the W&B run fields and W&B error messages
(:func:`redact`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "redact"]

log = logging.getLogger(__name__)

_SECRET_NAME = re.compile(r"API_?KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact ordinary text


def redact(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """``value`` with every credential from ``env`` (default ``os.environ``) replaced by
    ``<NAME redacted>``: in strings, and recursively in the keys and values of dicts, lists and
    tuples. A credential is the value (8+ characters) of a variable whose name contains
    ``API_KEY``, ``APIKEY``, ``TOKEN``, ``SECRET`` or ``PASSWORD`` (any case)."""
    env = os.environ if env is None else env
    secrets = sorted(((v, k) for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN),
                     key=lambda s: -len(s[0]))  # longest first: a key that contains another is redacted whole
    if not secrets:
        return value

    def clean(x: Any) -> Any:
        if isinstance(x, str):
            for secret, name in secrets:
                x = x.replace(secret, f"<{name} redacted>")
            return x
        if isinstance(x, dict):
            return {clean(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(clean(v) for v in x)
        return x

    return clean(value)


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
        # Kept after a W&B failure turns the sink off: a checkpoint still names the run to resume,
        # and the end-of-run message still names the directory to sync.
        self._run_id: str | None = None
        self._wandb_dir: str | None = None
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

            self._wandb("start", lambda: self._start(wandb.init(
                project=project,
                entity=entity,
                group=redact(group),
                name=redact(name),
                tags=redact(tags),
                job_type=job_type,
                mode=mode,
                dir=str(self.run_dir),
                config=redact(config),
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(quiet=True, console="off"),
            )))

    def _start(self, wandb_run: Any) -> None:
        self.wandb_run, self._run_id = wandb_run, wandb_run.id
        self._wandb_dir = str(Path(wandb_run.dir).parent)

    def _wandb(self, what: str, call: Callable[[], Any]) -> None:
        """Run a W&B ``call``; if it raises, warn once (how to sync, the error with credentials
        redacted) and turn W&B off for the rest of the run."""
        try:
            call()
        except Exception as err:  # noqa: BLE001 - W&B raises many types (network, disk, its own bugs)
            self.wandb_run = None  # not finished: finish() on a broken run may raise or block again
            at = f"at step {self._last_step}" if self._last_step >= 0 else "before the first step"
            sync = (f"Sync what W&B recorded with `wandb sync {self._wandb_dir}`" if self._wandb_dir else
                    "For a W&B copy of later runs, use logger.mode=offline and `wandb sync` the run afterwards")
            log.warning(
                "W&B %s failed %s (%s: %s). Training continues without W&B; %s holds every step (from here "
                "on only there). %s.", what, at, type(err).__name__, redact(str(err)), self.metrics_path, sync,
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
        """The W&B run id (``None`` when W&B is disabled or failed to start)."""
        return self._run_id

    @property
    def wandb_dir(self) -> str | None:
        """Local directory of the W&B run (the offline run to sync), or ``None`` (as :attr:`run_id`)."""
        return self._wandb_dir

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
            run = self.wandb_run
            self._wandb("log", lambda: run.log(metrics, step=step))

    def log_media(
        self, images: dict[str, Path], tables: dict[str, list[dict[str, Any]]], step: int | None = None
    ) -> None:
        """Send images (PNG paths) and tables (rows as dicts, one column per key; nested values
        are JSON-encoded) to W&B. The metrics file only holds numbers, so this is a no-op
        without W&B; the files themselves stay in the run directory."""
        if self.wandb_run is None:
            return
        import wandb

        run = self.wandb_run

        def send() -> None:
            media: dict[str, Any] = {k: wandb.Image(str(p)) for k, p in images.items()}
            for key, rows in tables.items():
                columns = list(rows[0]) if rows else []
                data = [[json.dumps(r[c]) if isinstance(r[c], (dict, list)) else r[c] for c in columns] for r in rows]
                media[key] = wandb.Table(columns=columns, data=data)
            run.log(media, step=step if step is not None else max(self._last_step, 0))

        self._wandb("media log", send)

    def summary(self, values: dict[str, Any]) -> None:
        """Set W&B run summary values (e.g. final metrics)."""
        if self.wandb_run is not None:
            run = self.wandb_run
            self._wandb("summary", lambda: run.summary.update(values))

    def close(self, exit_code: int = 0) -> None:
        """Close the metrics file and finish the W&B run (safe to call twice)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            run = self.wandb_run
            self._wandb("finish", lambda: run.finish(exit_code=exit_code))
            self.wandb_run = None
