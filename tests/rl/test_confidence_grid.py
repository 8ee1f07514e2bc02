"""The confidence grid: its values and strings, which completions have a context to teacher-force
it at, the candidates' log-probs against an independent plain forward, gradients, and the
expected stated confidence on hand numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from calibrl.data.format import CompletionFormat
from calibrl.rewards.parsing import parse_completion
from calibrl.rl.confidence_grid import (
    ConfidenceGrid,
    confidence_contexts,
    expected_confidence,
    grid_distribution,
    grid_logprobs,
)
from calibrl.rl.rollout import Rollout

# --------------------------------------------------------------------------- ConfidenceGrid


@pytest.mark.parametrize(
    "step, values",
    [
        (0.05, [k / 20 for k in range(21)]),
        (0.1, [k / 10 for k in range(11)]),
        (0.25, [0.0, 0.25, 0.5, 0.75, 1.0]),
        (1, [0.0, 1.0]),
    ],
)
def test_grid_values_and_strings(step, values):
    grid = ConfidenceGrid(step)
    assert len(grid) == len(values) and grid.values.dtype == torch.float64
    assert grid.values.tolist() == pytest.approx(values, abs=1e-12)
    assert grid.strings == [f"{v:.2f}" for v in values]
    assert grid.strings[0] == "0.00" and grid.strings[-1] == "1.00"


def test_grid_strings_by_hand_and_for_a_format():
    assert ConfidenceGrid(0.25).strings == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    grid = ConfidenceGrid.for_format(0.5, CompletionFormat(confidence="conf"))
    assert grid.strings == ["0.00", "0.50", "1.00"] and grid.close_tag == "</conf>"


@pytest.mark.parametrize(
    "step, message",
    [
        (0.03, "does not divide 1"),
        (0.125, "cannot be written with 2 decimals"),
        (0, r"must be in \(0, 1\]"),
        (-0.1, r"must be in \(0, 1\]"),
        (math.nan, r"must be in \(0, 1\]"),
        (1.5, r"must be in \(0, 1\]"),
    ],
)
def test_grid_rejects_bad_steps(step, message):
    with pytest.raises(ValueError, match=message):
        ConfidenceGrid(step)


def test_candidate_token_ids_decode_to_the_strings(tiny):
    _, tok = tiny
    grid = ConfidenceGrid(0.05)
    ids = grid.token_ids(tok)
    assert [tok.decode(i) for i in ids] == grid.strings
    # SmolLM2's digits are single tokens: "0", ".", "2", "5"
    assert {len(i) for i in ids} == {4}


# --------------------------------------------------------------------------- confidence_contexts

PROMPTS = ["Q: what is 2 + 3?", "Q: name a prime number, please."]
CONF = "<confidence>"


def _ids(tok, pieces: list[str | list[str]]) -> list[int]:
    """Token ids of ``pieces``: a string is tokenized on its own, a list names vocabulary tokens."""
    out: list[int] = []
    for p in pieces:
        out += tok.convert_tokens_to_ids(p) if isinstance(p, list) else tok(p, add_special_tokens=False).input_ids
    return out


def _rollout(tok) -> Rollout:
    """Five completions of two prompts (rows 0-2 answer prompt 0, rows 3-4 prompt 1):

    0. well formed, a token boundary right after ``<confidence>``, EOS sampled: qualifies;
    1. no confidence tag (not well formed);
    2. well formed (``.5`` reads as 0.5) but the token ``>.`` straddles the tag's end;
    3. well formed with a space before the number (the confidence text starts at the space,
       right after the tag's last token): qualifies;
    4. a confidence that is not a number (not well formed).
    """
    rows = [
        _ids(tok, ["<think>add them</think>", "<answer>", "5", "</answer>", CONF, "0.25</confidence>"])
        + [tok.eos_token_id],
        _ids(tok, ["<answer>", "5", "</answer>"]),
        _ids(tok, ["<answer>", "7", "</answer>", ["<", "confidence", ">.", "5", "</", "confidence", ">"]]),
        _ids(tok, ["<answer>", "7", "</answer>", CONF, " 0.9</confidence>"]),
        _ids(tok, ["<answer>", "7", "</answer>", CONF, "lots</confidence>"]),
    ]
    width = max(map(len, rows))
    comp = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    group = torch.tensor([0, 0, 0, 1, 1])
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
    return Rollout(enc.input_ids[group], enc.attention_mask[group], comp, mask, texts, group)


def test_contexts_are_the_well_formed_rows_with_a_clean_boundary(tiny):
    _, tok = tiny
    rollout = _rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    assert [p.format_ok for p in parsed] == [True, False, True, True, False]
    assert rollout.texts[2].endswith("<confidence>.5</confidence>")
    rows, ends = confidence_contexts(tok, rollout, parsed, CompletionFormat())
    assert rows.tolist() == [0, 3] and rows.dtype == ends.dtype == torch.long
    for i, k in zip(rows.tolist(), ends.tolist()):
        context = tok.decode(rollout.completion_ids[i, :k], skip_special_tokens=True)
        assert context.endswith(CONF)
        assert context == rollout.texts[i][: parsed[i].confidence_span[0]]
    with pytest.raises(ValueError, match="4 parses for 5 completions"):
        confidence_contexts(tok, rollout, parsed[:4], CompletionFormat())


# --------------------------------------------------------------------------- grid_logprobs


def _plain_candidate_logprob(model, prompt: torch.Tensor, context: torch.Tensor, candidate: list[int]) -> float:
    """``sum_j log p(candidate_j | prompt, context, candidate_<j)`` from one unpadded forward of
    ``[prompt | context | candidate]``: the logits at position t predict token t + 1."""
    seq = torch.cat([prompt, context, torch.tensor(candidate)])
    logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].double(), dim=-1)  # [S, vocab]
    start = len(prompt) + len(context)
    return sum(float(logp[start + j - 1, t]) for j, t in enumerate(candidate))


@pytest.mark.parametrize("tree", [False, True])
def test_grid_logprobs_equal_a_plain_forward_per_candidate(tiny, tree):
    from calibrl.rl.confidence_grid import grid_logprobs_tree

    model, tok = tiny
    rollout = _rollout(tok)
    rows, ends = confidence_contexts(tok, rollout, [parse_completion(t) for t in rollout.texts], CompletionFormat())
    grid = ConfidenceGrid(0.1)
    candidates = grid.token_ids(tok)
    fn = grid_logprobs_tree if tree else grid_logprobs
    with torch.no_grad():
        got = fn(model, rollout, rows, ends, candidates, tok.pad_token_id)
        assert got.shape == (2, 11) and got.dtype == torch.float32 and (got <= 0).all()
        for m, (i, k) in enumerate(zip(rows.tolist(), ends.tolist())):
            prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
            want = [_plain_candidate_logprob(model, prompt, rollout.completion_ids[i, :k], c) for c in candidates]
            assert got[m].tolist() == pytest.approx(want, abs=1e-4)
    # the two contexts differ (prompt, length), so their grids do too
    assert not torch.allclose(got[0], got[1])


def test_grid_logprobs_without_contexts(tiny):
    model, tok = tiny
    rollout = _rollout(tok)
    out = grid_logprobs(model, rollout, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                        ConfidenceGrid(0.25).token_ids(tok), tok.pad_token_id)
    assert out.shape == (0, 5) and out.device == next(model.parameters()).device


def test_gradient_flows_through_the_grid_distribution(tiny):
    model, tok = tiny
    rollout = _rollout(tok)
    rows, ends = confidence_contexts(tok, rollout, [parse_completion(t) for t in rollout.texts], CompletionFormat())
    model.zero_grad(set_to_none=True)
    try:
        probs = grid_distribution(grid_logprobs(model, rollout, rows, ends, ConfidenceGrid(0.25).token_ids(tok),
                                                tok.pad_token_id))
        assert probs.sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
        probs[0, 0].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
        # the prompt's and context's positions get gradient too (through the shared KV cache)
        emb = model.get_input_embeddings().weight.grad
        prompt0 = rollout.prompt_ids[0][rollout.prompt_mask[0].bool()]
        assert float(emb[prompt0[0]].abs().sum()) > 0
    finally:
        model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- expected_confidence


def test_expected_confidence_by_hand():
    # grid [0, 0.5, 1], p = [0.2, 0.5, 0.3]: 0.2 * 0 + 0.5 * 0.5 + 0.3 * 1 = 0.55
    probs = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    values = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert expected_confidence(probs, values).tolist() == pytest.approx([0.55, 0.0])
    # the same from log-probs: softmax renormalises whatever mass lies off the grid
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.3]]) * 0.4)  # 60% of the mass elsewhere
    assert expected_confidence(grid_distribution(logp), values).tolist() == pytest.approx([0.55])


def test_the_prefix_tree_forward_equals_the_cache_forward(tiny):
    """grid_logprobs_tree (one forward, 4-D tree mask) gives grid_logprobs' values and gradients."""
    from calibrl.rl.confidence_grid import _trie, grid_logprobs_tree

    model, tok = tiny
    grid = ConfidenceGrid(0.05)
    cands = grid.token_ids(tok)
    tokens, parents, depths, paths = _trie(cands)
    # "0.00".."0.95" share "0", "."; 10 first decimals, 2 second decimals each; "1.00" its own 4
    assert len(tokens) == 2 + 10 + 20 + 4 and [len(p) for p in paths] == [4] * 21
    rollout = _rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    rows, ends = confidence_contexts(tok, rollout, parsed, CompletionFormat())
    m = copy.deepcopy(model)
    a = grid_logprobs(m, rollout, rows, ends, cands, tok.pad_token_id)
    a[:, 3].sum().backward()
    ga = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    b = grid_logprobs_tree(m, rollout, rows, ends, cands, tok.pad_token_id)
    b[:, 3].sum().backward()
    assert torch.allclose(a, b, atol=1e-4)
    for x, y in zip(ga, (p.grad for p in m.parameters())):
        assert torch.allclose(x, y, atol=1e-4)


def test_the_grid_on_the_policy_forward_cache_equals_a_separate_forward(tiny):
    """grid_logprobs_on_cache (the tree run on the KV cache of the policy forward) gives
    grid_logprobs_tree's values, and the gradient of a policy loss plus a grid loss in one backward
    equals the sum of the two backwards run apart."""
    from calibrl.rl.confidence_grid import grid_logprobs_on_cache, grid_logprobs_tree
    from calibrl.rl.rollout import completion_forward, completion_logprobs

    model, tok = tiny
    cands = ConfidenceGrid(0.05).token_ids(tok)
    rollout = _rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    rows, ends = confidence_contexts(tok, rollout, parsed, CompletionFormat())
    assert rows.tolist() == [0, 3]
    m = copy.deepcopy(model)
    # apart: the policy loss's backward, then the grid loss's
    lp = completion_logprobs(m, rollout)
    lp.sum().backward()
    a = grid_logprobs_tree(m, rollout, rows, ends, cands, tok.pad_token_id)
    (a[:, 3] - a[:, 7]).sum().backward()
    ga = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    # together: one forward of the rows, the tree on its cache, one backward
    fwd = completion_forward(m, rollout)
    assert torch.allclose(fwd.logprobs, lp, atol=1e-5)
    b = grid_logprobs_on_cache(m, fwd, rows, ends, cands)
    assert b.shape == (2, 21) and torch.allclose(a, b, atol=1e-4)
    (fwd.logprobs.sum() + (b[:, 3] - b[:, 7]).sum()).backward()
    for x, y in zip(ga, (p.grad for p in m.parameters())):
        assert torch.allclose(x, y, atol=1e-4)
    # a subset of rows in another order; none at all
    fwd = completion_forward(m, rollout)
    with torch.no_grad():
        c = grid_logprobs_on_cache(m, fwd, rows.flip(0), ends.flip(0), cands)
    assert torch.allclose(c, a.detach().flip(0), atol=1e-4)
    assert grid_logprobs_on_cache(m, fwd, rows[:0], ends[:0], cands).shape == (0, 21)


def test_the_grid_on_a_cache_refuses_a_forward_without_one(tiny):
    from calibrl.rl.confidence_grid import grid_logprobs_on_cache
    from calibrl.rl.rollout import CompletionForward

    model, tok = tiny
    rollout = _rollout(tok)
    with pytest.raises(ValueError, match="needs the KV cache"):
        grid_logprobs_on_cache(model, CompletionForward(torch.zeros(5, 1), None, rollout), torch.tensor([0]),
                               torch.tensor([3]), [[1], [2]])
    from calibrl.rl.rollout import completion_forward

    with torch.no_grad():
        fwd = completion_forward(model, rollout)
        grid_logprobs_on_cache(model, fwd, torch.tensor([0]), torch.tensor([3]), [[1], [2]])
        with pytest.raises(ValueError, match="used up by an earlier call"):  # the tree's 3 columns were appended
            grid_logprobs_on_cache(model, fwd, torch.tensor([0]), torch.tensor([3]), [[1], [2]])
