"""Objective combiners: from reward components to per-token advantages.

Reward components (:mod:`calibrl.rewards.components`) are grouped into four *objectives*
(:data:`OBJECTIVE_OF`)::

    accuracy     correctness
    calibration  brier, log_score, spherical_score   (scoring rules of the stated confidence)
    format       format
    abstention   abstention                          (optional: the reward for abstaining)

A combiner (registry :data:`COMBINERS`, config ``objective.combine``, registered with
:func:`register_combiner`) has one signature::

    combine(rewards [N, K], names [K], weights [K], group_index [N], segments [N, L], *,
            scale=False, std_floor=1e-4) -> advantages [N, L]

and declares, as its ``needs_segments`` attribute, whether it reads the token segments: the
trainer computes them (:func:`segment_ids`, a decode per token) only for a combiner that says so,
and hands the others ``completion_mask - 1``. A new token-level combiner needs no trainer edit.

``rewards[i, k]`` is component ``names[k]`` of completion i; completions with equal
``group_index`` answer the same prompt (a GRPO group, at least 2 rows, not necessarily
contiguous). ``segments[i, t]`` is 0 on the reasoning+answer tokens (up to and including the
token that closes ``</answer>``), 1 on the tokens after it (analysis, confidence), -1 on padding;
see :func:`segment_ids`. Combiners that ignore the boundary (``needs_segments = False``) accept
``completion_mask - 1``.
Advantages are exactly 0 on padding. "Group-normalise" below means
:func:`calibrl.objectives.advantages.group_advantages` applied group by group: subtract the group mean,
divide by the unbiased group std floored at ``std_floor``, exact 0 where the group's values are
all equal. Write ``r_o = sum_{k in o} weights[k] * rewards[:, k]`` for the weighted reward of
objective o.

``sum`` (RLCR, arXiv:2507.16806)
    ``r = rewards @ weights``; ``A = r - mean_group(r)``, divided by the floored group std only
    when ``scale`` (GRPO's normalisation, arXiv:2402.03300; Dr. GRPO, arXiv:2503.20783, argues
    against it, and it blows small Brier differences up to full-size updates); ``A`` on every
    completion token.

``normalize_then_sum`` (after GDPO, arXiv:2601.05242)
    ``A = sum_o group_normalise(r_o)``, always std-scaled (``scale`` is ignored): each objective
    gets the same voice within a group whatever its spread, so a 0.05 Brier gap is not drowned
    by a 1.0 correctness gap. An objective that is constant within a group (e.g. every
    completion well-formed, so ``format`` is 1 throughout) contributes exactly 0 there; it does
    not divide by the floor. Two consequences to keep in mind: the *scale* of an objective's
    weights cancels (only their signs and the ratios between components of one objective
    matter), and ``A`` is not renormalised after the sum (GDPO adds a batch-wise normalisation
    of the sum; we do not), so its magnitude grows with the number of non-constant objectives.

``segment`` (credit assignment by segment, cf. DCPO, arXiv:2603.09117)
    The per-objective advantages of ``normalize_then_sum``, placed on the tokens that produced
    them: accuracy and abstention (the choice to abstain is written in the answer) on segment-0
    tokens, calibration on segment-1 tokens, format on every completion token. A row with no segment-1 token (no answer span, or nothing written after
    ``</answer>``: a format failure) gets accuracy *and* calibration on all its tokens: with no
    confidence to blame the whole sequence is at fault, and putting the calibration term
    nowhere would let a format failure escape the calibration penalty (its Brier is the worst,
    -1), an incentive to drop the confidence.

Each combiner returns a tensor of ``rewards``' dtype. Identical rewards in a group give exact 0
advantages for that group under every combiner.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import torch

from calibrl.rewards.spans import span_tokens, token_char_ends
from calibrl.registry import Registry
from calibrl.rewards.parsing import ParsedCompletion
from calibrl.objectives.advantages import group_advantages

__all__ = ["COMBINERS", "OBJECTIVES", "OBJECTIVE_OF", "Combiner", "objective_of", "register_combiner", "segment_ids"]

OBJECTIVES = ("accuracy", "calibration", "format", "abstention")

#: Reward component -> the objective it serves. Read-only; use :func:`objective_of` for a lookup
#: whose error lists the known components.
OBJECTIVE_OF: Mapping[str, str] = MappingProxyType(
    {
        "correctness": "accuracy",
        "brier": "calibration",
        "log_score": "calibration",
        "spherical_score": "calibration",
        "format": "format",
        "abstention": "abstention",
    }
)


def objective_of(component: str) -> str:
    """The objective (an item of :data:`OBJECTIVES`) that reward ``component`` belongs to.

    Raises:
        KeyError: unknown component; the message lists the known ones.
    """
    if component not in OBJECTIVE_OF:
        raise KeyError(
            f"reward component {component!r} belongs to no objective; known components: "
            f"{', '.join(sorted(OBJECTIVE_OF))}"
        )
    return OBJECTIVE_OF[component]


class Combiner(Protocol):
    """Signature shared by every entry of :data:`COMBINERS` (see the module docstring).

    Attributes:
        needs_segments: the combiner reads ``segments`` (set by :func:`register_combiner`).
    """

    needs_segments: bool

    def __call__(
        self,
        rewards: torch.Tensor,
        names: Sequence[str],
        weights: torch.Tensor,
        group_index: torch.Tensor,
        segments: torch.Tensor,
        *,
        scale: bool = False,
        std_floor: float = 1e-4,
    ) -> torch.Tensor: ...


COMBINERS: Registry[Combiner] = Registry("objective combiner")

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def register_combiner(name: str, *, needs_segments: bool = False) -> Callable[[_F], _F]:
    """Decorator: register a combiner in :data:`COMBINERS` as ``name``, declaring whether it reads
    the token segments (``needs_segments``, set as the function's attribute).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def wrap(fn: _F) -> _F:
        fn.needs_segments = needs_segments  # type: ignore[attr-defined]
        return COMBINERS.register(name)(fn)

    return wrap


def _validate(
    rewards: torch.Tensor,
    names: Sequence[str],
    weights: torch.Tensor,
    group_index: torch.Tensor,
    segments: torch.Tensor,
    std_floor: float,
) -> None:
    if rewards.ndim != 2 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor [N, K], got {rewards.dtype} {tuple(rewards.shape)}")
    n, k = rewards.shape
    if len(names) != k:
        raise ValueError(f"rewards have K={k} components but names has {len(names)}: {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"component names repeat: {list(names)}")
    for name in names:
        objective_of(name)
    if weights.shape != (k,) or not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor [K={k}], got {weights.dtype} {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"weights hold a non-finite value: {weights.tolist()}")
    if not torch.isfinite(rewards).all():
        bad = sorted({names[j] for j in (~torch.isfinite(rewards)).nonzero()[:, 1].tolist()})
        raise ValueError(f"rewards hold a non-finite value (components {bad})")
    if group_index.shape != (n,) or group_index.is_floating_point() or group_index.dtype == torch.bool:
        raise ValueError(
            f"group_index must be an integer tensor [N={n}], got {group_index.dtype} {tuple(group_index.shape)}"
        )
    if segments.ndim != 2 or segments.shape[0] != n or segments.is_floating_point() or segments.dtype == torch.bool:
        raise ValueError(f"segments must be an integer tensor [N={n}, L], got {segments.dtype} {tuple(segments.shape)}")
    if not ((segments >= -1) & (segments <= 1)).all():
        raise ValueError("segments must hold only -1 (padding), 0 (reasoning+answer) and 1 (after the answer)")
    if not std_floor > 0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}")
    groups, counts = torch.unique(group_index, return_counts=True)
    if n and counts.min() < 2:
        lone = groups[counts < 2].tolist()
        raise ValueError(f"groups {lone} have a single completion; a group baseline needs at least 2")


def _per_group(r: torch.Tensor, group_index: torch.Tensor, scale: bool, std_floor: float) -> torch.Tensor:
    """:func:`group_advantages` of ``r [N]`` within each group of ``group_index`` -> ``[N]``."""
    out = torch.empty_like(r)
    for g in torch.unique(group_index):
        rows = (group_index == g).nonzero().squeeze(1)
        out[rows] = group_advantages(r[rows], len(rows), scale, std_floor)
    return out


def _objective_advantages(
    rewards: torch.Tensor, names: Sequence[str], weights: torch.Tensor, group_index: torch.Tensor, std_floor: float
) -> dict[str, torch.Tensor]:
    """Group-normalised (std-scaled) advantage ``[N]`` of every objective, zeros for absent ones."""
    weighted = rewards * weights.to(rewards.dtype)  # [N, K]
    per_objective: dict[str, torch.Tensor] = {}
    for j, name in enumerate(names):
        o = OBJECTIVE_OF[name]
        per_objective[o] = per_objective[o] + weighted[:, j] if o in per_objective else weighted[:, j]
    zero = rewards.new_zeros(rewards.shape[0])
    return {
        o: _per_group(per_objective[o], group_index, True, std_floor) if o in per_objective else zero
        for o in OBJECTIVES
    }


def _on_tokens(adv: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``adv [N]`` on the tokens where ``where [N, L]`` holds, exact 0 elsewhere."""
    return torch.where(where, adv.unsqueeze(1), adv.new_zeros(()))


@register_combiner("sum")
def combine_sum(
    rewards: torch.Tensor,
    names: Sequence[str],
    weights: torch.Tensor,
    group_index: torch.Tensor,
    segments: torch.Tensor,
    *,
    scale: bool = False,
    std_floor: float = 1e-4,
) -> torch.Tensor:
    """Group advantage of the weighted reward sum on every token (see the module docstring).

    Raises:
        ValueError: ``rewards`` not float ``[N, K]``; ``names`` or ``weights`` not of length K
            (or names repeat); ``group_index`` not integer ``[N]``; ``segments`` not integer
            ``[N, L]`` in {-1, 0, 1}; a non-finite reward or weight; ``std_floor <= 0``
            (``group_advantages`` divides by it); a group with a single completion.
        KeyError: a component name with no objective (the message lists the known ones).
    """
    _validate(rewards, names, weights, group_index, segments, std_floor)
    total = rewards @ weights.to(rewards.dtype)  # [N]
    return _on_tokens(_per_group(total, group_index, scale, std_floor), segments >= 0)


@register_combiner("normalize_then_sum")
def combine_normalize_then_sum(
    rewards: torch.Tensor,
    names: Sequence[str],
    weights: torch.Tensor,
    group_index: torch.Tensor,
    segments: torch.Tensor,
    *,
    scale: bool = False,
    std_floor: float = 1e-4,
) -> torch.Tensor:
    """Sum of per-objective, separately group-normalised advantages on every token (GDPO).

    ``scale`` is ignored: per-objective std scaling is what this combiner is.

    Raises:
        ValueError, KeyError: as :func:`combine_sum`.
    """
    _validate(rewards, names, weights, group_index, segments, std_floor)
    adv = _objective_advantages(rewards, names, weights, group_index, std_floor)
    return _on_tokens(sum(adv.values()), segments >= 0)


@register_combiner("segment", needs_segments=True)
def combine_segment(
    rewards: torch.Tensor,
    names: Sequence[str],
    weights: torch.Tensor,
    group_index: torch.Tensor,
    segments: torch.Tensor,
    *,
    scale: bool = False,
    std_floor: float = 1e-4,
) -> torch.Tensor:
    """Per-objective advantages on the segment each objective judges (see the module docstring).

    ``scale`` is ignored, as in :func:`combine_normalize_then_sum`.

    Raises:
        ValueError, KeyError: as :func:`combine_sum`.
    """
    _validate(rewards, names, weights, group_index, segments, std_floor)
    adv = _objective_advantages(rewards, names, weights, group_index, std_floor)
    tokens = segments >= 0
    after = segments == 1
    whole = tokens & ~after.any(dim=1, keepdim=True)  # [N, L]: every token of rows without segment 1
    return (
        _on_tokens(adv["accuracy"] + adv["abstention"], (segments == 0) | whole)
        + _on_tokens(adv["calibration"], after | whole)
        + _on_tokens(adv["format"], tokens)
    )


def segment_ids(
    tokenizer: Any,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    texts: list[str],
    parsed: Sequence[ParsedCompletion],
    answer_tag: str = "answer",
) -> torch.Tensor:
    """Segment of every completion token: 0 up to ``</answer>``, 1 after it, -1 on padding.

    The boundary is the character offset where the answer's closing tag ``</{answer_tag}>`` ends
    (the first one at or after ``answer_span[1]``). Tokens are mapped to characters with
    :func:`calibrl.rewards.spans.token_char_ends`. A token is in segment 0 when it ends at or
    before the boundary *or* starts before it: a token that straddles the boundary (SmolLM2
    writes ``</answer><confidence>`` with a single ``><`` token) still closes the answer, and the
    answer is what it is mostly responsible for. Segment 1 is therefore the tokens that lie
    wholly after the boundary, plus zero-width tokens past it (a trailing EOS). A row without an
    answer span, or with nothing after ``</answer>`` (an EOS right after it sits at the
    boundary, in segment 0), has no segment-1 token; :func:`combine_segment` then blames its
    whole sequence.

    Cost: :func:`token_char_ends` decodes every prefix, O(L^2) per row with an answer span.

    Args:
        tokenizer: the tokenizer that produced ``completion_ids``.
        completion_ids: LongTensor ``[N, L]``.
        completion_mask: ``[N, L]`` 0/1, 1 on sampled tokens.
        texts: ``N`` completions, each the decode (special tokens skipped) of its masked ids,
            as :func:`calibrl.rl.rollout.generate_rollout` builds them.
        parsed: ``N`` parses of ``texts``.
        answer_tag: name of the answer tag (:attr:`CompletionFormat.answer`).

    Returns:
        LongTensor ``[N, L]`` with values in {-1, 0, 1}, on ``completion_ids``' device.

    Raises:
        ValueError: shapes or lengths disagree, a text with an answer span is not the decode of
            its tokens, or no closing tag follows its answer span.
    """
    if completion_ids.ndim != 2 or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
            f"{tuple(completion_mask.shape)} must be one [N, L] shape"
        )
    n = completion_ids.shape[0]
    if len(texts) != n or len(parsed) != n:
        raise ValueError(f"{n} completions but {len(texts)} texts and {len(parsed)} parses")
    keep = completion_mask.bool()
    out = torch.where(keep, 0, -1).to(dtype=torch.long, device=completion_ids.device)
    close = f"</{answer_tag}>"
    for i, (text, p) in enumerate(zip(texts, parsed)):
        if p.answer_span is None:
            continue
        ids = completion_ids[i][keep[i]].tolist()
        if tokenizer.decode(ids, skip_special_tokens=True) != text:
            raise ValueError(f"texts[{i}] is not the decode of its completion tokens")
        at = text.find(close, p.answer_span[1])
        if at < 0:
            raise ValueError(
                f"no {close} after answer span {p.answer_span} in texts[{i}]: parsed is not from this text"
            )
        boundary = at + len(close)
        ends = token_char_ends(tokenizer, ids)
        straddling = span_tokens(ends, (0, boundary))  # tokens covering a character before it
        n_answer = max(bisect.bisect_right(ends, boundary), straddling[-1] + 1 if straddling else 0)
        positions = keep[i].nonzero().squeeze(1)  # [len(ids)] columns of the sampled tokens
        out[i, positions[n_answer:]] = 1
    return out
