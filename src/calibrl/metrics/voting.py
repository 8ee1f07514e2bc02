"""Test-time voting: one answer and one confidence per question from n sampled completions.

Each sample is ``(question_id, answer, stated confidence, correct)``. :func:`aggregate` picks one
answer per question with a voting method and gives it an aggregate confidence, so that the
accuracy and calibration of the *aggregate* can be compared across methods (as
:mod:`calibrl.eval.evaluator` reports them). Pure Python/numpy; no models, no torch.

Policy, exactly as implemented:

1. **Vote key.** Answers are grouped by :func:`normalize_answer` (strip, collapse internal
   whitespace, casefold, drop one trailing period). Answers a verifier would equate but that
   differ as strings after normalisation (``"12"`` vs ``"12.0"``, ``"1/2"`` vs ``"0.5"``) are
   separate votes.
2. **Who votes.** Only *well-formed* samples vote: the answer is not ``None`` and the
   confidence is given (NaN or ``None`` marks a confidence that could not be parsed). This
   holds for every method, ``majority`` included, so all methods draw on the same pool and a
   sample with a missing confidence can never outscore a well-formed one. A question with no
   voting sample gets answer ``None``, confidence NaN, correct 0, voted ``False``.
3. **Methods** (registered in :data:`VOTING_METHODS`), over the m voting samples of a question:

   - ``majority``: the key with the most votes; aggregate confidence = its vote count / m.
   - ``confidence_weighted``: each vote weighted by its stated confidence; the key with the
     largest total weight wins; aggregate confidence = winner's weight / total weight. When the
     total weight is 0 (every voter stated 0) the weights carry no preference and the method
     falls back to ``majority`` (plain counts and vote share). Cf. confidence-weighted voting
     in RLCR (Damani et al., arXiv:2507.16806) and DeepConf (Fu et al., arXiv:2508.15260).
   - ``best_of_n``: the single sample with the highest stated confidence; aggregate
     confidence = that confidence.

4. **Ties** go to the earliest voting sample in input order: for ``majority`` (equal counts)
   and ``confidence_weighted`` (exactly equal float weight sums) to the key whose first vote
   comes first; for ``best_of_n`` (equal confidences) to the earliest of the tied samples.
5. **Reported answer and correctness** are those of the first voting sample whose key is the
   winning key. Verifiers are assumed deterministic per answer string, so samples sharing a
   key are assumed to share a verdict; when they do not (e.g. a case-sensitive verifier), the
   first one's verdict is used.
6. **Errors** (``ValueError``): empty input, inputs of different lengths, a question id that
   is not a string, an answer that is neither a string nor ``None``, a confidence that is
   infinite, outside [0, 1] or not numeric (NaN and ``None`` are the "missing" markers),
   correctness other than 0/1/bool. An unknown method name raises ``KeyError`` listing the
   valid ones.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from calibrl.registry import Registry

__all__ = ["VOTING_METHODS", "VoteResult", "aggregate", "normalize_answer"]

# A method maps the vote keys of one question's voting samples (input order, m >= 1) and their
# confidences (float [m], in [0, 1]) to (winning key, aggregate confidence in [0, 1]).
VotingMethod = Callable[[list[str], np.ndarray], tuple[str, float]]
VOTING_METHODS: Registry[VotingMethod] = Registry("voting method")


def normalize_answer(answer: str) -> str:
    """Vote key of an answer: strip, collapse internal whitespace to one space, casefold, then
    drop one trailing period.

    ``" The  Answer. "`` -> ``"the answer"``. Answers a verifier would equate but that differ as
    strings after these steps (``"12"`` vs ``"12.0"``) get different keys, i.e. separate votes.

    Raises:
        ValueError: ``answer`` is not a ``str``.
    """
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a str, got {type(answer).__name__}")
    key = " ".join(answer.split()).casefold()
    return key[:-1] if key.endswith(".") else key


def _first_max(totals: Mapping[str, float]) -> str:
    # Dicts (and Counters) keep first-insertion order, and max() returns the first of equal
    # maxima: ties go to the key that appeared first.
    return max(totals, key=totals.__getitem__)


@VOTING_METHODS.register("majority")
def majority_vote(keys: list[str], confidences: np.ndarray) -> tuple[str, float]:
    """Most frequent key; confidence = its share of the ``m = len(keys)`` votes, in (0, 1].

    ``confidences`` (float ``[m]``) is not used; it is accepted so all methods share one
    signature. Ties go to the key that appears first.
    """
    counts = Counter(keys)
    winner = _first_max(counts)
    return winner, counts[winner] / len(keys)


@VOTING_METHODS.register("confidence_weighted")
def confidence_weighted_vote(keys: list[str], confidences: np.ndarray) -> tuple[str, float]:
    """Key with the largest summed confidence; confidence = its weight / total weight, in [0, 1].

    Args:
        keys: vote keys, ``[m]``.
        confidences: float ``[m]`` in [0, 1], the vote weights.

    Falls back to :func:`majority_vote` when the total weight is 0. Ties (exactly equal float
    sums) go to the key that appears first. Source: confidence-weighted majority voting as in
    RLCR (arXiv:2507.16806) and DeepConf (arXiv:2508.15260).
    """
    weights: dict[str, float] = {}
    for key, w in zip(keys, confidences.tolist()):
        weights[key] = weights.get(key, 0.0) + w
    total = math.fsum(weights.values())
    if total == 0.0:
        return majority_vote(keys, confidences)
    winner = _first_max(weights)
    return winner, weights[winner] / total


@VOTING_METHODS.register("best_of_n")
def best_of_n(keys: list[str], confidences: np.ndarray) -> tuple[str, float]:
    """Key of the single most confident sample; confidence = that sample's confidence.

    Args:
        keys: vote keys, ``[m]``.
        confidences: float ``[m]`` in [0, 1].

    Ties go to the earliest sample (``np.argmax`` returns the first maximum).
    """
    best = int(np.argmax(confidences))
    return keys[best], float(confidences[best])


@dataclass
class VoteResult:
    """Per-question outcome of :func:`aggregate`; one row per distinct question, in order of
    first appearance in the input.

    Attributes:
        question_ids: ``[Q]`` question ids.
        answer: ``[Q]`` chosen answer as written by the first voting sample with the winning
            key; ``None`` when no sample voted.
        confidence: float ``[Q]`` aggregate confidence in [0, 1]; NaN when no sample voted.
        correct: int ``[Q]`` of 0/1; 0 when no sample voted.
        voted: bool ``[Q]``, at least one well-formed sample.
        n_samples: int ``[Q]``, samples given for the question (voting or not).
        n_votes: int ``[Q]``, well-formed samples that voted.
    """

    question_ids: list[str]
    answer: list[str | None]
    confidence: np.ndarray
    correct: np.ndarray
    voted: np.ndarray
    n_samples: np.ndarray
    n_votes: np.ndarray


def _validate(
    question_ids: Sequence[str],
    answers: Sequence[str | None],
    confidences: Sequence[float],
    correct: Sequence[bool | int],
) -> tuple[np.ndarray, np.ndarray]:
    lengths = {len(question_ids), len(answers), len(confidences), len(correct)}
    if len(lengths) != 1:
        raise ValueError(
            "question_ids, answers, confidences and correct must have one length, got "
            f"{len(question_ids)}, {len(answers)}, {len(confidences)}, {len(correct)}"
        )
    if len(question_ids) == 0:
        raise ValueError("empty input: voting needs at least one sample")
    if not all(isinstance(qid, str) for qid in question_ids):
        raise ValueError("question_ids must all be str")
    if not all(a is None or isinstance(a, str) for a in answers):
        raise ValueError("answers must all be str or None")
    try:
        q = np.asarray(confidences, dtype=np.float64)  # None becomes NaN: both mean "missing"
    except (TypeError, ValueError) as err:
        raise ValueError(f"confidences must be floats (NaN or None where missing): {err}") from err
    if q.ndim != 1:
        raise ValueError(f"confidences must be 1-D, got shape {q.shape}")
    given = q[~np.isnan(q)]
    if np.any(np.isinf(given)) or np.any((given < 0.0) | (given > 1.0)):
        bad = given[np.isinf(given) | (given < 0.0) | (given > 1.0)][0]
        raise ValueError(f"confidences must lie in [0, 1] or be NaN (missing), got {bad!r}")
    c = np.asarray(correct)
    if c.ndim != 1 or not np.all((c == 0) | (c == 1)):
        raise ValueError("correct must be 1-D and hold only 0/1 (or bool) values")
    return q, c.astype(np.int64)


def aggregate(
    question_ids: Sequence[str],
    answers: Sequence[str | None],
    confidences: Sequence[float],
    correct: Sequence[bool | int],
    method: str,
) -> VoteResult:
    """Choose one answer per question from its samples with voting method ``method``.

    Policy (who votes, methods, ties, correctness): see the module docstring.

    Args:
        question_ids: ``[N]`` question id of each sample; samples of a question need not be
            adjacent.
        answers: ``[N]`` parsed answers, ``None`` where none was parsed.
        confidences: ``[N]`` stated confidences in [0, 1], NaN (or ``None``) where none was
            parsed.
        correct: ``[N]`` verifier verdicts, 0/1 or bool.
        method: a name in :data:`VOTING_METHODS` (``majority``, ``confidence_weighted``,
            ``best_of_n``).

    Returns:
        A :class:`VoteResult` with one row per distinct question.

    Raises:
        KeyError: unknown ``method`` (the message lists the valid names).
        ValueError: invalid inputs (see the module docstring).
    """
    vote = VOTING_METHODS.get(method)
    q, c = _validate(question_ids, answers, confidences, correct)
    rows_of: dict[str, list[int]] = {}
    for i, qid in enumerate(question_ids):
        rows_of.setdefault(qid, []).append(i)

    chosen: list[str | None] = []
    conf, corr, n_votes = [], [], []
    for rows in rows_of.values():
        voters = [i for i in rows if answers[i] is not None and not math.isnan(q[i])]
        n_votes.append(len(voters))
        if not voters:
            chosen.append(None)
            conf.append(math.nan)
            corr.append(0)
            continue
        keys = [normalize_answer(answers[i]) for i in voters]
        winner, agg = vote(keys, q[voters])
        first = voters[keys.index(winner)]
        chosen.append(answers[first])
        conf.append(agg)
        corr.append(int(c[first]))
    n_votes_arr = np.asarray(n_votes, dtype=np.int64)
    return VoteResult(
        question_ids=[str(qid) for qid in rows_of],
        answer=chosen,
        confidence=np.asarray(conf, dtype=np.float64),
        correct=np.asarray(corr, dtype=np.int64),
        voted=n_votes_arr > 0,
        n_samples=np.asarray([len(rows) for rows in rows_of.values()], dtype=np.int64),
        n_votes=n_votes_arr,
    )

