"""Reuse one finished warm-up across runs that share it (``trainer.sft.cache=true``).

Ablation arms differ only after the warm-up, yet each would repeat the same SFT (and the same
eval after it). With the cache on, the first run stores, under
``$CALIBRL_CACHE/sft/<key>/`` (next to the model cache), the warmed-up checkpoint, the SFT log
records, the post-SFT eval files and the random-number-generator states at the end of the
warm-up; later runs with the same key load them instead. Restoring the RNG states makes a run
that hits the cache follow exactly the RL trajectory of one that did the warm-up itself.

The key is a SHA-256 of everything the warm-up and its eval depend on: the resolved ``model``
(``model.lora`` only when LoRA is on, so full fine-tuning keys did not change when it came),
``data``, ``prompt``, ``trainer.sft`` (without ``cache``), ``trainer.bf16``, the device type
(``cpu`` or ``cuda``, as ``trainer.device`` resolves here),
``trainer.weight_decay``, ``trainer.max_grad_norm``, ``eval`` (without ``raw_model``), ``seed``
and the calibrl version. It does not cover the code: after changing SFT or eval code, delete
``$CALIBRL_CACHE/sft``. Entries are written to a temporary directory renamed into place, so an
interrupted run never leaves a half entry.

The self-labelled confidence warm-up that follows (``trainer.self_label.enabled``,
:mod:`calibrl.rl.self_label`) is cached the same way, as an entry of stage ``self_label`` under
``$CALIBRL_CACHE/self_label/<key>/`` (its checkpoint, records, ``eval_self_label.*`` files and RNG
states), with the key :func:`self_label_cache_key`: a SHA-256 of the SFT key (the model it starts
from and everything the SFT key covers) and ``trainer.self_label``. Delete
``$CALIBRL_CACHE/self_label`` after changing its code.
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
from calibrl.models import honour_umask

__all__ = [
    "SFTCacheEntry", "eval_files", "load_sft_cache", "save_sft_cache", "self_label_cache_dir", "self_label_cache_key",
    "sft_cache_dir", "sft_cache_key",
]


def eval_files(stage: str) -> tuple[str, str]:
    """The eval files of an eval ``stage`` in the run directory: report and predictions."""
    return f"eval_{stage}.json", f"eval_{stage}.jsonl"


def sft_cache_key(cfg: DictConfig) -> str:
    """Hex SHA-256 of what the warm-up and the eval after it depend on (see module docstring)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    t = c["trainer"]
    model = dict(c["model"])
    if not (model.get("lora") or {}).get("enabled"):  # keys as before LoRA existed: full fine-tuning caches stay valid
        model.pop("lora", None)
    if model.get("adapter") is None:
        model.pop("adapter", None)
    parts = {
        "model": model, "data": c["data"], "prompt": c["prompt"],
        "sft": {k: v for k, v in t["sft"].items() if k != "cache"},
        "bf16": t["bf16"], "device": device_type(t["device"]), "weight_decay": t["weight_decay"], "max_grad_norm": t["max_grad_norm"],
        "eval": {k: v for k, v in c["eval"].items() if k != "raw_model"},
        "seed": c["seed"], "version": calibrl.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def sft_cache_dir(cfg: DictConfig) -> Path:
    """``<model.cache_dir>/../sft/<key>`` (``$CALIBRL_CACHE/sft/<key>`` by default)."""
    return Path(cfg.model.cache_dir).expanduser().parent / "sft" / sft_cache_key(cfg)


def self_label_cache_key(cfg: DictConfig) -> str:
    """Hex SHA-256 of what the self-labelled warm-up and the eval after it depend on: the SFT key
    (:func:`sft_cache_key`: the model it starts from, data, prompt, eval settings, seed, ...) and
    the resolved ``trainer.self_label``."""
    parts = {"sft": sft_cache_key(cfg), "self_label": OmegaConf.to_container(cfg.trainer.self_label, resolve=True)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def self_label_cache_dir(cfg: DictConfig) -> Path:
    """``<model.cache_dir>/../self_label/<key>`` (``$CALIBRL_CACHE/self_label/<key>`` by default)."""
    return Path(cfg.model.cache_dir).expanduser().parent / "self_label" / self_label_cache_key(cfg)


@dataclass
class SFTCacheEntry:
    """A stored warm-up.

    Attributes:
        path: the entry's directory; the model and tokenizer are in ``path / "checkpoint"``.
        records: the warm-up's log records (``{"step": i, "sft/...": ...}``), in order.
        eval_scalars: the flat eval metrics after it (as :meth:`EvalResult.scalars` gives them).
        stage: the eval stage after it, ``sft`` or ``self_label`` (names its eval files).
    """

    path: Path
    records: list[dict[str, Any]]
    eval_scalars: dict[str, float]
    stage: str = "sft"

    @property
    def last_step(self) -> int:
        """Global step at the end of the warm-up (0 without records)."""
        return self.records[-1]["step"] if self.records else 0

    def copy_eval_files(self, run_dir: Path) -> None:
        """Copy the eval report and predictions of :attr:`stage` into ``run_dir``."""
        for name in eval_files(self.stage):
            shutil.copyfile(self.path / name, run_dir / name)

    def restore_rng(self) -> None:
        """Restore the Python, NumPy and torch RNG states saved at the end of the warm-up."""
        with (self.path / "rng.pkl").open("rb") as f:
            set_rng_state(pickle.load(f))


def save_sft_cache(
    target: Path, model: Any, tokenizer: Any, records: list[dict[str, Any]], eval_scalars: dict[str, float],
    run_dir: Path, stage: str = "sft",
) -> Path:
    """Store a finished warm-up at ``target`` (atomically; an existing entry is kept).

    Args:
        records: the warm-up's log records.
        eval_scalars: the metrics of the eval after it.
        run_dir: where that eval's files (``eval_<stage>.json``/``.jsonl``) were written.
        stage: that eval's stage, ``sft`` or ``self_label``.

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
        for name in eval_files(stage):
            shutil.copyfile(run_dir / name, tmp / name)
        with (tmp / "rng.pkl").open("wb") as f:
            pickle.dump(rng_state(), f)
        (tmp / "entry.json").write_text(json.dumps({"records": records, "eval_scalars": eval_scalars, "stage": stage}))
        honour_umask(tmp)
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
    return SFTCacheEntry(target, data["records"], data["eval_scalars"], data.get("stage", "sft"))
