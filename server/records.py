"""What the coordinator records of a round: typed while the run goes on, metrics.json when written.

The strategy fills one :class:`SiteRecord` per site from the sites' typed replies; the driver adds the
round's stage and site-level DP into a :class:`RoundRecord`. ``to_json`` is metrics.json's schema, from
which the console table and report.html are rendered (``server.report``), so that a report can be made
again from the file alone (and a resumed run's history is that file's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fed_swinumamba.logs import NOT_PRIVATE
from fed_swinumamba.protocol import EvalReply, TrainReply

NOT_PRIVATE_MARK = NOT_PRIVATE.rstrip(": ")


@dataclass
class SiteRecord:
    """One site in one round: what it was sent and sent back, its training, its scores, what went wrong."""

    modality: str | None
    bytes_down: int | None = None  # None: the site answered no message this round
    bytes_up: int | None = None
    # With compression: what the same tensors would have cost as float32.
    bytes_down_uncompressed: int | None = None
    bytes_up_uncompressed: int | None = None
    training: TrainReply | None = None
    evaluation: EvalReply | None = None
    errors: list[str] = field(default_factory=list)
    rejected: str | None = None  # why its update was not aggregated

    def to_json(self) -> dict:
        out: dict = {"modality": self.modality}
        if self.bytes_down is not None:
            out |= {"bytes_down": self.bytes_down, "bytes_up": self.bytes_up}
            for key in ("bytes_down_uncompressed", "bytes_up_uncompressed"):
                out |= {key: getattr(self, key)} if getattr(self, key) is not None else {}
        t = self.training
        if t is not None:
            out |= {"num_examples": t.num_patients, "steps": t.steps}
            if t.train_loss is not None:
                out |= {"train_loss": t.train_loss, "timing": {"first_batch_s": t.first_batch_s, "train_s": t.train_s}}
            if t.dp is not None:
                out |= {"epsilon": t.dp.epsilon, "privacy": t.dp.record()}
                out |= {"not_private": NOT_PRIVATE_MARK} if t.dp.reproducible else {}
                out |= {"privacy_budget_exhausted": True} if t.dp.budget_exhausted else {}
        if self.evaluation is not None:
            out |= self.evaluation.record()
        if self.errors:
            out["errors"] = list(self.errors)
        if self.rejected:
            out["rejected"] = self.rejected
        return out


@dataclass
class RoundRecord:
    server_round: int
    stage: int
    lr: float
    trainable_groups: tuple[str, ...]
    sites: dict[str, SiteRecord]
    site_dp: dict | None = None  # the site-level DP accountant's report
    not_private: bool = False  # the run's DP noise was reproducible

    def to_json(self) -> dict:
        out = {
            "round": self.server_round,
            "stage": self.stage,
            "lr": self.lr,
            "trainable_groups": list(self.trainable_groups),
            "sites": {name: s.to_json() for name, s in sorted(self.sites.items())},
        }
        out |= {"not_private": NOT_PRIVATE_MARK} if self.not_private else {}
        return out | ({"site_dp": self.site_dp} if self.site_dp else {})


__all__ = ["NOT_PRIVATE_MARK", "RoundRecord", "SiteRecord"]
