"""The self-labelled warm-up as a stage of the main job: start-up validation (one line each), the
answering through the evaluator, tiny end-to-end runs (its eval, its records and global steps,
the cache shared by runs with the same settings, a resume after it)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrl.config import ConfigError
from calibrl.rl.self_label import LABEL_SIGNALS, Answered
from calibrl.run import stages
from calibrl.run.pipeline import run
from calibrl.run.sft_cache import self_label_cache_dir, sft_cache_dir
from calibrl.run.validate import validate
from helpers import compose_config, read_records

BASE = ["model=tiny", "debug=default", "trainer.self_label.enabled=true"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.sft.enabled=false"], "trainer.self_label.enabled=true needs trainer.sft.enabled=true"),
    (["trainer.self_label.signal=entropy"],
     "unknown trainer.self_label.signal 'entropy'; valid choices: agreement, answer_prob"),
    (["trainer.self_label.loss_on=answer"],
     "unknown trainer.self_label.loss_on 'answer'; valid choices: completion, confidence, verified"),
    (["trainer.self_label.fit_fraction=0"], "trainer.self_label.fit_fraction must be in (0, 1), got 0"),
    (["trainer.self_label.fit_fraction=1.0"], "trainer.self_label.fit_fraction must be in (0, 1), got 1.0"),
    (["trainer.self_label.num_examples=3"], "trainer.self_label.num_examples must be >= 4, got 3"),
    (["trainer.self_label.signal=agreement", "trainer.self_label.n_samples=1"],
     "trainer.self_label.signal=agreement needs trainer.self_label.n_samples >= 2, got 1"),
    (["trainer.self_label.num_examples=30"],
     "trainer.sft.num_examples=8 + trainer.self_label.num_examples=30 = 38 training examples, more than "
     "data.train_size=32"),
    (["trainer.sft.confidence.grid_step=0.033"], "trainer.sft.confidence.grid_step: confidence grid step 0.033"),
])
def test_bad_self_label_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([*BASE, *overrides]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_self_label_settings_are_not_checked_when_it_is_off():
    validate(compose_config(["model=tiny", "debug=default", "trainer.self_label.num_examples=1000",
                             "trainer.self_label.signal=entropy"]))


def test_too_few_training_rows_after_dedup_fail_before_the_model_loads(tmp_path, monkeypatch):
    # debug=default asks for 32 training rows; those sharing a question with the eval set are dropped,
    # so 8 + 24 = 32 passes validation but not the data check in build.
    monkeypatch.setattr("calibrl.run.build._policy", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"^data: trainer.self_label.num_examples=24 after trainer.sft.num_examples=8"):
        run(compose_config([*BASE, "trainer.self_label.num_examples=24", "logger.mode=disabled"]), tmp_path)


def test_agreement_answers_sample_n_answers_per_question_and_leave_the_rng(tmp_path):
    from calibrl.run.build import build

    cfg = compose_config([*BASE, "trainer.self_label.signal=agreement", "trainer.self_label.n_samples=3",
                          "logger.mode=disabled"])
    parts = build(cfg, tmp_path)
    items = list(parts.splits.train[8:12])
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    answered = stages.answer_items(parts, items, LABEL_SIGNALS.get("agreement"))
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])
    assert [a.example for a in answered] == items
    assert all(len(a.samples) == 3 for a in answered)
    # the greedy completion is the evaluator's: the same as a greedy answer to the same question
    again = stages.answer_items(parts, items[:1], LABEL_SIGNALS.get("answer_prob"))
    assert again[0].completion == answered[0].completion and again[0].samples == ()
    parts.tracker.close(0)


class ScriptedAnswers:
    """Stands in for :func:`calibrl.run.stages.answer_items`: every item answered in the format,
    right (answer-token probability 0.9) or wrong (0.2) in turn, so the map has points and the
    label set trains."""

    def __init__(self):
        self.calls = 0

    def __call__(self, parts, items, label_signal, progress=None):
        self.calls += 1
        out = []
        for i, e in enumerate(items):
            right = i % 2 == 0
            answer = e.answer if right else f"{e.answer}1"
            text = f"<think>sum</think>\n<answer>{answer}</answer>\n<confidence>0.50</confidence>"
            out.append(Answered(e, text, right, 0.9 if right else 0.2))
        return out


def _strip(records):  # timings differ run to run
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def test_self_label_run_logs_its_steps_writes_its_eval_and_shares_the_cache(tmp_path, monkeypatch):
    answers = ScriptedAnswers()
    monkeypatch.setattr(stages, "answer_items", answers)
    overrides = [*BASE, "trainer.sft.cache=true", "seed=11", "trainer.max_steps=1", "trainer.save_checkpoint=false",
                 "logger.mode=disabled"]
    cfg = compose_config(overrides)
    shutil.rmtree(sft_cache_dir(cfg), ignore_errors=True)
    shutil.rmtree(self_label_cache_dir(cfg), ignore_errors=True)
    first = run(cfg, tmp_path / "first")  # a miss: answers, trains, stores
    assert answers.calls == 1 and list(first) == ["sft", "self_label", "final"]
    d = tmp_path / "first"
    assert json.loads((d / "eval_self_label.json").read_text())["n_questions"] == 8
    assert list(json.loads((d / "summary.json").read_text())) == ["sft", "self_label", "final"]
    records = read_records(d / "metrics.jsonl")
    # debug=default: 2 SFT steps; 8 items -> 4 fit, 4 label, batches of 4, 1 epoch -> 1 self-label
    # step (global step 3), its eval at step 3, the RL step at 4.
    assert [r["step"] for r in records if "sft/loss" in r] == [1, 2]
    assert [r["step"] for r in records if "self_label/loss" in r] == [3]
    (summary,) = [r for r in records if "self_label/n_label" in r]
    assert summary["step"] == 3 and summary["self_label/n_label"] == 4 and summary["self_label/n_dropped"] == 0
    assert summary["self_label/label_auroc"] == 1.0  # labels 1.0 on the right answers (0.9), 0.0 on the wrong (0.2)
    assert [r["step"] for r in records if "train/rl_step" in r] == [4]
    entry = json.loads((self_label_cache_dir(cfg) / "entry.json").read_text())
    assert entry["stage"] == "self_label" and (self_label_cache_dir(cfg) / "eval_self_label.jsonl").is_file()

    second = run(compose_config(overrides), tmp_path / "second")  # a hit: nothing answered again
    assert answers.calls == 1
    assert json.dumps(second) == json.dumps(first)
    assert json.dumps(_strip(read_records(tmp_path / "second" / "metrics.jsonl"))) == json.dumps(_strip(records))
    for name in ("eval_self_label.jsonl", "eval_sft.jsonl"):
        assert (tmp_path / "second" / name).read_text() == (d / name).read_text()
    # The key: the SFT key and trainer.self_label; RL settings share the entry, and the SFT entry
    # is shared with arms without the self-labelled warm-up.
    assert self_label_cache_dir(compose_config([*overrides, "algo.beta=0.1"])) == self_label_cache_dir(cfg)
    assert self_label_cache_dir(compose_config([*overrides, "trainer.self_label.lr=1e-4"])) != self_label_cache_dir(cfg)
    assert self_label_cache_dir(compose_config([*overrides, "trainer.sft.lr=1e-4"])) != self_label_cache_dir(cfg)
    assert sft_cache_dir(compose_config([*overrides, "trainer.self_label.enabled=false"])) == sft_cache_dir(cfg)


def test_a_resumed_run_keeps_the_self_label_eval_and_does_not_redo_it(tmp_path, monkeypatch):
    answers = ScriptedAnswers()
    monkeypatch.setattr(stages, "answer_items", answers)
    overrides = [*BASE, "seed=12", "trainer.save_every=1", "trainer.save_checkpoint=false", "logger.mode=disabled"]
    d = tmp_path / "run"
    whole = run(compose_config(overrides), d)
    assert answers.calls == 1
    whole_records = read_records(d / "metrics.jsonl")
    # Checkpoints are named by global step: 2 SFT + 1 self-label + RL step 1 = step 4.
    after_rl_step1 = d / "checkpoints" / "step00000004"
    assert json.loads((after_rl_step1 / "state.json").read_text())["rl_step"] == 1
    resumed = run(compose_config([*overrides, f"trainer.resume={after_rl_step1}"]), tmp_path / "other")
    assert answers.calls == 1  # the warm-ups are not run again
    assert list(resumed) == ["sft", "self_label", "final"]
    assert json.dumps(resumed["self_label"]) == json.dumps(whole["self_label"])
    assert json.dumps(_strip(read_records(d / "metrics.jsonl"))) == json.dumps(_strip(whole_records))


def _tune_script():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("tune_self_label", REPO / "scripts" / "tune_self_label.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_script_scores_sft_and_each_candidate_on_a_split_without_held_out_items(tmp_path, monkeypatch):
    """scripts/tune_self_label.py: one row for the SFT model, one per candidate; the validation
    questions exclude every held-out one (debug=default: 8 held-out items, eval_seed=2)."""
    from omegaconf import OmegaConf

    from calibrl.data import build_splits

    tune = _tune_script()
    monkeypatch.setenv("CALIBRL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rows.jsonl"
    assert tune.main(["model=tiny", "debug=default", "trainer.sft.cache=false", "--val-seed", "2", "--val-size", "12",
                      "--candidate", "loss_on=completion", "--candidate", "loss_on=confidence,lr=1e-5",
                      "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["candidate"] for r in rows] == ["sft", "loss_on=completion", "loss_on=confidence,lr=1e-5"]
    cfg = compose_config(["model=tiny", "debug=default"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    held_out = {e.question for e in build_splits(**data).eval}
    val = build_splits(**(data | {"eval_size": 12, "train_size": 0})).eval
    # the same seed as the held-out set: its first 8 questions are those 8, so at most 4 remain
    expected = sum(e.question not in held_out for e in val)
    assert expected <= 4 and all(r["n"] == expected for r in rows)
    assert tune._is_grid_string("0.05") and tune._is_grid_string(" 1.00 ")
    assert not any(tune._is_grid_string(a) for a in ("5", "-0.05", "10.5", None, "0.5"))
    with pytest.raises(SystemExit, match="unknown trainer.self_label field 'epoch'"):
        tune._candidate("epoch=3")
    with pytest.raises(SystemExit, match="trainer.self_label.lr must be a float, got 'fast'"):
        tune._candidate("lr=fast")
    assert tune._candidate("lr=2e-5,loss_on=completion,epochs=1") == {"lr": 2e-5, "loss_on": "completion", "epochs": 1}
