"""Completion parser: every shared case, plus the policy rules of ``calibrl.rewards.parsing``."""

from __future__ import annotations

import math

import pytest
from helpers import case_id, load_cases

from calibrl.data.format import CompletionFormat
from calibrl.rewards.parsing import parse_completion, parse_confidence

PARSING_CASES = load_cases("confidence_parsing.jsonl")


def _wrap(conf: str, answer: str = "15") -> str:
    return f"<think>x</think><answer>{answer}</answer><confidence>{conf}</confidence>"


def _assert_consistent(p) -> None:
    """Invariants of every parse result."""
    if p.format_ok:
        assert p.error is None
        assert p.confidence is not None and 0.0 <= p.confidence <= 1.0
        assert p.answer  # non-empty
    else:
        assert isinstance(p.error, str) and p.error.strip(), "a format failure must give a reason"
        assert p.confidence is None, "a format failure must never carry a confidence"


# --------------------------------------------------------------------------- shared cases


def test_case_file_is_not_trivially_small():
    # Guards against an empty or truncated case file making the parametrized test vacuous.
    assert len(PARSING_CASES) >= 20
    assert len({case_id(r) for r in PARSING_CASES}) == len(PARSING_CASES), "case names must be unique"


@pytest.mark.parametrize("case", PARSING_CASES, ids=case_id)
def test_shared_case(case):
    p = parse_completion(case["text"])
    expect = case["expect"]
    assert p.format_ok is expect["format_ok"], p.error
    if "confidence" in expect:
        if expect["confidence"] is None:
            assert p.confidence is None
        else:
            assert p.confidence is not None, p.error
            assert abs(p.confidence - expect["confidence"]) <= 1e-9
    if not expect["format_ok"]:
        # The parsing policy (calibrl.rewards.parsing): a format failure counts whatever the tags say; never a confidence.
        assert p.confidence is None
    if expect.get("answer") is not None:
        assert p.answer is not None and p.answer.strip() == expect["answer"].strip()
    _assert_consistent(p)


# --------------------------------------------------------------------------- scratch blocks


def test_tags_inside_think_are_ignored():
    text = "<think><answer>9</answer><confidence>0.9</confidence></think><answer>15</answer><confidence>0.2</confidence>"
    p = parse_completion(text)
    assert p.format_ok, p.error
    assert p.answer == "15"
    assert p.confidence == 0.2


def test_tags_inside_analysis_are_ignored():
    text = "<think>x</think><answer>15</answer><analysis><confidence>0.9</confidence></analysis><confidence>0.4</confidence>"
    p = parse_completion(text)
    assert p.format_ok, p.error
    assert (p.answer, p.confidence) == ("15", 0.4)


def test_confidence_only_inside_think_is_a_format_failure():
    p = parse_completion("<think>I am <confidence>0.9</confidence> sure</think><answer>15</answer>")
    assert not p.format_ok
    assert p.confidence is None
    assert "confidence" in p.error
    # The answer itself was found; only the confidence is missing.
    assert p.answer == "15"


def test_answer_only_inside_think_is_a_format_failure():
    p = parse_completion("<think><answer>15</answer></think><confidence>0.5</confidence>")
    assert not p.format_ok
    assert p.answer is None and p.confidence is None
    assert "answer" in p.error


@pytest.mark.parametrize(
    "text",
    [
        "<think>never closed <answer>15</answer><confidence>0.5</confidence>",
        "<think>x</think><answer>15</answer><analysis>open<confidence>0.5</confidence>",
    ],
    ids=["think", "analysis"],
)
def test_unclosed_scratch_block_fails(text):
    p = parse_completion(text)
    assert not p.format_ok
    assert p.confidence is None
    assert "unclosed" in p.error


# --------------------------------------------------------------------------- tag structure


def test_duplicated_top_level_answer_fails():
    p = parse_completion("<think>x</think><answer>15</answer><answer>16</answer><confidence>0.5</confidence>")
    assert not p.format_ok
    assert p.confidence is None
    assert p.answer is None  # ambiguous: neither answer is reported
    assert "answer" in p.error


def test_duplicated_top_level_confidence_fails():
    p = parse_completion("<think>x</think><answer>15</answer><confidence>0.5</confidence><confidence>0.6</confidence>")
    assert not p.format_ok
    assert p.confidence is None
    assert "confidence" in p.error


def test_confidence_before_answer_fails():
    p = parse_completion("<think>x</think><confidence>0.5</confidence><answer>15</answer>")
    assert not p.format_ok
    assert p.confidence is None
    assert "after the answer" in p.error


def test_confidence_nested_in_answer_fails():
    p = parse_completion("<think>x</think><answer>15<confidence>0.5</confidence></answer>")
    assert not p.format_ok
    assert p.confidence is None


@pytest.mark.parametrize("inner", ["", "   ", "\n\t"], ids=["empty", "spaces", "newline-tab"])
def test_empty_answer_fails(inner):
    p = parse_completion(f"<think>x</think><answer>{inner}</answer><confidence>0.5</confidence>")
    assert not p.format_ok
    assert p.confidence is None
    assert p.error == "empty answer"


def test_answer_is_stripped():
    p = parse_completion("<think>x</think><answer>\n  15 \n</answer><confidence>0.5</confidence>")
    assert p.format_ok
    assert p.answer == "15"


def test_no_think_block_is_allowed():
    # The think block is scratch space, not a required tag.
    p = parse_completion("<answer>15</answer><confidence>0.5</confidence>")
    assert p.format_ok, p.error
    assert (p.answer, p.confidence) == ("15", 0.5)


def test_custom_tag_names():
    fmt = CompletionFormat(think="reasoning", answer="final", analysis="reflect", confidence="prob")
    text = "<reasoning><final>1</final></reasoning><final>2</final><reflect>hm</reflect><prob>0.25</prob>"
    p = parse_completion(text, fmt)
    assert p.format_ok, p.error
    assert (p.answer, p.confidence) == ("2", 0.25)
    # Under the default format the same text has no <answer>/<confidence> tags at all.
    assert not parse_completion(text).format_ok


# --------------------------------------------------------------------------- confidence values


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("50%", 0.5),  # 50 / 100
        ("0.5%", 0.005),  # 0.5 / 100
        (" 85 % ", 0.85),  # whitespace around the number and the sign
        ("0.5.", 0.5),  # one trailing period
        ("85%.", 0.85),
        ("1.", 1.0),
        ("+0.25", 0.25),
        ("2.5e-1", 0.25),  # 2.5 * 10^-1
        ("1e2%", 1.0),  # 100 / 100
        ("0", 0.0),
    ],
)
def test_confidence_accepted(conf, expected):
    p = parse_completion(_wrap(conf))
    assert p.format_ok, p.error
    assert abs(p.confidence - expected) <= 1e-12


@pytest.mark.parametrize(
    "conf",
    [
        "٠.٥",  # Arabic-Indic digits for 0.5: float() would read them, the policy does not
        "０.５",  # full-width digits
        "150%",  # 1.5 > 1
        "101%",
        "-5%",
        "1.5",  # bare number above 1 without '%'
        "2",
        "0.5..",  # "0.5." is 0.5 plus one trailing period; a second one is too many
        "0.5 0.6",
        "0,5",  # decimal comma
        "1/2",
        "0.5 (fairly sure)",
        "inf%",
        "1e400",  # overflows to inf
        "nan%",
        ".",
        "%",
        "0x1",
    ],
)
def test_confidence_rejected(conf):
    p = parse_completion(_wrap(conf))
    assert not p.format_ok, f"{conf!r} parsed as {p.confidence}"
    assert p.confidence is None
    assert isinstance(p.error, str) and p.error


def test_parse_confidence_direct():
    assert parse_confidence("0.85") == (0.85, None)
    assert parse_confidence("85%") == (0.85, None)
    q, reason = parse_confidence("150%")
    assert q is None and "outside" in reason
    q, reason = parse_confidence("85")
    assert q is None and "%" in reason  # the reason points at the fix
    q, reason = parse_confidence("")
    assert q is None and reason == "empty confidence"


# --------------------------------------------------------------------------- API contract


@pytest.mark.parametrize("bad", [None, b"<answer>1</answer><confidence>0.5</confidence>", 15, ["<answer>"]])
def test_non_str_input_raises_type_error(bad):
    with pytest.raises(TypeError, match="str"):
        parse_completion(bad)


@pytest.mark.parametrize(
    "text",
    [c["text"] for c in PARSING_CASES]
    + [
        "",
        "<answer>",
        "</answer></confidence>",
        "<think></think>",
        "<answer>1</answer><confidence>0.5",
        "<answer>1</answer></confidence>0.5<confidence>",
        "<confidence>0.5</confidence>",
        "<think><think>x</think>",
        "<analysis></analysis><answer>a</answer><confidence>1e-999</confidence>",
    ],
)
def test_never_raises_and_error_iff_failure(text):
    p = parse_completion(text)
    _assert_consistent(p)


def test_spans_index_the_original_text():
    text = "<think>a <answer>9</answer> b</think>\n<answer> 15 </answer>\n<analysis>hm</analysis><confidence> 0.7 </confidence>"
    p = parse_completion(text)
    assert p.format_ok, p.error
    a0, a1 = p.answer_span
    c0, c1 = p.confidence_span
    assert text[a0:a1] == " 15 "  # span covers the raw tag contents, stripped answer is "15"
    assert text[a0:a1].strip() == p.answer == "15"
    assert text[c0:c1] == " 0.7 "
    assert float(text[c0:c1]) == p.confidence == 0.7
    # The spans point at the top-level tags, not the copy inside <think>.
    assert a0 > text.index("</think>")
    assert text[a0 - len("<answer>") : a0] == "<answer>"
    assert text[c1 : c1 + len("</confidence>")] == "</confidence>"


def test_answer_span_kept_on_confidence_failure():
    text = "<think>x</think><answer>42</answer><confidence>high</confidence>"
    p = parse_completion(text)
    assert not p.format_ok
    assert p.answer == "42"
    assert text[slice(*p.answer_span)] == "42"
    assert p.confidence_span is None


def test_result_is_finite():
    for case in PARSING_CASES:
        p = parse_completion(case["text"])
        assert p.confidence is None or math.isfinite(p.confidence)


# --------------------------------------------------------------------------- SFT demonstrations


class _FakeTokenizer:
    chat_template = "{{ messages }}"
    eos_token = "<|endoftext|>"


@pytest.mark.parametrize("q", [0.0, 0.05, 0.5, 0.95, 1.0])
@pytest.mark.parametrize(
    "fmt", [CompletionFormat(), CompletionFormat("reasoning", "final", "reflect", "prob")], ids=["default", "custom"]
)
def test_sft_demonstration_round_trips(q, fmt):
    from calibrl.data.prompts import PromptBuilder
    from calibrl.data.sources import Example

    builder = PromptBuilder(_FakeTokenizer(), "Answer in tags.", fmt=fmt)
    text = builder.demonstration(Example(id="0", question="7+8?", answer="15"), q)
    p = parse_completion(text, fmt)  # the trailing EOS text sits outside every tag
    assert p.format_ok, p.error
    assert p.answer == "15"
    assert p.confidence == pytest.approx(q, abs=1e-12)  # written with two decimals
