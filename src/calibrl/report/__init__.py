"""Reporting: ``calibrl-compare`` (``python -m calibrl.report``) reads finished runs, aggregates
them into arms and renders tables, figures and a self-contained HTML report.

One module per step, each importing only the ones before it:

- :mod:`calibrl.report.load`: run directories and W&B groups -> :class:`~calibrl.report.load.Run`
  records (config, seed, per-step training curves, eval points with their predictions).
- :mod:`calibrl.report.aggregate`: arms by config keys; per-arm seed statistics, pooled bootstrap
  intervals, best values over eval points, curve bands.
- :mod:`calibrl.report.figures`: the comparison figures (training curves, accuracy-vs-ECE paths).
- :mod:`calibrl.report.html`: the self-contained HTML page.
- :mod:`calibrl.report.render`: the output folder: Markdown/CSV tables, PNG figures, ``report.html``.
- :mod:`calibrl.report.wandb_report`: the optional W&B Report of a run group.
- :mod:`calibrl.report.compare`: the ``calibrl-compare`` command line.
"""
