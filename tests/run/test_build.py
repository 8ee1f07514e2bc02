"""Pieces of :mod:`calibrl.run.build` with their own contract."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from calibrl.run.build import keep_changed_config


def _write(run_dir, tree):
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(tree))


def test_a_resume_with_a_changed_config_keeps_the_old_one_and_warns(tmp_path, caplog):
    old = {"reward": {"weights": {"brier": 1.0, "format": 0.5}}, "trainer": {"resume": None, "max_steps": 6}}
    new = {"reward": {"weights": {"brier": 0.5, "format": 0.5}}, "trainer": {"resume": "auto", "max_steps": 6},
           "objective": {"combine": "segment"}}
    _write(tmp_path, old)
    with caplog.at_level(logging.WARNING, logger="calibrl.run.build"):
        changed = keep_changed_config(tmp_path, new, rl_step=4)
    assert changed == ["objective.combine", "reward.weights.brier"]  # trainer.resume is expected to change
    kept = tmp_path / "config_resolved.before_resume_step4.yaml"
    assert OmegaConf.to_container(OmegaConf.load(kept)) == old
    assert not (tmp_path / "config_resolved.yaml").exists()  # build writes the new one next
    assert "reward.weights.brier: 1.0 -> 0.5" in caplog.text and kept.name in caplog.text


def test_a_resume_with_the_same_config_keeps_nothing(tmp_path):
    tree = {"seed": 0, "trainer": {"resume": None}}
    _write(tmp_path, tree)
    assert keep_changed_config(tmp_path, {"seed": 0, "trainer": {"resume": "auto"}}, rl_step=2) == []
    assert [p.name for p in tmp_path.iterdir()] == ["config_resolved.yaml"]
    assert keep_changed_config(tmp_path / "missing", tree, rl_step=2) == []
