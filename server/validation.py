"""Screening of site updates before aggregation: a broken or poisoned update must not reach the model.

Two checks, per reply, against the global weights the round started from:
- every value finite (a diverged site sends NaN or inf);
- the update's norm ||w_site - w_global|| at most ``max_norm_ratio`` times the median norm of the
  *other* sites' updates (needs at least one other site; 0 switches the check off). Comparing with the
  others' median keeps one huge update from raising its own yardstick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rejection:
    index: int  # position of the reply in the list screened
    reason: str


def update_norm(update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum((v.astype(np.float64) - global_state[k]) ** 2)) for k, v in update.items())))


def screen_updates(
    updates: Sequence[Mapping[str, np.ndarray]], global_state: Mapping[str, np.ndarray], max_norm_ratio: float
) -> list[Rejection]:
    """The updates (the sites' trained weights) that must not be aggregated, each with the reason (naming the
    tensor or the norms)."""
    rejections, norms = [], {}
    for i, update in enumerate(updates):
        bad = next((k for k, v in update.items() if not np.isfinite(v).all()), None)
        if bad is not None:
            rejections.append(Rejection(i, f"non-finite values in {bad}"))
        else:
            norms[i] = update_norm(update, global_state)
    if max_norm_ratio > 0 and len(norms) >= 2:
        for i, norm in norms.items():
            others = float(np.median([n for j, n in norms.items() if j != i]))
            if norm > max_norm_ratio * max(others, 1e-12):
                rejections.append(
                    Rejection(
                        i,
                        f"update norm {norm:.3g} is {norm / max(others, 1e-12):.1f}x the median {others:.3g} of the other sites' (limit {max_norm_ratio:g}x)",
                    )
                )
    return sorted(rejections, key=lambda r: r.index)
