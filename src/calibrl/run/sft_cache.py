"""Reuse one finished SFT warm-up across runs that share it (``trainer.sft.cache=true``).

Ablation arms differ only after the warm-up, yet each would repeat the same SFT (and the same
eval after it). With the cache on, the first run stores, under
``$CALIBRL_CACHE/sft/<key>/`` (next to the model cache), the warmed-up checkpoint, the SFT log
records, the post-SFT eval files and the random-number-generator states at the end of the
warm-up; later runs with the same key load them instead. Restoring the RNG states makes a run
that hits the cache follow exactly the RL trajectory of one that did the warm-up itself.

The key is a SHA-256 of everything the warm-up and its eval depend on: the resolved ``model``,
``data``, ``prompt``, ``trainer.sft`` (without ``cache``), ``trainer.bf16``, the device type
(``cpu`` or ``cuda``, as ``trainer.device`` resolves here),
``trainer.weight_decay``, ``trainer.max_grad_norm``, ``eval`` (without ``raw_model``), ``seed``
and the calibrl version. It does not cover the code: after changing SFT or eval code, delete
``$CALIBRL_CACHE/sft``. Entries are written to a temporary directory renamed into place, so an
interrupted run never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import calibrl
from calibrl.device import device_type, rng_state, set_rng_state

__all__ = ["SFTCacheEntry", "sft_cache_key", "sft_cache_dir", "save_sft_cache", "load_sft_cache"]

EVAL_FILES = ("eval_sft.json", "eval_sft.jsonl")


def sft_cache_key(cfg: DictConfig) -> str:
    """Hex SHA-256 of what the warm-up and the eval after it depend on (see module docstring)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    t = c["trainer"]
    parts = {
        "model": c["model"], "data": c["data"], "prompt": c["prompt"],
        "sft": {k: v for k, v in t["sft"].items() if k != "cache"},
        "bf16": t["bf16"], "device": device_type(t["device"]), "weight_decay": t["weight_decay"], "max_grad_norm": t["max_grad_norm"],
        "eval": {k: v for k, v in c["eval"].items() if k != "raw_model"},
        "seed": c["seed"], "version": calibrl.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def sft_cache_dir(cfg: DictConfig) -> Path:
    """``<model.cache_dir>/../sft/<key>`` (``$CALIBRL_CACHE/sft/<key>`` by default)."""
    return Path(cfg.model.cache_dir).expanduser().parent / "sft" / sft_cache_key(cfg)


@dataclass
class SFTCacheEntry:
    """A stored warm-up.

    Attributes:
        path: the entry's directory; the model and tokenizer are in ``path / "checkpoint"``.
        records: the SFT log records (``{"step": i, "sft/...": ...}``), in order.
        eval_scalars: the flat post-SFT eval metrics (as :meth:`EvalResult.scalars` gives them).
    """

    path: Path
    records: list[dict[str, Any]]
    eval_scalars: dict[str, float]

    @property
    def last_step(self) -> int:
        """Global step at the end of the warm-up (0 without records)."""
        return self.records[-1]["step"] if self.records else 0

    def copy_eval_files(self, run_dir: Path) -> None:
        """Copy the post-SFT eval report and predictions into ``run_dir``."""
        for name in EVAL_FILES:
            shutil.copyfile(self.path / name, run_dir / name)

    def restore_rng(self) -> None:
        """Restore the Python, NumPy and torch RNG states saved at the end of the warm-up."""
        with (self.path / "rng.pkl").open("rb") as f:
            set_rng_state(pickle.load(f))


def save_sft_cache(
    target: Path, model: Any, tokenizer: Any, records: list[dict[str, Any]], eval_scalars: dict[str, float],
    run_dir: Path,
) -> Path:
    """Store a finished warm-up at ``target`` (atomically; an existing entry is kept).

    Args:
        records: the SFT log records.
        eval_scalars: the post-SFT eval metrics.
        run_dir: where the post-SFT eval files (``eval_sft.json``/``.jsonl``) were written.

    Returns:
        ``target``.
    """
    if (target / "entry.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp / "checkpoint")
        tokenizer.save_pretrained(tmp / "checkpoint")
        for name in EVAL_FILES:
            shutil.copyfile(run_dir / name, tmp / name)
        with (tmp / "rng.pkl").open("wb") as f:
            pickle.dump(rng_state(), f)
        (tmp / "entry.json").write_text(json.dumps({"records": records, "eval_scalars": eval_scalars}))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "entry.json").is_file():  # not a concurrent writer: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_sft_cache(target: Path) -> SFTCacheEntry | None:
    """The entry at ``target``, or ``None`` when there is none."""
    entry = target / "entry.json"
    if not entry.is_file():
        return None
    data = json.loads(entry.read_text())
    return SFTCacheEntry(target, data["records"], data["eval_scalars"])
