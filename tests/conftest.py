"""Shared test helpers.

``load_cases(name)`` reads one JSON-lines case file from the shared case folder
(``<repo>/../shared/cases``, see ``shared/cases/README.md``); when that folder is missing it falls
back to ``$CALIBRL_CASES_DIR``. A missing folder or file is an error, never a skip: a test that
silently loads no cases would pass while checking nothing.

Case files are read at collection time (they feed ``pytest.mark.parametrize``), so tests import
the helper directly: ``from conftest import load_cases``. The ``cases`` fixture offers the same
helper to tests that prefer a fixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES_DIR = REPO_ROOT.parent / "shared" / "cases"
CASES_ENV = "CALIBRL_CASES_DIR"


def cases_dir() -> Path:
    """The case folder: ``<repo>/../shared/cases``, else ``$CALIBRL_CASES_DIR``.

    Raises:
        FileNotFoundError: neither exists (the message names both places looked at).
    """
    if DEFAULT_CASES_DIR.is_dir():
        return DEFAULT_CASES_DIR
    env = os.environ.get(CASES_ENV)
    if env and Path(env).expanduser().is_dir():
        return Path(env).expanduser()
    raise FileNotFoundError(
        f"shared case folder not found: looked at {DEFAULT_CASES_DIR} and ${CASES_ENV}="
        f"{env!r}; check out the shared folder next to the repo or set {CASES_ENV}"
    )


def load_cases(name: str) -> list[dict[str, Any]]:
    """Every case (one JSON object per non-blank line) of ``<cases dir>/<name>``.

    Raises:
        FileNotFoundError: no case folder, or no such file in it.
        ValueError: a line is not valid JSON, a case is not an object, or the file holds no case.
    """
    path = cases_dir() / name
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


@pytest.fixture
def cases():
    """The :func:`load_cases` helper, as a fixture."""
    return load_cases


def compose_config(overrides: list[str]):
    """The real training config (``conf/config.yaml``) composed with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from calibrl.train import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def restore_torch_threads():
    """pipeline.run calls torch.set_num_threads; give the rest of the session its setting back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
