"""Tiny end-to-end runs through the real entry point (Hydra compose -> pipeline.run); the main
job's recipe (`experiment=quickstart`) on the tiny model.

`model=tiny` is a random 2-layer Llama with SmolLM2's tokenizer, so the runs take seconds; the
assertions check the files a user relies on and that every logged number is finite where it must be.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from calibrl.run.pipeline import run
from calibrl.cli import CONF_DIR
from helpers import REPO



def _compose(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    # the main job's recipe on the tiny model
    cfg = _compose(["experiment=quickstart", "model=tiny", "debug=default", "logger.mode=offline",
                    "eval.raw_model=true"])
    results = run(cfg, run_dir)
    return run_dir, results


def test_tiny_run_writes_metrics_checkpoint_and_wandb(tiny_run):
    run_dir, results = tiny_run
    records = _records(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), "steps must never decrease"
    sft_steps = [r for r in records if "sft/loss" in r]
    rl_steps = [r for r in records if "train/rl_step" in r]
    assert [r["train/rl_step"] for r in rl_steps] == [1, 2]
    # debug=default: 8 SFT examples, batch 4, 1 epoch -> 2 SFT steps; RL steps continue from there.
    assert [r["step"] for r in sft_steps] == [1, 2]
    assert [r["step"] for r in rl_steps] == [3, 4]
    for r in sft_steps:
        assert math.isfinite(r["sft/loss"]) and r["sft/loss"] > 0
    for r in rl_steps:
        for key in ("rewards/total/mean", "rewards/correctness/mean", "rewards/brier/mean", "rewards/format/mean",
                    "train/accuracy", "train/format_rate", "train/clip_fraction", "train/completion_length",
                    "train/zero_std_groups", "perf/step_s", "perf/generate_s", "perf/update_s",
                    "train/calibration_loss", "train/calibration_score", "train/expected_confidence/coverage"):
            assert math.isfinite(r[key]), key
        assert -1.0 <= r["rewards/total/mean"] <= 1.5
    evals = [r for r in records if "eval/chain_sum/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # raw model, after SFT, after RL
    assert set(results) == {"raw", "sft", "final"}
    for stage in results.values():
        assert 0.0 <= stage["accuracy"] <= 1.0 and 0.0 <= stage["format_rate"] <= 1.0
    ckpt = run_dir / "checkpoint"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert (ckpt / "tokenizer.json").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    resolved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert resolved.model.kind == "tiny" and "${" not in (run_dir / "config_resolved.yaml").read_text()
    assert resolved.experiment_name == "quickstart" and resolved.objective.calibration == "expected"
    preds = _records(run_dir / "eval_final.jsonl")
    assert len(preds) == 8 and {"id", "completion", "confidence", "correct", "format_ok"} <= set(preds[0])
    def no_nan(token):
        raise AssertionError(f"summary.json is not strict JSON: {token}")

    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["final"]["accuracy"] == results["final"]["accuracy"]
    # The tiny model never writes a confidence: its overconfidence is undefined, NaN in memory,
    # null on disk.
    assert math.isnan(results["final"]["overconfidence"]) and summary["final"]["overconfidence"] is None


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibrl.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_saved_files_follow_the_umask_not_safetensors_private_mode(tiny_run, tmp_path):
    """safetensors writes model.safetensors 0600; every saved file gets 0o666 less the umask."""
    from calibrl.models import honour_umask

    run_dir, _ = tiny_run
    mask = os.umask(0)
    os.umask(mask)
    files = [f for f in (run_dir / "checkpoint").iterdir() if f.is_file()]
    assert "model.safetensors" in {f.name for f in files}
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~mask) for f in files}
    private = tmp_path / "d" / "w.bin"
    private.parent.mkdir()
    private.write_bytes(b"x")
    os.chmod(private, 0o600)
    old = os.umask(0o027)
    try:
        honour_umask(tmp_path / "d")
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o640


def test_cli_prints_composed_config():
    out = _cli("experiment=quickstart", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.reward.weights == {"correctness": 1.0, "brier": 1.0, "format": 0.5}
    assert cfg.model.kind == "gguf" and cfg.experiment_name == "quickstart"
    assert cfg.objective.calibration == "expected" and cfg.objective.combine == "sum"


def test_cli_misspelled_key_lists_valid_keys():
    out = _cli("model=tiny", "trainer.max_stepz=3")
    assert out.returncode != 0
    assert "trainer.max_steps" in out.stderr and "Valid keys under 'trainer'" in out.stderr


def test_cli_unknown_group_option_lists_choices():
    out = _cli("model=nope", "--cfg", "job")
    assert out.returncode != 0
    assert "smollm2_135m" in out.stderr and "tiny" in out.stderr


def test_cli_unknown_reward_component_fails_before_loading(tmp_path):
    out = _cli("model=tiny", "debug=default", "+reward.weights.bier=1.0", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert "unknown reward component 'bier'; valid choices: abstention, brier, correctness, format" in out.stderr
    assert "Traceback" not in out.stderr  # a config mistake is one line, not a stack trace
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_missing_local_paths_fail_before_any_work(tmp_path):
    out = _cli("model=hf", "model.name_or_path=/does/not/exist", "debug=default", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "model.name_or_path '/does/not/exist' does not exist" in out.stderr
    out = _cli("model=tiny", "debug=default", "data=jsonl", "data.path=missing.jsonl", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "data.path 'missing.jsonl' does not exist" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_cli_zero_format_weight_is_refused(tmp_path):
    out = _cli("model=tiny", "debug=default", "reward.weights.format=0", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "format" in out.stderr and "strictly" in out.stderr


def test_cli_strips_launcher_local_rank(tmp_path):
    out = _cli("--local_rank=0", "model=tiny", "--cfg", "job")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name):
    cfg = _compose([f"experiment={name}", "model=tiny", "debug=default"])
    from calibrl.run.validate import validate

    validate(cfg)
    assert cfg.experiment_name == name


def test_sft_cache_gives_the_same_run(tmp_path):
    import shutil

    from calibrl.run.sft_cache import sft_cache_dir

    overrides = ["model=tiny", "debug=default", "trainer.sft.cache=true", "seed=7"]
    cfg = _compose(overrides)
    shutil.rmtree(sft_cache_dir(cfg), ignore_errors=True)
    first = run(cfg, tmp_path / "first")  # a miss: does the warm-up, stores it
    assert (sft_cache_dir(cfg) / "entry.json").is_file()
    second = run(_compose(overrides), tmp_path / "second")  # a hit
    plain = run(_compose(["model=tiny", "debug=default", "seed=7"]), tmp_path / "plain")
    a, b, c = (_records(tmp_path / d / "metrics.jsonl") for d in ("first", "second", "plain"))

    def strip(records):  # timings differ run to run
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]

    # Same SFT records, same post-SFT eval, same RL trajectory, same final eval.
    assert json.dumps(strip(a)) == json.dumps(strip(b)) == json.dumps(strip(c))
    assert json.dumps(first) == json.dumps(second) == json.dumps(plain)
    assert (tmp_path / "second" / "eval_sft.jsonl").read_text() == (tmp_path / "first" / "eval_sft.jsonl").read_text()
    # A different warm-up setting is a different entry.
    assert sft_cache_dir(_compose([*overrides, "trainer.sft.lr=1e-4"])) != sft_cache_dir(cfg)
    assert sft_cache_dir(_compose([*overrides, "algo.beta=0.1"])) == sft_cache_dir(cfg)


def test_sft_cache_entry_restores_every_rng(tmp_path):
    import random

    import numpy as np
    import torch

    from calibrl.run.sft_cache import load_sft_cache, save_sft_cache

    class Stub:  # stands in for the model and the tokenizer
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("eval_sft.json", "eval_sft.jsonl"):
        (run_dir / name).write_text(name)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    target = save_sft_cache(tmp_path / "entry", Stub(), Stub(), [{"step": 3, "sft/loss": 0.5}], {"ece": float("nan")}, run_dir)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    entry = load_sft_cache(target)
    entry.restore_rng()
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert entry.last_step == 3 and math.isnan(entry.eval_scalars["ece"])
    out = tmp_path / "out"
    out.mkdir()
    entry.copy_eval_files(out)
    assert (out / "eval_sft.jsonl").read_text() == "eval_sft.jsonl"
    assert load_sft_cache(tmp_path / "missing") is None


def test_gradient_checkpointing_run_matches_the_plain_run(tmp_path, monkeypatch):
    """trainer.gradient_checkpointing=true switches HF activation checkpointing on for the run and
    changes no logged loss or gradient norm (beyond float rounding)."""
    from transformers import PreTrainedModel

    calls = []
    enable = PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable",
                        lambda self, **kw: calls.append(kw) or enable(self, **kw))
    base = ["model=tiny", "debug=default", "logger.mode=disabled", "seed=3"]
    run(_compose(base), tmp_path / "plain")
    assert calls == []
    run(_compose([*base, "trainer.gradient_checkpointing=true"]), tmp_path / "ckpt")
    assert calls == [{"activation_checkpointing_kwargs": {"use_reentrant": False}}]
    # A warm-up taken from the SFT cache gives a fresh model: it is switched on for that one too.
    import shutil

    from calibrl.run.sft_cache import sft_cache_dir

    cached = [*base, "trainer.gradient_checkpointing=true", "trainer.sft.cache=true"]
    shutil.rmtree(sft_cache_dir(_compose(cached)), ignore_errors=True)
    run(_compose(cached), tmp_path / "miss")
    calls.clear()
    run(_compose(cached), tmp_path / "hit")
    assert calls == [{"activation_checkpointing_kwargs": {"use_reentrant": False}}] * 2  # loaded model, cached model
    plain, ckpt = (_records(tmp_path / d / "metrics.jsonl") for d in ("plain", "ckpt"))
    keys = ("sft/loss", "train/loss", "train/grad_norm")
    assert [sorted(k for k in r if k in keys) for r in plain] == [sorted(k for k in r if k in keys) for r in ckpt]
    for a, b in zip(plain, ckpt):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-6), k


def _safetensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_bf16_final_checkpoint_is_half_the_size_and_loads(tiny_run, tmp_path):
    """trainer.save_dtype=bfloat16: the same run (the fixture's, in fp32) writes bf16 weights, about
    half the bytes, that transformers loads; the final eval, run before the save on the fp32 policy,
    is the fixture's to the digit."""
    import torch
    from transformers import AutoModelForCausalLM

    fp32_dir, fp32_results = tiny_run
    results = run(_compose(["model=tiny", "debug=default", "logger.mode=disabled", "eval.raw_model=true",
                            "trainer.save_dtype=bfloat16"]), tmp_path)
    assert json.dumps(results["final"]) == json.dumps(fp32_results["final"])
    bf16, fp32 = _safetensors(tmp_path / "checkpoint"), _safetensors(fp32_dir / "checkpoint")
    assert sorted(bf16) == sorted(fp32)  # the tied LM head is stored once, as in fp32
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16} and {t.dtype for t in fp32.values()} == {torch.float32}
    for name, weight in fp32.items():  # the fp32 weights rounded to bf16
        assert torch.equal(bf16[name], weight.to(torch.bfloat16)), name
    size = (tmp_path / "checkpoint" / "model.safetensors").stat().st_size
    assert 0.45 < size / (fp32_dir / "checkpoint" / "model.safetensors").stat().st_size < 0.55
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoint"), dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings


def test_save_final_model_leaves_the_policy_in_fp32(tmp_path):
    import copy

    import torch

    from calibrl.models import load_policy
    from calibrl.run.stages import save_final_model
    from helpers import tiny_spec

    model, tok = load_policy(tiny_spec())
    before = copy.deepcopy(model.state_dict())
    save_final_model(model, tok, tmp_path / "ckpt", "bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()


def test_unknown_save_dtype_is_one_config_error():
    from calibrl.config import ConfigError
    from calibrl.run.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(_compose(["model=tiny", "debug=default", "trainer.save_dtype=float16"]))
    assert str(err.value) == "unknown trainer.save_dtype 'float16'; valid choices: bfloat16, float32"


def test_unreachable_hub_data_is_a_config_error(tmp_path, monkeypatch):
    """datasets raises ConnectionError for a hub id with no network (after its retries): a
    configuration error naming the data and what to do, not a traceback."""
    import calibrl.run.build as build_module
    from calibrl.config import ConfigError

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'someone/some_set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(build_module, "build_splits", offline)
    with pytest.raises(ConfigError) as err:
        run(_compose(["model=tiny", "debug=default"]), tmp_path / "r")
    assert str(err.value) == ("data: Couldn't reach 'someone/some_set' on the Hub (LocalEntryNotFoundError) "
                              "(no network here? point data.path at a local copy)")
