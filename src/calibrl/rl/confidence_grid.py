"""The stated-confidence distribution over a grid, computed exactly by teacher forcing.

The tags format writes a confidence as a two-decimal number, ``<confidence>0.25</confidence>``
(the SFT warm-up writes ``{q:.2f}`` on the grid ``trainer.sft.confidence.grid_step``). Given a
completion up to and including its ``<confidence>`` tag (the *context*), the model puts a
probability on every way to go on; the *grid* is the set of candidate strings

    ``f"{v:.2f}"`` for ``v`` in ``0, step, 2 step, ..., 1``

and ``log P(v | context)`` is the sum of the candidate's token log-probs, teacher forced.
:func:`grid_logprobs_tree` (evaluation, the readout, and training under gradient checkpointing)
appends the candidates' prefix tree to each context and runs one forward under a 4-D attention
mask; :func:`grid_logprobs_on_cache` (training) runs the same tree on the KV cache of the policy
forward that already ran the context; :func:`grid_logprobs` (the reference both are tested
against) runs every candidate on its own copy of the context's KV cache.
Renormalised over the grid, these give ``p(v)`` [M, V], the model's distribution over the
confidences it could state, and

- the *expected stated confidence* ``sum_v p(v) v``, a readout that moves before the greedy mode
  does (ConfTuner, arXiv:2508.18847, reads the confidence distribution the same way);
- the exact *expected score* of a proper scoring rule (:mod:`calibrl.objectives.calibration`),
  the calibration loss of ``objective.calibration=expected``, which takes the probabilities as
  the model gives them (not renormalised) and scores the mass off the grid at the rule's worst.

Mass the model puts outside the grid (another number of decimals, a malformed value) is not in
the renormalised ``p``: the readout conditions on writing a grid value.

Costs: 36 tree tokens (0.05 grid, SmolLM2: digits are single tokens) per context, on top of one
context forward (:func:`grid_logprobs_tree`) or of the context's last token on the policy
forward's cache (:func:`grid_logprobs_on_cache`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from calibrl.data.format import CompletionFormat
from calibrl.device import module_device
from calibrl.rewards.parsing import ParsedCompletion, parse_confidence
from calibrl.rewards.spans import token_char_ends
from calibrl.rl.rollout import CompletionForward, Rollout, completion_logprobs

__all__ = [
    "ConfidenceGrid",
    "confidence_contexts",
    "context_ids",
    "expected_confidence",
    "grid_distribution",
    "grid_logprobs",
    "grid_logprobs_on_cache",
    "grid_logprobs_tree",
]

# A grid value is written with two decimals, so the step must be a whole number of hundredths.
_DECIMALS = 2


class ConfidenceGrid:
    """The confidence values ``0, step, ..., 1`` and their candidate strings.

    Args:
        step: grid spacing, in (0, 1], a whole number of hundredths (two decimals, as the SFT
            warm-up writes) that divides 1 (e.g. 0.05: 21 values; 0.1: 11; 0.01: 101).
        close_tag: the closing confidence tag (``"</confidence>"``; where a sampled confidence ends).

    Attributes:
        values: float64 ``[V]``, the grid, ascending, ``values[0] == 0``, ``values[-1] == 1``.
        strings: ``V`` candidate strings, ``f"{v:.2f}"``: all four characters long, so none is a
            prefix of another and the closing tag is not needed to tell them apart (it would cost 3
            more tokens per candidate for SmolLM2; mass that goes on after two decimals, e.g.
            ``0.255``, counts with its two-decimal prefix).

    Raises:
        ValueError: ``step`` is not finite, not in (0, 1], not a whole number of hundredths, or
            does not divide 1; or a written value does not read back (through
            :func:`calibrl.rewards.parsing.parse_confidence`) as itself.
    """

    def __init__(self, step: float, close_tag: str = "</confidence>") -> None:
        if not isinstance(step, (int, float)) or not math.isfinite(step) or not 0 < step <= 1:
            raise ValueError(f"confidence grid step must be in (0, 1], got {step!r}")
        hundredths = round(step * 10**_DECIMALS)
        if abs(hundredths - step * 10**_DECIMALS) > 1e-6:
            raise ValueError(
                f"confidence grid step {step!r} cannot be written with {_DECIMALS} decimals, the confidence "
                "format the prompt and SFT warm-up teach (e.g. 0.05, 0.1)"
            )
        if 10**_DECIMALS % hundredths:
            raise ValueError(f"confidence grid step {step!r} does not divide 1 (e.g. 0.05, 0.1, 0.25)")
        n = 10**_DECIMALS // hundredths
        self.step = hundredths / 10**_DECIMALS
        self.values = torch.arange(n + 1, dtype=torch.float64) * hundredths / 10**_DECIMALS
        self.strings = [f"{v:.{_DECIMALS}f}" for v in self.values.tolist()]
        for v in self.values.tolist():
            q, reason = parse_confidence(f"{v:.{_DECIMALS}f}")
            if q is None or abs(q - v) > 1e-12:
                raise ValueError(f"confidence grid value {v:.{_DECIMALS}f} does not read back: {reason}")
        self.close_tag = close_tag

    def __len__(self) -> int:
        return len(self.strings)

    def token_ids(self, tokenizer: Any) -> list[list[int]]:
        """Token ids of each candidate string, tokenized on its own (no special tokens)."""
        return [tokenizer(s, add_special_tokens=False).input_ids for s in self.strings]

    @classmethod
    def for_format(cls, step: float, fmt: CompletionFormat) -> "ConfidenceGrid":
        """The grid for a completion format's confidence tag."""
        return cls(step, f"</{fmt.confidence}>")


def confidence_contexts(
    tokenizer: Any, rollout: Rollout, parsed: Sequence[ParsedCompletion], fmt: CompletionFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which completions have a confidence to teacher-force a grid at, and where.

    A row qualifies when it is well formed (``format_ok``: its confidence parsed) and a token
    boundary falls exactly where the confidence text starts (right after ``<confidence>``); the
    context is then its completion tokens ``[:k]``.

    Args:
        tokenizer: the policy's tokenizer.
        rollout: N completions (on the CPU).
        parsed: their parses, ``N``.
        fmt: the completion format (tag names).

    Returns:
        ``(rows, ends)``: LongTensors ``[M]``, the qualifying rows and their context lengths k in
        completion tokens (``0 < k <= L``).

    Raises:
        ValueError: ``parsed`` and ``rollout`` differ in length.
    """
    if len(parsed) != len(rollout):
        raise ValueError(f"{len(parsed)} parses for {len(rollout)} completions")
    rows, ends = [], []
    for i, p in enumerate(parsed):
        if not p.format_ok or p.confidence_span is None:
            continue
        n = int(rollout.completion_mask[i].sum())
        char_ends = token_char_ends(tokenizer, rollout.completion_ids[i, :n].tolist())
        start = p.confidence_span[0]
        k = next((j + 1 for j, e in enumerate(char_ends) if e >= start), None)
        if k is None or char_ends[k - 1] != start or k >= n:
            continue  # a token straddles the tag's end: no clean context
        rows.append(i)
        ends.append(k)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(ends, dtype=torch.long)


def context_ids(rollout: Rollout, rows: torch.Tensor, ends: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The M contexts ``prompt + completion[:k]`` of ``rows``/``ends``
    (:func:`confidence_contexts`), left-padded: ``(ids, mask)``, LongTensors ``[M, P']``."""
    ctx = []
    for i, k in zip(rows.tolist(), ends.tolist()):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        ctx.append(torch.cat([prompt, rollout.completion_ids[i, :k]]))
    p = max(len(c) for c in ctx)
    ids = torch.full((len(ctx), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctx), p), dtype=torch.long)
    for j, c in enumerate(ctx):
        ids[j, p - len(c):], mask[j, p - len(c):] = c, 1
    return ids, mask


def _grid_rollout(rollout: Rollout, rows: torch.Tensor, ends: torch.Tensor, candidates: list[list[int]],
                  pad_id: int) -> Rollout:
    """A rollout whose prompts are the M contexts and whose groups are the V candidates of each:
    ``M * V`` rows, group ``m`` = context ``m``."""
    m, v = len(rows), len(candidates)
    prompt_ids, prompt_mask = context_ids(rollout, rows, ends, pad_id)
    width = max(len(c) for c in candidates)
    cand_ids = torch.full((v, width), pad_id, dtype=torch.long)
    cand_mask = torch.zeros((v, width), dtype=torch.long)
    for j, c in enumerate(candidates):
        cand_ids[j, : len(c)], cand_mask[j, : len(c)] = torch.tensor(c), 1
    return Rollout(
        prompt_ids.repeat_interleave(v, dim=0), prompt_mask.repeat_interleave(v, dim=0),
        cand_ids.repeat(m, 1), cand_mask.repeat(m, 1), [""] * (m * v),
        torch.arange(m).repeat_interleave(v),
    )


def grid_logprobs(model: Any, rollout: Rollout, rows: torch.Tensor, ends: torch.Tensor,
                  candidates: list[list[int]], pad_id: int, share_prefix: bool = True) -> torch.Tensor:
    """Sequence log-probs of every grid candidate after each context, teacher forced.

    Args:
        model: the causal LM (gradients flow when enabled by the caller).
        rollout: the completions (CPU).
        rows, ends: ``[M]`` from :func:`confidence_contexts`.
        candidates: ``V`` token-id lists (:meth:`ConfidenceGrid.token_ids`).
        pad_id: the tokenizer's pad id.
        share_prefix: run each context once and the candidates on its KV cache (else V full
            forwards per context: for models whose cache is off, e.g. under gradient checkpointing).

    Returns:
        float32 ``[M, V]``, ``log P(candidate v | context m)`` in nats (each <= 0), on the model's
        device; ``[0, V]`` when M is 0.
    """
    if len(rows) == 0:
        return torch.zeros((0, len(candidates)), device=module_device(model))
    grid = _grid_rollout(rollout, rows, ends, candidates, pad_id)
    lp = completion_logprobs(model, grid, share_prefix=share_prefix)  # [M*V, W]
    return lp.sum(dim=1).view(len(rows), len(candidates))


def _trie(candidates: list[list[int]]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """The candidates' token-id prefix tree: ``(tokens, parents, depths, paths)``; node ``j`` holds
    token ``tokens[j]`` after node ``parents[j]`` (-1: right after the context) at ``depths[j]``;
    ``paths[v]`` lists candidate v's nodes in order."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    index: dict[tuple[int, int], int] = {}
    paths = []
    for cand in candidates:
        parent, path = -1, []
        for d, tok in enumerate(cand):
            key = (parent, tok)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
                depths.append(d)
            parent = index[key]
            path.append(parent)
        paths.append(path)
    return tokens, parents, depths, paths


def grid_logprobs_tree(model: Any, rollout: Rollout, rows: torch.Tensor, ends: torch.Tensor,
                       candidates: list[list[int]], pad_id: int) -> torch.Tensor:
    """:func:`grid_logprobs` in one forward per context batch, without copying the KV cache: the
    candidates' prefix tree (``0 . 2 5`` and ``0 . 3 0`` share ``0 .``) is appended to each context
    as extra tokens, each attending to the context and its own ancestors only (a 4-D attention
    mask; positions continue the context's by tree depth). For the 0.05 grid and SmolLM2 that is
    36 tree tokens per context instead of 21 x 4 candidate tokens, each over a private copy of the
    context's cache. Same values as :func:`grid_logprobs` (up to float rounding; tested).

    Args / Returns: as :func:`grid_logprobs`.
    """
    if len(rows) == 0:
        return torch.zeros((0, len(candidates)), device=module_device(model))
    ids, mask = context_ids(rollout, rows, ends, pad_id)
    no_past = torch.zeros((len(rows), 0), dtype=torch.bool)
    return _tree_logprobs(model, ids, mask, no_past, torch.zeros(len(rows), dtype=torch.long), candidates)


def grid_logprobs_on_cache(model: Any, fwd: CompletionForward, local_rows: torch.Tensor, ends: torch.Tensor,
                           candidates: list[list[int]]) -> torch.Tensor:
    """:func:`grid_logprobs_tree` on the KV cache of a policy forward that already ran the
    contexts (:func:`calibrl.rl.rollout.completion_forward`): for each context only its last token
    (recomputed, for the logits that predict the grid's first token) and the prefix tree run, the
    rest of the context is read from the cache (its other columns masked out). Gradients reach
    the cached positions through the cache, so one backward of the policy loss plus a loss on
    these log-probs equals two separate backwards (up to float rounding; tested). The cache is
    narrowed to ``local_rows`` and appended to (in place): ``fwd`` serves one call. Runs under
    the caller's grad and autocast mode.

    Args:
        model: the causal LM that made ``fwd``.
        fwd: its forward of a micro-batch (cache, trimmed rows).
        local_rows: LongTensor ``[M]`` (any device), rows of ``fwd.rollout`` with a context.
        ends: LongTensor ``[M]`` (any device), their context lengths in completion tokens, each
            within the row's completion tokens (``0 < k <= `` its length).
        candidates: ``V`` token-id lists (:meth:`ConfidenceGrid.token_ids`).

    Returns:
        float32 ``[M, V]``, ``log P(candidate v | context m)`` in nats, on the model's device.

    Raises:
        ValueError: ``fwd`` has no cache, or a layer of its cache does not hold every column of
            the trimmed rows (a used-up ``fwd``; a sliding-window layer shorter than the rows).
    """
    if len(local_rows) == 0:
        return torch.zeros((0, len(candidates)), device=module_device(model))
    if fwd.cache is None:
        raise ValueError("grid_logprobs_on_cache needs the KV cache of a shared-prefix forward")
    r = fwd.rollout
    p, w = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    held = {int(layer.keys.shape[-2]) for layer in getattr(fwd.cache, "layers", []) if getattr(layer, "keys", None) is not None}
    if fwd.cache.get_seq_length() != p + w or held - {p + w}:
        raise ValueError(f"the cache holds {sorted(held) or fwd.cache.get_seq_length()} columns, the rows {p + w} "
                         "(used up by an earlier call, or a sliding-window layer): run the contexts on their own")
    local_rows, ends = local_rows.to(r.prompt_ids.device), ends.to(r.prompt_ids.device)
    last = ends - 1  # the context's last token, run again
    prompt_ok = r.prompt_mask[local_rows].bool()
    before_last = torch.arange(w, device=last.device)[None] < last[:, None]
    past_ok = torch.cat([prompt_ok, before_last & r.completion_mask[local_rows].bool()], dim=1)
    ids = r.completion_ids[local_rows].gather(1, last[:, None])
    fwd.cache.batch_select_indices(local_rows)
    start = prompt_ok.sum(dim=1) + last  # the last token's position
    return _tree_logprobs(model, ids, torch.ones_like(ids), past_ok, start, candidates, fwd.cache)


def _tree_logprobs(model: Any, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, past_ok: torch.Tensor,
                   start: torch.Tensor, candidates: list[list[int]], cache: Any = None) -> torch.Tensor:
    """The prefix-tree forward: ``ctx_ids``/``ctx_mask`` [M, p] (left padded) are the context
    tokens run here, after the ``C`` cached columns of which ``past_ok`` [M, C] (bool) marks the
    context's; ``start`` [M] is the position of the first token run here. Returns [M, V]."""
    device = module_device(model)
    tokens, parents, depths, paths = _trie(candidates)
    m, p = ctx_ids.shape
    c, t = past_ok.shape[1], len(tokens)
    s = p + t
    ids = torch.cat([ctx_ids.cpu(), torch.tensor(tokens).expand(m, t)], dim=1).to(device)
    ctx_mask, start = ctx_mask.cpu(), start.cpu()
    n_ctx = start + ctx_mask.sum(dim=1)  # [M] the position after the context
    positions = torch.cat([start[:, None] + (ctx_mask.cumsum(dim=1) - 1).clamp_min(0),
                           n_ctx[:, None] + torch.tensor(depths)[None]], dim=1).to(device)
    # allowed[b, i, k]: query i may attend to key k (the C cached columns first)
    causal = torch.tril(torch.ones(p, p, dtype=torch.bool))
    anc = torch.zeros(t, t, dtype=torch.bool)  # node j attends to node k: k is j or an ancestor of j
    for j in range(t):
        k = j
        while k != -1:
            anc[j, k] = True
            k = parents[k]
    key_ok = ctx_mask.bool()  # [M, p]
    allowed = torch.zeros(m, s, c + s, dtype=torch.bool)
    allowed[:, :, :c] = past_ok.cpu()[:, None, :]
    allowed[:, :p, c : c + p] = causal[None] & key_ok[:, None, :]
    allowed[:, p:, c : c + p] = key_ok[:, None, :]
    allowed[:, p:, c + p :] = anc[None]
    allowed[:, torch.arange(s), c + torch.arange(s)] = True  # every query sees itself (padding rows too)
    # positions whose logits are needed: the context's last token and every node with children
    has_child = sorted({q for q in parents if q >= 0})
    keep = torch.zeros(m, s, dtype=torch.bool)
    keep[:, p - 1] = True
    keep[:, [p + q for q in has_child]] = True
    kwargs = {} if cache is None else {"cache": cache, "use_cache": True}
    out = model(input_ids=ids, attention_mask=allowed[:, None].to(device), position_ids=positions,
                logits_to_keep=keep.to(device), **kwargs)
    logits = out.logits.view(m, 1 + len(has_child), -1)  # row order: p - 1, then has_child in order
    logp = torch.log_softmax(logits.float(), dim=-1)
    slot = {q: 1 + i for i, q in enumerate(has_child)}
    parent_slot = torch.tensor([0 if q == -1 else slot[q] for q in parents], device=device)
    node_lp = logp[:, parent_slot, torch.tensor(tokens, device=device)]  # [M, T]: node j's token after its parent
    member = torch.zeros(t, len(candidates), device=device)
    for v, path in enumerate(paths):
        member[path, v] = 1.0
    return node_lp @ member  # [M, V]


def grid_distribution(seq_logprobs: torch.Tensor) -> torch.Tensor:
    """``p(v)`` [M, V]: ``softmax`` of the candidates' sequence log-probs over the grid (rows sum
    to 1)."""
    return torch.softmax(seq_logprobs.float(), dim=-1)


def expected_confidence(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Expected stated confidence ``sum_v p(v) v``: float ``[M]`` in [0, 1] from ``probs`` [M, V]
    and the grid ``values`` [V]."""
    return probs @ values.to(probs.dtype).to(probs.device)
