"""Site-level differential privacy: central DP with client-side fixed clipping, as Flower's.

For federations with many sites, where the unit to protect is a whole hospital's contribution:
each site clips its update (trained weights minus the global weights it started from) to
``clipping_norm`` (client/site.py, Flower's ``compute_clip_model_update``), and the coordinator
averages the updates with equal weights and adds Gaussian noise of standard deviation
``noise_multiplier * clipping_norm / n`` to every partition's average (what Flower's
``DifferentialPrivacyClientSideFixedClipping`` adds to one FedAvg; here per partition, drawn from
OS entropy: the sites know the run seed, and must not be able to subtract the noise).

One site's clipped update moves the shared average by at most C_s / n_s and its modality's average
by at most C_m / n_m with C_s^2 + C_m^2 <= C^2, so a round is one Gaussian mechanism with noise
multiplier ``noise_multiplier`` for the site, and one release is accounted per round (Flower's RDP
accountant, no sampling amplification, state kept in the checkpoints so a resumed run goes on
counting). Flower's ``fixedclipping_mod`` cannot be used as is: it needs the reply to carry exactly
the weights the message brought, and our sites receive and return only the groups that changed
or trained.

Not covered by the guarantee: the scalar metrics sites send (as in Flower), and cross-site
evaluation, which would send one site's un-noised local model to the others: it is switched off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fed_swinumamba.flower_internals import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

log = logging.getLogger("fed_swinumamba.server")


@dataclass(frozen=True)
class SiteDPSettings:
    noise_multiplier: float
    clipping_norm: float
    delta: float
    budget: float | None  # total epsilon over the run; None: no limit

    @classmethod
    def from_run_config(cls, c: dict) -> SiteDPSettings | None:
        """None when ``site-dp-noise-multiplier`` is 0 (off). ``c`` is resolved by ``fed_swinumamba.run_config``,
        which has already checked each value's range; what is left is how the keys go together."""
        sigma = c["site-dp-noise-multiplier"]
        if sigma == 0:
            return None
        if c["strategy"] not in ("fedavg", "fedprox"):
            raise ValueError(
                f"site-level DP needs an averaging strategy (fedavg or fedprox), not {c['strategy']!r}: its noise is calibrated to a mean"
            )
        budget = c["site-dp-epsilon"]
        return cls(sigma, c["site-dp-clipping-norm"], c["site-dp-delta"], budget if budget > 0 else None)


class SiteLevelDP:
    """Noise for each partition's aggregate and the federation's accountant (one release per round)."""

    def __init__(self, settings: SiteDPSettings, num_sites: int, state: dict | None = None):
        self.s = settings
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=settings.delta,
                population_size=num_sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=settings.budget,
            )
        )
        if state:
            self.accountant.load_state_dict(state)

    @classmethod
    def restore(cls, settings: SiteDPSettings, state: dict) -> SiteLevelDP:
        """The accountant of an interrupted run, with the releases it had counted."""
        return cls(settings, int(state["config"]["population_size"]), state)

    def _event(self, num_replies: int) -> GaussianPrivacyEvent:
        # Without amplification the sample size does not change epsilon; Flower only requires it to fit
        # the population fixed when the accountant was made (sites that joined later would exceed it).
        population = self.accountant.config.population_size
        return GaussianPrivacyEvent(self.s.noise_multiplier, min(num_replies, population), population)

    def budget_allows_round(self) -> bool:
        """False once one more release would spend more than the budget."""
        return self.s.budget is None or not self.accountant.would_exceed(self._event(1))

    def noised(self, mean: dict[str, np.ndarray], num_replies: int) -> dict[str, np.ndarray]:
        """``mean`` of ``num_replies`` clipped updates plus Gaussian noise of std sigma * C / n per coordinate."""
        std = self.s.noise_multiplier * self.s.clipping_norm / num_replies
        rng = np.random.default_rng()  # seeded from OS entropy
        return {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype) for k, v in mean.items()}

    def clipped(self, changes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A site's whole change scaled to L2 norm at most C: the coordinator's own clip of what it aggregates.

        Needed with compression: a site clips its update, then adds the residual its earlier packets left
        out (error feedback), so what arrives may exceed C by that residual; clipped again here, every
        aggregated update is within C and the noise stays calibrated."""
        norm = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in changes.values())))
        factor = min(1.0, self.s.clipping_norm / norm) if norm > 0 else 1.0
        return {k: (v * factor).astype(v.dtype) for k, v in changes.items()}

    def record_release(self, num_replies: int) -> None:
        self.accountant.compose(self._event(num_replies))
        log.info(
            "site-level DP: epsilon %.3f (delta %g) after %d rounds",
            self.epsilon(),
            self.s.delta,
            self.accountant.num_releases,
        )

    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.accountant.num_releases else 0.0

    def report(self) -> dict:
        """What metrics.json records each round."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.s.delta,
            "noise_multiplier": self.s.noise_multiplier,
            "clipping_norm": self.s.clipping_norm,
            "releases": self.accountant.num_releases,
            "budget": self.s.budget,
            "budget_exhausted": not self.budget_allows_round(),
            "unit": "site",
        }
