"""Reporting: ``calibrl-compare`` (``python -m calibrl.report``) reads finished runs, aggregates
them into arms and renders tables, figures and a self-contained HTML report."""
