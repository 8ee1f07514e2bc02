"""Evaluation: the held-out evaluator shared by training and ``calibrl-eval``.

- :mod:`calibrl.eval.evaluator`: generate, parse, score and measure a set (one function for both).
- :mod:`calibrl.eval.signals`: stated vs model-intrinsic confidence (answer-token probability,
  lowest-window probability).
- :mod:`calibrl.eval.plots`: reliability diagrams and confidence histograms.
- :mod:`calibrl.eval.job` and :mod:`calibrl.eval.cli`: the ``calibrl-eval`` job
  (``python -m calibrl.eval``).
"""
