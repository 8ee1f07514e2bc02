"""Loading runs for calibrl-compare: run directories and a fake W&B API into Run records with
their stages, metrics from predictions worked out by hand, and the errors that name the input."""

from __future__ import annotations

import json
import math

import pytest
import wandb

from calibrl.report.load import CompareError, WandbUnavailable, load_run, load_wandb_runs, sample_metrics
from helpers import P_B, P_D, RUN_EVALS, FakeWandbApi, FakeApiRun, write_run_dir


def test_runs_are_read_with_their_stages(arms):
    assert list(arms) == ["a", "b"] and [r.seed for r in arms["a"]] == [0, 1]
    a0 = arms["a"][0]
    assert a0.finished and a0.dataset == "ds"
    assert [(p.stage, p.rl_step) for p in a0.evals] == [("sft", 0), ("step2", 2), ("final", 4)]
    assert a0.point("step2").rows[0]["id"] == "q0"  # predictions attached to their stage
    assert a0.train["rl_step"].tolist() == [1, 2, 3, 4]
    assert a0.point("missing") is None


def test_metrics_of_predictions_by_hand():
    # P_B: 0.8 right, 0.2 wrong: two bins with gap 0.2 each -> ECE 0.2; Brier (0.04 + 0.04) / 2.
    m = sample_metrics(P_B)
    assert m["accuracy"] == 0.5 and m["format_rate"] == 1.0 and m["ece"] == pytest.approx(0.2)
    assert m["brier"] == pytest.approx(0.04) and m["auroc"] == 1.0 and m["confidence_std"] == pytest.approx(0.3)
    # P_D: a format failure counts as wrong in accuracy; the rest is over the one well-formed row.
    m = sample_metrics(P_D)
    assert m["accuracy"] == 0.5 and m["format_rate"] == 0.5 and m["ece"] == pytest.approx(0.5)
    assert math.isnan(m["auroc"])


def test_torn_metrics_line_names_file_and_line(tmp_path):
    d = write_run_dir(tmp_path, "a", 0)
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/acc')  # the 9th line, torn
    with pytest.raises(CompareError, match=r"metrics.jsonl:9: not a JSON line"):
        load_run(d)


def test_bad_predictions_and_datasets_name_the_problem(tmp_path):
    d = write_run_dir(tmp_path, "a", 0)
    (d / "eval_step2.jsonl").write_text('{"confidence": 1.5, "correct": 1, "format_ok": true}\n')
    with pytest.raises(CompareError, match=r"eval_step2.jsonl: row 1 is well-formed but its confidence 1.5"):
        load_run(d)
    (d / "eval_step2.jsonl").write_text('{"confidence": 0.5}\n')
    with pytest.raises(CompareError, match=r"row 1 lacks correct, format_ok"):
        load_run(d)
    with pytest.raises(CompareError, match=r"no eval records of dataset 'other' \(found: ds\)"):
        load_run(write_run_dir(tmp_path, "a", 1), dataset="other")


def test_an_unfinished_run_has_no_final_point(tmp_path):
    r = load_run(write_run_dir(tmp_path, "b", 2, finished=False, like=("b", 1)))
    assert not r.finished and [p.stage for p in r.evals] == ["sft", "step2"]
    assert r.train["rl_step"].tolist() == [1, 2, 3]


def test_wandb_adapter_reads_the_same_runs():
    api = FakeWandbApi([FakeApiRun(arm, seed) for arm, seed in RUN_EVALS])
    runs = load_wandb_runs("ent/proj", "g1", api=api)
    assert api.calls == [("ent/proj", {"group": "g1"})]
    a0, a1 = runs[:2]
    assert a0.name == "wandb:ent/proj/a0" and "_wandb" not in a0.config and a0.seed == 0
    assert [(p.stage, p.rl_step, p.rows) for p in a0.evals] == [
        ("sft", 0, None), ("step2", 2, None), ("final", 4, None)]
    # the logged scalars stand in for the predictions; confidence_std is not logged
    assert a0.point("final").values["accuracy"] == 1.0 and math.isnan(a0.point("final").values["confidence_std"])
    assert math.isnan(a1.train["accuracy"][-1])  # the string "NaN" is read as NaN


def test_wandb_unfinished_run_and_raw_stage():
    run = FakeApiRun("a", 0, finished=False)
    run.config["eval"]["raw_model"] = True  # config says raw + sft, but only one eval before RL
    (r,) = load_wandb_runs("ent/proj", "g", api=FakeWandbApi([run]))
    assert not r.finished and [p.stage for p in r.evals] == ["step0", "step2"]


def _with_self_label_eval(records: list[dict]) -> list[dict]:
    """``records`` with a self-label step and its eval (accuracy 0.25) after the SFT eval (step 1):
    the later records move one step on."""
    out = [r | {"step": r["step"] + 1} if r["step"] >= 2 else r for r in records]
    return out[:2] + [{"step": 2, "self_label/loss": 0.5}, {"step": 2, "eval/ds/accuracy": 0.25}] + out[2:]


def test_self_label_eval_is_a_stage_before_rl(tmp_path):
    d = write_run_dir(tmp_path, "a", 0)
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _with_self_label_eval(records)))
    (d / "eval_self_label.jsonl").write_text(json.dumps({"confidence": 0.4, "correct": 1, "format_ok": True}) + "\n")
    r = load_run(d)
    assert [(p.stage, p.rl_step) for p in r.evals] == [("sft", 0), ("self_label", 0), ("step2", 2), ("final", 4)]
    assert r.point("self_label").values["accuracy"] == 1.0  # from its predictions
    run = FakeApiRun("a", 0)
    run.config["trainer"]["self_label"] = {"enabled": True}
    run._records = _with_self_label_eval(run._records)
    (w,) = load_wandb_runs("ent/proj", "g", api=FakeWandbApi([run]))
    assert [p.stage for p in w.evals] == ["sft", "self_label", "step2", "final"]
    assert w.point("self_label").values["accuracy"] == 0.25  # from the logged scalar


def test_wandb_errors(monkeypatch):
    def no_key(**_):
        raise wandb.errors.UsageError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(wandb, "Api", no_key)
    with pytest.raises(WandbUnavailable) as err:
        load_wandb_runs("ent/proj", "g")
    assert str(err.value) == "W&B API unavailable for ent/proj (group 'g'): UsageError: No API key configured."
    with pytest.raises(CompareError, match="ENTITY/PROJECT"):
        load_wandb_runs("proj", "g", api=FakeWandbApi([]))
    with pytest.raises(CompareError, match="no W&B runs in ent/proj with group 'g'"):
        load_wandb_runs("ent/proj", "g", api=FakeWandbApi([]))
