"""LoRA runs (model.lora) end to end on the tiny model: what is saved, calibrl-eval of the adapter
and of the merged model, resume, the SFT cache, DeepSpeed ZeRO-2 on 2 processes, start-up errors.

The random tiny model never writes a well-formed completion, and a fresh adapter is a no-op
(B = 0), so without a reward signal the adapters would not move: the in-process runs rewrite the
sampled texts into scored answers (``faults.scripted_answers``, keyed so that a resumed run gets
the texts the uninterrupted one got)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calibrl.config import ConfigError, LoraConfig
from calibrl.distributed import free_port
from calibrl.lora import apply_lora, parameter_counts
from calibrl.models import load_policy
from calibrl.run.pipeline import run
from calibrl.run.validate import validate
from faults import scripted_answers
from helpers import REPO, compose_config, read_records, tiny_spec

LORA = ["model=tiny", "debug=default", "model.lora.enabled=true", "model.lora.r=4", "trainer.lr=1e-2",
        "algo.beta=0.1", "logger.mode=disabled"]
RUN = [*LORA, "trainer.max_steps=4", "trainer.save_every=2", "model.lora.save_merged=true"]


def _strip(records: list[dict]) -> list[dict]:  # timings differ run to run
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _run(overrides: list[str], run_dir: Path) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        scripted_answers(mp, seed=0, keyed=True)
        return run(compose_config(overrides), run_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, restore_torch_threads):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _run(RUN, run_dir)
    (run_dir / "stdout.txt").write_text(out.getvalue())
    return run_dir


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibrl.eval.cli", *args, "logger.mode=disabled", "eval_sets=none"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_run_trains_only_the_adapters_and_saves_them_small(lora_run):
    ckpt, merged = lora_run / "checkpoint", lora_run / "checkpoint_merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "config.json").exists()  # not mistaken for a full HF model
    adapter, full = load_file(str(ckpt / "adapter_model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert all("lora_" in k for k in adapter)
    assert sum(v.numel() for v in adapter.values()) * 50 < sum(v.numel() for v in full.values())
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # RL moved the adapters (B = 0 at init)
    # The start-up line gives peft's own count of the same policy: r=4 on every linear layer of
    # 2 layers of hidden 64 (q, o 64->64: 512 each; k, v 64->32: 384 each; gate, up, down 64<->128: 768 each).
    policy = apply_lora(load_policy(tiny_spec())[0], LoraConfig(enabled=True, r=4))
    trainable, total = policy.get_nb_trainable_parameters()
    assert trainable == 2 * (2 * 512 + 2 * 384 + 3 * 768) == 8192
    assert f"policy: {trainable:,} trainable of {total:,} parameters" in (lora_run / "stdout.txt").read_text()
    # Resumable checkpoints hold the adapters only.
    (last,) = [p for p in sorted((lora_run / "checkpoints").iterdir())][-1:]
    state = torch.load(last / "model.pt", weights_only=True)
    assert sum(v.numel() for v in state.values()) == parameter_counts(policy)[0]
    assert not (last / "reference.pt").exists()  # the reference is the policy with its adapters off


def test_calibrl_eval_of_the_adapter_and_of_the_merged_model_equals_the_final_eval(lora_run, tmp_path):
    final = read_records(lora_run / "eval_final.jsonl")
    # the run directory brings its eval settings; the merged model is a plain HF directory: given by hand
    debug = ["data.eval_size=8", "eval.max_new_tokens=8", "eval.batch_size=8"]
    for name, checkpoint, extra in (("run", lora_run, []), ("merged", lora_run / "checkpoint_merged", debug)):
        out = tmp_path / name
        done = _eval_cli(f"checkpoint={checkpoint}", f"hydra.run.dir={out}", "eval.n_bootstrap=0", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        preds = read_records(out / "predictions.jsonl")
        assert [p["completion"] for p in preds] == [p["completion"] for p in final], name
    resolved = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert f"adapter: {(lora_run / 'checkpoint').resolve()}" in resolved and "kind: tiny" in resolved


def test_resume_continues_the_same_curve(lora_run, tmp_path, restore_torch_threads):
    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    shutil.rmtree(copy / "checkpoint")
    checkpoints = sorted((copy / "checkpoints").iterdir())
    shutil.rmtree(checkpoints[-1])  # as if killed after RL step 2's checkpoint
    _run([*RUN, "trainer.resume=auto"], copy)
    assert _strip(read_records(copy / "metrics.jsonl")) == _strip(read_records(lora_run / "metrics.jsonl"))
    want = load_file(str(lora_run / "checkpoint" / "adapter_model.safetensors"))
    got = load_file(str(copy / "checkpoint" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_sft_cache_of_adapters_gives_the_same_run(tmp_path, restore_torch_threads):
    from calibrl.run.sft_cache import sft_cache_dir

    overrides = [*LORA, "trainer.max_steps=2", "trainer.sft.cache=true", "seed=13"]
    cfg = compose_config(overrides)
    assert sft_cache_dir(cfg) != sft_cache_dir(compose_config([*overrides, "model.lora.enabled=false"]))
    shutil.rmtree(sft_cache_dir(cfg), ignore_errors=True)
    first = _run(overrides, tmp_path / "first")  # a miss: does the warm-up, stores the adapter
    assert (sft_cache_dir(cfg) / "checkpoint" / "adapter_config.json").is_file()
    second = _run(overrides, tmp_path / "second")  # a hit: the stored adapter, trainable, on the base
    a, b = (_strip(read_records(tmp_path / d / "metrics.jsonl")) for d in ("first", "second"))
    assert json.dumps(a) == json.dumps(b) and json.dumps(first) == json.dumps(second)
    assert any(r.get("train/grad_norm", 0) > 0 for r in b)


def test_full_fine_tuning_cache_keys_did_not_change_with_lora():
    """The key of a run without LoRA is computed over the model settings as they were before
    model.lora existed, so stored warm-ups stay valid."""
    import hashlib

    import calibrl
    from calibrl.device import device_type
    from calibrl.run.sft_cache import sft_cache_key
    from omegaconf import OmegaConf

    cfg = compose_config(["model=tiny", "debug=default"])
    c = OmegaConf.to_container(cfg, resolve=True)
    model = {k: v for k, v in c["model"].items() if k not in ("lora", "adapter")}
    t = c["trainer"]
    parts = {
        "model": model, "data": c["data"], "prompt": c["prompt"], "sft": {k: v for k, v in t["sft"].items() if k != "cache"},
        "bf16": t["bf16"], "device": device_type(t["device"]), "weight_decay": t["weight_decay"],
        "max_grad_norm": t["max_grad_norm"], "eval": {k: v for k, v in c["eval"].items() if k != "raw_model"},
        "seed": c["seed"], "version": calibrl.__version__,
    }
    assert sft_cache_key(cfg) == hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.lora.r=0"], "model.lora.r must be > 0, got 0"),
        (["model.lora.dropout=1.5"], r"model.lora.dropout must be in \[0, 1\)"),
        (["deepspeed=zero3"], "model.lora.enabled=true is not supported with ZeRO-3: .* use deepspeed=zero2"),
        (["model.adapter=/tmp/x"], "model.adapter='/tmp/x' is for calibrl-eval"),
    ],
)
def test_bad_lora_settings_fail_at_start_up(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config([*LORA, *overrides]))


def test_unknown_target_module_fails_before_training(tmp_path, restore_torch_threads):
    cfg = compose_config([*LORA, "model.lora.target_modules=[q_proj,c_attn]"])
    validate(cfg)  # needs the model to know its layers: found when it is built
    with pytest.raises(ConfigError, match="'c_attn' match.* its linear layers are down_proj, gate_proj, k_proj, o_proj, "
                                          "q_proj, up_proj, v_proj"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or read_records(tmp_path / "metrics.jsonl") == []


def test_two_process_zero2_lora_run_and_resume(tmp_path):
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "calibrl.train", *LORA, "deepspeed=zero2", "trainer.save_every=1", f"hydra.run.dir={tmp_path}",
             *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )

    done = torchrun("trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["train/rl_step"] for r in read_records(tmp_path / "metrics.jsonl") if "train/rl_step" in r] == [1, 2]
    assert (tmp_path / "checkpoint" / "adapter_config.json").is_file()
    states = list((tmp_path / "checkpoints").glob("*/deepspeed/*model_states.pt"))
    assert states
    module = torch.load(states[0], weights_only=False, map_location="cpu")["module"]
    # The frozen base is not saved; DeepSpeed keeps the tied output head (named_parameters() lists
    # a tied weight once, under the input embedding, so its frozen-parameter filter misses it).
    assert {k for k in module if "lora_" not in k} == {"base_model.model.lm_head.weight"}
    assert sum(v.numel() for k, v in module.items() if "lora_" in k) == 8192
    done = torchrun("trainer.max_steps=3", "trainer.resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    assert [r["train/rl_step"] for r in read_records(tmp_path / "metrics.jsonl") if "train/rl_step" in r] == [1, 2, 3]
    assert all(math.isfinite(r["train/loss"]) for r in read_records(tmp_path / "metrics.jsonl") if "train/loss" in r)
