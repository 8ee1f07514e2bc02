"""Abstention metrics: hand-computed values, every NaN case and every input error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibrl.metrics.abstention import ABSTENTION_KEYS, abstention_metrics

T, F = True, False

# Three questions, 10 rows: (question_id, abstained, correct, format_ok, unanswerable).
ROWS = [
    ("A", F, 1, T, F),  # A answerable, solved: right answer
    ("A", T, 0, T, F),  #   abstains although a sibling solves A -> over-abstention
    ("A", F, 0, T, F),  #   wrong answer
    ("B", F, 0, T, F),  # B answerable, never solved (unknown): wrong answer -> under-abstention
    ("B", F, 0, F, F),  #   format failure
    ("B", F, 0, F, F),  #   format failure
    ("C", T, 1, T, T),  # C unanswerable (unknown): abstains (correct == abstained)
    ("C", T, 1, T, T),  #   abstains
    ("C", F, 0, T, T),  #   answers -> under-abstention
    ("C", F, 0, F, T),  #   format failure
]
EXPECTED = {
    "rate": 3 / 10,  # abstentions A2, C1, C2
    "answer_rate": 4 / 10,  # well-formed, not abstained: A1, A3, B1, C3
    "selective_accuracy": 1 / 3,  # answered on answerable A1, A3, B1; correct A1
    "over": 1 / 6,  # rows of answerable A, B = 6; abstained on solved A: A2
    "under": 2 / 7,  # rows of unknown B, C = 3 + 4; answered B1, C3
    "unanswerable_recall": 2 / 4,  # C rows 4; abstained C1, C2
    "unanswerable_fraction": 4 / 10,  # C rows
}


def call(rows):
    return abstention_metrics(*(list(col) for col in zip(*rows, strict=True)))


def check(got, expected):
    assert tuple(got) == ABSTENTION_KEYS
    for key in ABSTENTION_KEYS:
        if math.isnan(expected[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected[key], abs=1e-12), key
        assert isinstance(got[key], float)


def test_hand_computed_three_questions():
    check(call(ROWS), EXPECTED)


def test_row_order_and_id_type_do_not_matter():
    new_id = {"A": 7, "B": (1, 2), "C": None}
    order = np.random.default_rng(0).permutation(len(ROWS))
    ids, *flags = zip(*[(new_id[ROWS[i][0]], *ROWS[i][1:]) for i in order], strict=True)
    check(abstention_metrics(list(ids), *(np.array(f) for f in flags)), EXPECTED)


def test_over_counts_single_row_questions_in_the_denominator():
    # A (2 rows): correct, abstain -> solved, A2 over-abstains; B (1 row) abstains, unsolved.
    # over = 1 / 3 answerable rows; under: unknown B (1 row), not answered -> 0 / 1.
    got = call([("A", F, 1, T, F), ("A", T, 0, T, F), ("B", T, 0, T, F)])
    assert got["over"] == pytest.approx(1 / 3, abs=1e-12)
    assert got["under"] == 0.0


def test_all_format_failures():
    # A answerable, B unanswerable, 2 rows each, all malformed: nothing abstains or answers.
    # selective: no answered row -> NaN; over: 0 of the 2 answerable rows (A has 2 rows, so
    # defined); under: 0 answered of 4 unknown rows (A unsolved, B); recall: 0 of 2; fraction 2/4.
    rows = [("A", F, 0, F, F)] * 2 + [("B", F, 0, F, T)] * 2
    check(call(rows), {
        "rate": 0.0, "answer_rate": 0.0, "selective_accuracy": math.nan, "over": 0.0,
        "under": 0.0, "unanswerable_recall": 0.0, "unanswerable_fraction": 0.5,
    })


def test_nan_when_every_answerable_question_has_one_row():
    # A right, B abstains (unsolved), C unanswerable abstains. over undefined (single rows).
    # under: unknown B, C = 2 rows, none answered -> 0. selective: A1 only -> 1.
    got = call([("A", F, 1, T, F), ("B", T, 0, T, F), ("C", T, 1, T, T)])
    check(got, {
        "rate": 2 / 3, "answer_rate": 1 / 3, "selective_accuracy": 1.0, "over": math.nan,
        "under": 0.0, "unanswerable_recall": 1.0, "unanswerable_fraction": 1 / 3,
    })


def test_nan_when_all_solved_and_nothing_unanswerable():
    # A (2 rows) both right: no unknown question, no unanswerable row.
    got = call([("A", F, 1, T, F), ("A", F, 1, T, F)])
    check(got, {
        "rate": 0.0, "answer_rate": 1.0, "selective_accuracy": 1.0, "over": 0.0,
        "under": math.nan, "unanswerable_recall": math.nan, "unanswerable_fraction": 0.0,
    })


def test_nan_when_everything_is_unanswerable():
    # B (2 rows) unanswerable: one abstains, one answers. No answerable row at all.
    got = call([("B", T, 1, T, T), ("B", F, 0, T, T)])
    check(got, {
        "rate": 0.5, "answer_rate": 0.5, "selective_accuracy": math.nan, "over": math.nan,
        "under": 0.5, "unanswerable_recall": 0.5, "unanswerable_fraction": 1.0,
    })


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "empty"),
        ([("A", T, 0, F, F)], "abstained is True on a row whose format failed"),
        ([("A", F, 1, F, F)], "correct is 1 on a row whose format failed"),
        ([("A", F, 2, T, F)], "correct must hold only 0/1"),
        ([("A", F, 0.5, T, F)], "correct must hold only 0/1"),
        ([("A", 3, 0, T, F)], "abstained must hold only 0/1"),
        ([("A", F, 1, T, T)], "correct must equal abstained"),  # answered an unanswerable, "right"
        ([("A", T, 0, T, T)], "correct must equal abstained"),  # right abstention marked wrong
        ([("A", T, 1, T, F)], "answerable question is marked correct"),
        ([("A", F, 0, T, F), ("A", T, 1, T, T)], "constant within a question id"),
    ],
)
def test_invalid_rows_raise(rows, match):
    with pytest.raises(ValueError, match=match):
        call(rows) if rows else abstention_metrics([], [], [], [], [])


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="one length"):
        abstention_metrics(["A", "A"], [F, F], [0], [T, T], [F, F])
