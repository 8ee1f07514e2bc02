"""Plots: each writes a valid PNG (creating parent folders) and refuses invalid input before
writing anything."""

from __future__ import annotations

import numpy as np
import pytest

from calibrl.eval.plots import confidence_histogram, reliability_diagram, reliability_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q = rng.uniform(size=200)
    return q, (rng.uniform(size=200) < q**2).astype(int)


def _assert_png(path, returned):
    assert returned == path
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_diagram_writes_png(tmp_path, data, strategy):
    path = tmp_path / "nested" / "dir" / "reliability.png"
    _assert_png(path, reliability_diagram(*data, path, strategy=strategy, title="verbalized"))


def test_reliability_diagram_accepts_str_path_and_empty_bins(tmp_path):
    # Only two of ten bins hold data; the others are skipped, not drawn as NaN bars.
    path = tmp_path / "sparse.png"
    _assert_png(path, reliability_diagram([0.15, 0.15, 0.95], [1, 0, 1], str(path)))


def test_confidence_histogram_writes_png(tmp_path, data):
    path = tmp_path / "a" / "hist.png"
    _assert_png(path, confidence_histogram(*data, path, n_bins=10))
    # All correct: the "wrong" layer is empty.
    path = tmp_path / "all_right.png"
    _assert_png(path, confidence_histogram([0.7, 0.9], [1, 1], path))


def test_reliability_grid_writes_png(tmp_path, data):
    q, c = data
    path = tmp_path / "grid" / "signals.png"
    panels = {"verbalized": (q, c), "answer-token probability": (np.sqrt(q), c)}
    _assert_png(path, reliability_grid(panels, path, n_bins=5, title="before / after"))


@pytest.mark.parametrize(
    "draw",
    [
        lambda p: reliability_diagram([], [], p),
        lambda p: confidence_histogram([], [], p),
        lambda p: reliability_grid({"ok": ([0.5], [1]), "empty": ([], [])}, p),
        lambda p: reliability_grid({}, p),
        lambda p: reliability_diagram([0.5, 1.5], [1, 0], p),
        lambda p: confidence_histogram([0.5], [1], p, n_bins=0),
    ],
    ids=["diagram-empty", "histogram-empty", "grid-empty-panel", "grid-no-panels", "diagram-out-of-range", "histogram-no-bins"],
)
def test_invalid_input_raises_before_writing(tmp_path, draw):
    path = tmp_path / "never" / "plot.png"
    with pytest.raises(ValueError):
        draw(path)
    assert not path.parent.exists()
