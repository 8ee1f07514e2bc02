"""The schema is the one source of the defaults (calibrl.config): a composed config with no
override carries exactly the dataclasses' defaults, and the files of single-choice groups set no
value that could drift from them."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from calibrl.cli import CONF_DIR
from calibrl.config import AlgoConfig, DeepSpeedConfig, EvalConfig, ObjectiveConfig, TrainerConfig
from helpers import compose_config


def test_composed_defaults_are_the_schema_defaults():
    cfg = compose_config([])
    assert OmegaConf.to_object(cfg.algo) == AlgoConfig()
    assert OmegaConf.to_object(cfg.trainer) == TrainerConfig()
    assert OmegaConf.to_object(cfg.objective) == ObjectiveConfig()
    assert OmegaConf.to_object(cfg.deepspeed) == DeepSpeedConfig()
    assert OmegaConf.to_object(cfg.eval) == EvalConfig(seed=cfg.seed)
    # the values runs used before the schema became the source (the golden runs pin them)
    assert (cfg.algo.max_new_tokens, cfg.trainer.warmup_steps) == (48, 2)


@pytest.mark.parametrize("path", ["algo/grpo.yaml", "trainer/default.yaml", "deepspeed/none.yaml"])
def test_single_choice_group_files_set_nothing(path):
    assert not OmegaConf.load(CONF_DIR / path)  # a comment pointing at calibrl/config.py only
