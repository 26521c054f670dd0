"""The run's DP-SGD request (the ``dp-*`` keys), as the coordinator sends it to every site.

A site without a privacy section of its own follows it (:func:`fed_swinumamba.privacy.privacy_spec`);
a site's lifetime budget and its consent to reproducible noise stay the site's own. The values are
checked once, by :mod:`fed_swinumamba.run_config`; this module imports nothing of the data pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class RunDPOptions:
    epsilon: float = 0.0  # each site's budget for the study; 0: none (the noise must then be given)
    noise_multiplier: float = 0.0  # 0: derived from epsilon for the planned rounds
    max_grad_norm: float = 1.0
    delta: float = 0.0  # 0: min(1e-5, 1 / disclosed number of training patients)
    slices_per_case: int = 2
    cases_per_batch: int = 0  # 0: the site's batch size // slices per patient
    local_steps: int = 0  # 0: the run's local steps
    frozen: tuple[str, ...] = ()
    lr_scale: float = 1.0
    insecure_reproducible: bool = False  # noise and sampling from the run seed: NOT private (tests, benchmarks)

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0 or self.noise_multiplier > 0

    @classmethod
    def from_run_config(cls, c: Mapping) -> RunDPOptions:
        """From a run config resolved by :func:`fed_swinumamba.run_config.resolve_run_config` (checked there)."""
        values = _dp_keys(cls, c)
        return cls(**{**values, "frozen": tuple(filter(None, (s.strip() for s in str(values["frozen"]).split(","))))})

    def to_config(self) -> dict:
        """As fields of the round instructions, under the run config's names (``dp-*``)."""
        return {_key(k): list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping) -> RunDPOptions:
        values = _dp_keys(cls, config)
        return cls(**{**values, "frozen": tuple(values["frozen"])})


def _key(field_name: str) -> str:
    """A field's name in the run config and the instructions: ``lr_scale`` -> ``dp-lr-scale``."""
    return "dp-" + field_name.replace("_", "-")


def _dp_keys(cls: type[RunDPOptions], source: Mapping) -> dict:
    return {f.name: source[_key(f.name)] for f in fields(cls)}
