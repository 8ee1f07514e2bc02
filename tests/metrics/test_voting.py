"""Test-time voting over n samples per question: hand-made groups with the expected winners and
aggregate confidences worked out in comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibrl.metrics.voting import VOTING_METHODS, aggregate, normalize_answer

NAN = math.nan


def one(method, answers, confidences, correct=None):
    """Aggregate a single question; returns (answer, confidence, correct, voted)."""
    correct = [0] * len(answers) if correct is None else correct
    res = aggregate(["q"] * len(answers), answers, confidences, correct, method)
    assert res.question_ids == ["q"]
    return res.answer[0], float(res.confidence[0]), int(res.correct[0]), bool(res.voted[0])


# --------------------------------------------------------------------------- normalize_answer


@pytest.mark.parametrize(
    "raw, key",
    [
        (" The  Answer. ", "the answer"),  # strip, collapse, casefold, drop the period
        ("PARIS\n", "paris"),
        ("12.", "12"),
        ("12..", "12."),  # only one trailing period goes
        ("12.0", "12.0"),  # not numerically normalised: "12" and "12.0" are separate votes
        ("Straße", "strasse"),  # casefold, not lower
    ],
)
def test_normalize_answer(raw, key):
    assert normalize_answer(raw) == key


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a str"):
        normalize_answer(12)


# --------------------------------------------------------------------------- the three methods


def test_registry_names():
    assert VOTING_METHODS.names() == ["best_of_n", "confidence_weighted", "majority"]


def test_methods_pick_different_answers_brief_example():
    answers, conf, correct = ["A", "A", "B"], [0.2, 0.2, 0.9], [1, 1, 0]
    # majority: A has 2 of 3 votes -> A, share 2/3
    assert one("majority", answers, conf, correct) == ("A", pytest.approx(2 / 3), 1, True)
    # weighted: A = 0.2 + 0.2 = 0.4, B = 0.9, total 1.3 -> B, 0.9 / 1.3
    assert one("confidence_weighted", answers, conf, correct) == ("B", pytest.approx(0.9 / 1.3), 0, True)
    # best of n: the 0.9 sample -> B, 0.9
    assert one("best_of_n", answers, conf, correct) == ("B", 0.9, 0, True)


def test_three_methods_three_winners():
    answers = ["A", "A", "A", "B", "B", "C"]
    conf = [0.1, 0.1, 0.1, 0.5, 0.5, 0.9]
    correct = [1, 1, 1, 0, 0, 0]
    # majority: A 3 votes of 6 -> share 0.5
    assert one("majority", answers, conf, correct) == ("A", 0.5, 1, True)
    # weighted: A 0.3, B 1.0, C 0.9; total 2.2 -> B, 1.0 / 2.2
    assert one("confidence_weighted", answers, conf, correct) == ("B", pytest.approx(1.0 / 2.2), 0, True)
    # best of n: C at 0.9
    assert one("best_of_n", answers, conf, correct) == ("C", 0.9, 0, True)


def test_votes_are_grouped_by_normalized_answer():
    answers = [" Paris.", "paris", "PARIS ", "12", "12.0"]
    conf = [0.1, 0.1, 0.1, 0.4, 0.4]
    # keys: paris x3 (weight 0.3), "12" (0.4), "12.0" (0.4): majority paris 3/5; weighted "12"
    # (0.4 beats 0.3, ties "12.0" and comes first), confidence 0.4 / 1.1
    assert one("majority", answers, conf) == (" Paris.", 0.6, 0, True)  # reported as first written
    assert one("confidence_weighted", answers, conf) == ("12", pytest.approx(0.4 / 1.1), 0, True)


def test_weighted_with_zero_total_weight_falls_back_to_counts():
    # weights 0, 0, 0: no preference -> plain majority: B 2 of 3
    assert one("confidence_weighted", ["A", "B", "B"], [0.0, 0.0, 0.0]) == ("B", pytest.approx(2 / 3), 0, True)


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize(
    "method, answers, conf, winner, agg",
    [
        ("majority", ["A", "B"], [0.3, 0.7], "A", 0.5),  # 1-1: A appears first; share 1/2
        ("majority", ["B", "A"], [0.3, 0.7], "B", 0.5),
        # A 0.5 vs B 0.25 + 0.25 = 0.5 exactly (binary fractions): first appearance wins; 0.5 / 1.0
        ("confidence_weighted", ["A", "B", "B"], [0.5, 0.25, 0.25], "A", 0.5),
        ("confidence_weighted", ["B", "A", "B"], [0.25, 0.5, 0.25], "B", 0.5),
        ("best_of_n", ["A", "B"], [0.8, 0.8], "A", 0.8),  # earliest sample of the maximum
        ("best_of_n", ["B", "A"], [0.8, 0.8], "B", 0.8),
        # tied samples 1 (B) and 2 (A): the earliest *sample* wins, though key A appeared first
        ("best_of_n", ["A", "B", "A"], [0.5, 0.8, 0.8], "B", 0.8),
    ],
)
def test_ties_go_to_first_appearance(method, answers, conf, winner, agg):
    assert one(method, answers, conf) == (winner, agg, 0, True)


def test_tie_order_counts_only_voting_samples():
    # The malformed "B" (no confidence) comes first but does not vote: voters are A, B -> 1-1 tie
    # -> A, the first *voting* key; share 1/2.
    assert one("majority", ["B", "A", "B"], [NAN, 0.5, 0.5]) == ("A", 0.5, 0, True)


# --------------------------------------------------------------------------- who votes


@pytest.mark.parametrize("method", ["majority", "confidence_weighted", "best_of_n"])
def test_malformed_samples_never_vote(method):
    # Sample 0 has no answer (but a high confidence), samples 1-3 an answer but no confidence.
    # Only sample 4 (B, 0.3) is well formed, so every method picks it; majority share 1/1,
    # weighted 0.3 / 0.3, best of n 0.3.
    answers = [None, "A", "A", "A", "B"]
    conf = [0.99, NAN, NAN, NAN, 0.3]
    correct = [1, 1, 1, 1, 0]
    res = aggregate(["q"] * 5, answers, conf, correct, method)
    expected = {"majority": 1.0, "confidence_weighted": 1.0, "best_of_n": 0.3}[method]
    assert res.answer == ["B"] and res.confidence.tolist() == [expected] and res.correct.tolist() == [0]
    assert res.n_samples.tolist() == [5] and res.n_votes.tolist() == [1] and res.voted.tolist() == [True]


@pytest.mark.parametrize("method", ["majority", "confidence_weighted", "best_of_n"])
def test_question_without_well_formed_sample_and_question_order(method):
    qids = ["q2", "q1", "q2", "q1"]
    answers = [None, "7", "A", "7"]
    conf = [0.9, 0.6, NAN, 0.6]
    correct = [1, 1, 1, 1]
    res = aggregate(qids, answers, conf, correct, method)
    assert res.question_ids == ["q2", "q1"]  # first-appearance order
    # q2: no sample has both an answer and a confidence -> no vote
    assert res.answer[0] is None and math.isnan(res.confidence[0]) and res.correct[0] == 0 and not res.voted[0]
    # q1: two votes for 7 -> majority 2/2, weighted 1.2/1.2, best 0.6
    assert res.answer[1] == "7" and res.correct[1] == 1 and res.voted[1]
    assert res.confidence[1] == pytest.approx({"majority": 1.0, "confidence_weighted": 1.0, "best_of_n": 0.6}[method])
    assert res.n_samples.tolist() == [2, 2] and res.n_votes.tolist() == [0, 2]
    assert res.correct.dtype == np.int64 and res.voted.dtype == bool


def test_correctness_comes_from_first_voting_sample_of_the_winning_key():
    # A case-sensitive verifier: "Paris" wrong, "paris" right; one key. The first *voting* sample
    # of the key is "Paris" (the malformed "paris" before it does not count) -> correct 0.
    answers, conf, correct = ["paris", "Paris", "paris"], [NAN, 0.5, 0.5], [1, 0, 1]
    assert one("majority", answers, conf, correct) == ("Paris", 1.0, 0, True)
    # best of n picks sample 2 ("paris", 0.7) but its key's first voter is sample 1 -> "Paris", 0
    assert one("best_of_n", ["x", "Paris", "paris"], [NAN, 0.5, 0.7], correct) == ("Paris", 0.7, 0, True)


# --------------------------------------------------------------------------- bad input


def test_unknown_method_lists_valid_ones():
    with pytest.raises(KeyError, match="valid choices: best_of_n, confidence_weighted, majority"):
        aggregate(["q"], ["A"], [0.5], [1], "plurality")


@pytest.mark.parametrize(
    "qids, answers, conf, correct, match",
    [
        (["q", "q"], ["A"], [0.5, 0.5], [1, 1], "one length"),
        (["q"], ["A"], [0.5], [1, 0], "one length"),
        ([], [], [], [], "empty input"),
        (["q"], ["A"], [1.5], [1], r"\[0, 1\] or be NaN"),
        (["q"], ["A"], [-0.1], [1], r"\[0, 1\] or be NaN"),
        (["q"], ["A"], [math.inf], [1], r"\[0, 1\] or be NaN"),
        (["q"], ["A"], ["high"], [1], "NaN or None where missing"),
        (["q"], ["A"], [0.5], [2], "0/1"),
        (["q"], ["A"], [0.5], [0.5], "0/1"),
        (["q"], [12], [0.5], [1], "str or None"),
        ([3], ["A"], [0.5], [1], "question_ids must all be str"),
    ],
)
def test_bad_input_raises(qids, answers, conf, correct, match):
    with pytest.raises(ValueError, match=match):
        aggregate(qids, answers, conf, correct, "majority")


def test_bool_correctness_is_accepted():
    assert one("majority", ["A"], [0.5], [True]) == ("A", 1.0, 1, True)


def test_none_confidence_means_missing():
    # ParsedCompletion.confidence is None on a format failure: such a sample does not vote, so
    # B (0.2) is the only vote even for best_of_n.
    assert one("best_of_n", ["A", "B"], [None, 0.2]) == ("B", 0.2, 0, True)


