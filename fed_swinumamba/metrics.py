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

Both come from one pass over the two surfaces, which ``compute_hausdorff_distance(..., percentile=95)``
and ``compute_surface_dice(..., class_thresholds=[tau])`` would each compute again: they give the same
numbers (a test holds them equal) at half the cost. The surfaces are MONAI's (``get_mask_edges``, on the
bounding box of both masks); the nearest-surface distances are a KD-tree search, as in MONAI on a CPU, but
over bounded chunks of surface voxels. MONAI's search holds every surface voxel's coordinates at once, in
float64, and the tree over all of them: with the scattered predictions of a barely trained network
(millions of surface voxels in a 512 x 512 x 57 CT) the scoring of one case added 309 MiB to a fresh
process's peak, the site's largest step at evaluation. Here the coordinates and tree of one chunk (at most
``SURFACE_CHUNK`` voxels, ~10 MB) are held at a time, beside 12 bytes per surface voxel for the distances
themselves: 182 MiB for that case, with MONAI's surfaces (benchmarks/RESULTS.md).

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
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics.utils import get_mask_edges
from scipy.spatial import KDTree

__all__ = ["ClassScores", "ClassSummary", "PairedGain", "SiteScores", "case_scores", "paired_gain"]


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


SURFACE_CHUNK = 1 << 18  # surface voxels per KD-tree and per query: ~10 MB of coordinates and results each
_PARALLEL_QUERY = 1 << 14  # queries of fewer points run in one thread


def _surface_chunks(edges: np.ndarray, spacing: list[float] | None) -> Iterator[np.ndarray]:
    """Coordinates (mm, or voxels without spacing) of the surface voxels, C order, in slabs along the first
    axis of at most ``SURFACE_CHUNK`` voxels (a slab is never split: one plane may exceed it)."""
    per_plane = edges.reshape(edges.shape[0], -1).sum(axis=1)
    scale = np.asarray(spacing if spacing is not None else [1.0] * edges.ndim, dtype=np.float64)
    start = 0
    while start < edges.shape[0]:
        stop, count = start + 1, int(per_plane[start])
        while stop < edges.shape[0] and count + per_plane[stop] <= SURFACE_CHUNK:
            count += int(per_plane[stop])
            stop += 1
        if count:
            points = np.argwhere(edges[start:stop]).astype(np.float64)
            points[:, 0] += start
            yield points * scale
        start = stop


def _nearest_surface_distances(source: np.ndarray, target: np.ndarray, spacing: list[float] | None) -> torch.Tensor:
    """For each surface voxel of ``source`` (C order), the distance to the nearest surface voxel of ``target``:
    one KD-tree per chunk of ``target``, each queried with every chunk of ``source`` (on the threads torch
    may use), keeping the minimum. A source of one chunk is listed once rather than for every tree."""
    nearest = np.full(int(source.sum()), np.inf)
    sources = list(_surface_chunks(source, spacing)) if len(nearest) <= SURFACE_CHUNK else None
    for targets in _surface_chunks(target, spacing):
        tree, offset = KDTree(targets, leafsize=32), 0
        for points in sources if sources is not None else _surface_chunks(source, spacing):
            part = nearest[offset : offset + len(points)]
            workers = torch.get_num_threads() if len(points) >= _PARALLEL_QUERY else 1  # threads cost ~ms to start
            np.minimum(part, tree.query(points, k=1, workers=workers)[0], out=part)
            offset += len(points)
    return torch.from_numpy(nearest.astype(np.float32))


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
    prediction_surface, truth_surface = (np.asarray(e) for e in get_mask_edges(prediction, truth, crop=True))
    to_truth = _nearest_surface_distances(prediction_surface, truth_surface, spacing)
    to_prediction = _nearest_surface_distances(truth_surface, prediction_surface, spacing)
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
        self.case_dice: list[float] = []  # per case added: its mean Dice over the classes that count for it

    @property
    def num_cases(self) -> int:
        return len(self.case_dice)

    def add(self, scores: Mapping[int, ClassScores]) -> None:
        """Add one case; a class that is in neither its truth nor its prediction (all NaN) does not count for it."""
        self.case_dice.append(_mean([s.dice for s in scores.values() if not math.isnan(s.dice)]))
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


@dataclass(frozen=True)
class PairedGain:
    """How much one model beats another on the same cases: the mean of the per-case differences of a
    score and the standard error of that mean (inf with fewer than two cases: no noise estimate)."""

    mean: float
    standard_error: float
    cases: int

    def exceeds(self, margin: float) -> bool:
        """A gain larger than ``margin`` standard errors (``margin`` 0: any gain at all)."""
        return self.mean > 0 and (margin == 0 or self.mean > margin * self.standard_error)


def paired_gain(scores: Sequence[float], reference: Sequence[float]) -> PairedGain:
    """The gain of ``scores`` over ``reference``, both per case and in the same order; cases where either
    is NaN (nothing to score) are left out. Pairing removes what the cases share (an easy case is easy for
    both models), so a small gain that every case shows stands out from the spread of the cases' scores."""
    differences = [s - r for s, r in zip(scores, reference, strict=True) if not (math.isnan(s) or math.isnan(r))]
    n = len(differences)
    if n < 2:
        return PairedGain(_mean(differences), math.inf, n)
    return PairedGain(statistics.mean(differences), statistics.stdev(differences) / math.sqrt(n), n)
