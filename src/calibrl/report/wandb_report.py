"""A W&B Report of a run group (``calibrl-compare --wandb-report``): line plots of the per-step
``train/*`` metrics over ``train/rl_step``, the group's runs grouped into arms by config keys.

It needs the optional package ``wandb_workspaces`` (``pip install wandb-workspaces``); without
it, :data:`WANDB_UI_HOWTO` says how to build the same view by hand in the W&B UI.
"""

from __future__ import annotations

from collections.abc import Sequence

from calibrl.report.load import CURVE_METRICS

__all__ = ["WANDB_UI_HOWTO", "wandb_report"]

# format with path (ENTITY/PROJECT), group and keys (the --by keys, comma-separated)
WANDB_UI_HOWTO = (
    "wandb_workspaces is not installed (pip install wandb-workspaces), so no W&B Report was created. "
    "In the W&B UI: open project {path}, filter the runs table by Group = {group}, click 'Group' and "
    "choose the config keys {keys}; line plots of train/accuracy, train/ece, train/brier, train/auroc "
    "and train/confidence_mean with x-axis train/rl_step then show one line per arm (edit panel -> "
    "Grouping -> range: min/max for the seed band)."
)


def wandb_report(path: str, group: str, by: Sequence[str]) -> str:
    """Create a W&B Report of a group (line plots of :data:`~calibrl.report.load.CURVE_METRICS`
    over ``train/rl_step``, runs grouped by the ``by`` config keys) and return its URL.

    Args:
        path: ``ENTITY/PROJECT``.
        group: the W&B run group.
        by: dotted config keys that define an arm.

    Raises:
        ImportError: ``wandb_workspaces`` is not installed.
        wandb.errors.Error, OSError, ValueError: W&B refused or could not be reached.
    """
    import wandb_workspaces.reports.v2 as wr

    entity, project = path.split("/")
    runset = wr.Runset(entity=entity, project=project, name=group, filters=f"Metric('group') == {group!r}",
                       groupby=[f"config.{k}" for k in by])
    panels = [wr.LinePlot(x="train/rl_step", y=[f"train/{m}"], title=f"train/{m}") for m in CURVE_METRICS]
    report = wr.Report(entity=entity, project=project, title=f"calibrl-compare: {group}",
                       description=f"Arms by {', '.join(by)}; mean over seeds.",
                       blocks=[wr.PanelGrid(runsets=[runset], panels=panels)])
    report.save()
    return report.url
