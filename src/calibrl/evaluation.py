"""Held-out evaluation: generate, score with the training reward path, summarise.

Metrics (keys without the ``eval/<dataset>/`` prefix the trainer adds): ``accuracy``,
``format_rate``, ``confidence_mean``, ``confidence_std``, ``overconfidence``, ``ece`` (10 uniform
bins), ``brier``, ``auroc`` (NaN when one class is absent) -- see
:func:`calibrl.metrics.calibration_summary` -- plus per slice ``slice/<s>/accuracy``,
``slice/<s>/confidence_mean`` (NaN without well-formed completions) and ``slice/<s>/count``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrl.data.prompts import PromptBuilder
from calibrl.data.sources import Example
from calibrl.metrics import calibration_summary
from calibrl.rewards import RewardFunction
from calibrl.rl.rollout import generate_rollout
from calibrl.scoring import score_completions

__all__ = ["EvalSettings", "evaluate"]


@dataclass
class EvalSettings:
    """Mirrors the ``eval`` config group.

    Attributes:
        batch_size: prompts per ``generate`` call.
        max_new_tokens: completion length cap (tokens).
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (used when ``do_sample``).
        n_bins: ECE bins.
    """

    batch_size: int = 64
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 1.0
    n_bins: int = 10


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: PromptBuilder,
    examples: Sequence[Example],
    is_correct: Callable[[str | None, Example], bool],
    reward_fn: RewardFunction,
    settings: EvalSettings,
    autocast_dtype: torch.dtype | None = None,
    predictions_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``examples`` (one completion each).

    Args:
        predictions_path: when set, one JSON line per example (id, slice, completion, parsed
            answer, confidence, correct, format error) is written there.
        progress: called with the number of examples finished after each batch.

    Returns:
        Metric name -> value (see module docstring).

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("no eval examples")
    correct, conf, ok, slices, rows = [], [], [], [], []
    for start in range(0, len(examples), settings.batch_size):
        batch = list(examples[start : start + settings.batch_size])
        rollout = generate_rollout(
            model,
            tokenizer,
            [prompts.prompt(e) for e in batch],
            1,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            do_sample=settings.do_sample,
            stop_string=f"</{prompts.fmt.confidence}>",
            autocast_dtype=autocast_dtype,
        )
        parsed, rewards = score_completions(rollout.texts, batch, is_correct, reward_fn, prompts.fmt)
        correct.extend(rewards.correct.tolist())
        conf.extend(rewards.confidence.tolist())
        ok.extend(rewards.format_ok.tolist())
        slices.extend(e.slice for e in batch)
        for e, text, p, c in zip(batch, rollout.texts, parsed, rewards.correct.tolist()):
            rows.append(
                {"id": e.id, "slice": e.slice, "reference": e.answer, "completion": text, "answer": p.answer,
                 "confidence": p.confidence, "correct": c, "format_ok": p.format_ok, "error": p.error}
            )
        if progress:
            progress(len(batch))
    out = calibration_summary(correct, conf, ok, n_bins=settings.n_bins)
    by_slice: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(slices):
        by_slice[s].append(i)
    c_arr, q_arr, ok_arr = np.array(correct, float), np.array(conf, float), np.array(ok, bool)
    for s, idx in sorted(by_slice.items()):
        idx_ok = [i for i in idx if ok_arr[i]]
        out[f"slice/{s}/accuracy"] = float(c_arr[idx].mean())
        out[f"slice/{s}/confidence_mean"] = float(q_arr[idx_ok].mean()) if idx_ok else float("nan")
        out[f"slice/{s}/count"] = float(len(idx))
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with predictions_path.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return out
