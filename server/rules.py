"""Aggregation rules over plain arrays: how one partition's updates become its new weights.

:class:`server.strategy.ModalityAwareStrategy` routes every tensor to its partition (the shared weights,
or one modality's encoder) and calls that partition's rule with the sites' weights for the tensors
they trained. The arithmetic is that of Flower's strategies of the same name (FedAvg / FedProx,
FedTrimmedAvg, FedMedian, FedAdam, FedYogi, FedAdagrad; Reddi et al., 2021), over a dict of arrays
rather than whole-model records, because sites train and send a different set of tensors at each
stage of the unfreezing schedule. A server optimiser therefore keeps its moments *per tensor*: created
the first round a tensor is trained, kept through later stages, and saved in every checkpoint
(:meth:`ServerOptimizer.state_dict`), so that a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import trim_mean

Weights = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Sum_i w_i x_i / sum_i w_i per tensor (float64 sums, the tensors' own dtype back)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to more than 0, got {list(weights)}")
    return {
        k: (sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total).astype(
            updates[0][k].dtype
        )
        for k in updates[0]
    }


class Rule:
    """One partition's aggregation. Stateless rules keep nothing between rounds."""

    def aggregate(
        self, current: Weights, updates: Sequence[Weights], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """New values of the tensors in ``updates`` (all updates hold the same tensors) from the values
        ``current`` they started from, the sites' trained values and the sites' weights."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {len(state)} arrays")


class Mean(Rule):
    """FedAvg (and FedProx, whose proximal term acts at the sites): the weighted mean."""

    def aggregate(self, current, updates, weights):
        return weighted_mean(updates, weights)


class TrimmedMean(Rule):
    """FedTrimmedAvg: per coordinate, the unweighted mean after cutting ``beta`` of the values at each end."""

    def __init__(self, beta: float):
        self.beta = beta

    def aggregate(self, current, updates, weights):
        return {
            k: trim_mean(np.stack([u[k] for u in updates]), self.beta, axis=0).astype(updates[0][k].dtype)
            for k in updates[0]
        }


class Median(Rule):
    """FedMedian: the coordinate-wise median of the sites' values (unweighted)."""

    def aggregate(self, current, updates, weights):
        return {k: np.median(np.stack([u[k] for u in updates]), axis=0).astype(updates[0][k].dtype) for k in updates[0]}


class ServerOptimizer(Rule):
    """FedAdam, FedYogi or FedAdagrad: the weighted mean's step from ``current`` is a pseudo-gradient
    delta, and the server moves each tensor by eta * m / (sqrt(v) + tau), with

        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * delta^2                          (adam)
        v = v - (1 - beta2) * delta^2 * sign(v - delta^2)              (yogi)
        v = v + delta^2                                                (adagrad)

    m and v start at 0 when a tensor is first trained. FedAdam scales eta by the bias correction
    sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)), where Flower's FedAdam takes t = the server round; here t
    counts the rounds *this tensor* has been updated (the same while every tensor trains from round 1,
    and right for a group that the schedule unfreezes later).
    """

    KINDS = ("adam", "yogi", "adagrad")

    def __init__(self, kind: str, eta: float, beta_1: float, beta_2: float, tau: float):
        if kind not in self.KINDS:
            raise ValueError(f"server optimiser must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.eta, self.beta_1, self.beta_2, self.tau = kind, eta, beta_1, beta_2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t: dict[str, int] = {}

    def aggregate(self, current, updates, weights):
        mean = weighted_mean(updates, weights)
        out = {}
        for k, target in mean.items():
            x = current[k].astype(np.float64)
            delta = target.astype(np.float64) - x
            m, v = (
                self.m.get(k, np.zeros_like(x)).astype(np.float64),
                self.v.get(k, np.zeros_like(x)).astype(np.float64),
            )
            self.t[k] = t = self.t.get(k, 0) + 1
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            if self.kind == "adam":
                v = self.beta_2 * v + (1 - self.beta_2) * delta**2
                eta = self.eta * np.sqrt(1 - self.beta_2 ** (t + 1)) / (1 - self.beta_1 ** (t + 1))
            elif self.kind == "yogi":
                v = v - (1 - self.beta_2) * delta**2 * np.sign(v - delta**2)
                eta = self.eta
            else:
                v = v + delta**2
                eta = self.eta
            self.m[k], self.v[k] = (
                m.astype(np.float32),
                v.astype(np.float32),
            )  # stored as Flower's, in the weights' precision
            out[k] = (x + eta * m / (np.sqrt(v) + self.tau)).astype(current[k].dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor's moments and step count, as arrays named ``m.<tensor>``, ``v.<tensor>``, ``t.<tensor>``."""
        state = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return state | {f"t.{k}": np.array(t, dtype=np.int64) for k, t in self.t.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v.")}
        self.t = {k[2:]: int(np.asarray(v).item()) for k, v in state.items() if k.startswith("t.")}


def make_rule(strategy: str, *, trimmed_beta: float, eta: float, beta_1: float, beta_2: float, tau: float) -> Rule:
    """A fresh rule for run-config strategy ``strategy`` (one per partition: a server optimiser's
    moments never mix the shared weights with an encoder)."""
    if strategy in ("fedavg", "fedprox"):
        return Mean()
    if strategy == "fedtrimmedavg":
        return TrimmedMean(trimmed_beta)
    if strategy == "fedmedian":
        return Median()
    if strategy.startswith("fed") and strategy[3:] in ServerOptimizer.KINDS:
        return ServerOptimizer(strategy[3:], eta, beta_1, beta_2, tau)
    raise ValueError(f"unknown strategy {strategy!r}")
