"""Fuzzing the reward path: arbitrary text (unicode digits, nested and unclosed tags, tags echoed
from the prompt, thousands of tags, megabyte strings, NUL bytes, lone surrogates) thrown at the
parser and at ``score_completions`` under every shipped reward config. Neither raises, each
returns within a time bound, every reward is finite, and a malformed completion never scores
above a well-formed one."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from calibrl.data.sources import DataSplits, Example, exact_match
from calibrl.data.format import CompletionFormat
from calibrl.rewards import RewardFunction, VerifierGuard, parse_completion
from calibrl.rewards.scoring import score_completions
from helpers import REPO

CONF_REWARD = REPO / "conf" / "reward"
WEIGHTS = {p.stem: dict(OmegaConf.load(p).weights) for p in sorted(CONF_REWARD.glob("*.yaml"))}
ABSTAIN = "I don't know"
FMT = CompletionFormat(abstain=ABSTAIN)
EXAMPLES = [Example("a", "What is 7 + 8?", "15"), Example("u", "What is 7 + x?", "15", fields={"unanswerable": True})]
SPLITS = DataSplits("fuzz", EXAMPLES, EXAMPLES, exact_match)

PARSE_BOUND_S = 1.0  # one completion of up to ~1 MB; the parser is linear (ms per MB)
SCORE_BOUND_S = 10.0  # a batch of such completions, verifier round trips included

TAGS = [f"<{c}{t}>" for t in ("think", "analysis", "answer", "confidence") for c in ("", "/")]
FRAGMENTS = TAGS + [
    "15", "14", "0.9", "0", "1", ".5", "85%", "100%", "1e-3", "-0.1", "1.0000001", "nan", "inf", "3/4", "high",
    "١٥", "٠.٩", "０.９", "½", "⁹", "𝟗",  # digits of other scripts, superscripts, math digits
    ABSTAIN, "\x00", "\u200b", "\ufeff", "\ud800", " ", "\n", "\t", "<", ">", "/", ".", "%",
    "<think", "answer>", "</", "<<answer>>", "<ANSWER>", "< answer>",
    "Reply as <answer>…</answer><confidence>…</confidence>.",  # the prompt's instructions echoed
]


@st.composite
def completions(draw) -> str:
    """Fragments and free text, sometimes repeated up to ~1 MB."""
    parts = draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=20)), max_size=24))
    unit = "".join(parts)
    if unit and draw(st.booleans()):
        unit *= draw(st.integers(1, max(1, 1_000_000 // len(unit))))
    return unit


def _well_formed(answer: str, q: str) -> str:
    return f"<think>x</think><answer>{answer}</answer><confidence>{q}</confidence>"


@st.composite
def batches(draw) -> list[str]:
    """A batch mixing fuzzed completions with well-formed ones, so the ranking check has both."""
    fuzzed = draw(st.lists(completions(), min_size=1, max_size=4))
    formed = draw(st.lists(st.builds(_well_formed, st.sampled_from(["15", "14", ABSTAIN, "x" * 9000]),
                                     st.sampled_from(["0", "0.3", "1", "85%"])), min_size=1, max_size=3))
    return draw(st.permutations(fuzzed + formed))


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(completions())
def test_parser_never_raises_and_returns_in_bounded_time(text):
    t0 = time.perf_counter()
    for fmt in (CompletionFormat(), FMT):
        p = parse_completion(text, fmt)
        if p.format_ok:
            assert p.error is None and p.answer and p.confidence is not None
            assert math.isfinite(p.confidence) and 0.0 <= p.confidence <= 1.0
        else:
            assert p.error and p.confidence is None and not p.abstained
    assert time.perf_counter() - t0 < 2 * PARSE_BOUND_S


@pytest.fixture(scope="module")
def reward_fns():
    fns = {name: RewardFunction(w, VerifierGuard(timeout_s=10.0, max_answer_chars=8192)) for name, w in WEIGHTS.items()}
    yield fns
    for rf in fns.values():
        rf.guard.close()


@FUZZ
@given(texts=batches(), unanswerable=st.lists(st.booleans(), min_size=8, max_size=8))
def test_rewards_are_finite_and_malformed_never_beats_well_formed(reward_fns, texts, unanswerable):
    examples = [EXAMPLES[int(u)] for u in unanswerable[: len(texts)]]
    for name, rf in reward_fns.items():
        t0 = time.perf_counter()
        parsed, batch = score_completions(texts, examples, SPLITS.is_correct, rf, FMT)
        assert time.perf_counter() - t0 < SCORE_BOUND_S, name
        assert np.all(np.isfinite(batch.total)), name
        ok = batch.format_ok
        assert np.all(batch.total[~ok] == rf.format_failure_total), name
        assert np.all(batch.total[ok] >= rf.lowest_well_formed), name
        if ok.any() and (~ok).any():
            assert batch.total[~ok].max() < batch.total[ok].min(), name
        assert batch.counters["rewards/verifier_timeouts"] == 0


# Inputs on which regular expressions with lazy blocks or adjacent \s* runs go quadratic or cubic
# (the parser before it became a linear scan took 5-60 s on each of the first four), plus other
# giants; name -> (completion, its total under reward=rlcr against the reference "15").
GIANTS = {
    "10k unclosed think": ("<think>" * 10_000, -1.0),
    "10k unclosed answers": ("<answer>" * 10_000 + "<confidence>0.5</confidence>", -1.0),
    "10k unclosed confidences": ("<answer>1</answer>" + "<confidence>" * 10_000, -1.0),
    "spaces inside the confidence": ("<answer>1</answer><confidence>0.5" + " " * 1_500 + "x</confidence>", -1.0),
    "1 MB of spaces inside the confidence": ("<answer>1</answer><confidence>0.5" + " " * 1_000_000 + "x</confidence>",
                                             -1.0),
    "1 MB of NUL": ("\x00" * 1_000_000, -1.0),
    # right at q 1: 1 - 0 + 0.5
    "1 MB think, then a right answer": ("<think>" + "7+8 " * 250_000 + "</think><answer>15</answer>"
                                        "<confidence>1</confidence>", 1.5),
    # the first </think> closes the block, the other 4999 are stray text; right at 0.5: 1 - 0.25 + 0.5
    "5k nested think": ("<think>" * 5_000 + "</think>" * 5_000 + "<answer>15</answer><confidence>0.5</confidence>",
                        1.25),
    "5k well-formed triples": (_well_formed("15", "0.9") * 5_000, -1.0),
    # over reward.max_answer_chars: wrong without a verifier call, at q 1: 0 - 1 + 0.5
    "1 MB answer": ("<answer>" + "9" * 1_000_000 + "</answer><confidence>1</confidence>", -0.5),
    "unicode digits, 20k times": ("<answer>١٥</answer><confidence>٠.٩</confidence>" * 20_000, -1.0),
}


@pytest.mark.parametrize("name", list(GIANTS))
def test_giant_inputs_parse_and_score_in_bounded_time(reward_fns, name):
    text, total = GIANTS[name]
    t0 = time.perf_counter()
    parse_completion(text)
    assert time.perf_counter() - t0 < PARSE_BOUND_S
    t0 = time.perf_counter()
    _, batch = score_completions([text, _well_formed("14", "1")], EXAMPLES[:1] * 2, SPLITS.is_correct,
                                 reward_fns["rlcr"])
    assert time.perf_counter() - t0 < SCORE_BOUND_S
    # the well-formed wrong answer at q 1 earns the least a well-formed completion can: 0 - 1 + 0.5
    assert batch.total.tolist() == [total, -0.5]


def test_giant_answer_is_capped_not_verified(reward_fns):
    _, batch = score_completions([GIANTS["1 MB answer"][0]], EXAMPLES[:1], SPLITS.is_correct, reward_fns["rlcr"])
    # well-formed, over reward.max_answer_chars: wrong without a verifier call; 0 - (1 - 0)^2 + 0.5
    assert batch.format_ok[0] and not batch.correct[0] and batch.total[0] == -0.5
    assert batch.counters["rewards/verifier_too_long"] == 1
