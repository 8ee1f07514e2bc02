"""Verifier guard (``calibrl.rewards.guard``): answer size cap, a time limit per answer in a worker
process, verifier errors and worker crashes, no ``eval`` of model text, the counts reaching the
step metrics, and the settings checked at start-up."""

from __future__ import annotations

import copy
import os
import pickle
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from calibrl.data.sources import VERIFIERS, DataSplits, Example, exact_match
from calibrl.rewards import RewardFunction, VerifierGuard
from calibrl.rewards.guard import COUNTERS
from calibrl.rewards.scoring import score_completions

RLCR = {"correctness": 1.0, "brier": 1.0, "format": 0.5}
EX = Example("e0", "What is 2 + 3?", "5")
NO_COUNTS = dict.fromkeys(COUNTERS, 0)


def misbehaving(answer: str, example: Example) -> float:
    """A test verifier: hangs on "hang", kills its process on "crash", raises on "raise"."""
    if answer == "hang":
        time.sleep(3600)
    if answer == "crash":
        os._exit(3)
    if answer == "raise":
        raise RuntimeError("verifier bug")
    return exact_match(answer, example)


@pytest.fixture
def splits(monkeypatch):
    """Splits whose verifier is `misbehaving`, registered as data.verifier=test_misbehaving."""
    monkeypatch.setitem(VERIFIERS._items, "test_misbehaving", misbehaving)
    return DataSplits("t", [EX], [EX], VERIFIERS.get("test_misbehaving"))


def _counts(**nonzero: int) -> dict[str, int]:
    return {**NO_COUNTS, **{f"rewards/verifier_{k}": v for k, v in nonzero.items()}}


def test_verdicts_through_the_worker():
    guard = VerifierGuard(timeout_s=5.0)
    out = guard.verify(lambda a, e: a == e.answer, [("5", EX), ("6", EX)])
    assert out.correct == [True, False] and out.counts == NO_COUNTS
    guard.close()


def test_a_hung_verifier_is_incorrect_counted_and_the_batch_goes_on(splits):
    guard = VerifierGuard(timeout_s=0.5)
    answers = ["5", "hang", "5", "6", "hang", "5"]
    t0 = time.monotonic()
    out = guard.verify(splits.is_correct, [(a, EX) for a in answers])
    elapsed = time.monotonic() - t0
    # Two timeouts of 0.5 s, each followed by a fresh fork for the rest; nothing waits an hour.
    assert 1.0 <= elapsed < 10.0
    assert out.correct == [True, False, True, False, False, True]
    assert out.counts == _counts(timeouts=2)
    # the worker that replaced the hung one serves the next batch
    assert guard.verify(splits.is_correct, [("5", EX)]).correct == [True]
    guard.close()


def test_a_raising_verifier_and_a_dying_worker_are_errors(splits):
    guard = VerifierGuard(timeout_s=5.0)
    # the bare verifier: a raise is an error; DataSplits.is_correct already scores one as wrong
    out = guard.verify(misbehaving, [(a, EX) for a in ["crash", "5", "raise", "5"]])
    assert out.correct == [False, True, False, True]
    assert out.counts == _counts(errors=2)
    out = guard.verify(splits.is_correct, [(a, EX) for a in ["crash", "raise", "5"]])
    assert out.correct == [False, False, True]
    assert out.counts == _counts(errors=1)
    guard.close()


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_an_answer_over_the_size_cap_is_incorrect_without_calling_the_verifier(timeout_s):
    calls = []

    def always_right(answer, example):
        calls.append(answer)
        return True

    guard = VerifierGuard(timeout_s=timeout_s, max_answer_chars=8)
    out = guard.verify(always_right, [("12345678", EX), ("123456789", EX), ("x" * 1_000_000, EX)])
    assert out.correct == [True, False, False]
    assert out.counts == _counts(too_long=2)
    if timeout_s is None:  # in-process: the calls are visible here
        assert calls == ["12345678"]
    guard.close()


def test_objects_made_after_the_worker_forked_reach_it():
    guard = VerifierGuard(timeout_s=5.0)
    assert guard.verify(lambda a, e: a == e.answer, [("5", EX)]).correct == [True]
    late = Example("e1", "What is 4 + 4?", "8")
    offset = 3  # a closure over a value the forked worker has never seen

    def shifted(answer, example):
        return int(answer) + offset == int(example.answer)

    assert guard.verify(shifted, [("5", late), ("6", late)]).correct == [True, False]
    # a bound method is one object for the worker however often it is looked up
    splits = DataSplits("t", [late], [late], exact_match)
    assert guard.verify(splits.is_correct, [("8", late)]).correct == [True]
    pid = guard.worker_pid
    assert guard.verify(splits.is_correct, [("8", late), ("9", late)]).correct == [True, False]
    assert guard.worker_pid == pid, "the same splits.is_correct must not re-fork the worker"
    guard.close()


@dataclass(frozen=True)
class _Unpicklable:
    answer: str

    def __reduce__(self):
        raise TypeError("not picklable")


def test_an_example_that_will_not_pickle_still_gets_verified():
    guard = VerifierGuard(timeout_s=5.0)
    out = guard.verify(lambda a, e: a == e.answer, [("5", _Unpicklable("5")), ("6", _Unpicklable("5"))])
    assert out.correct == [True, False] and out.counts == NO_COUNTS
    guard.close()


def test_eval_of_model_text_reads_literals_only_in_the_worker(tmp_path):
    marker = tmp_path / "ran"

    def evaluates(answer, example):
        return eval(answer) == eval(example.answer)  # noqa: S307 - the pattern under test

    guard = VerifierGuard(timeout_s=5.0)
    attack = f"open({str(marker)!r}, 'w').write('x') and 7"
    hex_example = Example("h", "What is 0x3 + 0x4?", "0x3 + 0x4")  # the task's own expression
    out = guard.verify(evaluates, [(attack, hex_example), ("7", hex_example), ("[1, 2]", Example("l", "q", "[1, 2]"))])
    assert not marker.exists(), "model text was executed"
    assert out.correct == [False, True, True]
    assert out.counts == _counts(errors=1)  # literal_eval raised on the attack: an error, wrong
    guard.close()


def test_reasoning_gym_answers_are_not_executed(tmp_path):
    pytest.importorskip("reasoning_gym")
    from calibrl.data.sources import build_splits

    # spiral_matrix's score_answer calls eval(answer) on the model's text
    splits = build_splits("reasoning_gym", name="rg", task="spiral_matrix", train_size=0, eval_size=1,
                          train_seed=0, eval_seed=1)
    ex = splits.eval[0]
    marker = tmp_path / "ran"
    guard = VerifierGuard(timeout_s=10.0)
    out = guard.verify(splits.is_correct, [(f"__import__('pathlib').Path({str(marker)!r}).touch()", ex),
                                           (ex.answer, ex)])
    assert not marker.exists(), "model text was executed"
    assert out.correct == [False, True]
    guard.close()


def test_worker_overhead_per_answer_is_small():
    # Measured ~0.1 ms per answer (module docstring); 512 answers must stay far below a second.
    splits = DataSplits("t", [EX], [EX], exact_match)
    guard = VerifierGuard(timeout_s=5.0)
    items = [("5" if i % 2 else "6", EX) for i in range(512)]
    guard.verify(splits.is_correct, items[:1])  # the fork
    t0 = time.perf_counter()
    out = guard.verify(splits.is_correct, items)
    assert time.perf_counter() - t0 < 2.0
    assert sum(out.correct) == 256
    guard.close()


def test_close_stops_the_worker_and_copies_start_without_one():
    guard = VerifierGuard(timeout_s=5.0)
    guard.verify(lambda a, e: True, [("5", EX)])
    pid = guard.worker_pid
    copied = pickle.loads(pickle.dumps(guard))
    assert copied.worker_pid is None and copied.timeout_s == 5.0
    guard.close()
    assert guard.worker_pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert copy.deepcopy(guard).verify(lambda a, e: a == "5", [("5", EX)]).correct == [True]


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_bad_timeout_is_refused(timeout_s):
    with pytest.raises(ValueError, match="reward.verifier_timeout_s"):
        VerifierGuard(timeout_s=timeout_s)


@pytest.mark.parametrize("max_chars", [0, -5, 1.5, True])
def test_bad_size_cap_is_refused(max_chars):
    with pytest.raises(ValueError, match="reward.max_answer_chars"):
        VerifierGuard(max_answer_chars=max_chars)


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from calibrl.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_reward_config_builds_the_guard():
    rf = RewardFunction.from_config(_compose([]).reward)
    assert rf.weights == RLCR
    assert (rf.guard.timeout_s, rf.guard.max_answer_chars) == (5.0, 8192)
    rf = RewardFunction.from_config(_compose(["reward.verifier_timeout_s=null", "reward.max_answer_chars=100"]).reward)
    assert (rf.guard.timeout_s, rf.guard.max_answer_chars) == (None, 100)
    with pytest.raises(ValueError, match="reward.verifier_timeout_s"):
        RewardFunction.from_config(_compose(["reward.verifier_timeout_s=-1"]).reward)
    with pytest.raises(ValueError, match="reward.max_answer_chars"):
        RewardFunction.from_config(_compose(["reward.max_answer_chars=0"]).reward)
    with pytest.raises(Exception, match="verifier_timeout_s"):  # the schema types the field
        _compose(["reward.verifier_timeout_s=soon"])


# --------------------------------------------------------------------------- scoring and the RL step


def _completion(answer: str, q: str) -> str:
    return f"<think>x</think><answer>{answer}</answer><confidence>{q}</confidence>"


def test_score_completions_scores_a_hung_answer_as_wrong(splits):
    rf = RewardFunction(RLCR, VerifierGuard(timeout_s=0.5))
    texts = [_completion("5", "0.9"), _completion("hang", "0.9"), _completion("6", "0.0"), "no tags"]
    t0 = time.monotonic()
    _, batch = score_completions(texts, [EX] * 4, splits.is_correct, rf)
    assert time.monotonic() - t0 < 10.0
    # right at 0.9: 1 - 0.01 + 0.5 = 1.49; hung = wrong at 0.9: 0 - 0.81 + 0.5 = -0.31;
    # wrong at 0.0: 0 - 0 + 0.5 = 0.5; format failure: 0 - 1 + 0 = -1 (verifier not asked)
    np.testing.assert_allclose(batch.total, [1.49, -0.31, 0.5, -1.0], atol=1e-12)
    np.testing.assert_array_equal(batch.correct, [True, False, False, False])
    assert batch.counters == _counts(timeouts=1)
    rf.guard.close()


@pytest.fixture(scope="module")
def tiny():
    from omegaconf import OmegaConf

    from calibrl.models import ModelSpec, load_policy
    from calibrl.cli import CONF_DIR

    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    return load_policy(ModelSpec(**fields, cache_dir=os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl") + "/models"))


def test_rl_step_with_a_hung_verifier_returns_and_logs_the_timeout(tiny, splits):
    from calibrl.data.prompts import PromptBuilder
    from calibrl.rl.engine import TorchEngine
    from calibrl.rl.grpo import GRPOTrainer
    from helpers import rl_groups
    from calibrl.rl.rollout import Rollout

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    builder = PromptBuilder(tok, "Answer in tags.")
    # B=2 prompts x G=2; every answer is wrong ("nope") or hangs the verifier ("hang")
    texts = [_completion("hang", "0.9"), _completion("nope", "0.9"), _completion("nope", "0.5"), _completion("nope", "0")]

    def generate(examples):
        enc = tok([builder.prompt(e) for e in examples], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        length = max(map(len, ids))
        comp = torch.tensor([row + [tok.eos_token_id] * (length - len(row)) for row in ids])
        mask = (torch.arange(length)[None] < torch.tensor([len(r) for r in ids])[:, None]).long()
        return Rollout(enc.input_ids.repeat_interleave(2, dim=0), enc.attention_mask.repeat_interleave(2, dim=0),
                       comp, mask, texts, torch.tensor([0, 0, 1, 1]))

    s = rl_groups(max_new_tokens=32)  # B=2, G=2, micro-batches of 2, no bf16
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0)
    trainer = GRPOTrainer(engine, tok, builder, [EX], splits.is_correct,
                          RewardFunction(RLCR, VerifierGuard(timeout_s=0.5)), *s)
    trainer.generate = generate
    t0 = time.monotonic()
    m = trainer.step()
    assert time.monotonic() - t0 < 30.0
    assert m["rewards/verifier_timeouts"] == 1.0
    assert m["rewards/verifier_too_long"] == 0.0 and m["rewards/verifier_errors"] == 0.0
    # all wrong: totals [-0.81, -0.81, -0.25, 0] + 0.5 = [-0.31, -0.31, 0.25, 0.5], mean 0.0325
    assert m["rewards/correctness/mean"] == 0.0
    assert m["rewards/total/mean"] == pytest.approx(0.0325, abs=1e-12)
    trainer.reward_fn.guard.close()
