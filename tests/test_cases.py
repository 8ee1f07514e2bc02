"""The repository's copy of the shared input cases (``tests/fixtures/cases``) equals ``../shared/cases``
when that folder exists beside the repository, and every case file is loaded by some test."""

from __future__ import annotations

import pytest

from helpers import CASES_DIR, REPO, SHARED_CASES_DIR, load_cases


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_file())


@pytest.mark.skipif(not SHARED_CASES_DIR.is_dir(), reason=f"no shared case folder at {SHARED_CASES_DIR}")
def test_repo_copy_equals_the_shared_cases():
    assert _files(CASES_DIR) == _files(SHARED_CASES_DIR), "copy the shared case files into tests/fixtures/cases"
    for name in _files(SHARED_CASES_DIR):
        assert (CASES_DIR / name).read_bytes() == (SHARED_CASES_DIR / name).read_bytes(), f"{name} differs"


@pytest.mark.parametrize("name", [n for n in _files(CASES_DIR) if n.endswith(".jsonl")])
def test_every_case_file_is_loaded_by_a_test(name):
    assert load_cases(name)
    users = [p for p in (REPO / "tests").rglob("test_*.py") if f'load_cases("{name}")' in p.read_text()]
    assert users, f"no test loads {name}"


def test_load_cases_refuses_a_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cases("no_such_file.jsonl")
