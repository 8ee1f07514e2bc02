"""Resumable RL checkpoints: atomic writes, keep-last-K, and finding the one to resume from.

Layout, under the run directory::

    checkpoints/step00000042/      # global step 42, complete
        model.pt optimizer.pt scheduler.pt   (the engine's files, calibrl.rl.engine; deepspeed/
                                              with DeepSpeed: model, optimizer shards, scheduler)
        reference.pt                         (the frozen reference model, when algo.beta > 0)
        rng_rank<r>.pt                       (python, numpy, torch CPU and CUDA RNG states of rank r)
        state.json                           (global step, RL step, trainer state, W&B run id,
                                              metrics-file records so far, eval results so far)
    checkpoints/.tmp-step00000044/ # a save in progress: never read

A checkpoint is written into a ``.tmp-*`` directory and renamed into place only once every file
is written and flushed; a rename within one file system is atomic, so a crash during a save leaves
at worst a ``.tmp-*`` directory, never a ``step*`` directory that looks complete. After a save,
all but the newest ``keep_last`` checkpoints are deleted.

With several processes every rank calls :func:`save_checkpoint` (the DeepSpeed save is
collective and each rank writes its RNG state); rank 0 writes the rest and renames, between
barriers. The run directory must be on a file system every rank sees.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibrl.device import rng_state, set_rng_state
from calibrl.distributed import barrier, dist_info
from calibrl.models import honour_umask
from calibrl.rl.engine import Engine

__all__ = ["CheckpointState", "find_checkpoint", "load_checkpoint", "save_checkpoint"]

_PREFIX = "step"


@dataclass
class CheckpointState:
    """What a checkpoint restores besides the engine's files.

    Attributes:
        path: the checkpoint directory.
        global_step: the global step (SFT + RL optimizer steps) of the last logged record.
        rl_step: RL steps done.
        trainer: :meth:`calibrl.rl.grpo.GRPOTrainer.state_dict`.
        wandb_id: the W&B run id to continue (``None`` without W&B).
        records: records in ``metrics.jsonl`` at the save (a resumed run drops the later ones).
        results: eval stage -> scalars, for the evals done so far.
    """

    path: Path
    global_step: int
    rl_step: int
    trainer: dict[str, int]
    wandb_id: str | None
    records: int
    results: dict[str, dict[str, float]]

    def restore_rng(self) -> None:
        """Set the python, numpy and torch RNGs to their state at the save."""
        set_rng_state(torch.load(self.path / f"rng_rank{dist_info().rank}.pt", weights_only=False))  # numpy inside


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    engine: Engine,
    *,
    global_step: int,
    rl_step: int,
    trainer_state: dict[str, int],
    wandb_id: str | None,
    records: int,
    results: dict[str, dict[str, float]],
    keep_last: int,
    reference: Any = None,
) -> Path:
    """Write a checkpoint atomically and prune old ones (module docstring).

    Returns:
        The checkpoint directory ``run_dir/checkpoints/step<global_step:08d>``.

    Raises:
        ValueError: ``keep_last < 1``.
    """
    if keep_last < 1:
        raise ValueError(f"trainer.keep_last must be >= 1, got {keep_last}")
    main = dist_info().is_main
    root = Path(run_dir) / "checkpoints"
    final = root / f"{_PREFIX}{global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{dist_info().rank}.pt")
    barrier()
    if main:
        _finish(tmp, final, root, keep_last, reference, {
            "global_step": global_step, "rl_step": rl_step, "trainer": trainer_state, "wandb_id": wandb_id,
            "records": records, "results": results})
    barrier()
    return final


def _finish(tmp: Path, final: Path, root: Path, keep_last: int, reference: Any, state: dict[str, Any]) -> None:
    """Rank 0: reference weights and state.json, flush, rename into place, prune."""
    if reference is not None:
        torch.save(reference.state_dict(), tmp / "reference.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    honour_umask(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved twice (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in _complete(root)[:-keep_last]:
        shutil.rmtree(old)


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file())


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint ``path`` names: ``path`` itself if it is one, else the newest complete one
    under ``path/checkpoints`` (``path`` a run directory); ``None`` when there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = _complete(path / "checkpoints")
    return found[-1] if found else None


def load_checkpoint(path: Path) -> CheckpointState:
    """Read ``state.json`` of the checkpoint directory ``path`` (the engine loads its own files).

    Raises:
        FileNotFoundError: ``path`` holds no ``state.json``.
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a calibrl checkpoint (no state.json)")
    s = json.loads((path / "state.json").read_text())
    return CheckpointState(path, s["global_step"], s["rl_step"], s["trainer"], s["wandb_id"], s["records"], s["results"])
