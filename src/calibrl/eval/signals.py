"""Model-intrinsic confidence signals, side by side with the stated (verbalized) confidence.

For every completion, four numbers (see :data:`SIGNALS`):

- ``verbalized``: the confidence the model wrote, as parsed (NaN unless ``format_ok``).
- ``answer_prob``: geometric mean of the probabilities of the tokens that cover the answer
  text, ``exp(mean log p)`` over those tokens.
- ``lowest_window_prob``: a step-level signal after DeepConf's windowed "group confidence"
  (Fu et al., "Deep Think with Confidence", arXiv:2508.15260): over the *reasoning tokens* (the
  completion tokens that end before the ``<answer>`` opening tag), the minimum over all
  sliding windows of ``window`` consecutive tokens of the mean token log-prob, reported as
  ``exp`` of that minimum. DeepConf's token confidence is the negative mean log-prob of the
  top-k candidate tokens; this module uses the log-prob of the token actually generated.
- ``expected_confidence``: the *expected* stated confidence ``sum_v p(v) v`` over the grid
  ``0, step, ..., 1`` (:mod:`calibrl.rl.confidence_grid`): ``p`` is the model's distribution over
  the confidences it could write at its ``<confidence>`` tag, teacher forced and renormalised
  over the grid (mass on anything else, e.g. another number of decimals, is dropped). Greedy
  decoding states (close to) the mode of ``p``; this is its mean, so it moves as soon as ``p``
  does, before the mode flips (ConfTuner, arXiv:2508.18847, reads the same distribution). Same NaN policy as ``verbalized`` (NaN unless ``format_ok``), and also NaN
  where no token boundary falls right after the tag
  (:func:`calibrl.rl.confidence_grid.confidence_contexts`).

The intrinsic signals use the policy's log-probs under the raw distribution (temperature 1, no
top-p), whatever temperature the completions were sampled at:
:func:`calibrl.rl.rollout.completion_logprobs` takes the plain log-softmax.

Tokens are mapped to characters of the completion text (where :class:`ParsedCompletion` spans
live) by :func:`calibrl.rewards.spans.token_char_ends`, which decodes prefixes the way
:func:`calibrl.rl.rollout.generate_rollout` decodes ``texts``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calibrl.device import autocast, module_device
from calibrl.data.format import CompletionFormat
from calibrl.rewards.parsing import ParsedCompletion
from calibrl.rewards.spans import check_ends, span_tokens, token_char_ends
from calibrl.rl.confidence_grid import (
    ConfidenceGrid,
    confidence_contexts,
    expected_confidence,
    grid_distribution,
    grid_logprobs_tree,
)
from calibrl.rl.rollout import Rollout, completion_logprobs

__all__ = [
    "SIGNALS",
    "answer_probability",
    "confidence_signals",
    "expected_stated_confidence",
    "lowest_window_probability",
    "reasoning_end",
]

SIGNALS = ("verbalized", "answer_prob", "lowest_window_prob", "expected_confidence")

# log-softmax in float32 can land a hair above 0 for a token of probability ~1; anything above
# this is not a log-probability at all.
_LOGPROB_ROUNDING = 1e-4


def _check_logprobs(logprobs: Sequence[float], ends: Sequence[int]) -> np.ndarray:
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1 or len(lp) != len(ends):
        raise ValueError(f"logprobs must be 1-D with one value per token ({len(ends)}), got shape {lp.shape}")
    if not np.all(np.isfinite(lp)):
        raise ValueError("logprobs hold a non-finite value")
    if np.any(lp > _LOGPROB_ROUNDING):
        raise ValueError(f"logprobs must be <= 0 (log-probabilities), got {lp.max()!r}")
    return np.minimum(lp, 0.0)  # drop float rounding above 0 so probabilities stay <= 1


def answer_probability(logprobs: Sequence[float], ends: Sequence[int], answer_span: tuple[int, int]) -> float:
    """Geometric-mean probability of the tokens covering the answer: ``exp(mean log p)``.

    Args:
        logprobs: ``[L]`` log-probs (nats, <= 0) of the completion tokens.
        ends: ``[L]`` token end offsets from :func:`token_char_ends`.
        answer_span: ``(a, b)`` character offsets of the answer text
            (:attr:`ParsedCompletion.answer_span`).

    Returns:
        A probability in (0, 1] (0.0 only by float underflow, mean log-prob below about -745);
        NaN (undefined) when no token overlaps the span, i.e. the span is empty.

    Raises:
        ValueError: lengths differ, a log-prob is non-finite or above 0, or the span or
            ``ends`` are invalid (see :func:`span_tokens`).
    """
    lp = _check_logprobs(logprobs, ends)
    tokens = span_tokens(ends, answer_span)
    if not tokens:
        return math.nan
    return float(np.exp(lp[tokens].mean()))


def lowest_window_probability(
    logprobs: Sequence[float], ends: Sequence[int], reasoning_end: int, window: int
) -> float:
    """``exp`` of the lowest mean log-prob over sliding windows of the reasoning tokens.

    Reasoning tokens are those with ``ends[k] <= reasoning_end`` (they end before the answer tag
    opens; a token straddling the tag is excluded). With R of them, the windows are
    ``[j, j + window)`` for ``j = 0 .. R - window``; when ``R < window`` there is one window
    over all R tokens. Windowed "group confidence" after DeepConf (arXiv:2508.15260), with the
    generated token's log-prob in place of DeepConf's top-k mean (see the module docstring).

    Worked example: log-probs ``[-1, -2, -3, -1]``, all reasoning, ``window=2``: window means
    -1.5, -2.5, -2.0; the lowest is -2.5, so the result is ``exp(-2.5)``.

    Args:
        logprobs: ``[L]`` log-probs (nats, <= 0) of the completion tokens.
        ends: ``[L]`` token end offsets from :func:`token_char_ends`.
        reasoning_end: character offset where the reasoning ends (:func:`reasoning_end`).
        window: window length in tokens, >= 1.

    Returns:
        A probability in (0, 1] (0.0 only by float underflow); NaN (undefined) when there is no
        reasoning token.

    Raises:
        ValueError: ``window < 1``, ``reasoning_end`` negative, lengths differ, a log-prob is
            non-finite or above 0, or ``ends`` decreases.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if reasoning_end < 0:
        raise ValueError(f"reasoning_end must be >= 0, got {reasoning_end}")
    lp = _check_logprobs(logprobs, ends)
    check_ends(ends)
    n = bisect.bisect_right(list(ends), reasoning_end)  # ends are sorted: reasoning is a prefix
    if n == 0:
        return math.nan
    w = min(window, n)
    csum = np.concatenate([[0.0], np.cumsum(lp[:n])])
    means = (csum[w:] - csum[:-w]) / w  # [n - w + 1] window means
    return float(np.exp(means.min()))


def reasoning_end(text: str, parsed: ParsedCompletion, fmt: CompletionFormat = CompletionFormat()) -> int | None:
    """Character offset where the reasoning ends: the start of the answer's opening tag.

    The tag is the last ``<{fmt.answer}>`` that ends at or before ``parsed.answer_span[0]``. The
    parser blanks scratch blocks, so an ``<answer>`` written inside ``<think>`` is never the
    parsed answer's tag; searching backwards from the span skips it.

    Args:
        text: the completion that ``parsed`` was parsed from.
        parsed: its :class:`ParsedCompletion`.
        fmt: tag names.

    Returns:
        The offset in ``[0, len(text)]``, or ``None`` when ``parsed`` has no answer span.

    Raises:
        ValueError: no opening tag precedes the span (``parsed`` does not belong to ``text``).
    """
    if parsed.answer_span is None:
        return None
    tag = f"<{fmt.answer}>"
    start = text.rfind(tag, 0, parsed.answer_span[0])
    if start < 0:
        raise ValueError(f"no {tag} before answer span {parsed.answer_span}: parsed is not from this text")
    return start


@torch.no_grad()
def confidence_signals(
    model: Any,
    tokenizer: Any,
    rollout: Rollout,
    parsed: Sequence[ParsedCompletion],
    fmt: CompletionFormat = CompletionFormat(),
    *,
    window: int = 16,
    autocast_dtype: torch.dtype | None = None,
    micro_batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Verbalized, answer-token and lowest-window confidence of every completion of a rollout
    (``expected_confidence`` is :func:`expected_stated_confidence`'s, a forward of its own).

    The policy's log-probs are computed (``completion_logprobs`` with ``share_prefix=True``, in
    eval mode, no grad, CPU autocast to ``autocast_dtype`` when given) only for the rows that
    have an answer span, ``micro_batch_size`` rows at a time, and read only where
    ``completion_mask`` is 1. The model's train/eval mode is restored afterwards.

    Args:
        model: the policy (a causal LM, as for ``completion_logprobs``).
        tokenizer: its tokenizer (the one that produced ``rollout``).
        rollout: N completions; ``rollout.texts[i]`` must be the decode (special tokens
            skipped) of the masked ``completion_ids[i]``, as ``generate_rollout`` makes it.
        parsed: ``[N]`` parses of ``rollout.texts``, in order.
        fmt: the completion format ``parsed`` was parsed with.
        window: sliding-window length in tokens for ``lowest_window_prob`` (>= 1).
        autocast_dtype: e.g. ``torch.bfloat16`` for CPU autocast; ``None`` for full precision.
        micro_batch_size: rows per forward pass (>= 1).

    Returns:
        ``{name: float64 [N]}`` for ``verbalized``, ``answer_prob`` and ``lowest_window_prob``,
        values in [0, 1]: ``verbalized`` (NaN unless ``format_ok``), ``answer_prob`` (NaN without
        an answer span or with an empty one), ``lowest_window_prob`` (NaN without an answer span
        or without reasoning tokens).

    Raises:
        ValueError: ``len(parsed) != len(rollout)``, ``window < 1``, ``micro_batch_size < 1``,
            or a text that is not the decode of its completion tokens.
    """
    n = len(rollout)
    if len(parsed) != n:
        raise ValueError(f"parsed has {len(parsed)} items but the rollout has {n} completions")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    out = {name: np.full(n, math.nan) for name in ("answer_prob", "lowest_window_prob")}
    out["verbalized"] = np.array([p.confidence if p.format_ok else math.nan for p in parsed], dtype=np.float64)
    rows = [i for i, p in enumerate(parsed) if p.answer_span is not None]
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(rows), micro_batch_size):
            chunk = rows[lo : lo + micro_batch_size]
            sub = rollout.select(torch.tensor(chunk))
            with autocast(module_device(model), autocast_dtype):
                lp = completion_logprobs(model, sub, share_prefix=True).cpu()  # float32 [len(chunk), L]
            keep = sub.completion_mask == 1
            for j, i in enumerate(chunk):
                ids = sub.completion_ids[j][keep[j]].tolist()
                if tokenizer.decode(ids, skip_special_tokens=True) != rollout.texts[i]:
                    raise ValueError(f"rollout.texts[{i}] is not the decode of its completion tokens")
                ends = token_char_ends(tokenizer, ids)
                row_lp = lp[j][keep[j]].tolist()
                out["answer_prob"][i] = answer_probability(row_lp, ends, parsed[i].answer_span)
                end = reasoning_end(rollout.texts[i], parsed[i], fmt)
                out["lowest_window_prob"][i] = lowest_window_probability(row_lp, ends, end, window)
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def expected_stated_confidence(
    model: Any,
    tokenizer: Any,
    rollout: Rollout,
    parsed: Sequence[ParsedCompletion],
    grid: ConfidenceGrid,
    fmt: CompletionFormat = CompletionFormat(),
    *,
    autocast_dtype: torch.dtype | None = None,
    micro_batch_size: int = 8,
) -> np.ndarray:
    """Expected stated confidence ``sum_v p(v) v`` of every completion, over ``grid``.

    At each completion's context (its tokens up to and including the ``<confidence>`` tag,
    :func:`~calibrl.rl.confidence_grid.confidence_contexts`) the V candidates
    ``f"{v:.2f}"`` are teacher forced (:func:`~calibrl.rl.confidence_grid.grid_logprobs_tree`:
    one forward of the context with the candidates' prefix tree appended), their sequence
    probabilities renormalised
    over the grid into ``p`` and averaged against the values. In eval mode, no grad, autocast to
    ``autocast_dtype`` on the model's device (as :func:`confidence_signals`); the model's mode is
    restored afterwards.

    Cost: per completion one forward of ``prompt + completion[:k]`` plus the grid's prefix tree
    (36 tokens for step 0.05 and SmolLM2: ``0 .`` shared, 10 first and 20 second decimals, and
    ``1 . 0 0``). Memory: a forward holds ``micro_batch_size`` contexts and a
    ``[micro_batch_size, S, S]`` boolean attention mask.

    Args:
        model: the policy (a causal LM, as for ``completion_logprobs``).
        tokenizer: its tokenizer (the one that produced ``rollout``).
        rollout: N completions, ``texts`` the decodes of the masked ``completion_ids`` (as
            ``generate_rollout`` makes them).
        parsed: ``[N]`` parses of ``rollout.texts``, in order.
        grid: the confidence grid (:meth:`ConfidenceGrid.for_format` of ``fmt``).
        fmt: the completion format ``parsed`` was parsed with.
        autocast_dtype: e.g. ``torch.bfloat16``; ``None`` for full precision.
        micro_batch_size: contexts per forward (>= 1).

    Returns:
        float64 ``[N]`` in [0, 1]; NaN where the completion is not well formed (``format_ok``
        false, as ``verbalized``) or no token boundary falls right after its confidence tag.

    Raises:
        ValueError: ``len(parsed) != len(rollout)`` or ``micro_batch_size < 1``.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    rows, ends = confidence_contexts(tokenizer, rollout, parsed, fmt)
    out = np.full(len(rollout), math.nan)
    candidates = grid.token_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(rows), micro_batch_size):
            chunk, k = rows[lo : lo + micro_batch_size], ends[lo : lo + micro_batch_size]
            with autocast(module_device(model), autocast_dtype):
                lp = grid_logprobs_tree(model, rollout, chunk, k, candidates, tokenizer.pad_token_id)  # [m, V]
            mean = expected_confidence(grid_distribution(lp).double(), grid.values).cpu().numpy()
            out[chunk.numpy()] = np.clip(mean, 0.0, 1.0)  # float rounding of sum p = 1
    finally:
        model.train(was_training)
    return out
