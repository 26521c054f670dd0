"""Segmentation scores of one case and their means over a site: Dice, HD95 and NSD per foreground class.

Dice counts voxels; HD95 and NSD (normalised surface Dice) measure the boundary, which Dice barely
sees on large organs and which matters where a margin is planned. Both boundary scores are MONAI's,
computed on the whole case (a 3-D volume, or a 2-D image) with its real voxel spacing, so they are in
mm (pixel units when the spacing is not known):

- HD95: the larger of the two directed 95th percentiles (``torch.quantile``, linear interpolation) of
  the distances from each surface voxel of one mask to the nearest surface voxel of the other; a
  surface voxel is a mask voxel that binary erosion removes.
- NSD at tolerance tau: the fraction of both surfaces' voxels lying within tau of the other surface
  (Nikolov et al., 2021).

Both come from one call of ``monai.metrics.utils.get_edge_surface_distance`` (the surfaces and both
directions' distance transforms), which ``compute_hausdorff_distance(..., percentile=95)`` and
``compute_surface_dice(..., class_thresholds=[tau])`` would each compute again: they give the same
numbers (a test holds them equal) at half the cost, on a whole CT volume the larger part of an
evaluation after the network's own.

A class that only one of prediction and truth contains has no pair of surfaces to measure. MONAI
(1.6) then warns and returns HD95 NaN, the same as for a class in neither, NSD 0, and Dice NaN
(``compute_dice``'s ``ignore_empty``) when only the truth is empty but 0 when only the prediction
is. Here the rule is explicit and the same both ways: Dice 0, NSD 0, HD95 inf, so a missed or
hallucinated structure is never mistaken for an absent one; :class:`SiteScores` leaves the infinite
HD95 out of its mean and counts it. A class in neither scores NaN everywhere and is not a case of
that class (MONAI calls this NaN too).

This module knows nothing of Flower; it scores label maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

__all__ = ["ClassScores", "ClassSummary", "SiteScores", "case_scores"]


@dataclass(frozen=True)
class ClassScores:
    """One class in one case. HD95 in mm (pixels without spacing); see the module docstring for absent classes."""

    dice: float
    hd95: float
    nsd: float


def _label_map(labels: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"{what} must be an integer label map, got dtype {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ValueError(f"{what} must be a 2-D or 3-D label map, got shape {tuple(labels.shape)}")
    return labels


def _per_class(tolerance: float | Sequence[float], num_foreground: int) -> list[float]:
    tolerances = (
        [float(tolerance)] * num_foreground if isinstance(tolerance, (int, float)) else [float(t) for t in tolerance]
    )
    if len(tolerances) != num_foreground or any(t < 0 for t in tolerances):
        raise ValueError(
            f"tolerance must be one non-negative number or one per foreground class ({num_foreground}), got {tolerance}"
        )
    return tolerances


def _class_scores(
    prediction: torch.Tensor, truth: torch.Tensor, tolerance: float, spacing: list[float] | None
) -> ClassScores:
    """Scores of one class from its two binary masks."""
    predicted, present = bool(prediction.any()), bool(truth.any())
    if not (predicted or present):
        return ClassScores(math.nan, math.nan, math.nan)
    if not (predicted and present):
        return ClassScores(0.0, math.inf, 0.0)
    dice = 2.0 * float((prediction & truth).sum()) / float(prediction.sum() + truth.sum())
    _, (to_truth, to_prediction), _ = get_edge_surface_distance(prediction, truth, spacing=spacing, symmetric=True)
    hd95 = max(float(torch.quantile(d.float(), 0.95)) for d in (to_truth, to_prediction))
    within = int((to_truth <= tolerance).sum() + (to_prediction <= tolerance).sum())
    return ClassScores(dice, hd95, within / (len(to_truth) + len(to_prediction)))


def case_scores(
    prediction: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    num_classes: int,
    tolerance: float | Sequence[float],
    spacing: Sequence[float] | None = None,
) -> dict[int, ClassScores]:
    """Dice, HD95 and NSD of each foreground class (1 .. num_classes - 1) of one case.

    ``prediction`` and ``truth`` are integer label maps of the same 2-D or 3-D shape (0 = background),
    the whole case rather than slices, or surfaces would be cut. ``spacing`` is the voxel size along
    each of their axes, in mm; None measures in pixels. ``tolerance`` is NSD's tolerance in the same
    units, one for all classes or one per foreground class (a tolerance is a property of the
    structure: how far its boundary may be off).
    """
    prediction, truth = _label_map(prediction, "prediction"), _label_map(truth, "truth")
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ in shape")
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != truth.ndim or any(s <= 0 for s in spacing):
            raise ValueError(
                f"spacing must give one positive size per axis of the {truth.ndim}-D label map, got {spacing}"
            )
    tolerances = _per_class(tolerance, num_classes - 1)
    return {c: _class_scores(prediction == c, truth == c, tolerances[c - 1], spacing) for c in range(1, num_classes)}


@dataclass(frozen=True)
class ClassSummary:
    """A class's means over a site's cases; each mean is NaN when no case contributes to it."""

    dice: float  # over the cases of the class (in the truth or the prediction)
    hd95: float  # over the cases where both contain it: a finite HD95
    nsd: float  # over the cases of the class
    cases: int  # cases of the class
    hd95_unbounded: int  # cases of the class with HD95 inf (in only one of the two), left out of the hd95 mean


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class SiteScores:
    """Collects :func:`case_scores` results of a site's cases and gives per-class means, NaN-aware."""

    def __init__(self) -> None:
        self._scores: dict[int, list[ClassScores]] = {}
        self.num_cases = 0

    def add(self, scores: Mapping[int, ClassScores]) -> None:
        """Add one case; a class that is in neither its truth nor its prediction (all NaN) does not count for it."""
        self.num_cases += 1
        for label, s in scores.items():
            self._scores.setdefault(label, [])
            if not math.isnan(s.dice):
                self._scores[label].append(s)

    def summary(self) -> dict[int, ClassSummary]:
        """Per-class means over the cases added so far, by class label."""
        return {label: self._summarise(scores) for label, scores in sorted(self._scores.items())}

    @staticmethod
    def _summarise(scores: list[ClassScores]) -> ClassSummary:
        finite_hd95 = [s.hd95 for s in scores if math.isfinite(s.hd95)]
        return ClassSummary(
            dice=_mean([s.dice for s in scores]),
            hd95=_mean(finite_hd95),
            nsd=_mean([s.nsd for s in scores]),
            cases=len(scores),
            hd95_unbounded=len(scores) - len(finite_hd95),
        )
