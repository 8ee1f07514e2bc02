"""Helpers shared by several test files (import with ``from helpers import ...``; ``tests/`` is on
``sys.path``, see ``pyproject.toml``). Fixtures live in ``conftest.py``; fault injection in
``faults.py``.

- :func:`load_cases`: the repository's copy of the shared input cases (``tests/fixtures/cases``).
- :func:`compose_config`, :func:`read_records`: the real training config and a run's metrics file.
- :func:`tiny_spec`, :func:`hand_rollout`, :func:`make_trainer`: the tiny random Llama, a
  hand-made rollout and a GRPO trainer over it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from calibrl.cli import CONF_DIR
from calibrl.config import AlgoConfig, ObjectiveConfig, TrainerConfig
from calibrl.data.example import Example
from calibrl.data.sources import exact_match
from calibrl.models import ModelSpec
from calibrl.rewards import RewardFunction
from calibrl.rl.engine import TorchEngine
from calibrl.rl.grpo import GRPOTrainer
from calibrl.rl.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CASES_DIR = FIXTURES / "cases"
SHARED_CASES_DIR = REPO.parent / "shared" / "cases"

STOP = "</confidence>"
EOS = 2  # SmolLM2: <|im_end|> is both EOS and pad
RLCR = {"correctness": 1.0, "brier": 1.0, "format": 0.5}
EXAMPLES = [
    Example("e0", "What is 2 + 3?", "5"),
    Example("e1", "Compute 12 + 30 - 7, then double-check the result carefully.", "35"),
    Example("e2", "What is 9 - 4?", "5"),
]
LENGTHS = [4, 2, 3, 1]  # completion tokens of the 4 rows of hand_rollout; n_tokens = 10


def load_cases(name: str) -> list[dict[str, Any]]:
    """Every case (one JSON object per non-blank line) of ``tests/fixtures/cases/<name>``.

    A missing file is an error, never a skip: a test that silently loads no cases would pass
    while checking nothing.

    Raises:
        FileNotFoundError: no such case file.
        ValueError: a line is not valid JSON, a case is not an object, or the file holds no case.
    """
    path = CASES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"case file {path} does not exist")
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: a case must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"case file {path} holds no case")
    return rows


def case_id(row: dict[str, Any]) -> str:
    """Test id of a case: its ``name``."""
    return str(row["name"])


def compose_config(overrides: list[str]):
    """The real training config (``conf/config.yaml``) composed with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tiny_spec() -> ModelSpec:
    """The ``model=tiny`` preset: a random 2-layer Llama with SmolLM2's tokenizer."""
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    return ModelSpec(**fields, cache_dir=os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl") + "/models")


def hand_rollout(tok, builder) -> Rollout:
    """B=2 prompts x G=2 completions of random tokens with the masks given by LENGTHS."""
    enc = tok([builder.prompt(e) for e in EXAMPLES[:2]], return_tensors="pt", padding=True, add_special_tokens=False)
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(3, 5000, (4, 5), generator=gen)
    mask = (torch.arange(5)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return Rollout(
        enc.input_ids.repeat_interleave(2, dim=0), enc.attention_mask.repeat_interleave(2, dim=0),
        comp, mask, [""] * 4, torch.tensor([0, 0, 1, 1]),
    )


def rl_groups(**settings: Any) -> tuple[AlgoConfig, TrainerConfig, ObjectiveConfig]:
    """The ``algo``, ``trainer`` and ``objective`` settings of a small test trainer (B=2, G=2, at
    most 6 new tokens, micro-batches of 2, no bf16); each keyword sets the field of that name in
    whichever of the three has it (e.g. ``beta=0.1``, ``micro_batch_size=4``, ``combine="segment"``).

    Raises:
        TypeError: a keyword that is no field of any of them.
    """
    groups = (AlgoConfig(group_size=2, prompts_per_step=2, max_new_tokens=6),
              TrainerConfig(micro_batch_size=2, bf16=False), ObjectiveConfig())
    for k, v in settings.items():
        owner = next((g for g in groups if k in g.__dataclass_fields__), None)
        if owner is None:
            raise TypeError(f"no setting {k!r} in algo, trainer or objective")
        setattr(owner, k, v)
    return groups


def make_trainer(model, tok, builder, examples=EXAMPLES, **settings) -> GRPOTrainer:
    """A GRPO trainer (RLCR reward, AdamW lr 1e-3) over ``examples``, with
    :func:`rl_groups` (``settings`` override them)."""
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0)
    return GRPOTrainer(
        engine, tok, builder, examples, lambda a, e: a is not None and exact_match(a, e) >= 1,
        RewardFunction(RLCR), *rl_groups(**settings),
    )
