"""The main job's path on the real SmolLM2-135M model, shrunk (deselected by default: `-m slow`)."""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir

from calibrl.run.pipeline import run
from calibrl.cli import CONF_DIR


@pytest.mark.slow
def test_quickstart_shrunk_on_smollm2(tmp_path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=quickstart", "debug=default", "data.train_size=400", "trainer.sft.num_examples=160",
                "trainer.sft.epochs=1",
                "trainer.sft.batch_size=8", "data.eval_size=32", "eval.max_new_tokens=48", "algo.max_new_tokens=48",
                "algo.group_size=4",
            ],
        )
    results = run(cfg, tmp_path)
    # 160 gold demonstrations (20 steps) teach the tag format to the real model.
    assert results["sft"]["format_rate"] >= 0.8
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if "train/rl_step" in r]
    assert len(rl) == 2 and all(math.isfinite(r["rewards/total/mean"]) for r in rl)
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
