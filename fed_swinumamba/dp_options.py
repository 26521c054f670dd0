"""The run config's ``dp-*`` keys (DP-SGD for sites without a privacy section of their own), checked once.

The coordinator checks them when a run starts, so that a bad value stops the run before any site
trains; the sites read them from the run config Flower gives them. Both go through this module, which
imports nothing of the data pipeline. A setting that makes no sense is an error naming its key, never
silently replaced (``dp-lr-scale = 0`` once became 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


def _checked(run_config: Mapping, key: str, default, kind: type, ok: Callable[[float], bool], rule: str):
    value = run_config.get(key, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"run config {key} must be {rule}, got {value!r}") from None
    if isinstance(value, bool) or not ok(number) or (kind is int and number != float(value)):
        raise ValueError(f"run config {key} must be {rule}, got {value!r}")
    return number


@dataclass(frozen=True)
class RunDPOptions:
    epsilon: float  # each site's budget for the study; 0: none (the noise must then be given)
    noise_multiplier: float  # 0: derived from epsilon for the planned rounds
    max_grad_norm: float
    delta: float  # 0: min(1e-5, 1 / disclosed number of training patients)
    slices_per_case: int
    cases_per_batch: int  # 0: the site's batch size // slices per patient
    local_steps: int  # 0: the run's local steps
    frozen: tuple[str, ...]
    lr_scale: float
    insecure_reproducible: bool  # noise and sampling from the run seed: NOT private (tests, benchmarks)

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0 or self.noise_multiplier > 0

    @classmethod
    def from_run_config(cls, c: Mapping) -> RunDPOptions:
        non_negative, positive, whole = (lambda v: v >= 0), (lambda v: v > 0), (lambda v: v >= 1)
        reproducible = c.get("dp-insecure-reproducible", False)
        if not isinstance(reproducible, bool):
            raise ValueError(f"run config dp-insecure-reproducible must be true or false, got {reproducible!r}")
        return cls(
            epsilon=_checked(c, "dp-epsilon", 0.0, float, non_negative, "a number >= 0 (0: no budget)"),
            noise_multiplier=_checked(c, "dp-noise-multiplier", 0.0, float, non_negative, "a number >= 0 (0: derived from dp-epsilon)"),
            max_grad_norm=_checked(c, "dp-max-grad-norm", 1.0, float, positive, "a number > 0"),
            delta=_checked(c, "dp-delta", 0.0, float, lambda v: 0 <= v < 1, "a number in [0, 1) (0: derived)"),
            slices_per_case=_checked(c, "dp-slices-per-case", 2, int, whole, "a whole number >= 1"),
            cases_per_batch=_checked(c, "dp-cases-per-batch", 0, int, non_negative, "a whole number >= 0 (0: from the batch size)"),
            local_steps=_checked(c, "dp-local-steps", 0, int, non_negative, "a whole number >= 0 (0: the run's local steps)"),
            frozen=tuple(filter(None, (s.strip() for s in str(c.get("dp-frozen", "")).split(",")))),
            lr_scale=_checked(c, "dp-lr-scale", 1.0, float, positive, "a number > 0"),
            insecure_reproducible=reproducible,
        )
