"""Abstention: parsing, verdicts, the abstention reward, unanswerable data, reports (issue 4)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from calibrl.data import build_splits
from calibrl.data.prompts import PromptBuilder
from calibrl.data.sources import Example
from calibrl.data.unanswerable import make_unanswerable
from calibrl.config import EvalConfig
from calibrl.eval.evaluator import _summarize, EvalResult
from calibrl.objectives import COMBINERS
from calibrl.data.format import CompletionFormat
from calibrl.rewards import RewardFunction, parse_completion
from calibrl.rewards.scoring import score_completions, verdict

FMT = CompletionFormat(abstain="I don't know")
ABSTAIN_WEIGHTS = {"correctness": 1.0, "brier": 1.0, "format": 0.5, "abstention": 0.25}  # conf/reward/rlcr_abstain


def completion(answer: str, q: str = "0.5") -> str:
    return f"<think>hm</think><answer>{answer}</answer><confidence>{q}</confidence>"


def example(answer: str = "7", unanswerable: bool = False) -> Example:
    return Example(id="e", question="3 + 4 =", answer=answer, fields={"unanswerable": unanswerable})


def exact(answer: str | None, ex: Example) -> bool:
    return answer == ex.answer


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("answer", ["I don't know", "i don't know", "  I  don't\nknow. ", "I DON'T KNOW."])
def test_abstain_phrase_matches_after_normalisation(answer):
    p = parse_completion(completion(answer), FMT)
    assert p.format_ok and p.abstained


@pytest.mark.parametrize("answer", ["I don't know 7", "7", "I do not know", "I don't know.."])
def test_other_answers_do_not_abstain(answer):
    assert not parse_completion(completion(answer), FMT).abstained


def test_no_abstention_without_a_phrase_and_none_on_a_format_failure():
    assert not parse_completion(completion("I don't know")).abstained  # abstention off
    failed = parse_completion(completion("I don't know", q="sure"), FMT)
    assert not failed.format_ok and not failed.abstained


@pytest.mark.parametrize("phrase", ["", "  ", " . "])
def test_blank_abstain_phrase_rejected(phrase):
    with pytest.raises(ValueError, match="non-blank"):
        CompletionFormat(abstain=phrase)


# --------------------------------------------------------------------------- verdict and rewards


@pytest.mark.parametrize(
    ("text", "unanswerable", "expected"),
    [
        (completion("7"), False, True),  # right answer
        (completion("8"), False, False),  # wrong answer
        (completion("I don't know"), False, False),  # abstention on an answerable question
        (completion("7", q="x"), False, False),  # format failure
        (completion("I don't know"), True, True),  # abstention on an unanswerable question
        (completion("7"), True, False),  # any answer to an unanswerable question (verifier not run)
        (completion("I don't know", q="x"), True, False),  # format failure
    ],
)
def test_verdict_table(text, unanswerable, expected):
    ex = example(unanswerable=unanswerable)

    def verifier(answer, e):
        assert not e.unanswerable, "the verifier must not run on an unanswerable question"
        return exact(answer, e)

    assert verdict(parse_completion(text, FMT), ex, verifier) is expected


def test_rlcr_abstain_hand_computed_totals():
    cases = [
        # (completion, unanswerable, total): correctness + brier + 0.5 format + 0.25 abstention
        (completion("I don't know", "0"), False, 0 - 0.0 + 0.5 + 0.25),  # 0.75
        (completion("I don't know", "0.4"), False, 0 - 0.16 + 0.5 + 0.25),  # 0.59
        (completion("7", "0.8"), False, 1 - 0.04 + 0.5),  # 1.46
        (completion("8", "0.8"), False, 0 - 0.64 + 0.5),  # -0.14
        (completion("I don't know", "0.9"), True, 1 - 0.01 + 0.5),  # 1.49: the correct response
        (completion("7", "0.9"), True, 0 - 0.81 + 0.5),  # -0.31
        (completion("I don't know", "x"), False, 0 - 1 + 0 + 0),  # format failure: -1
    ]
    parsed, rewards = score_completions(
        [c[0] for c in cases], [example(unanswerable=c[1]) for c in cases], exact, RewardFunction(ABSTAIN_WEIGHTS), FMT
    )
    np.testing.assert_allclose(rewards.total, [c[2] for c in cases], atol=1e-12)
    np.testing.assert_array_equal(rewards.components["abstention"], [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rewards.correct, [0, 0, 1, 0, 1, 0, 0])


@pytest.mark.parametrize(("p", "abstain_better"), [(0.3, True), (0.49, True), (0.51, False), (0.9, False)])
def test_calibrated_policy_abstains_below_sqrt_of_the_abstention_weight(p, abstain_better):
    # Answering with calibrated q = p: E = p * (1 - (1-p)^2) + (1-p) * (0 - p^2) = p^2.
    # Abstaining with q = 0 earns 0.25 (format is paid either way). sqrt(0.25) = 0.5.
    rf = RewardFunction(ABSTAIN_WEIGHTS)
    q = f"{p}"
    _, r = score_completions([completion("7", q), completion("8", q), completion("I don't know", "0")],
                             [example()] * 3, exact, rf, FMT)
    answer_value = p * r.total[0] + (1 - p) * r.total[1]
    assert answer_value == pytest.approx(p**2 + 0.5, abs=1e-12)
    assert bool(r.total[2] > answer_value) is abstain_better


@pytest.mark.parametrize("w", [1.0, 1.5])
def test_abstention_weight_must_stay_below_correctness(w):
    with pytest.raises(ValueError, match="abstaining pays at least as much as a right answer"):
        RewardFunction({**ABSTAIN_WEIGHTS, "abstention": w})


def test_negative_abstention_weight_is_refused_for_what_it_does():
    # Besides the format term, abstaining at confidence 0 totals w (its Brier term is 0) and a
    # wrong answer at confidence 0 totals 0: with w < 0 abstaining scores below a wrong answer.
    with pytest.raises(ValueError) as err:
        RewardFunction({**ABSTAIN_WEIGHTS, "abstention": -0.1})
    assert str(err.value) == ("reward.weights.abstention=-0.1 must be >= 0 (a negative weight makes abstaining "
                              "score below a wrong answer)")


def test_segment_combiner_puts_the_abstention_advantage_before_the_answer_closes():
    # Only the abstention component differs: 0.25 * [1, 0] -> mean 0.125, unbiased std
    # sqrt(2 * 0.125^2 / 1) = 0.17678 -> advantages +-0.70711 on segment 0, none on segment 1.
    rewards = torch.tensor([[0.0, -0.25, 1.0, 1.0], [0.0, -0.25, 1.0, 0.0]])
    names = ["correctness", "brier", "format", "abstention"]
    segments = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 1, -1, -1]])
    adv = COMBINERS.get("segment")(rewards, names, torch.tensor([1.0, 1.0, 0.5, 0.25]), torch.tensor([0, 0]), segments)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0, 0, 0], [-a, -a, 0, 0, 0]]))


# --------------------------------------------------------------------------- unanswerable data


def _rows(n: int) -> list[Example]:
    return [Example(id=f"r{i}", question=f"Compute: {i} + 1{i} - 3 =", answer=str(2 * i + 7)) for i in range(n)]


def test_make_unanswerable_replaces_exactly_one_operand():
    rows = _rows(10)
    out = make_unanswerable(rows, 0.5, seed=3)
    flagged = [e for e in out if e.unanswerable]
    assert len(flagged) == 5 and all(e.fields["unanswerable"] is False for e in out if not e.unanswerable)
    for before, after in zip(rows, out):
        assert (after.id, after.answer, after.slice) == (before.id, before.answer, before.slice)
        if after.unanswerable:
            nums_before = re.findall(r"\d+", before.question)
            nums_after = re.findall(r"\d+", after.question)
            assert len(nums_after) == len(nums_before) - 1 and after.question.count("x") == 1
            assert after.meta["answerable_question"] == before.question
        else:
            assert after.question == before.question
    assert [e.question for e in make_unanswerable(rows, 0.5, seed=3)] == [e.question for e in out]
    assert [e.question for e in make_unanswerable(rows, 0.5, seed=4)] != [e.question for e in out]


def test_make_unanswerable_fraction_zero_is_the_identity_and_bad_input_raises():
    rows = _rows(4)
    assert make_unanswerable(rows, 0.0, seed=0) == rows
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        make_unanswerable(rows, 1.5, seed=0)
    with pytest.raises(ValueError, match="no number to remove"):
        make_unanswerable([Example(id="w", question="Spell cat.", answer="c a t")], 1.0, seed=0)


def test_reasoning_gym_eval_split_with_unanswerable_items():
    splits = build_splits(
        "reasoning_gym", name="cs", task="chain_sum", train_size=20, eval_size=40, train_seed=1, eval_seed=2,
        task_kwargs={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
        unanswerable={"eval_fraction": 0.25},
    )
    assert sum(e.unanswerable for e in splits.eval) == 10  # round(0.25 * 40)
    assert not any(e.unanswerable for e in splits.train)
    for e in splits.eval:
        expr = e.question.rsplit(":", 1)[1]
        assert ("x" in expr) is e.unanswerable


@pytest.mark.parametrize(("flag", "expected"), [(True, True), (1, True), (0, False), (False, False)])
def test_unanswerable_flag_values(flag, expected):
    assert Example(id="a", question="?", answer="1", fields={"unanswerable": flag}).unanswerable is expected


def test_hf_table_flags_its_own_unanswerable_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"question": f"What is {i} + y?" if i % 2 else f"What is {i} + 1?", "answer": str(i + 1),
             "unanswerable": bool(i % 2)} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {"question": "question", "answer": "answer", "id": None, "slice": None}
    splits = build_splits("hf", name="t", path=str(path), train_size=5, eval_size=4, train_seed=0, eval_seed=1,
                          fields=fields)
    for e in (*splits.train, *splits.eval):
        assert e.unanswerable is ("y" in e.question)
    path.write_text(path.read_text().replace("true", '"maybe"', 1))
    with pytest.raises(ValueError, match="field 'unanswerable' must be true/false or 0/1, got 'maybe'"):
        build_splits("hf", name="t", path=str(path), train_size=5, eval_size=4, train_seed=0, eval_seed=1,
                     fields=fields)


class _FakeTokenizer:
    chat_template = "{{ messages }}"
    eos_token = "<eos>"


def test_sft_demonstrates_the_abstain_phrase_on_unanswerable_items():
    demo = PromptBuilder(_FakeTokenizer(), "sys", FMT).demonstration(example(unanswerable=True), 0.9)
    p = parse_completion(demo, FMT)
    assert p.abstained and p.confidence == 0.9
    with pytest.raises(ValueError, match="prompt.abstain_phrase is unset"):
        PromptBuilder(_FakeTokenizer(), "sys").demonstration(example(unanswerable=True), 0.9)


# --------------------------------------------------------------------------- eval report


def test_eval_report_and_scalars_carry_abstention_metrics():
    def row(qid, sample, answer, correct, abstained=False, unanswerable=False):
        return {"dataset": "d", "id": qid, "sample": sample, "slice": "a", "fields": {}, "question": "?",
                "reference": "1", "completion": "...", "answer": answer, "format_ok": True, "error": None,
                "correct": correct, "confidence": 0.5, "answer_prob": None, "lowest_window_prob": None,
                "abstained": abstained, "unanswerable": unanswerable}

    rows = [
        row("q1", 0, "1", 1), row("q1", 1, "I don't know", 0, abstained=True),  # over-abstention
        row("q2", 0, "5", 0), row("q2", 1, "6", 0),  # unknown question, both answered: under
        row("q3", 0, "I don't know", 1, True, True), row("q3", 1, "2", 0, unanswerable=True),
    ]
    settings = EvalConfig(n_bootstrap=0, n_samples=2, do_sample=True, seed=0)
    report = _summarize(rows, settings, "d", abstention=True)
    # rate 2/6; over: 1 of 4 answerable rows abstains on solved q1; under: rows of q2 and q3
    # answered (3 of 4); selective accuracy: 1 right of the 3 answered answerable rows.
    expected = {"rate": 2 / 6, "answer_rate": 4 / 6, "selective_accuracy": 1 / 3, "over": 1 / 4, "under": 3 / 4,
                "unanswerable_recall": 1 / 2, "unanswerable_fraction": 2 / 6}
    assert report["abstention"] == pytest.approx(expected)
    scalars = EvalResult("d", rows, report).scalars()
    assert scalars["abstain/over"] == pytest.approx(0.25) and scalars["abstain/rate"] == pytest.approx(1 / 3)
    assert "abstention" not in _summarize(rows, settings, "d")
    by_flag = _summarize(rows, EvalConfig(n_bootstrap=0, n_samples=2, do_sample=True, seed=0, slice_by=["unanswerable"]), "d")
    assert {k: v["count"] for k, v in by_flag["slices"]["unanswerable"].items()} == {"False": 4, "True": 2}


def test_every_set_can_be_sliced_by_the_unanswerable_flag():
    plain = Example(id="p", question="1 + 1 =", answer="2")  # no such field: answerable
    assert plain.field_value("unanswerable") == "False"
    assert example(unanswerable=True).field_value("unanswerable") == "True"


# --------------------------------------------------------------------------- config and a tiny run


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from calibrl.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["reward=rlcr_abstain"], "reward.weights.abstention needs prompt.abstain_phrase"),
        (["data.unanswerable.train_fraction=0.1"], "train_fraction > 0 needs prompt.abstain_phrase"),
        (["experiment=abstain", "prompt.abstain_phrase=' '"], "non-blank"),
        (["experiment=abstain", "reward.weights.abstention=1.0"], "abstaining pays at least as much"),
    ],
)
def test_inconsistent_abstention_settings_fail_at_start_up(overrides, match):
    from calibrl.config import ConfigError
    from calibrl.run.validate import validate

    with pytest.raises(ConfigError, match=match):
        validate(_compose(["model=tiny", "debug=default", *overrides]))


def test_tiny_abstain_run_logs_abstention(tmp_path):
    from calibrl.run.pipeline import run

    # half the training rows unanswerable, so the 8 SFT demonstrations include abstentions
    cfg = _compose(["experiment=abstain", "model=tiny", "debug=default", "data.unanswerable.train_fraction=0.5",
                    "data.unanswerable.eval_fraction=0.5"])
    run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/rl_step" in r]
    assert len(train) == 2
    for r in train:
        assert 0.0 <= r["train/abstain/rate"] <= 1.0 and "rewards/abstention/mean" in r
    final = [r for r in records if "eval/chain_sum/abstain/unanswerable_fraction" in r][-1]
    assert final["eval/chain_sum/abstain/unanswerable_fraction"] == 0.5  # round(0.5 * 8) of 8 rows
    preds = [json.loads(line) for line in (tmp_path / "eval_final.jsonl").read_text().splitlines()]
    assert sum(p["unanswerable"] for p in preds) == 4
    for p in preds:
        assert not (p["unanswerable"] and p["correct"] and not p["abstained"])
