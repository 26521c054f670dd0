"""Modality-aware aggregation on top of Flower's strategies.

Shared weights are aggregated over every site that trained; ``modality_encoders.<m>.*`` only over
the sites of modality ``m``. Each partition has its own instance of the chosen Flower strategy
(FedAvg, FedProx, FedAdam, FedTrimmedAvg, FedMedian), so stateful server optimisers (FedAdam's
moments) never mix partitions, and the arithmetic is Flower's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fed_swinumamba.params import SHARED, partition_of
from fed_swinumamba.protocol import ARRAYS, METRICS, NUM_EXAMPLES

from .site_dp import SiteLevelDP

log = logging.getLogger(__name__)


def strategy_factory(name: str, *, proximal_mu: float = 0.0, trimmed_beta: float = 0.2) -> Callable[[], Strategy]:
    """A maker of fresh strategy instances (one per partition) for run-config name ``name``."""
    makers = {
        "fedavg": lambda: FedAvg(),
        "fedprox": lambda: FedProx(proximal_mu=proximal_mu),
        "fedadam": lambda: FedAdam(),
        "fedtrimmedavg": lambda: FedTrimmedAvg(beta=trimmed_beta),
        "fedmedian": lambda: FedMedian(),
    }
    if name not in makers:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(makers)}")
    return makers[name]


class ModalityAwareAggregator:
    """Aggregates train replies partition by partition with one strategy instance per partition.

    With ``site_dp`` (server/site_dp.py) every reply weighs the same and each partition's mean gets
    Flower's central-DP noise.
    """

    def __init__(self, make_strategy: Callable[[], Strategy], site_dp: SiteLevelDP | None = None):
        self._make_strategy = make_strategy
        self._strategies: dict[str, Strategy] = {}
        self.site_dp = site_dp

    def aggregate(self, server_round: int, global_state: Mapping[str, np.ndarray], replies: Sequence[Message]) -> dict[str, np.ndarray]:
        """New values for every weight that some reply trained; weights nobody sent stay as they are."""
        by_partition: dict[str, list[Message]] = {}
        for reply in replies:
            arrays: ArrayRecord = reply.content[ARRAYS]
            split: dict[str, ArrayRecord] = {}
            for name in arrays:
                split.setdefault(partition_of(name), ArrayRecord())[name] = arrays[name]
            for partition, record in split.items():
                # The strategy needs only the weight of the reply; sites' other metrics differ (DP or not).
                weight = MetricRecord({NUM_EXAMPLES: 1 if self.site_dp else reply.content[METRICS][NUM_EXAMPLES]})
                content = RecordDict({ARRAYS: record, METRICS: weight})
                by_partition.setdefault(partition, []).append(Message(content=content, metadata=reply.metadata))

        updated: dict[str, np.ndarray] = {}
        for partition, messages in sorted(by_partition.items(), key=lambda kv: kv[0] != SHARED):
            strategy = self._strategies.setdefault(partition, self._make_strategy())
            keys = list(messages[0].content[ARRAYS].keys())
            if any(set(m.content[ARRAYS].keys()) != set(keys) for m in messages):
                raise ValueError(f"round {server_round}: sites sent different weight sets for partition {partition!r}; they must train the same stage")
            if isinstance(strategy, FedOpt):
                strategy.current_arrays = {k: np.asarray(global_state[k]) for k in keys}  # the server optimiser's x_t
            if self.site_dp:
                strategy = self.site_dp.private(strategy, len(messages))
            arrays, _ = strategy.aggregate_train(server_round, messages)
            if arrays is None:
                continue
            for name in keys:
                updated[name] = arrays[name].numpy().astype(np.asarray(global_state[name]).dtype, copy=False)
            log.info("round %d: aggregated %d tensors of partition %r from %d sites", server_round, len(keys), partition, len(messages))
        return updated
