"""Model-intrinsic confidence signals: the pure maths on hand numbers, token/character alignment
on the real tokenizer, and the end-to-end signals of a hand-built rollout on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_spec

from calibrl.eval.signals import (
    SIGNALS,
    answer_probability,
    confidence_signals,
    expected_stated_confidence,
    lowest_window_probability,
    reasoning_end,
)
from calibrl.rewards.spans import span_tokens, token_char_ends
from calibrl.models import load_policy
from calibrl.data.format import CompletionFormat
from calibrl.rewards.parsing import parse_completion
from calibrl.rl.confidence_grid import ConfidenceGrid
from calibrl.rl.rollout import Rollout, completion_logprobs, generate_rollout

LP = [-1.0, -2.0, -3.0, -1.0]
# What confidence_signals returns (expected_confidence has a forward of its own).
TOKEN_SIGNALS = ("verbalized", "answer_prob", "lowest_window_prob")


@pytest.fixture(scope="module")
def tiny():
    return load_policy(tiny_spec())


# --------------------------------------------------------------------------- span_tokens


@pytest.mark.parametrize(
    "ends, span, tokens",
    [
        # tokens cover [0,2) [2,4) [4,5) [5,9)
        ([2, 4, 5, 9], (2, 4), [1]),  # token 0 ends at 2 and token 2 starts at 4: no overlap
        ([2, 4, 5, 9], (1, 3), [0, 1]),
        ([2, 4, 5, 9], (3, 5), [1, 2]),
        ([2, 4, 5, 9], (0, 9), [0, 1, 2, 3]),
        ([2, 4, 5, 9], (4, 4), []),  # empty span
        ([2, 2, 5], (2, 3), [2]),  # token 1 covers [2,2): nothing, so it overlaps nothing
        ([2, 2, 5], (0, 2), [0]),
    ],
)
def test_span_tokens(ends, span, tokens):
    assert span_tokens(ends, span) == tokens


@pytest.mark.parametrize(
    "ends, span, match",
    [
        ([2, 4, 5, 9], (3, 10), "not inside the text"),
        ([2, 4, 5, 9], (4, 3), "not inside the text"),
        ([2, 4, 5, 9], (-1, 3), "not inside the text"),
        ([2, 1, 5], (0, 1), "non-decreasing"),
    ],
)
def test_span_tokens_rejects_bad_input(ends, span, match):
    with pytest.raises(ValueError, match=match):
        span_tokens(ends, span)


# --------------------------------------------------------------------------- answer_probability


def test_answer_probability_hand_values():
    ends = [2, 4, 5, 9]
    # span [3,5) -> tokens 1, 2: mean(-2, -3) = -2.5
    assert answer_probability(LP, ends, (3, 5)) == pytest.approx(math.exp(-2.5))
    # span [4,5) -> token 2 alone: exp(-3)
    assert answer_probability(LP, ends, (4, 5)) == pytest.approx(math.exp(-3.0))
    # empty span: no token, geometric mean undefined
    assert math.isnan(answer_probability(LP, ends, (4, 4)))
    # float rounding just above 0 is read as 0: probability exactly 1
    assert answer_probability([1e-6], [1], (0, 1)) == 1.0


@pytest.mark.parametrize(
    "logprobs, match",
    [
        ([-1.0, -2.0], "one value per token"),
        ([-1.0, -2.0, math.nan, -1.0], "non-finite"),
        ([-1.0, -2.0, -math.inf, -1.0], "non-finite"),
        ([-1.0, 0.5, -3.0, -1.0], "must be <= 0"),
    ],
)
def test_logprob_validation(logprobs, match):
    with pytest.raises(ValueError, match=match):
        answer_probability(logprobs, [2, 4, 5, 9], (3, 5))
    with pytest.raises(ValueError, match=match):
        lowest_window_probability(logprobs, [2, 4, 5, 9], 9, 2)


# --------------------------------------------------------------------------- lowest_window_probability


@pytest.mark.parametrize(
    "ends, end, window, expected",
    [
        # all 4 reasoning; windows of 2: means -1.5, -2.5, -2.0 -> lowest -2.5
        ([1, 2, 3, 4], 4, 2, -2.5),
        ([1, 2, 3, 4], 4, 1, -3.0),  # single tokens: the lowest log-prob
        ([1, 2, 3, 4], 4, 4, -1.75),  # one window: (-1 - 2 - 3 - 1) / 4
        ([1, 2, 3, 4], 4, 16, -1.75),  # fewer tokens than the window: one window over all 4
        ([1, 2, 3, 4], 2, 16, -1.5),  # tokens ending at <= 2: -1, -2
        # a token ending past the tag (token 2 ends at 6 > 5) is not reasoning: -1, -2 again
        ([2, 4, 6, 8], 5, 2, -1.5),
    ],
)
def test_lowest_window_probability_hand_values(ends, end, window, expected):
    assert lowest_window_probability(LP, ends, end, window) == pytest.approx(math.exp(expected))


def test_lowest_window_probability_without_reasoning_is_nan():
    assert math.isnan(lowest_window_probability(LP, [1, 2, 3, 4], 0, 2))  # answer tag at offset 0
    assert math.isnan(lowest_window_probability([], [], 0, 2))  # no token at all


@pytest.mark.parametrize(
    "end, window, ends, match",
    [
        (4, 0, [1, 2, 3, 4], "window must be >= 1"),
        (-1, 2, [1, 2, 3, 4], "reasoning_end must be >= 0"),
        (4, 2, [1, 3, 2, 4], "non-decreasing"),
    ],
)
def test_lowest_window_probability_rejects_bad_input(end, window, ends, match):
    with pytest.raises(ValueError, match=match):
        lowest_window_probability(LP, ends, end, window)


# --------------------------------------------------------------------------- reasoning_end


def test_reasoning_end_skips_answer_tags_inside_think():
    head = "<think>try <answer>1</answer></think>"  # 7 + 4 + 8 + 1 + 9 + 8 = 37 characters
    text = head + "<answer>12</answer><confidence>0.5</confidence>"
    parsed = parse_completion(text)
    assert parsed.answer == "12"
    assert reasoning_end(text, parsed, CompletionFormat()) == 37 == len(head)


def test_reasoning_end_other_cases():
    fmt = CompletionFormat(answer="final")
    text = "<final>3</final><confidence>1</confidence>"
    assert reasoning_end(text, parse_completion(text, fmt), fmt) == 0  # tag opens the completion
    no_answer = parse_completion("just words")
    assert no_answer.answer_span is None and reasoning_end("just words", no_answer, CompletionFormat()) is None
    parsed = parse_completion("<answer>12</answer><confidence>0.5</confidence>")
    with pytest.raises(ValueError, match="not from this text"):
        reasoning_end("12 and more words", parsed, CompletionFormat())  # span (8, 10), no tag before


# --------------------------------------------------------------------------- token_char_ends


class PrefixTokenizer:
    """Decodes a prefix of ids to a fixed string, like a byte-level tokenizer part-way through a
    multi-byte character."""

    def __init__(self, prefixes: list[str]) -> None:
        self.prefixes = prefixes

    def decode(self, ids, skip_special_tokens):
        assert skip_special_tokens is True
        return self.prefixes[len(ids) - 1]


def test_token_char_ends_running_max_and_cap():
    # prefix lengths 1, 3, 2 (two replacement chars, then one finished emoji): running max
    # 1, 3, 3, capped at the full length 2 -> 1, 2, 2
    tok = PrefixTokenizer(["a", "a\ufffd\ufffd", "a\U0001f600"])
    assert token_char_ends(tok, [7, 8, 9]) == [1, 2, 2]
    assert token_char_ends(tok, []) == []


def test_token_char_ends_on_the_real_tokenizer(tiny):
    _, tok = tiny
    text = "<think>x</think><answer>12</answer>"
    ids = tok(text, add_special_tokens=False).input_ids
    # ASCII only: each token decodes alone to its own characters, so its end is the running sum
    expected = np.cumsum([len(tok.decode([i])) for i in ids]).tolist()
    assert token_char_ends(tok, ids) == expected and expected[-1] == len(text)
    # a trailing EOS is skipped when decoding: it ends where the text ends
    assert token_char_ends(tok, ids + [tok.eos_token_id])[-1] == len(text)
    # multi-byte characters: still monotone and ending at the text's length
    uni = "héllo 😀 wörld"
    ends = token_char_ends(tok, tok(uni, add_special_tokens=False).input_ids)
    assert ends == sorted(ends) and ends[-1] == len(uni)


def test_token_char_ends_match_generated_texts(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    r = generate_rollout(model, tok, ["Q: 2+3?", "Q: what is 9 - 4, and why?"], 2, max_new_tokens=24)
    for i in range(len(r)):
        ids = r.completion_ids[i][r.completion_mask[i] == 1].tolist()
        ends = token_char_ends(tok, ids)
        assert ends == sorted(ends) and ends[-1] == len(r.texts[i])
    # random tokens never form the format: no answer span, so both intrinsic signals are NaN
    out = confidence_signals(model, tok, r, [parse_completion(t) for t in r.texts], CompletionFormat())
    assert all(np.isnan(out[name]).all() for name in TOKEN_SIGNALS)
    assert np.isnan(expected_stated_confidence(model, tok, r, [parse_completion(t) for t in r.texts],
                                               ConfidenceGrid(0.1))).all()


# --------------------------------------------------------------------------- confidence_signals

# Completions written as pieces tokenized one by one, so the tokens of each piece are known
# without going through the code under test. Row 0 is well formed; row 1 has an answer but an
# unparseable confidence and no reasoning; row 2 has no tags. Rows 0, 1 share prompt 0.
PIECES = [
    ["<think>café 😀 so twelve</think>", "<answer>", "12", "</answer><confidence>0.5</confidence>"],
    ["<answer>", "7", "</answer><confidence>lots</confidence>"],
    ["no tags here"],
]
PROMPTS = ["Q: what is 3 * 4?", "Q: name a prime number, please."]
WINDOW = 3


def _hand_rollout(tok) -> tuple[Rollout, list[list[int]]]:
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    piece_ids = [[tok(p, add_special_tokens=False).input_ids for p in row] for row in PIECES]
    rows = [sum(ids, []) for ids in piece_ids]
    rows[0] = rows[0] + [tok.eos_token_id]  # row 0 sampled EOS: it is in the mask
    width = max(map(len, rows))
    comp = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    texts = ["".join(row) for row in PIECES]
    for r, t in zip(rows, texts):  # the pieces' tokens decode back to the text
        assert tok.decode(r, skip_special_tokens=True) == t
    group = torch.tensor([0, 0, 1])
    rollout = Rollout(enc.input_ids[group], enc.attention_mask[group], comp, mask, texts, group)
    return rollout, [[len(ids) for ids in row] for row in piece_ids]


def test_confidence_signals_end_to_end(tiny):
    model, tok = tiny
    rollout, n_tok = _hand_rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    assert [p.format_ok for p in parsed] == [True, False, False] and parsed[1].answer == "7"
    out = confidence_signals(model, tok, rollout, parsed, CompletionFormat(), window=WINDOW)
    assert set(out) == set(TOKEN_SIGNALS) and all(v.shape == (3,) and v.dtype == np.float64 for v in out.values())

    with torch.no_grad():
        lp = completion_logprobs(model, rollout, share_prefix=True).double().numpy()
    # row 0: reasoning = the think piece's tokens, answer = the "12" piece's tokens
    r0, tag0, ans0 = n_tok[0][0], n_tok[0][1], n_tok[0][2]
    answer0 = lp[0, r0 + tag0 : r0 + tag0 + ans0]
    assert out["answer_prob"][0] == pytest.approx(math.exp(answer0.mean()), rel=1e-5)
    assert r0 > WINDOW  # several windows to take the minimum over
    low = min(lp[0, j : j + WINDOW].mean() for j in range(r0 - WINDOW + 1))
    assert out["lowest_window_prob"][0] == pytest.approx(math.exp(low), rel=1e-5)
    # row 1: the "7" token(s) after the tag; the answer tag opens the completion -> no reasoning
    tag1, ans1 = n_tok[1][0], n_tok[1][1]
    assert out["answer_prob"][1] == pytest.approx(math.exp(lp[1, tag1 : tag1 + ans1].mean()), rel=1e-5)
    assert math.isnan(out["lowest_window_prob"][1])
    # row 2: no answer span
    assert math.isnan(out["answer_prob"][2]) and math.isnan(out["lowest_window_prob"][2])
    # stated confidence only where the format holds
    assert out["verbalized"][0] == 0.5 and np.isnan(out["verbalized"][1:]).all()
    assert ((out["answer_prob"][:2] > 0) & (out["answer_prob"][:2] <= 1)).all()


def test_confidence_signals_micro_batches_autocast_and_mode(tiny):
    model, tok = tiny
    rollout, _ = _hand_rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    fmt = CompletionFormat()
    full = confidence_signals(model, tok, rollout, parsed, fmt, window=WINDOW)
    model.train()
    try:
        single = confidence_signals(model, tok, rollout, parsed, fmt, window=WINDOW, micro_batch_size=1)
        assert model.training  # mode restored
    finally:
        model.eval()
    for name in TOKEN_SIGNALS:
        np.testing.assert_allclose(single[name], full[name], rtol=1e-5)  # NaNs in the same places
    bf16 = confidence_signals(model, tok, rollout, parsed, fmt, window=WINDOW, autocast_dtype=torch.bfloat16)
    assert not model.training
    for name in ("answer_prob", "lowest_window_prob"):
        # bf16 logits move each log-prob by a few hundredths on this random model
        np.testing.assert_allclose(np.log(bf16[name]), np.log(full[name]), atol=0.5)


def test_confidence_signals_rejects_bad_input(tiny):
    model, tok = tiny
    rollout, _ = _hand_rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    fmt = CompletionFormat()
    with pytest.raises(ValueError, match="parsed has 2 items"):
        confidence_signals(model, tok, rollout, parsed[:2], fmt)
    with pytest.raises(ValueError, match="window must be >= 1"):
        confidence_signals(model, tok, rollout, parsed, fmt, window=0)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        confidence_signals(model, tok, rollout, parsed, fmt, micro_batch_size=0)
    rollout.texts[0] = " " + rollout.texts[0]  # offsets would no longer match the tokens
    with pytest.raises(ValueError, match=r"texts\[0\] is not the decode"):
        confidence_signals(model, tok, rollout, [parse_completion(t) for t in rollout.texts], fmt)


# --------------------------------------------------------------------------- expected_stated_confidence


def test_signal_names():
    assert SIGNALS == (*TOKEN_SIGNALS, "expected_confidence")


def test_expected_stated_confidence_is_the_grid_mean(tiny):
    model, tok = tiny
    rollout, n_tok = _hand_rollout(tok)
    parsed = [parse_completion(t) for t in rollout.texts]
    grid = ConfidenceGrid(0.25)
    got = expected_stated_confidence(model, tok, rollout, parsed, grid)
    assert got.shape == (3,) and got.dtype == np.float64
    # only row 0 is well formed (like `verbalized`); its context is every piece before the
    # confidence text "0.5</confidence>": the think, answer tag and "12" pieces and the tokens of
    # "</answer><confidence>" ('</', 'answer', '><', 'confidence', '>').
    assert np.isnan(got[1:]).all()
    k = sum(n_tok[0][:3]) + 5
    assert tok.decode(rollout.completion_ids[0, :k]).endswith("</answer><confidence>")
    prompt = rollout.prompt_ids[0][rollout.prompt_mask[0].bool()]
    logp = []
    with torch.no_grad():
        for cand in grid.token_ids(tok):  # plain forward of [prompt | completion[:k] | candidate]
            seq = torch.cat([prompt, rollout.completion_ids[0, :k], torch.tensor(cand)])
            lp = torch.log_softmax(model(input_ids=seq[None]).logits[0].double(), dim=-1)
            logp.append(sum(float(lp[len(seq) - len(cand) + j - 1, t]) for j, t in enumerate(cand)))
    p = np.exp(np.array(logp) - max(logp))
    p /= p.sum()  # renormalised over the 5 grid values
    assert got[0] == pytest.approx(float(p @ np.array([0.0, 0.25, 0.5, 0.75, 1.0])), abs=1e-5)


def test_expected_stated_confidence_micro_batches_autocast_and_mode(tiny):
    model, tok = tiny
    rollout, _ = _hand_rollout(tok)
    # two well-formed rows: row 1 with a number for a confidence as well
    rollout.texts[1] = rollout.texts[1].replace("lots", "0.7")
    rows = [r[m == 1].tolist() for r, m in zip(rollout.completion_ids, rollout.completion_mask)]
    rows[1] = tok(rollout.texts[1], add_special_tokens=False).input_ids
    width = max(map(len, rows))
    rollout.completion_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    rollout.completion_mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    parsed = [parse_completion(t) for t in rollout.texts]
    assert [p.format_ok for p in parsed] == [True, True, False]
    grid = ConfidenceGrid(0.1)
    full = expected_stated_confidence(model, tok, rollout, parsed, grid)
    model.train()
    try:
        single = expected_stated_confidence(model, tok, rollout, parsed, grid, micro_batch_size=1)
        assert model.training  # mode restored
    finally:
        model.eval()
    assert np.isfinite(full[:2]).all() and np.isnan(full[2]) and ((full[:2] >= 0) & (full[:2] <= 1)).all()
    np.testing.assert_allclose(single, full, rtol=1e-5)
    bf16 = expected_stated_confidence(model, tok, rollout, parsed, grid, autocast_dtype=torch.bfloat16)
    np.testing.assert_allclose(bf16, full, atol=0.05)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        expected_stated_confidence(model, tok, rollout, parsed, grid, micro_batch_size=0)
    with pytest.raises(ValueError, match="2 parses for 3 completions"):
        expected_stated_confidence(model, tok, rollout, parsed[:2], grid)
