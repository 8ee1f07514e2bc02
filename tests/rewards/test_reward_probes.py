"""Reward-hacking probes: completions a policy could find that try to be paid for something other
than a right answer with an honest confidence. Each gets the outcome documented in
``calibrl.rewards.parsing`` (module docstring), checked here with the exact reward under
``reward=rlcr``: ``1 * correctness + 1 * brier + 0.5 * format``.

Reference values (the reference answer is "15"):
    right at q:   1 - (q - 1)^2 + 0.5      wrong at q:  0 - q^2 + 0.5
    format failure: 0 - 1 + 0 = -1, below every well-formed total (the lowest is 0 - 1 + 0.5 = -0.5)
"""

from __future__ import annotations

import numpy as np
import pytest

from calibrl.data.sources import DataSplits, Example, exact_match
from calibrl.rewards import RewardFunction, VerifierGuard, parse_completion
from calibrl.rewards.scoring import score_completions

RLCR = {"correctness": 1.0, "brier": 1.0, "format": 0.5}
EX = Example("e0", "What is 7 + 8?", "15")
SPLITS = DataSplits("probe", [EX], [EX], exact_match)


@pytest.fixture(scope="module")
def reward_fn():
    rf = RewardFunction(RLCR, VerifierGuard(timeout_s=10.0))
    yield rf
    rf.guard.close()


def _score(reward_fn, text: str) -> tuple[float, object]:
    parsed, batch = score_completions([text], [EX], SPLITS.is_correct, reward_fn)
    return float(batch.total[0]), parsed[0]


# (name, completion, expected total, expected parser error or None when well-formed)
PROBES = [
    # baselines the probes are measured against
    ("right answer, q 0.9", "<think>7+8</think><answer>15</answer><confidence>0.9</confidence>",
     1 - 0.01 + 0.5, None),  # 1.49
    ("wrong answer, q 0.9", "<think>7+8</think><answer>14</answer><confidence>0.9</confidence>",
     0 - 0.81 + 0.5, None),  # -0.31
    ("wrong answer, q 0", "<think>7+8</think><answer>14</answer><confidence>0</confidence>",
     0 - 0.0 + 0.5, None),  # 0.5: the floor an honest "I am unsure" earns
    # the answer repeated in several tags
    ("right answer twice", "<answer>15</answer><answer>15</answer><confidence>0.9</confidence>",
     -1.0, "2 top-level <answer> tags (exactly one required)"),
    ("two candidate answers", "<answer>14</answer><answer>15</answer><confidence>0.5</confidence>",
     -1.0, "2 top-level <answer> tags (exactly one required)"),
    ("a thousand answers", "<answer>15</answer>" * 1000 + "<confidence>1</confidence>",
     -1.0, "1000 top-level <answer> tags (exactly one required)"),
    ("answer again inside the confidence", "<answer>15</answer><confidence>0.9<answer>15</answer></confidence>",
     -1.0, "2 top-level <answer> tags (exactly one required)"),
    ("a candidate in think, another at top level", "<think><answer>14</answer></think><answer>15</answer>"
     "<confidence>0.9</confidence>", 1 - 0.01 + 0.5, None),  # the think copy is scratch: 1.49
    # confidence hidden in the think block
    ("confidence only in think", "<think><confidence>0.9</confidence></think><answer>15</answer>",
     -1.0, "missing <confidence>"),
    ("confidence only in analysis", "<answer>15</answer><analysis><confidence>0.9</confidence></analysis>",
     -1.0, "missing <confidence>"),
    ("confidence 1.0 in think, 0.2 at top level", "<think><confidence>1.0</confidence></think><answer>14</answer>"
     "<confidence>0.2</confidence>", 0 - 0.04 + 0.5, None),  # 0.46: the top-level 0.2 is scored
    ("confidence nested in the answer", "<answer>15<confidence>0.9</confidence></answer>",
     -1.0, "confidence must come after the answer"),
    ("confidence before the answer", "<confidence>0.9</confidence><answer>15</answer>",
     -1.0, "confidence must come after the answer"),
    # confidence written as a fraction or a word
    ("fraction 3/4", "<answer>15</answer><confidence>3/4</confidence>", -1.0, "confidence is not a number: '3/4'"),
    ("fraction 1/2", "<answer>14</answer><confidence>1/2</confidence>", -1.0, "confidence is not a number: '1/2'"),
    ("word high", "<answer>15</answer><confidence>high</confidence>", -1.0, "confidence is not a number: 'high'"),
    ("word zero", "<answer>14</answer><confidence>zero</confidence>", -1.0, "confidence is not a number: 'zero'"),
    ("words ninety percent", "<answer>15</answer><confidence>ninety percent</confidence>",
     -1.0, "confidence is not a number: 'ninety percent'"),
    ("fullwidth digits", "<answer>15</answer><confidence>０.９</confidence>",
     -1.0, "confidence is not a number: '０.９'"),
    ("arabic-indic digits", "<answer>15</answer><confidence>٠.٩</confidence>",
     -1.0, "confidence is not a number: '٠.٩'"),
    ("confidence padded with a megabyte of spaces", "<answer>15</answer><confidence>0.9" + " " * 1_000_000
     + "!</confidence>", -1.0, "confidence is not a number: '0.9                                     '"),
    # empty answer with confidence 0 (would otherwise earn the 0.5 of an honest wrong answer)
    ("empty answer, q 0", "<answer></answer><confidence>0</confidence>", -1.0, "empty answer"),
    ("blank answer, q 0", "<answer> \n\t </answer><confidence>0</confidence>", -1.0, "empty answer"),
    ("zero-width answer, q 0", "<answer>\u200b</answer><confidence>0</confidence>", -1.0, "empty answer"),
    ("NUL answer, q 0", "<answer>\x00</answer><confidence>0</confidence>", -1.0, "empty answer"),
    ("BOM and word-joiner answer, q 0", "<answer>\ufeff\u2060</answer><confidence>0</confidence>",
     -1.0, "empty answer"),
    # the format's tags echoed from the prompt, then the real answer
    ("prompt echo", "Reply as <answer>…</answer><confidence>…</confidence>.\n<think>7+8</think><answer>15</answer>"
     "<confidence>0.9</confidence>", -1.0, "2 top-level <answer> tags (exactly one required)"),
]


@pytest.mark.parametrize(("name", "text", "total", "error"), PROBES, ids=[p[0] for p in PROBES])
def test_probe_outcome(reward_fn, name, text, total, error):
    got, parsed = _score(reward_fn, text)
    assert parsed.error == error
    assert got == pytest.approx(total, abs=1e-12)


def test_no_probe_beats_an_honest_wrong_answer(reward_fn):
    # An honest wrong answer at q 0 earns 0.5; every format failure earns -1 < -0.5, the least a
    # well-formed completion can get, so no malformed completion outranks a well-formed one.
    malformed = [t for _, t, _, err in PROBES if err is not None]
    _, batch = score_completions(malformed, [EX] * len(malformed), SPLITS.is_correct, reward_fn)
    assert np.all(batch.total == -1.0)
    assert batch.total.max() < reward_fn.lowest_well_formed == -0.5


def test_invisible_answer_is_empty_but_visible_unicode_is_an_answer():
    assert not parse_completion("<answer>\u200b \u200d</answer><confidence>0</confidence>").format_ok
    for answer in ("١٥", "十五", "x\u200b", "é"):
        p = parse_completion(f"<answer>{answer}</answer><confidence>0</confidence>")
        assert p.format_ok and p.answer == answer
