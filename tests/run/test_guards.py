"""The run's guards alone (calibrl.run.guards): the SIGTERM flag, the non-finite stop message, the
resume state and the eval/checkpoint/stop cadence. Their use inside a run is tested by
test_robustness.py (non-finite stops), test_checkpoint.py (resume, SIGTERM)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from calibrl.config import ConfigError
from calibrl.run.guards import EXIT_NON_FINITE, Cadence, RunStopped, SignalFlag, non_finite_message, resume_state


def _checkpoint(run_dir: Path, global_step: int, rl_step: int) -> Path:
    """A complete checkpoint directory (its state.json; the engine files are not read here)."""
    path = run_dir / "checkpoints" / f"step{global_step:08d}"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({
        "global_step": global_step, "rl_step": rl_step, "trainer": {"consumed": 2 * rl_step, "skipped_steps": 0},
        "wandb_id": None, "records": global_step, "results": {"sft": {"accuracy": 0.5}},
    }))
    return path


def test_signal_flag_records_sigterm_and_restores_the_old_handler():
    calls = []

    def old(signum, frame):
        calls.append(signum)

    before = signal.signal(signal.SIGTERM, old)
    try:
        flag = SignalFlag(signal.SIGTERM)
        assert not flag.raised and signal.getsignal(signal.SIGTERM) != old
        signal.raise_signal(signal.SIGTERM)  # the process lives on: only the flag is set
        assert flag.raised and calls == []
        flag.restore()
        assert signal.getsignal(signal.SIGTERM) is old
        flag.restore()  # a second restore changes nothing
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_run_stopped_is_a_system_exit_with_its_code():
    with pytest.raises(SystemExit) as stop:
        raise RunStopped(EXIT_NON_FINITE)
    assert stop.value.code == 3 and isinstance(stop.value, RunStopped)


def test_non_finite_message_names_the_last_checkpoint_and_how_to_resume(tmp_path):
    _checkpoint(tmp_path, 4, 2)
    last = _checkpoint(tmp_path, 6, 4)
    (tmp_path / "checkpoints" / ".tmp-step00000008").mkdir()  # a save in progress: never named
    message = non_finite_message(tmp_path, 5, "3 RL steps in a row had a non-finite loss")
    assert message == (f"stopped at RL step 5: 3 RL steps in a row had a non-finite loss; nothing saved after it; "
                       f"last good checkpoint: {last} (resume with trainer.resume={last}, e.g. with a lower trainer.lr)")
    assert "\n" not in message


def test_non_finite_message_without_a_checkpoint_says_how_to_get_one(tmp_path):
    message = non_finite_message(tmp_path, 2, "non-finite gradient norm nan under DeepSpeed")
    assert message.startswith("stopped at RL step 2: non-finite gradient norm nan under DeepSpeed; nothing saved")
    assert message.endswith("no checkpoint was saved (trainer.save_every=N saves one every N RL steps)")


def test_resume_state_none_auto_and_paths(tmp_path):
    run_dir = tmp_path / "run"
    assert resume_state(None, run_dir) is None
    assert resume_state("auto", run_dir) is None  # nothing saved yet: a fresh run
    _checkpoint(run_dir, 4, 2)
    newest = _checkpoint(run_dir, 6, 4)
    auto = resume_state("auto", run_dir)
    assert auto.path == newest and (auto.global_step, auto.rl_step) == (6, 4) and auto.results == {"sft": {"accuracy": 0.5}}
    assert resume_state(str(run_dir), tmp_path / "elsewhere").path == newest  # a run dir: its newest checkpoint
    older = run_dir / "checkpoints" / "step00000004"
    assert resume_state(str(older), tmp_path / "elsewhere").path == older  # a checkpoint: that one


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_state_from_a_path_without_a_checkpoint_is_a_config_error(tmp_path, where):
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    with pytest.raises(ConfigError, match=rf"^trainer.resume={path}: no checkpoint there"):
        resume_state(str(path), tmp_path / "run")


def test_cadence_by_hand():
    c = Cadence(max_steps=6, eval_every=2, save_every=3, max_bad_steps_in_row=2)
    # evals after steps 2 and 4; not 6, the last (the final eval follows it)
    assert [i for i in range(1, 7) if c.eval_due(i)] == [2, 4]
    # checkpoints after steps 3 and 6, and after any step when a signal stops the run
    assert [i for i in range(1, 7) if c.save_due(i, stopping=False)] == [3, 6]
    assert all(c.save_due(i, stopping=True) for i in range(1, 7))
    # a stop at 2 non-finite steps in a row
    assert [c.too_many_bad(b) for b in (0, 1, 2, 3)] == [False, False, True, True]


def test_cadence_zero_turns_each_guard_off():
    c = Cadence(max_steps=4)
    assert not any(c.eval_due(i) or c.save_due(i, stopping=False) for i in range(1, 5))
    assert c.save_due(1, stopping=True)  # pre-emption still checkpoints
    assert not c.too_many_bad(100)
