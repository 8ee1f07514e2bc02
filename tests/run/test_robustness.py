"""Run robustness: non-finite steps, a failing W&B sink, credentials, malformed dataset rows,
out of memory during generation, and start-up checks of model and data paths.

Faults are injected through test-only patches (``tests/faults.py``); the long version of these
faults together is the soak run (``tests/run/test_soak.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_config, make_trainer, read_records
import reasoning_gym  # noqa: F401  (heavy imports at collection, not inside the first timed test)
import torch
import transformers
from omegaconf import OmegaConf

from calibrl.config import ConfigError, TrainerConfig
from calibrl.run.validate import validate
from calibrl.data.prompts import PromptBuilder
from calibrl.data.sources import Example, build_splits
from calibrl.models import ModelSpec, load_policy
from calibrl.run.pipeline import EXIT_NON_FINITE, run
import calibrl.rl.grpo as grpo
from calibrl.rl.grpo import GRPOTrainer
from calibrl.rl.loss import clipped_policy_loss
from calibrl.rl.rollout import Rollout, generate_rollout, is_out_of_memory
from calibrl.tracking import Tracker, redact
from calibrl.cli import CONF_DIR
from faults import fake_wandb, nan_losses, out_of_memory_above

TINY = ["model=tiny", "debug=default", "trainer.num_threads=1", "eval.n_bootstrap=0"]
SECRET = "wandb-test-key-0123456789abcdef0123456789"
EXAMPLES = [
    Example("e0", "What is 2 + 3?", "5"),
    Example("e1", "Compute 12 + 30 - 7, then double-check the result carefully.", "35"),
    Example("e2", "What is 9 - 4?", "5"),
    Example("e3", "Add 1 and 1.", "2"),
    Example("e4", "What is 100 - 1, written out in digits only please?", "99"),
]
transformers.LlamaForCausalLM  # noqa: B018  (resolve the lazy module now)


_compose, _records = compose_config, read_records
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def tiny():
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    spec = ModelSpec(**fields, cache_dir=os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl") + "/models")
    return load_policy(spec)


@pytest.fixture(scope="module")
def builder(tiny):
    return PromptBuilder(tiny[1], "Answer in tags.")


# --------------------------------------------------------------------------- non-finite steps


def _trainer(model, tok, builder, **settings) -> GRPOTrainer:
    return make_trainer(model, tok, builder, EXAMPLES, **settings)  # B=2, G=2, micro-batches of 2


def _hand_rollout(tok, builder) -> Rollout:
    """B=2 prompts x G=2 completions of 3 random tokens each."""
    enc = tok([builder.prompt(e) for e in EXAMPLES[:2]], return_tensors="pt", padding=True, add_special_tokens=False)
    comp = torch.randint(3, 5000, (4, 3), generator=torch.Generator().manual_seed(0))
    return Rollout(enc.input_ids.repeat_interleave(2, dim=0), enc.attention_mask.repeat_interleave(2, dim=0),
                   comp, torch.ones(4, 3, dtype=torch.long), [""] * 4, torch.tensor([0, 0, 1, 1]))


def test_nan_loss_skips_its_backward_and_the_step(tiny, builder, monkeypatch):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    trainer = _trainer(model, tok, builder)  # micro_batch_size=2: the 4 rows are 2 micro-batches
    rollout, adv = _hand_rollout(tok, builder), torch.tensor([1.0, -1.0, 0.5, -0.5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backward = []
    original = trainer.engine.backward
    monkeypatch.setattr(trainer.engine, "backward", lambda loss: (backward.append(float(loss.detach())), original(loss)))
    calls = {"n": 0}

    def second_is_nan(*args, **kwargs):  # the second micro-batch's loss is NaN (graph kept)
        calls["n"] += 1
        out = clipped_policy_loss(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if calls["n"] == 2 else out

    monkeypatch.setattr(grpo, "clipped_policy_loss", second_is_nan)
    out = trainer.update(rollout, adv)

    assert len(backward) == 1  # the first micro-batch only: the NaN one never reached backward
    assert math.isnan(out["loss"]) and math.isnan(out["grad_norm"])
    assert all(p.grad is None for p in model.parameters())  # the first micro-batch's gradient was dropped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not trainer.engine.optimizer.state  # no optimizer step (AdamW state appears on the first)
    assert trainer.skipped_steps == 1 and trainer.bad_steps_in_row == 1

    monkeypatch.setattr(grpo, "clipped_policy_loss", clipped_policy_loss)
    out = trainer.update(rollout, adv)  # a good step ends the streak
    assert math.isfinite(out["loss"]) and trainer.skipped_steps == 1 and trainer.bad_steps_in_row == 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_run_stops_after_max_bad_steps_in_row_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    # beta > 0: every row goes through the loss, so the random tiny model updates on every step.
    overrides = [*TINY, "trainer.max_steps=8", "trainer.save_every=2", "trainer.max_bad_steps_in_row=3",
                 "algo.beta=0.01", "trainer.save_checkpoint=true"]
    nan = nan_losses(monkeypatch, from_step=3)
    with pytest.raises(SystemExit) as stop:
        run(_compose(overrides), tmp_path)
    assert stop.value.code == EXIT_NON_FINITE == 3
    # debug=default: 2 SFT steps, so RL step i is global step 2 + i; RL step 2 -> step00000004.
    good = tmp_path / "checkpoints" / "step00000004"
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calibrl-train:")]
    assert err.startswith("calibrl-train: stopped at RL step 5: 3 RL steps in a row had a non-finite loss")
    assert f"last good checkpoint: {good}" in err and f"trainer.resume={good}" in err
    # RL step 4 was due for a checkpoint but was non-finite: not saved, so the good one is kept.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step00000004"]
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "eval_final.json").exists()
    rl = [r for r in _records(tmp_path / "metrics.jsonl") if "train/rl_step" in r]
    assert [r["train/rl_step"] for r in rl] == [1, 2, 3, 4, 5]  # every step logged, the bad ones too
    assert [r["train/bad_steps_in_row"] for r in rl] == [0, 0, 1, 2, 3]
    assert [r["train/skipped_steps"] for r in rl] == [0, 0, 1, 2, 3]
    assert all(math.isnan(r["train/loss"]) for r in rl[2:]) and nan.injected[0] == 3

    # What the message says works: resume from the good checkpoint (the fault gone).
    monkeypatch.undo()
    run(_compose([*overrides, f"trainer.resume={good}"]), tmp_path / "ignored")
    rl = [r for r in _records(tmp_path / "metrics.jsonl") if "train/rl_step" in r]
    assert [r["train/rl_step"] for r in rl] == list(range(1, 9))
    assert all(math.isfinite(r["train/loss"]) for r in rl)


def test_non_finite_gradient_under_deepspeed_stops_the_run_cleanly(tmp_path, monkeypatch, capsys):
    # DeepSpeedEngine.step raises FloatingPointError (the update was applied; it cannot be skipped).
    original = GRPOTrainer.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("non-finite gradient norm nan under DeepSpeed; the step was applied")
        return original(self)

    monkeypatch.setattr(GRPOTrainer, "step", step)
    with pytest.raises(SystemExit) as stop:
        run(_compose([*TINY, "trainer.max_steps=3"]), tmp_path)
    assert stop.value.code == EXIT_NON_FINITE
    err = capsys.readouterr().err
    assert "stopped at RL step 2: non-finite gradient norm nan under DeepSpeed" in err
    assert "no checkpoint was saved" in err
    assert [r["train/rl_step"] for r in _records(tmp_path / "metrics.jsonl") if "train/rl_step" in r] == [1]


@pytest.mark.parametrize("value, match", [(-1, "max_bad_steps_in_row must be >= 0"),
                                          (None, "min_generation_batch must be >= 1")])
def test_bad_robustness_settings_fail_at_start_up(value, match):
    override = f"trainer.max_bad_steps_in_row={value}" if value is not None else "trainer.min_generation_batch=0"
    with pytest.raises(ConfigError, match=match):
        validate(_compose([*TINY, override]))


# --------------------------------------------------------------------------- W&B failures, credentials


def test_wandb_log_failure_warns_once_and_the_metrics_file_stays_complete(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    fake = fake_wandb(monkeypatch, tmp_path, fail_at=3, message=f"POST https://api:{SECRET}@api.wandb.ai: timed out")
    tracker = Tracker(tmp_path, {"logger": {"group": SECRET}}, mode="online", group=SECRET, name=f"run-{SECRET}")
    with caplog.at_level(logging.WARNING, logger="calibrl.tracking"):
        for step in range(1, 7):
            tracker.log({"x": float(step)}, step=step)
        tracker.summary({"final/x": 6.0})
        tracker.close()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in fake.logged] == [1, 2]  # W&B got the steps before the failure, then nothing
    (warning,) = caplog.records  # once, not once per step
    text = warning.getMessage()
    assert "W&B log failed at step 3 (ConnectionError" in text and "Training continues" in text
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-fake'}" in text and str(tracker.metrics_path) in text
    assert SECRET not in text and "<WANDB_API_KEY redacted>" in text
    assert not fake.summary and not fake.finished  # the broken run is left alone
    assert tracker.run_id == "fakerun1"  # a checkpoint still names the W&B run to resume
    # what W&B was given had the key redacted too
    assert SECRET not in json.dumps(fake.init_kwargs, default=str)


def test_wandb_start_failure_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    fake_wandb(monkeypatch, tmp_path, init_error=TimeoutError("wandb.init timed out after 90 s"))
    with caplog.at_level(logging.WARNING, logger="calibrl.tracking"):
        tracker = Tracker(tmp_path, {}, mode="online")
        tracker.log({"x": 1.0}, step=1)
        tracker.close()
    (warning,) = caplog.records
    assert "W&B start failed before the first step (TimeoutError" in warning.getMessage()
    assert "logger.mode=offline" in warning.getMessage()
    assert tracker.run_id is None and tracker.wandb_dir is None
    assert _records(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 1.0}]


def test_redact_replaces_credentials_from_the_environment():
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": "hf_abcdefghijkl", "SHORT_TOKEN": "1", "PATH": "/usr/bin"}
    value = {"a": [f"x{SECRET}y", ("hf_abcdefghijkl",)], SECRET: 3, "n": 1.5, "p": "/usr/bin"}
    assert redact(value, env) == {
        "a": ["x<WANDB_API_KEY redacted>y", ("<HF_TOKEN redacted>",)], "<WANDB_API_KEY redacted>": 3, "n": 1.5,
        "p": "/usr/bin",  # not a credential's name; "1" too short to be one
    }


def test_api_key_never_reaches_config_logs_or_stdout(tmp_path):
    # The key is in the environment and, by mistake, interpolated into the config; the run goes
    # through the real CLI (Hydra's train.log) with a real offline W&B run.
    run_dir = tmp_path / "run"
    env = os.environ | {"WANDB_API_KEY": SECRET}
    proc = subprocess.run(
        [sys.executable, "-m", "calibrl.train", *TINY, "trainer.max_steps=1", "trainer.save_checkpoint=false",
         "logger.mode=offline", "logger.group=${oc.env:WANDB_API_KEY}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    for name in ("config_resolved.yaml", "metrics.jsonl", "train.log"):
        assert (run_dir / name).is_file() and SECRET not in (run_dir / name).read_text(), name
    assert OmegaConf.load(run_dir / "config_resolved.yaml").logger.group == "<WANDB_API_KEY redacted>"
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked  # W&B's own files (offline run, debug logs) included


# --------------------------------------------------------------------------- malformed dataset rows

FIELDS = {"question": "q", "answer": "a", "id": "uid", "slice": None}


def _rows(n: int) -> list[dict]:
    return [{"q": f"What is {i} + 1?", "a": str(i + 1), "uid": f"u{i:02d}"} for i in range(n)]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _hf(path: Path, **over):
    kwargs = dict(name="custom", path=str(path), train_size=100, eval_size=2, train_seed=0, eval_seed=1,
                  fields=FIELDS) | over
    return build_splits("hf", **kwargs)


@pytest.mark.parametrize("row, field, problem", [
    ({"q": ["What", "is", "1?"], "a": "2"}, "question", "holds a list"),
    ({"q": "What is 1 + 1?", "a": {"value": 2}}, "answer", "holds a dict"),
    ({"q": "What is 1 + 1?", "a": True}, "answer", "holds a bool"),
    ({"q": 12, "a": "2"}, "question", "holds a int"),
], ids=["list_question", "dict_answer", "bool_answer", "number_question"])
def test_non_string_field_names_file_row_and_field(tmp_path, row, field, problem):
    rows = _rows(6)
    rows[2] = row
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        _hf(path)
    msg = str(err.value)
    assert str(path) in msg and "row 3 (1-based)" in msg and f"field {field!r}" in msg and problem in msg
    assert "data.on_bad_row=skip" in msg


def test_bad_jsonl_line_is_named(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [*_rows(3), '{"q": "What is 9?", "a": ', *_rows(2)])
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 4 \(1-based\) could not be read as \.jsonl \(not valid JSON"):
        _hf(path)


def test_numbers_as_answers_and_mixed_column_types_are_read(tmp_path):
    # datasets' JSON reader refuses a column that is a number in one row and a string in another.
    rows = _rows(6)
    rows[1]["a"], rows[4]["a"] = 2, 5.5
    s = _hf(_write(tmp_path / "mixed.jsonl", rows), eval_size=1)
    assert {e.answer for e in s.train + s.eval} == {"1", "2", "3", "4", "5.5", "6"}


def test_skip_leaves_malformed_rows_out_and_counts_them(tmp_path, caplog):
    rows = [*_rows(8), {"q": "What is 1?"}, {"q": " ", "a": "1"}, {"q": "x", "a": [1]}, "not json", "[1, 2]",
            {"q": "What is 2?", "a": None}]
    with caplog.at_level(logging.WARNING, logger="calibrl.data.sources"):
        s = _hf(_write(tmp_path / "mixed.jsonl", rows), on_bad_row="skip")
    assert s.skipped_rows == 6
    assert len(s.train) + len(s.eval) == 8
    (warning,) = caplog.records
    assert "skipped 6 malformed rows" in warning.getMessage() and "row 9 (1-based)" in warning.getMessage()


def test_a_column_no_row_has_is_a_mapping_error_even_when_skipping(tmp_path):
    with pytest.raises(ValueError, match=r"no row has column 'question' \(data.fields.question\); columns: a, q, uid"):
        _hf(_write(tmp_path / "d.jsonl", _rows(4)), fields=FIELDS | {"question": "question"}, on_bad_row="skip")


def test_unknown_on_bad_row_fails_at_start_up():
    with pytest.raises(ConfigError, match="unknown data.on_bad_row 'ignore'; valid choices: error, skip"):
        validate(_compose([*TINY, "data.on_bad_row=ignore"]))


def test_run_with_skipped_rows_logs_the_count_once_at_start(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(40)]
    rows[5]["answer"] = ""
    data = _write(tmp_path / "sums.jsonl", [*rows, "{broken"])
    cfg = _compose([*TINY, "data=jsonl", f"data.path={data}", "data.on_bad_row=skip", "trainer.max_steps=1",
                    "trainer.sft.enabled=false", "trainer.save_checkpoint=false"])
    run(cfg, tmp_path / "run")
    records = _records(tmp_path / "run" / "metrics.jsonl")
    assert records[0] == {"step": 0, "data/skipped_rows": 2.0}
    assert sum("data/skipped_rows" in r for r in records) == 1


# --------------------------------------------------------------------------- out of memory in generation


def _strip(rollout: Rollout) -> list[tuple]:
    """Each row's content without padding: (group, prompt tokens, completion tokens, text, truncated)."""
    return [
        (int(rollout.group_index[i]), rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist(),
         rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist(), rollout.texts[i],
         bool(rollout.truncated[i]))
        for i in range(len(rollout))
    ]


def test_generation_out_of_memory_retries_in_halves_with_the_same_rollout(tiny, builder, monkeypatch, caplog):
    model, tok = tiny
    prompts = [builder.prompt(e) for e in EXAMPLES]  # 5 prompts of different lengths
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_string=None)  # greedy: the same text either way
    whole = generate_rollout(model, tok, prompts, 1, **kwargs)
    calls = out_of_memory_above(monkeypatch, max_prompts=2)
    ooms: list[int] = []
    with caplog.at_level(logging.WARNING, logger="calibrl.rl.rollout"):
        split = generate_rollout(model, tok, prompts, 1, **kwargs, on_oom=ooms.append)
    # 5 -> OOM -> 3 + 2; 3 -> OOM -> 2 + 1
    assert calls == [5, 3, 2, 1, 2] and ooms == [5, 3]
    assert "generation ran out of memory on 5 prompts (x1 completions); retrying as 3 + 2" in caplog.text
    assert split.group_index.tolist() == list(range(5))
    assert _strip(split) == _strip(whole)
    assert split.prompt_ids.shape == whole.prompt_ids.shape  # the longest prompt sets the width either way
    assert model.training is False  # the mode generate found is restored after the failed attempts


def test_generation_out_of_memory_keeps_groups_whole_and_in_order(tiny, builder, monkeypatch):
    model, tok = tiny
    prompts = [builder.prompt(e) for e in EXAMPLES]
    out_of_memory_above(monkeypatch, max_prompts=2)
    torch.manual_seed(0)
    split = generate_rollout(model, tok, prompts, 3, max_new_tokens=4)
    assert split.group_index.tolist() == [i for i in range(5) for _ in range(3)]
    for i in range(len(split)):  # every row carries its own group's prompt
        expected = tok(prompts[i // 3], add_special_tokens=False).input_ids
        assert split.prompt_ids[i][split.prompt_mask[i].bool()].tolist() == expected
    assert split.completion_ids.shape[0] == split.completion_mask.shape[0] == len(split.texts) == 15


def test_generation_out_of_memory_at_the_floor_is_raised(tiny, builder, monkeypatch):
    model, tok = tiny
    prompts = [builder.prompt(e) for e in EXAMPLES]
    calls = out_of_memory_above(monkeypatch, max_prompts=2)
    with pytest.raises(torch.OutOfMemoryError):
        generate_rollout(model, tok, prompts, 2, max_new_tokens=4, min_prompts=3)
    assert calls == [5, 3]  # 5 -> 3 + 2; 3 is the floor: raised


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_grpo_step_counts_generation_out_of_memory_retries(tiny, builder, monkeypatch):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    trainer = _trainer(model, tok, builder)
    out_of_memory_above(monkeypatch, max_prompts=1)
    metrics = trainer.step()  # 2 prompts -> OOM -> 1 + 1
    assert metrics["perf/generation_oom_retries"] == 1.0
    monkeypatch.undo()
    assert trainer.step()["perf/generation_oom_retries"] == 0.0  # counted per step


def test_min_generation_batch_reaches_generation(tiny, builder, monkeypatch):
    trainer_cfg = OmegaConf.to_object(_compose([*TINY, "trainer.min_generation_batch=4"]).trainer)
    assert isinstance(trainer_cfg, TrainerConfig) and trainer_cfg.min_generation_batch == 4
    trainer = _trainer(copy.deepcopy(tiny[0]), tiny[1], builder, min_generation_batch=trainer_cfg.min_generation_batch)
    seen = {}
    monkeypatch.setattr(grpo, "generate_rollout", lambda *args, min_prompts, **kwargs: seen.update(min_prompts=min_prompts))
    trainer.generate(EXAMPLES[:2])
    assert seen == {"min_prompts": 4}


# --------------------------------------------------------------------------- trust_remote_code, paths


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_trust_remote_code_is_off_by_default(model):
    assert _compose([f"model={model}"]).model.trust_remote_code is False


def test_load_policy_passes_trust_remote_code_false(tmp_path, monkeypatch):
    seen = []

    def record(name):
        def from_pretrained(*args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code")))
            raise RuntimeError("stop here")
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    with pytest.raises(RuntimeError, match="stop here"):
        load_policy(ModelSpec(kind="hf", name="m", name_or_path=str(tmp_path)))
    assert seen == [("tokenizer", False)]


def test_missing_gguf_package_fails_before_any_work(tmp_path):
    cfg = _compose([*TINY, "model.tokenizer_from.gguf_package=no_such_package_calibrl",
                    f"model.cache_dir={tmp_path / 'cache'}"])  # an empty cache: the package is needed
    with pytest.raises(FileNotFoundError,
                       match=r"model.tokenizer_from.gguf_package: package 'no_such_package_calibrl' is not installed"):
        validate(cfg)
    with pytest.raises(FileNotFoundError):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written, no data built


def test_missing_gguf_file_and_local_tokenizer_dir_fail_at_start_up(tmp_path):
    cfg = _compose([*TINY, "model.tokenizer_from.gguf_file=missing.gguf", f"model.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer_from.gguf_file 'missing.gguf' not found in package"):
        validate(cfg)
    cfg = _compose([*TINY, "model.tokenizer_from.kind=hf", f"+model.tokenizer_from.name_or_path={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer_from.name_or_path '.*nope' does not exist"):
        validate(cfg)


def test_materialized_model_needs_no_package(tmp_path):
    cache = tmp_path / "cache"
    (cache / "smollm2-135m-instruct").mkdir(parents=True)
    (cache / "smollm2-135m-instruct" / "config.json").write_text("{}")
    validate(_compose([*TINY, "model.tokenizer_from.gguf_package=no_such_package_calibrl", f"model.cache_dir={cache}"]))
