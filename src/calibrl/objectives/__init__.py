"""Objectives: how reward components are grouped (accuracy, calibration, format) and combined
into per-token advantages (``objective.combine``, registry :data:`COMBINERS`)."""

from calibrl.objectives.combiners import (
    COMBINERS,
    OBJECTIVE_OF,
    OBJECTIVES,
    Combiner,
    objective_of,
    register_combiner,
    segment_ids,
)

__all__ = ["COMBINERS", "OBJECTIVES", "OBJECTIVE_OF", "Combiner", "objective_of", "register_combiner", "segment_ids"]
