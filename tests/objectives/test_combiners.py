"""Objective combiners: hand-worked advantages for each combiner, exact zeros, padding, errors,
and the token segments on SmolLM2's real tokenizer (via the tiny model of
test_rollout_and_update)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import EOS, tiny_spec

from calibrl.models import load_policy
from calibrl.objectives import COMBINERS, OBJECTIVE_OF, OBJECTIVES, objective_of, segment_ids
from calibrl.rewards import COMPONENTS, parse_completion
from calibrl.objectives.advantages import group_advantages

ALL = ["normalize_then_sum", "segment", "sum"]
NAMES = ["correctness", "brier", "format"]
W = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)  # RLCR weights with a format term

# Two groups: rows 0-2 answer prompt 0 (G=3), rows 3-4 prompt 1 (G=2).
#   row  correct  q     brier -(q - c)^2   format
#   0    yes      0.75  -1/16              1
#   1    no       0.5   -4/16              1
#   2    format failure: worst of every component (0, -1, 0)
#   3    yes      1.0   0                  1
#   4    no       0.25  -1/16              1
R = torch.tensor(
    [[1, -0.0625, 1], [0, -0.25, 1], [0, -1, 0], [1, 0, 1], [0, -0.0625, 1]], dtype=torch.float64
)
GROUP = torch.tensor([0, 0, 0, 1, 1])
SEG = torch.tensor(
    [
        [0, 0, 0, 1, 1, -1],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, -1, -1],  # the format failure: no answer span, so no segment-1 token
        [0, 1, 1, -1, -1, -1],
        [0, 0, 0, 0, 1, -1],
    ]
)
S3, S63 = math.sqrt(3), math.sqrt(63)


def combine(name, rewards=R, names=NAMES, weights=W, group=GROUP, seg=SEG, **kw):
    return COMBINERS.get(name)(rewards, names, weights, group, seg, **kw)


def on_tokens(per_row, seg=SEG):
    """Expected ``[N, L]``: ``per_row[i]`` on the completion tokens of row i, 0 on padding."""
    return torch.where(seg >= 0, torch.tensor(per_row, dtype=torch.float64).unsqueeze(1), 0.0)


# --------------------------------------------------------------------------- objectives


def test_objective_of_every_registered_component():
    assert set(OBJECTIVE_OF.values()) == set(OBJECTIVES)
    assert {objective_of(c) for c in COMPONENTS} <= set(OBJECTIVES)
    assert objective_of("brier") == "calibration" and objective_of("correctness") == "accuracy"


def test_objective_of_unknown_lists_known():
    with pytest.raises(KeyError, match="known components: abstention, brier, correctness, format, log_score"):
        objective_of("bier")


def test_unknown_combiner_lists_valid_choices():
    assert COMBINERS.names() == ALL
    with pytest.raises(KeyError, match="valid choices: normalize_then_sum, segment, sum"):
        COMBINERS.get("gdpo")


# --------------------------------------------------------------------------- sum


def test_sum_hand_worked():
    # r = rewards @ [1, 1, 0.5] = [69/48, 12/48, -48/48 | 1.5, 0.4375]
    # group 0: mean = (69 + 12 - 48)/3/48 = 11/48 -> A = [58, 1, -59]/48
    # group 1: mean = 0.96875 -> A = [+0.53125, -0.53125]
    expected = on_tokens([58 / 48, 1 / 48, -59 / 48, 0.53125, -0.53125])
    torch.testing.assert_close(combine("sum"), expected, rtol=0, atol=1e-12)


def test_sum_scaled_hand_worked():
    # group 0: unbiased var = (58^2 + 1^2 + 59^2) / 48^2 / 2 = (3364 + 1 + 3481) / 2 / 48^2 = 3423 / 48^2
    #   -> A = [58, 1, -59] / 48 / (sqrt(3423) / 48) = [58, 1, -59] / sqrt(3423)
    # group 1 (G=2): std = |d| * sqrt(2) where d = +-0.53125 -> A = +-1/sqrt(2)
    s = math.sqrt(3423)
    expected = on_tokens([58 / s, 1 / s, -59 / s, 1 / math.sqrt(2), -1 / math.sqrt(2)])
    torch.testing.assert_close(combine("sum", scale=True), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [False, True])
def test_sum_equals_group_advantages_of_weighted_sum(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(4 * 5, 3, generator=g, dtype=torch.float64)
    group = torch.arange(4).repeat_interleave(5)
    seg = torch.zeros(20, 7, dtype=torch.long)
    out = combine("sum", rewards=rewards, group=group, seg=seg, scale=scale)
    ref = group_advantages(rewards @ W, 5, scale)
    torch.testing.assert_close(out, ref.unsqueeze(1).expand(20, 7))


@pytest.mark.parametrize("name", ALL)
def test_groups_need_not_be_contiguous(name):
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = combine(name, rewards=R[perm], group=GROUP[perm], seg=SEG[perm])
    torch.testing.assert_close(out, combine(name)[perm])


# --------------------------------------------------------------------------- normalize_then_sum


def test_normalize_then_sum_hand_worked():
    # Per objective, group 0 (unbiased std):
    #   accuracy    [1, 0, 0]:        mean 1/3, dev [2, -1, -1]/3, std 1/sqrt(3)  -> [2, -1, -1]/sqrt(3)
    #   calibration [-1, -4, -16]/16: mean -7/16, dev [6, 3, -9]/16, std sqrt(63)/16 -> [6, 3, -9]/sqrt(63)
    #   format      [.5, .5, 0]:      mean 1/3, dev [1, 1, -2]/6, std 1/(2 sqrt(3)) -> [1, 1, -2]/sqrt(3)
    #   sum: [sqrt(3) + 6/sqrt(63), 3/sqrt(63), -sqrt(3) - 9/sqrt(63)]
    # Group 1: accuracy [1, 0] -> +-1/sqrt(2); calibration [0, -1/16] -> +-1/sqrt(2);
    #   format [.5, .5] is constant -> exactly 0 (not divided by the floor). Sum: +-sqrt(2).
    expected = on_tokens([S3 + 6 / S63, 3 / S63, -S3 - 9 / S63, math.sqrt(2), -math.sqrt(2)])
    torch.testing.assert_close(combine("normalize_then_sum"), expected, rtol=0, atol=1e-12)


def test_normalize_then_sum_ignores_scale():
    torch.testing.assert_close(combine("normalize_then_sum", scale=True), combine("normalize_then_sum"))


def test_normalize_then_sum_gives_the_smaller_spread_an_equal_voice():
    # correctness [1, 0, 0] (spread 1), brier [-1/4, 0, -1/4] (spread 1/4), weights [1, 1]:
    # row 0 is right but hedged (q=0.5), row 1 wrong and sure of it (q=0), row 2 wrong and hedged.
    rewards = torch.tensor([[1, -0.25], [0, 0], [0, -0.25]], dtype=torch.float64)
    args = dict(
        rewards=rewards,
        names=["correctness", "brier"],
        weights=torch.tensor([1.0, 1.0], dtype=torch.float64),
        group=torch.zeros(3, dtype=torch.long),
        seg=torch.zeros(3, 1, dtype=torch.long),
    )

    def per_row(name, **kw):
        return combine(name, **args, **kw)[:, 0].tolist()

    # sum: r = [3/4, 0, -1/4], mean 1/6 -> A = [7, -2, -5]/12: accuracy decides the sign of row 1.
    assert per_row("sum") == pytest.approx([7 / 12, -2 / 12, -5 / 12])
    # sum, scaled: std = sqrt((49 + 4 + 25)/144/2) = sqrt(13/48) -> [7, -2, -5]/sqrt(39): same signs.
    s39 = math.sqrt(39)
    assert per_row("sum", scale=True) == pytest.approx([7 / s39, -2 / s39, -5 / s39])
    # normalize_then_sum: accuracy [2, -1, -1]/sqrt(3); calibration: mean -1/6, dev [-1, 2, -1]/12,
    # std 1/(4 sqrt(3)) -> [-1, 2, -1]/sqrt(3). Sum: [1, 1, -2]/sqrt(3): the well-calibrated wrong
    # answer (row 1) is now rewarded (+0.577 instead of -0.167) as much as the hedged right one.
    assert per_row("normalize_then_sum") == pytest.approx([1 / S3, 1 / S3, -2 / S3])


# --------------------------------------------------------------------------- segment


def test_segment_hand_worked():
    # Per-objective advantages from test_normalize_then_sum_hand_worked:
    #   row  accuracy    calibration   format
    #   0    2/sqrt(3)   6/sqrt(63)    1/sqrt(3)
    #   1    -1/sqrt(3)  3/sqrt(63)    1/sqrt(3)
    #   2    -1/sqrt(3)  -9/sqrt(63)   -2/sqrt(3)
    #   3    1/sqrt(2)   1/sqrt(2)     0
    #   4    -1/sqrt(2)  -1/sqrt(2)    0
    # segment 0 gets accuracy + format, segment 1 calibration + format; row 2 (no segment 1) gets
    # all three on every token: -1/sqrt(3) - 9/sqrt(63) - 2/sqrt(3) = -sqrt(3) - 9/sqrt(63).
    r2 = 1 / math.sqrt(2)
    a0, c0 = S3, 6 / S63 + 1 / S3
    a1, c1 = 0.0, 3 / S63 + 1 / S3
    f2 = -S3 - 9 / S63
    expected = torch.tensor(
        [
            [a0, a0, a0, c0, c0, 0],
            [a1, a1, c1, c1, c1, c1],
            [f2, f2, f2, f2, 0, 0],
            [r2, r2, r2, 0, 0, 0],
            [-r2, -r2, -r2, -r2, -r2, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(combine("segment"), expected, rtol=0, atol=1e-12)


def test_segment_row_sums_match_normalize_then_sum_where_only_one_segment():
    # A row with no segment-1 token carries the whole normalize_then_sum advantage on each token.
    torch.testing.assert_close(combine("segment")[2], combine("normalize_then_sum")[2])


def test_segment_puts_calibration_only_on_segment_1():
    # Well-formed rows, everyone correct: only the Brier term varies within the group.
    rewards = torch.tensor([[1, -0.01, 1], [1, -0.25, 1], [1, 0, 1]], dtype=torch.float64)
    seg = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 1, 1], [0, 0, 0, 1, -1]])
    out = combine("segment", rewards=rewards, group=torch.zeros(3, dtype=torch.long), seg=seg)
    assert torch.equal(out[seg != 1], torch.zeros_like(out[seg != 1]))
    assert (out[seg == 1] != 0).all()


def test_segment_puts_accuracy_only_on_segment_0():
    # Same confidence error |q - c| = 0.5 for everyone: only correctness varies.
    rewards = torch.tensor([[1, -0.25, 1], [0, -0.25, 1], [0, -0.25, 1]], dtype=torch.float64)
    seg = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 1, 1], [0, 0, 0, 1, -1]])
    out = combine("segment", rewards=rewards, group=torch.zeros(3, dtype=torch.long), seg=seg)
    assert torch.equal(out[seg != 0], torch.zeros_like(out[seg != 0]))
    assert (out[seg == 0] != 0).all()


def test_segment_without_a_calibration_component():
    # No calibration objective: segment-1 tokens get only the format advantage. Row 0: format
    # 1/sqrt(3) everywhere, accuracy 2/sqrt(3) on segment 0 only.
    out = combine("segment", rewards=R[:, [0, 2]], names=["correctness", "format"], weights=W[[0, 2]])
    torch.testing.assert_close(out[0], torch.tensor([S3, S3, S3, 1 / S3, 1 / S3, 0], dtype=torch.float64))


# --------------------------------------------------------------------------- shared policies


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_identical_rewards_give_exact_zeros(name, scale):
    # Group 0: three identical rows (including the all-format-failure case in group 2); group 1
    # varies, so the combiner does real work elsewhere in the batch.
    rewards = torch.tensor(
        [[1, -0.1, 1]] * 3 + [[1, 0, 1], [0, -0.3, 1]] + [[0, -1, 0]] * 2, dtype=torch.float64
    )
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    seg = torch.tensor([[0, 0, 1, -1]] * 7)
    out = combine(name, rewards=rewards, group=group, seg=seg, scale=scale)
    assert torch.equal(out[group != 1], torch.zeros(5, 4, dtype=torch.float64))
    assert (out[3:5, :3] != 0).all()


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_padding_is_exactly_zero_and_dtype_kept(name, scale):
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(6, 3, generator=g)  # float32
    seg = torch.randint(-1, 2, (6, 9), generator=g)
    out = combine(name, rewards=rewards, weights=W.float(), group=torch.tensor([0, 0, 1, 1, 2, 2]), seg=seg,
                  scale=scale)
    assert out.dtype == torch.float32 and out.shape == (6, 9)
    assert torch.equal(out[seg == -1], torch.zeros_like(out[seg == -1]))


@pytest.mark.parametrize("name", ALL)
def test_every_combiner_ranks_the_format_failure_last(name):
    out = combine(name)
    per_row = out[:3, 0]  # token 0 is a completion token of every row
    assert per_row[2] < per_row[1] and per_row[2] < per_row[0]


# --------------------------------------------------------------------------- validation


BAD = [
    (dict(names=["correctness", "brier"]), ValueError, "K=3 components but names has 2"),
    (dict(names=["correctness", "brier", "brier"]), ValueError, "names repeat"),
    (dict(weights=W[:2]), ValueError, r"weights must be a float tensor \[K=3\]"),
    (dict(weights=torch.tensor([1, 1, 1])), ValueError, "weights must be a float tensor"),
    (dict(weights=torch.tensor([1.0, math.inf, 0.5], dtype=torch.float64)), ValueError, "weights hold a non-finite"),
    (dict(rewards=R.long()), ValueError, "rewards must be a float tensor"),
    (dict(rewards=R[:, 0]), ValueError, "rewards must be a float tensor"),
    (dict(rewards=torch.where(R == -1, math.nan, R)), ValueError, r"non-finite value \(components \['brier'\]\)"),
    (dict(rewards=R.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(math.inf, dtype=torch.float64))),
     ValueError, r"non-finite value \(components \['correctness'\]\)"),
    (dict(group=GROUP[:4]), ValueError, r"group_index must be an integer tensor \[N=5\]"),
    (dict(group=GROUP.double()), ValueError, "group_index must be an integer tensor"),
    (dict(seg=SEG[:4]), ValueError, r"segments must be an integer tensor \[N=5, L\]"),
    (dict(seg=SEG.double()), ValueError, "segments must be an integer tensor"),
    (dict(seg=SEG + 1), ValueError, "segments must hold only -1"),
    (dict(group=torch.tensor([0, 0, 0, 1, 2])), ValueError, r"groups \[1, 2\] have a single completion"),
    (dict(std_floor=-1e-4), ValueError, "std_floor must be > 0"),
    (dict(std_floor=0.0), ValueError, "std_floor must be > 0"),
    (dict(names=["correctness", "bier", "format"]), KeyError, "known components: abstention, brier, correctness"),
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kw, err, match", BAD)
def test_invalid_inputs_raise(name, kw, err, match):
    with pytest.raises(err, match=match):
        combine(name, **kw)


# --------------------------------------------------------------------------- segment_ids


@pytest.fixture(scope="module")
def tok():
    return load_policy(tiny_spec())[1]


def _batch(tok, texts, eos=False, pad=2):
    """Tokenised completions, right-padded with ``pad`` pad tokens (mask 0) beyond the longest."""
    rows = [tok(t, add_special_tokens=False).input_ids + ([EOS] if eos else []) for t in texts]
    length = max(map(len, rows)) + pad
    ids = torch.full((len(rows), length), EOS)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _pieces(tok, ids, seg, which):
    return tok.decode(ids[seg == which].tolist(), skip_special_tokens=True)


# (text, EOS appended, decode of segment 0, decode of segment 1, token that must exist)
SEGMENT_CASES = [
    pytest.param(
        "<think>ok</think><answer>12345</answer><confidence>0.8</confidence>",
        False,
        "<think>ok</think><answer>12345</answer><",  # '><' straddles the boundary: segment 0
        "confidence>0.8</confidence>",
        "><",
        id="merged-><-and-digits-split",
    ),
    pytest.param(
        "<think>a</think> <answer> 42 </answer>\n<confidence> 0.8 </confidence>",
        True,
        "<think>a</think> <answer> 42 </answer>",
        "\n<confidence> 0.8 </confidence>",  # and the trailing EOS, past the boundary
        " </",
        id="whitespace-around-tags",
    ),
    pytest.param(
        "<answer>x</answer>><confidence>1</confidence>",
        False,
        "<answer>x</answer>>",  # '>>' straddles
        "<confidence>1</confidence>",
        ">>",
        id="stray->-merged-with-closing-tag",
    ),
    pytest.param(
        "<think>maybe <answer>3</answer>?</think><answer>4</answer>.<confidence>0.9</confidence>",
        False,
        "<think>maybe <answer>3</answer>?</think><answer>4</answer>",  # the tag inside think is not it
        ".<confidence>0.9</confidence>",
        ".<",
        id="answer-tag-inside-think",
    ),
    pytest.param(
        "<answer>é</answer>🙂<confidence>0.5</confidence>",
        True,
        "<answer>é</answer>",
        "🙂<confidence>0.5</confidence>",  # the emoji's bytes span two tokens, both in segment 1
        "é",
        id="multi-byte-characters",
    ),
]


@pytest.mark.parametrize("text, eos, seg0, seg1, token", SEGMENT_CASES)
def test_segment_ids_on_real_tokenizer(tok, text, eos, seg0, seg1, token):
    ids, mask = _batch(tok, [text], eos=eos)
    assert token in [tok.decode([i]) for i in ids[0][mask[0] == 1].tolist()]  # the tricky token exists
    parsed = parse_completion(text)
    assert parsed.format_ok
    seg = segment_ids(tok, ids, mask, [text], [parsed])
    assert _pieces(tok, ids[0], seg[0], 0) == seg0
    assert _pieces(tok, ids[0], seg[0], 1) == seg1
    assert torch.equal(seg[0][mask[0] == 0], torch.full((2,), -1))
    # segments are a run of 0s then a run of 1s
    tokens = seg[0][mask[0] == 1]
    assert torch.equal(tokens, tokens.sort().values)
    if eos:
        assert tokens[-1] == 1


def test_segment_ids_without_answer_or_confidence(tok):
    texts = ["Let me think. The answer is 7.", "<answer>5</answer>", "<answer>5</answer> then I stop"]
    ids, mask = _batch(tok, texts, eos=True)
    parsed = [parse_completion(t) for t in texts]
    assert parsed[0].answer_span is None and not parsed[1].format_ok
    seg = segment_ids(tok, ids, mask, texts, parsed)
    # No answer: every token 0. Answer then EOS: the EOS covers no character and ends at the
    # boundary, so it is segment 0 too and the row has no segment 1 (blamed as a whole).
    for i in (0, 1):
        assert torch.equal(seg[i], torch.where(mask[i] == 1, 0, -1))
    # Text after the answer without a confidence is segment 1 (where the confidence should be).
    assert _pieces(tok, ids[2], seg[2], 1) == " then I stop"


def test_segment_ids_feed_segment_combiner(tok):
    # One group of two well-formed, correct completions that differ only in stated confidence:
    # the whole advantage lands on the confidence part, none on the reasoning+answer.
    texts = ["<answer>4</answer><confidence>0.9</confidence>", "<answer>4</answer><confidence>0.5</confidence>"]
    ids, mask = _batch(tok, texts, eos=True)
    parsed = [parse_completion(t) for t in texts]
    seg = segment_ids(tok, ids, mask, texts, parsed)
    rewards = torch.tensor([[1.0, -((p.confidence - 1) ** 2), 1.0] for p in parsed], dtype=torch.float64)
    adv = COMBINERS.get("segment")(rewards, NAMES, W, torch.zeros(2, dtype=torch.long), seg)
    assert torch.equal(adv[seg != 1], torch.zeros_like(adv[seg != 1]))
    # G=2, std-scaled: +-1/sqrt(2) on every segment-1 token (row 0 is the better calibrated).
    torch.testing.assert_close(adv[0][seg[0] == 1], torch.full_like(adv[0][seg[0] == 1], 1 / math.sqrt(2)))
    torch.testing.assert_close(adv[1][seg[1] == 1], torch.full_like(adv[1][seg[1] == 1], -1 / math.sqrt(2)))


def test_segment_ids_errors(tok):
    texts = ["<answer>4</answer><confidence>0.9</confidence>"]
    ids, mask = _batch(tok, texts)
    parsed = [parse_completion(texts[0])]
    with pytest.raises(ValueError, match="1 completions but 2 texts"):
        segment_ids(tok, ids, mask, texts * 2, parsed)
    with pytest.raises(ValueError, match="must be one"):
        segment_ids(tok, ids, mask[:, :-1], texts, parsed)
    with pytest.raises(ValueError, match="not the decode"):
        segment_ids(tok, ids, mask, ["<answer>5</answer><confidence>0.9</confidence>"], parsed)
    with pytest.raises(ValueError, match="no </ans> after answer span"):
        segment_ids(tok, ids, mask, texts, parsed, answer_tag="ans")
