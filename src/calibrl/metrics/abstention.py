"""Abstention metrics of sampled completions: how often the model abstains, and whether it
abstains on the right questions.

Each of the N rows is one sampled completion; rows sharing a ``question_id`` are the n samples of
one question. A question is *solved* when it is answerable and at least one of its rows is
correct; it is *unknown* when it is unanswerable or answerable but not solved (the model showed
no sign of knowing the answer, so abstaining is the right call there). "Answered" means a
well-formed, non-abstained row.

============================  ===============================================  =====================
key                           value                                            NaN when
============================  ===============================================  =====================
``rate``                      abstained rows / N                               never
``answer_rate``               answered rows / N (coverage)                     never
``selective_accuracy``        correct / answered, over answerable questions    no such answered row
``over``                      abstained rows of solved questions / rows of     every answerable
                              answerable questions                             question has 1 row
``under``                     answered rows / rows, over unknown questions     no unknown question
``unanswerable_recall``       abstained / rows, over unanswerable questions    no unanswerable row
``unanswerable_fraction``     rows of unanswerable questions / N               never
============================  ===============================================  =====================

``over`` counts abstentions on a question another sample of the same question gets right (an
abstention is never correct on an answerable question, so "another row solves it" is "the
question is solved"). With one row per question that never happens, so the figure would read 0
whatever the policy; it is NaN instead. ``under`` counts answers given where the model should
have abstained. Over- and under-abstention follow Wen et al., "Know Your Limits: A Survey of
Abstention in Large Language Models", arXiv:2407.18418. They are the two sides of the trade-off
that abstention-aware training tunes: an abstention should be worth less than a right answer
but more than a wrong one (refusal-aware tuning in R-Tuning, Zhang et al., arXiv:2311.09677; the
ternary reward of TruthRL, Wei et al., arXiv:2509.25760). Malformed rows count in every
denominator but are never answers.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["ABSTENTION_KEYS", "abstention_metrics"]

ABSTENTION_KEYS = (
    "rate",
    "answer_rate",
    "selective_accuracy",
    "over",
    "under",
    "unanswerable_recall",
    "unanswerable_fraction",
)


def _flags(name: str, values: Sequence[bool] | np.ndarray) -> np.ndarray:
    """``values`` as bool ``[N]``; raises ValueError unless every value is 0/1 (or bool)."""
    raw = np.asarray(values)
    if raw.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {raw.shape}")
    as_float = raw.astype(np.float64)
    if not ((as_float == 0.0) | (as_float == 1.0)).all():
        raise ValueError(f"{name} must hold only 0/1 (or bool) values")
    return as_float == 1.0


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    """Mean of ``values[where]``; NaN when ``where`` selects nothing."""
    return float(values[where].mean()) if where.any() else float("nan")


def abstention_metrics(
    question_ids: Sequence[Hashable],
    abstained: Sequence[bool] | np.ndarray,
    correct: Sequence[int] | np.ndarray,
    format_ok: Sequence[bool] | np.ndarray,
    unanswerable: Sequence[bool] | np.ndarray,
) -> dict[str, float]:
    """Abstention rate, coverage, selective accuracy and over/under-abstention of N completions.

    Args:
        question_ids: ``[N]`` hashable ids; rows with one id are samples of one question.
        abstained: bool ``[N]``, the completion gave the abstain phrase; False where the format
            failed.
        correct: 0/1 ``[N]``, the verdict: on an answerable question the verifier accepted the
            answer (never for an abstention); on an unanswerable question ``correct == abstained``;
            0 wherever the format failed.
        format_ok: bool ``[N]``, the completion parsed.
        unanswerable: bool ``[N]``, the question has no answer; constant within a question id.

    Returns:
        The keys of :data:`ABSTENTION_KEYS` as defined in the module table, each in [0, 1] or NaN.

    Raises:
        ValueError: empty input, lengths that differ, flags or ``correct`` not 0/1, an abstention
            or a correct verdict on a malformed row, a verdict against the rules above, or
            ``unanswerable`` varying within a question id.
    """
    ids = list(question_ids)
    if not ids:
        raise ValueError("empty input: abstention metrics need at least one completion")
    abst = _flags("abstained", abstained)
    corr = _flags("correct", correct)
    ok = _flags("format_ok", format_ok)
    unans = _flags("unanswerable", unanswerable)
    lengths = {len(ids), abst.size, corr.size, ok.size, unans.size}
    if len(lengths) > 1:
        raise ValueError(
            "question_ids, abstained, correct, format_ok and unanswerable must have one length, "
            f"got {len(ids)}, {abst.size}, {corr.size}, {ok.size}, {unans.size}"
        )
    if (abst & ~ok).any():
        raise ValueError("abstained is True on a row whose format failed")
    if (corr & ~ok).any():
        raise ValueError("correct is 1 on a row whose format failed (a format failure is wrong)")
    if (unans & (corr != abst)).any():
        raise ValueError("on an unanswerable question correct must equal abstained")
    if (~unans & abst & corr).any():
        raise ValueError("an abstention on an answerable question is marked correct")

    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(q, len(index)) for q in ids])  # question of each row, [N]
    rows = np.bincount(codes)  # rows per question, [Q]
    unans_rows = np.bincount(codes, weights=unans)
    if ((unans_rows != 0) & (unans_rows != rows)).any():
        raise ValueError("unanswerable must be constant within a question id")
    q_unans = unans_rows > 0  # [Q]
    solved = (np.bincount(codes, weights=corr) > 0)[codes] & ~unans  # [N]
    unknown = unans | ~solved
    answered = ok & ~abst
    answerable = ~unans
    multi = (rows >= 2) & ~q_unans

    return {
        "rate": float(abst.mean()),
        "answer_rate": float(answered.mean()),
        "selective_accuracy": _mean(corr, answered & answerable),
        "over": _mean(abst & solved, answerable) if multi.any() else float("nan"),
        "under": _mean(answered, unknown),
        "unanswerable_recall": _mean(abst, unans),
        "unanswerable_fraction": float(unans.mean()),
    }
