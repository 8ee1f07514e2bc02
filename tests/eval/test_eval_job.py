"""calibrl-eval end to end on a tiny run: the files it writes, agreement with the training eval,
checkpoint kinds, out-of-domain and local JSONL sets, and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from calibrl.run.pipeline import run
from calibrl.cli import CONF_DIR
from helpers import REPO



def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibrl.eval.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "debug=default", "trainer.eval_every=1", "trainer.max_steps=2"])
    run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def eval_out(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = _eval_cli(f"checkpoint={tiny_run}", f"hydra.run.dir={out}", "logger.mode=offline",
                     "eval_sets.products.eval_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_writes_report_predictions_plots_and_wandb(eval_out):
    out, proc = eval_out
    report = json.loads((out / "eval.json").read_text())
    assert set(report["datasets"]) == {"chain_sum", "products"}
    cs = report["datasets"]["chain_sum"]
    # The run's eval settings are used: debug=default resamples 50 times, and accuracy (the mean
    # of 8 0/1 verdicts) is finite on every resample, so all 50 are valid.
    assert cs["n_questions"] == 8 and cs["accuracy"]["n_valid"] == 50
    for key in ("value", "ci_low", "ci_high", "n_valid"):
        assert key in cs["accuracy"]
    preds = _records(out / "predictions.jsonl")
    # debug=default: 8 in-domain questions, 4 out-of-domain, 1 sample each.
    assert len(preds) == 12 and {p["dataset"] for p in preds} == {"chain_sum", "products"}
    assert {"id", "completion", "answer", "confidence", "answer_prob", "lowest_window_prob", "correct"} <= set(preds[0])
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert "chain_sum" in proc.stdout and "eval.json" in proc.stdout


def test_plots_written_when_a_completion_is_well_formed(tiny_run, tmp_path):
    # A random tiny model never writes the format, so plots come from a hand-made result.
    from calibrl.eval.job import _plots
    from calibrl.config import EvalConfig
    from calibrl.eval.evaluator import EvalResult

    rows = [{"correct": c, "format_ok": True, "confidence": q, "answer_prob": 0.5, "lowest_window_prob": None}
            for q, c in ((0.9, 1), (0.2, 0), (0.7, 1))]
    images = _plots(EvalResult("toy", rows), EvalConfig(seed=0), tmp_path)
    assert set(images) == {"toy/reliability", "toy/confidence_hist"}
    for path in images.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_equal_the_training_eval_of_the_same_checkpoint(tiny_run, eval_out):
    out, _ = eval_out
    train_evals = [r for r in _records(tiny_run / "metrics.jsonl") if "eval/chain_sum/accuracy" in r]
    # trainer.eval_every=1 with 2 RL steps: after SFT, after step 1, final.
    assert len(train_evals) == 3
    final = train_evals[-1]
    (record,) = _records(out / "metrics.jsonl")
    keys = [k for k in final if k.startswith("eval/chain_sum/")]
    assert keys and keys == [k for k in record if k.startswith("eval/chain_sum/")]
    for k in keys:
        assert _same(final[k], record[k]), (k, final[k], record[k])
    # Same completions, too.
    train_preds = _records(tiny_run / "eval_final.jsonl")
    eval_preds = [p for p in _records(out / "predictions.jsonl") if p["dataset"] == "chain_sum"]
    assert [p["completion"] for p in train_preds] == [p["completion"] for p in eval_preds]


def test_hf_directory_and_cli_overrides_of_the_run_config(tiny_run, tmp_path):
    proc = _eval_cli(f"checkpoint={tiny_run / 'checkpoint'}", f"hydra.run.dir={tmp_path}", "logger.mode=disabled",
                     "model.name=unused", "data.eval_size=3", "eval_sets=none", "eval.n_bootstrap=0", "bf16=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_records(tmp_path / "predictions.jsonl")) == 3
    # A run directory's settings are used, but the command line still wins.
    out = tmp_path / "samples"
    proc = _eval_cli(f"checkpoint={tiny_run}", f"hydra.run.dir={out}", "logger.mode=disabled", "eval_sets=none",
                     "eval.n_samples=2", "eval.do_sample=true", "eval.n_bootstrap=0", "data.eval_size=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())["datasets"]["chain_sum"]
    assert report["n_questions"] == 3 and report["n_samples"] == 2
    assert set(report["voting"]) == {"majority", "confidence_weighted", "best_of_n"}
    assert len(_records(out / "predictions.jsonl")) == 6
    # Voting is its own printed table: the accuracy of a method sits in an `accuracy` column (it
    # used to fill the signal table's `n` column as "acc 0.333").
    assert "voting over the 2 samples of each question" in proc.stdout
    acc = report["voting"]["majority"]["accuracy"]["value"]
    assert any(line.split("│")[1].strip() == "majority" and line.split("│")[2].strip() == f"{acc:.3f}"
               for line in proc.stdout.splitlines() if line.count("│") > 3)
    assert "acc " not in proc.stdout


def test_eval_json_is_strict_json(eval_out):
    out, _ = eval_out
    text = (out / "eval.json").read_text()
    # a random tiny model writes no well-formed completion: undefined values are null, not NaN
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_model_overrides_apply_on_top_of_a_preset_or_run(tiny_run, tmp_path):
    out = tmp_path / "preset"
    # (`model=tiny` so Hydra can compose the nested keys; the preset is then loaded with them)
    proc = _eval_cli("checkpoint=tiny", "model=tiny", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
                     f"hydra.run.dir={out}", "logger.mode=disabled", "eval_sets=none", "data.eval_size=2",
                     "eval.n_bootstrap=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert OmegaConf.load(out / "config_resolved.yaml").model.tiny.hidden_size == 32
    # the `hf` preset takes its path from the command line
    out = tmp_path / "hf"
    proc = _eval_cli("checkpoint=hf", f"model.name_or_path={tiny_run / 'checkpoint'}", f"hydra.run.dir={out}",
                     "logger.mode=disabled", "eval_sets=none", "data.eval_size=2", "eval.n_bootstrap=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert OmegaConf.load(out / "config_resolved.yaml").model.name == str(tiny_run / "checkpoint")
    # with a run directory: the run's model, plus the command line's model.* values
    out = tmp_path / "run"
    proc = _eval_cli(f"checkpoint={tiny_run}", "model.chat_template=null", "model.name=mine", f"hydra.run.dir={out}",
                     "logger.mode=disabled", "eval_sets=none", "data.eval_size=2", "eval.n_bootstrap=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = OmegaConf.load(out / "config_resolved.yaml")
    assert resolved.model.name == "mine" and resolved.model.kind == "hf" and resolved.data.name == "chain_sum"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q1", "answer": "1"}\n{"question": "q2"}\n', "row 2 (1-based) has no value for field 'answer'"),
        ("", "is empty"),
        ("{not json\n", "could not be read as .jsonl"),
    ],
    ids=["missing_answer", "empty", "malformed"],
)
def test_bad_local_data_is_one_line_in_both_entry_points(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    ev = _eval_cli("checkpoint=tiny", f"hydra.run.dir={tmp_path / 'e'}", "logger.mode=disabled", "eval_sets=none",
                   "data=jsonl", f"data.path={data}", "data.eval_size=2")
    tr = subprocess.run([sys.executable, "-m", "calibrl.train", "model=tiny", "debug=default", "data=jsonl",
                         f"data.path={data}", f"hydra.run.dir={tmp_path / 't'}"],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
    for proc in (ev, tr):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_local_jsonl_eval_set_from_the_command_line(tiny_run, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    proc = _eval_cli(f"checkpoint={tiny_run}", f"hydra.run.dir={out}", "logger.mode=disabled", "eval_sets=none",
                     "+data@eval_sets.mine=jsonl", "eval_sets.mine.name=mine", f"eval_sets.mine.path={data}",
                     "eval_sets.mine.eval_size=3", "eval.n_bootstrap=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())["datasets"]
    assert set(report) == {"chain_sum", "mine"} and report["mine"]["n_questions"] == 3


def test_run_directory_without_a_saved_model(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config_resolved.yaml").write_text((tiny_run / "config_resolved.yaml").read_text())
    proc = _eval_cli(f"checkpoint={run_dir}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "without a saved model" in proc.stderr and "save_checkpoint=false" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["checkpoint=/no/such/dir"], "is not a run directory"),
        (["checkpoint=tiny", "eval.n_samples=3"], "needs eval.do_sample=true"),
        (["checkpoint=tiny", "eval.windw=3"], "unknown config key 'eval.windw'"),
        (["checkpoint=tiny", "eval.slice_by=[nope]", "eval_sets=none"], "no field 'nope'"),
        (["checkpoint=tiny", "reward.weights.brierr=1"], "brierr"),
        (["checkpoint=tiny", "data.task=bogus", "eval_sets=none"], "unknown reasoning-gym task 'bogus'"),
        (["checkpoint=tiny", "eval_sets.products.eval_size=0"], "eval_size must be >= 1"),
        (["checkpoint=tiny", "evl.n_samples=2"], "unknown config key 'evl'. Did you mean eval?"),
        (["checkpoint=tiny", "eval.grid_step=0.03"], "eval.grid_step: confidence grid step 0.03 does not divide 1"),
    ],
)
def test_errors_are_one_clear_line(args, message, tmp_path):
    proc = _eval_cli(*args, f"hydra.run.dir={tmp_path}", "logger.mode=disabled")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------- expected confidence

# Scripted item j of a local set (question "ITEM-j", reference 5): its answer and the model's
# distribution over the grid [0, 0.5, 1] at its <confidence> tag. Expected confidences 1.0, 0.55,
# 0.25, 0.9 for right, right, wrong, wrong; item 4 writes no confidence (not well formed).
ITEMS = {0: ("5", [0.0, 0.0, 1.0]), 1: ("5", [0.2, 0.5, 0.3]), 2: ("6", [0.5, 0.5, 0.0]),
         3: ("6", [0.0, 0.2, 0.8]), 4: ("5", None)}


def _item(tok, prompt_ids) -> int:
    import re

    return int(re.search(r"ITEM-(\d)", tok.decode(prompt_ids, skip_special_tokens=True)).group(1))


def _scripted_eval(monkeypatch, tmp_path, *overrides: str) -> tuple[Path, list[int]]:
    """calibrl-eval, in process, on the tiny model and the ITEMS set: generation writes the
    scripted completions (real token ids), the grid forward returns the scripted distributions
    (with half the mass off the grid, which the renormalisation drops). Returns the output
    directory and the item of every context the grid was asked for."""
    import torch

    from calibrl.eval import evaluator, signals
    from calibrl.eval.job import run_eval_job
    from calibrl.rl.rollout import Rollout

    def generate_rollout(model, tok, prompts, group_size, **kwargs):
        tokenizer[:] = [tok]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        rows = []
        for ids in enc.input_ids:
            answer, probs = ITEMS[_item(tok, ids)]
            text = f"<think>ok</think><answer>{answer}</answer>" + ("<confidence>0.50</confidence>" if probs else "")
            rows.append(tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id])
        width = max(map(len, rows))
        comp = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
        return Rollout(enc.input_ids, enc.attention_mask, comp, mask, texts, torch.arange(len(prompts)))

    asked: list[int] = []
    tokenizer = []  # the one generation was given

    def grid_logprobs(model, rollout, rows, ends, candidates, pad_id):
        assert len(candidates) == 3  # eval.grid_step=0.5
        (tok,) = tokenizer
        out = []
        for i, k in zip(rows.tolist(), ends.tolist()):
            assert tok.decode(rollout.completion_ids[i, :k]).endswith("<confidence>")
            asked.append(_item(tok, rollout.prompt_ids[i]))
            out.append(torch.log(0.5 * torch.tensor(ITEMS[asked[-1]][1])))
        return torch.stack(out)

    monkeypatch.setattr(evaluator, "generate_rollout", generate_rollout)
    monkeypatch.setattr(signals, "grid_logprobs_tree", grid_logprobs)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": f"ITEM-{j}", "answer": "5"}) + "\n" for j in ITEMS))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["model=tiny", "data=jsonl", f"data.path={data}",
                                         f"data.eval_size={len(ITEMS)}", "eval_sets=none", "logger.mode=disabled",
                                         "eval.n_bootstrap=0", *overrides])
    out = tmp_path / "out"
    run_eval_job(cfg, out)
    return out, asked


def test_expected_confidence_in_eval_json_predictions_metrics_and_table(monkeypatch, tmp_path, capsys):
    out, asked = _scripted_eval(monkeypatch, tmp_path, "eval.grid_step=0.5")
    assert sorted(asked) == [0, 1, 2, 3]  # the malformed item 4 has no context
    report = json.loads((out / "eval.json").read_text())["datasets"]["custom"]
    e = report["signals"]["expected_confidence"]
    # By hand (as in test_evaluator): mean 0.675, Brier 1.075 / 4, ECE 0.4, AUROC 3/4.
    assert e["n"] == 4 and report["signals"]["verbalized"]["n"] == 4
    assert e["confidence_mean"]["value"] == pytest.approx(0.675)
    assert e["brier"]["value"] == pytest.approx(0.26875)
    assert e["ece"]["value"] == pytest.approx(0.4)
    assert e["auroc"]["value"] == pytest.approx(0.75)
    preds = {p["question"]: p for p in _records(out / "predictions.jsonl")}
    got = {j: preds[f"ITEM-{j}"]["expected_confidence"] for j in ITEMS}
    assert got[4] is None
    assert [got[j] for j in range(4)] == pytest.approx([1.0, 0.55, 0.25, 0.9])
    (record,) = _records(out / "metrics.jsonl")
    assert record["eval/custom/expected_confidence/ece"] == pytest.approx(0.4)
    assert record["eval/custom/expected_confidence/auroc"] == pytest.approx(0.75)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "expected_confidence" in line)
    # signal | n | ece | brier | auroc | aurc | confident_error_rate | confidence_mean
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[:3] == ["expected_confidence", "4", "0.400"] and cells[4] == "0.750" and cells[7] == "0.675"
    assert (out / "plots" / "custom_reliability.png").is_file()  # a panel per signal, this one too


def test_no_expected_confidence_without_a_grid(monkeypatch, tmp_path):
    out, asked = _scripted_eval(monkeypatch, tmp_path, "eval.grid_step=null", "eval.intrinsic=false", "plots=false")
    assert asked == []
    report = json.loads((out / "eval.json").read_text())["datasets"]["custom"]
    assert set(report["signals"]) == {"verbalized"}
    assert all(p["expected_confidence"] is None for p in _records(out / "predictions.jsonl"))


def test_help_lists_the_groups_eval_takes_and_no_training_group():
    from calibrl.eval.job import GROUPS

    proc = _eval_cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert ", ".join(GROUPS) in groups
    # Hydra's default help lists every group under conf/ as "group: options"; no training group appears so.
    for name in ("algo:", "trainer:", "objective:", "deepspeed:", "experiment:"):
        assert name not in groups
    assert "checkpoint:" in proc.stdout  # the composed config follows
