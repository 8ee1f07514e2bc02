"""Data sources (reasoning-gym and `datasets` files), their verifiers, and the SFT confidence policies."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from calibrl.data import build_splits
from calibrl.data.prompts import CONFIDENCE_POLICIES
from calibrl.data.sources import DataSplits, Example, exact_match

# --------------------------------------------------------------------------- reasoning_gym

CHAIN_SUM_KWARGS = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def _chain_sum(**over):
    kwargs = dict(
        name="cs", task="chain_sum", train_size=200, eval_size=50, train_seed=1, eval_seed=2,
        task_kwargs=CHAIN_SUM_KWARGS, slice_fields=["num_terms", "num_digits"],
    )
    kwargs.update(over)
    return build_splits("reasoning_gym", **kwargs)


@pytest.fixture(scope="module")
def chain_sum() -> DataSplits:
    return _chain_sum()


def _terms(question: str) -> list[int]:
    """Signed terms of a chain_sum question: 'State ...: 12 - 3 + 40 =' -> [12, -3, 40]."""
    expr = question.rsplit(":", 1)[1].strip().rstrip("=").strip()
    tokens = expr.split()
    terms, sign = [int(tokens[0])], 1
    for tok in tokens[1:]:
        if tok in "+-":
            sign = 1 if tok == "+" else -1
        else:
            terms.append(sign * int(tok))
    return terms


def test_reasoning_gym_train_and_eval_are_disjoint(chain_sum):
    assert chain_sum.name == "cs"
    assert len(chain_sum.eval) == 50
    # train rows whose question is also an eval question are dropped, so train has <= 200 rows
    assert 0 < len(chain_sum.train) <= 200
    train_q = {e.question for e in chain_sum.train}
    eval_q = {e.question for e in chain_sum.eval}
    assert not train_q & eval_q
    assert len({e.id for e in chain_sum.eval}) == 50  # ids unique within the split
    assert all(e.id.startswith("eval-") for e in chain_sum.eval)
    assert all(e.id.startswith("train-") for e in chain_sum.train)


def test_reasoning_gym_slices_and_reference_answers_match_the_question(chain_sum):
    slice_re = re.compile(r"^num_terms=(\d),num_digits=(\d)$")
    seen = set()
    for e in chain_sum.train + chain_sum.eval:
        m = slice_re.match(e.slice)
        assert m, e.slice
        n_terms, n_digits = int(m.group(1)), int(m.group(2))
        terms = _terms(e.question)
        # e.g. '1 + 5 =' -> 2 terms, largest term 1 digit, answer 1 + 5 = 6
        assert len(terms) == n_terms
        assert max(len(str(abs(t))) for t in terms) == n_digits
        assert int(e.answer) == sum(terms)
        seen.add((n_terms, n_digits))
    # 2-3 terms x 1-2 digits: all four slices appear in 250 rows
    assert seen == {(2, 1), (2, 2), (3, 1), (3, 2)}


def test_reasoning_gym_verifier(chain_sum):
    for e in chain_sum.eval[:10]:
        assert chain_sum.is_correct(e.answer, e)
        assert chain_sum.is_correct(f"  {e.answer} ", e)
        assert not chain_sum.is_correct(str(int(e.answer) + 1), e)
        assert not chain_sum.is_correct(None, e)
        assert not chain_sum.is_correct("", e)


def test_reasoning_gym_is_deterministic(chain_sum):
    again = _chain_sum()

    def key(rows):
        return [(e.id, e.question, e.answer, e.slice) for e in rows]

    assert key(again.train) == key(chain_sum.train)
    assert key(again.eval) == key(chain_sum.eval)
    other = _chain_sum(train_seed=7)
    assert key(other.train) != key(chain_sum.train)
    assert key(other.eval) == key(chain_sum.eval)  # eval depends on eval_seed only


def test_reasoning_gym_unknown_task_lists_valid_tasks():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'chain_summ'") as err:
        _chain_sum(task="chain_summ")
    assert "chain_sum" in str(err.value).split("valid choices:")[1]
    assert "basic_arithmetic" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"min_terms": 5, "max_terms": 3}, {"bogus": 1}],
    ids=["min_above_max", "unknown_kwarg"],
)
def test_reasoning_gym_bad_task_kwargs(kwargs):
    with pytest.raises(ValueError, match="rejected data.task_kwargs"):
        _chain_sum(task_kwargs=kwargs, train_size=4, eval_size=2)


def test_reasoning_gym_unknown_slice_field_names_available_fields():
    with pytest.raises(KeyError) as err:
        _chain_sum(slice_fields=["num_terms", "n_digits"], train_size=4, eval_size=2)
    msg = str(err.value)
    assert "n_digits" in msg and "num_digits" in msg and "num_terms" in msg


def test_reasoning_gym_fields_for_slicing(chain_sum):
    e = chain_sum.eval[0]
    meta = e.meta["entry"]["metadata"]
    # the task name plus every scalar metadata value (the nested `difficulty` dict is left out)
    assert e.fields["task"] == "chain_sum" and e.fields["num_terms"] == meta["num_terms"]
    assert "difficulty" not in e.fields
    assert e.field_value("slice") == e.slice == f"num_terms={meta['num_terms']},num_digits={meta['num_digits']}"
    assert e.field_value("num_digits") == str(meta["num_digits"])
    with pytest.raises(KeyError, match="no field 'level'; available: slice, expression, num_digits"):
        e.field_value("level")


def test_reasoning_gym_eval_only_set():
    s = _chain_sum(train_size=0, eval_size=7)
    assert s.train == [] and len(s.eval) == 7


def test_is_correct_needs_a_full_score_and_survives_a_raising_verifier():
    e = Example(id="x", question="q", answer="a")
    half = DataSplits("d", [e], [e], lambda a, ex: 0.5)
    assert not half.is_correct("a", e)  # partial credit (0.5 < 1) is not correct
    full = DataSplits("d", [e], [e], lambda a, ex: 1)
    assert full.is_correct("anything", e)

    def boom(a, ex):
        raise RuntimeError("verifier crashed")

    assert not DataSplits("d", [e], [e], boom).is_correct("a", e)


# --------------------------------------------------------------------------- hf source

FIELDS = {"question": "q", "answer": "a", "id": "uid", "slice": "level"}


def _rows(n: int = 20) -> list[dict]:
    # question i: "What is i + 1?" -> answer i + 1; odd rows are "hard"
    return [
        {"q": f"What is {i} + 1?", "a": str(i + 1), "uid": f"u{i:02d}", "level": "hard" if i % 2 else "easy"}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf(path, **over):
    kwargs = dict(name="custom", path=str(path), train_size=100, eval_size=5, train_seed=0, eval_seed=1,
                  fields=FIELDS)
    kwargs.update(over)
    return build_splits("hf", **kwargs)


def test_hf_jsonl_maps_fields_and_holds_out_eval(tmp_path):
    rows = _rows(20)
    s = _hf(_write_jsonl(tmp_path / "d.jsonl", rows))
    by_uid = {r["uid"]: r for r in rows}
    assert len(s.eval) == 5
    assert len(s.train) == 15  # 20 rows, 5 held out, no duplicate questions
    assert {e.id for e in s.train} | {e.id for e in s.eval} == set(by_uid)
    assert not {e.id for e in s.train} & {e.id for e in s.eval}
    for e in s.train + s.eval:
        r = by_uid[e.id]
        assert (e.question, e.answer, e.slice) == (r["q"], r["a"], r["level"])
    assert not {e.question for e in s.train} & {e.question for e in s.eval}
    assert s.is_correct(" 3. ", Example("i", "What is 2 + 1?", "3"))


def test_hf_held_out_depends_on_eval_seed_and_train_size_cuts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(20))
    a, b = _hf(path), _hf(path)
    assert [e.id for e in a.eval] == [e.id for e in b.eval]
    assert [e.id for e in a.train] == [e.id for e in b.train]
    other = _hf(path, eval_seed=2)
    assert {e.id for e in other.eval} != {e.id for e in a.eval}
    small = _hf(path, train_size=3)
    assert len(small.train) == 3 and [e.id for e in small.eval] == [e.id for e in a.eval]


def test_hf_duplicate_questions_do_not_leak_into_train(tmp_path):
    # 10 questions, each written twice with different ids: 20 rows.
    rows = []
    for i in range(10):
        for copy in range(2):
            rows.append({"q": f"Capital of country {i}?", "a": f"city{i}", "uid": f"c{i}-{copy}", "level": "x"})
    s = _hf(_write_jsonl(tmp_path / "dup.jsonl", rows))
    eval_q = {e.question for e in s.eval}
    assert len(s.eval) == 5
    assert not {e.question for e in s.train} & eval_q
    # Every question whose copy was held out loses both copies from train:
    # train = 20 rows - 2 rows per distinct held-out question.
    assert len(s.train) == 20 - 2 * len(eval_q)
    # With 5 held-out rows of 10 questions, at least one held-out row's twin started on the train
    # side (5 rows cover 3..5 distinct questions, i.e. 6..10 rows), so the drop was exercised.
    assert len(eval_q) >= 3


def test_hf_missing_slice_and_id_fall_back(tmp_path):
    rows = [{"q": f"q{i}", "a": "x"} for i in range(6)]
    s = _hf(_write_jsonl(tmp_path / "bare.jsonl", rows), eval_size=2,
            fields={"question": "q", "answer": "a", "id": None, "slice": None})
    assert {e.slice for e in s.train + s.eval} == {"all"}
    assert all(re.fullmatch(r"train-\d", e.id) for e in s.train + s.eval)


@pytest.mark.parametrize("bad", [None, "  "], ids=["null", "blank"])
def test_hf_row_without_answer_names_file_row_and_field(tmp_path, bad):
    rows = _rows(6)
    rows[2]["a"] = bad
    path = _write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(ValueError) as err:
        _hf(path, eval_size=2)
    msg = str(err.value)
    # rows are numbered from 1 like file lines: the third line is row 3
    assert str(path) in msg and "row 3 (1-based)" in msg and "'answer'" in msg and "'a'" in msg


def test_hf_row_without_question_column(tmp_path):
    rows = _rows(4)
    del rows[3]["q"]
    with pytest.raises(ValueError, match=r"row 4 \(1-based\) has no value for field 'question'"):
        _hf(_write_jsonl(tmp_path / "noq.jsonl", rows), eval_size=1)


def test_hf_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _hf(tmp_path / "nope.jsonl")


def test_hf_missing_relative_file_path_is_file_not_found(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError(f"went to the Hub for {args[0]!r}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        _hf("data/nope.jsonl")


def test_hf_unsupported_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        _hf(tmp_path / "d.txt")


def test_hf_parquet(tmp_path):
    import datasets

    rows = _rows(10)
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    s = _hf(path, eval_size=3)
    assert len(s.eval) == 3 and len(s.train) == 7
    by_uid = {r["uid"]: r for r in rows}
    for e in s.train + s.eval:
        assert (e.question, e.answer, e.slice) == (by_uid[e.id]["q"], by_uid[e.id]["a"], by_uid[e.id]["level"])


def test_hf_unknown_verifier(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(6))
    with pytest.raises(KeyError, match="unknown verifier 'exactt'.*exact"):
        _hf(path, verifier="exactt")


def test_hf_fields_and_eval_only_set(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(3))
    s = _hf(path, eval_size=3, train_size=0)  # every row held out, none needed for training
    assert s.train == [] and len(s.eval) == 3
    e = next(e for e in s.eval if e.id == "u01")
    # the row's scalar columns other than question and answer
    assert dict(e.fields) == {"uid": "u01", "level": "hard"} and e.field_value("level") == "hard"


def test_hf_too_few_rows_for_both_splits(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(3))
    with pytest.raises(ValueError, match="0 train and 3 eval rows"):
        _hf(path, eval_size=5)


# --------------------------------------------------------------------------- exact verifier


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("Paris", "paris", 1.0),  # case-folded
        ("  Paris. ", "Paris", 1.0),  # surrounding spaces and a trailing period dropped
        ("New   York", "new york", 1.0),  # inner whitespace collapsed
        ("new\tyork\n", "New York", 1.0),
        ("42.", "42", 1.0),
        ("42", "42.", 1.0),  # symmetric: the reference is normalised too
        ("3.14", "3.14", 1.0),  # an inner period is kept
        ("3.14", "314", 0.0),
        ("42", "42.0", 0.0),  # exact, not numeric
        ("4 2", "42", 0.0),  # whitespace is collapsed, never removed
        ("Pariss", "Paris", 0.0),
        ("", "x", 0.0),
    ],
)
def test_exact_verifier(answer, reference, expected):
    assert exact_match(answer, Example("i", "q", reference)) == expected


@pytest.mark.parametrize("answer,reference", [(".5", "5"), ("5", ".5")])
def test_exact_verifier_keeps_leading_period(answer, reference):
    # 0.5 != 5: only a trailing period may be dropped
    assert exact_match(answer, Example("i", "q", reference)) == 0.0


# --------------------------------------------------------------------------- SFT confidence policies

GRID = {round(0.05 * k, 2) for k in range(1, 20)}  # 0.05, 0.10, ..., 0.95: 19 values


def test_constant_policy():
    policy = CONFIDENCE_POLICIES.get("constant")(value=0.7, random_fraction=0.9, grid_step=0.05)
    rng = random.Random(0)
    assert {policy(rng) for _ in range(200)} == {0.7}


def test_uniform_policy_covers_the_interior_grid():
    policy = CONFIDENCE_POLICIES.get("uniform")(grid_step=0.05)
    rng = random.Random(0)
    draws = [policy(rng) for _ in range(2000)]
    values = Counter(round(q, 10) for q in draws)
    assert set(values) == GRID  # never 0.0 or 1.0; all 19 interior points hit
    assert all(abs(q - round(q, 2)) < 1e-12 for q in draws)
    # expected 2000 / 19 ~ 105 per value; a seeded run stays well within [50, 170]
    assert all(50 <= c <= 170 for c in values.values())


def test_uniform_policy_with_coarser_grid():
    policy = CONFIDENCE_POLICIES.get("uniform")(grid_step=0.25)
    rng = random.Random(3)
    # 1 / 0.25 = 4 -> interior points 0.25, 0.5, 0.75
    assert {policy(rng) for _ in range(300)} == {0.25, 0.5, 0.75}


def test_mixed_policy_mostly_returns_the_constant():
    policy = CONFIDENCE_POLICIES.get("mixed")(value=0.5, random_fraction=0.25, grid_step=0.05)
    rng = random.Random(0)
    draws = [policy(rng) for _ in range(2000)]
    share = sum(q == 0.5 for q in draws) / len(draws)
    # P(0.5) = 0.75 + 0.25 * 1/19 (the uniform draw can land on 0.5 too) = 0.763; sd over 2000
    # draws = sqrt(0.763 * 0.237 / 2000) = 0.0095 -> [0.72, 0.81] is > 4 sd wide on each side.
    assert 0.72 <= share <= 0.81
    assert {round(q, 10) for q in draws} <= GRID
    assert len({round(q, 10) for q in draws}) > 10  # the random part explores the grid


def test_mixed_policy_extremes():
    rng = random.Random(0)
    never = CONFIDENCE_POLICIES.get("mixed")(value=0.3, random_fraction=0.0)
    assert {never(rng) for _ in range(100)} == {0.3}
    always = CONFIDENCE_POLICIES.get("mixed")(value=0.123, random_fraction=1.0)
    assert 0.123 not in {always(rng) for _ in range(100)}


def test_unknown_policy_lists_choices():
    with pytest.raises(KeyError, match="unknown SFT confidence policy 'gaussian'; valid choices: constant, mixed, uniform"):
        CONFIDENCE_POLICIES.get("gaussian")
