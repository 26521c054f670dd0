"""The federation's round logic as a Flower ``Strategy``: modality-aware payloads, screening, aggregation.

- ``configure_train`` samples the round's sites, asks any node whose identity is unknown who it is (a
  query holds no weights: a node's first message, and its first after an error, must not carry
  another modality's encoder, which with one site per modality is another hospital's own weights),
  then gives each node the part of the global model it lacks from the version it holds, with the
  round's typed :class:`~fed_swinumamba.protocol.Instructions`.
- ``aggregate_train`` records each reply (:class:`~fed_swinumamba.protocol.TrainReply`), screens the
  updates (server.validation), aggregates each partition — the shared weights over every site, each
  modality's encoder over its sites — with that partition's rule (server.rules), and under site-level
  DP adds the calibrated noise and accounts the release.
- ``configure_evaluate`` / ``aggregate_evaluate`` do the same for the global model, or for another
  model (a site's local model, the best checkpoint) evaluated without touching the sites' copies.
- With compression (run config ``compression``; fed_swinumamba.compression) the sites send their
  updates as packets, decoded here before screening, so every rule, the screening and site-level DP
  see real-valued updates; each node gets the change of its copy of the global model as a packet, the
  strategy keeping a copy of what each node holds, and an exact copy when that is unknown (first
  contact, after a failure), every ``compression-resync`` rounds and for the final evaluation.

The strategy owns all of its state — the global weights (one ``dict`` of NumPy arrays from reply to
checkpoint), each partition's rule with its server-optimiser moments, the site-level DP accountant —
and :meth:`state_dict` puts it into the checkpoint, so that a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_swinumamba.compression import CompressionError, Packet, compress, decompress, uncompressed_bytes
from fed_swinumamba.params import SHARED, federation_view, partition_of, select, site_view
from fed_swinumamba.protocol import (
    ARRAYS,
    COMPRESSED,
    CONFIG,
    FULL_SYNC,
    METRICS,
    SITE,
    TEST,
    VALIDATION,
    EvalReply,
    Instructions,
    TrainReply,
)

from .records import SiteRecord
from .rules import Rule, make_rule
from .settings import FederationSettings
from .site_dp import SiteLevelDP
from .validation import screen_updates

log = logging.getLogger("fed_swinumamba.server")

# configure_evaluate's config: which model the arrays are ("" = the global model) and whether every
# held-out case is scored rather than the run's per-round subset.
EVAL_MODEL, EVAL_FULL_SPLIT, EVAL_WAIT = "model", "full-split", "wait-s"
TTL_MARGIN_S = 600.0  # a message's ttl over its wait: building and pushing an exchange's messages


@dataclass
class SiteLink:
    """What the coordinator knows of a connected node: who it is and which global version it holds."""

    site: str | None = None
    modality: str | None = None  # None: unknown, ask the node (a query) before sending it any weights
    version: int | None = None  # None: unknown, send everything of its modality
    synced_round: int = 0  # with compression: the round of its last exact copy of the global model


@dataclass(frozen=True)
class Payload:
    """The weights of one message to a node: plain tensors, or with compression the packet (``names``)
    of the change its copy lacks; and what the same tensors cost as float32."""

    arrays: ArrayRecord
    base_version: int
    uncompressed_bytes: int
    names: tuple[str, ...] | None = None  # the packet's tensors; None: plain tensors


class ModalityAwareStrategy(Strategy):
    def __init__(self, settings: FederationSettings, weights: dict[str, np.ndarray]):
        self.s = settings
        self.weights = weights  # the global model
        self.version = 0  # completed aggregations
        self.links: dict[int, SiteLink] = {}
        self.rules: dict[str, Rule] = {}
        self.site_dp: SiteLevelDP | None = None
        self.records: dict[int, dict[str, SiteRecord]] = {}  # round -> site -> what the round records of it
        self.local_models: dict[str, dict[str, np.ndarray]] = {}  # the last round's locally trained models
        self.evaluations: dict[str, tuple[str, EvalReply]] = {}  # the last evaluation: site -> (modality, scores)
        self._sent: list[Message] = []  # the messages whose replies the next aggregate_* call gets
        self._evaluated = ""  # the model those messages evaluate ("" = the global model)
        self._evaluation_wait = settings.round_timeout  # seconds the driver waits for that evaluation's replies
        self._bytes_down: dict[int, tuple[int, int]] = {}  # node -> bytes sent, as float32
        self._site_dp_state: dict | None = None
        # With compression: what each node holds of the global model (its site's names), from which the
        # change it lacks is sent; one copy of a site's part of the model per node, kept in memory only.
        self.held: dict[int, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ Flower's Strategy
    def summary(self) -> None:
        log.info(
            "%s: strategy %s per partition (shared + one per modality of %s), %s",
            type(self).__name__,
            self.s.strategy,
            ",".join(self.s.model_config.modalities),
            "site-level DP" if self.s.site_dp else "no site-level DP",
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Messages for the round's sampled sites. ``arrays`` is not used: each node gets the part of the
        strategy's global weights that it lacks, from the version it holds."""
        nodes = sorted(grid.get_node_ids())
        self._start_site_dp(len(nodes))
        if self.site_dp and not self.site_dp.budget_allows_round():
            log.warning(
                "round %d: the site-level privacy budget %.3g would be exceeded (spent %.3f); no more training, evaluation goes on",
                server_round,
                self.site_dp.s.budget,
                self.site_dp.epsilon(),
            )
            return self._prepare([], server_round, MessageType.TRAIN, grid)
        k = max(self.s.min_train_sites, round(self.s.fraction_train * len(nodes)))
        sampled = sorted(
            random.Random(f"{self.s.seed}-{server_round}").sample(nodes, min(k, len(nodes)))
        )  # the same after a resume
        stage = self.s.schedule.stage_for_round(server_round)
        log.info(
            "[ROUND %d/%d] stage %d, lr %.2e, training %s on %d of %d sites",
            server_round,
            self.s.num_rounds,
            stage.index,
            stage.lr,
            ",".join(stage.trainable_groups),
            len(sampled),
            len(nodes),
        )
        return self._prepare(sampled, server_round, MessageType.TRAIN, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The updated tensors (also applied to the strategy's global weights), or None when nothing was aggregated."""
        trained = [
            r
            for r in self._answered(server_round, MessageType.TRAIN, replies, self.s.round_timeout)
            if self._record_training(server_round, r)
        ]
        # Each reply's weights become arrays once; everything below works on these.
        received = {str(r.content[SITE]["site"]): self._trained_weights(server_round, r) for r in trained}
        updates = self._screen(server_round, {site: w for site, w in received.items() if w is not None})
        self.local_models = {site: {**self.weights, **update} for site, update in updates.items()}
        if not updates or len(updates) < self.s.min_train_sites:
            if updates:
                log.warning(
                    "round %d: %d sites trained, fewer than min-train-sites=%d; global model unchanged",
                    server_round,
                    len(updates),
                    self.s.min_train_sites,
                )
            return None, None
        sites = self.records[server_round]
        weights = [1.0 if self.site_dp else float(sites[site].training.num_patients) for site in updates]
        updated = self._aggregate(server_round, list(updates.values()), weights)
        self.weights.update(updated)
        self.version = server_round
        if self.site_dp:
            self.site_dp.record_release(len(updates))
        return to_arrays(updated), MetricRecord({"sites": len(updates)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Messages for every identified node: the global model (``config['model']`` empty; ``arrays`` not
        used, as in training), or the model in ``arrays`` named by ``config['model']``, which each node
        evaluates with its own modality's encoder from it and then forgets."""
        full_split = bool(config.get(EVAL_FULL_SPLIT, False))
        self._evaluation_wait = float(config.get(EVAL_WAIT, self.s.round_timeout))
        nodes = sorted(grid.get_node_ids())
        name = self._evaluated = str(config.get(EVAL_MODEL, ""))
        if not name:
            return self._prepare(nodes, server_round, MessageType.EVALUATE, grid, full_split=full_split)
        weights = _numpy(arrays)
        known = [n for n in nodes if self.links.get(n, SiteLink()).modality]
        self._sent = [
            self._message(
                n,
                Payload(to_arrays(_for_site(weights, self.links[n].modality)), FULL_SYNC, 0),
                server_round,
                MessageType.EVALUATE,
                name,
                full_split,
            )
            for n in known
        ]
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each site's scores into :attr:`evaluations` (and, for the global model, the round's records);
        the mean over sites of their mean Dice."""
        self.evaluations = {}
        if self._evaluated:
            for reply in replies:
                if reply.has_error():
                    log.warning(
                        "evaluation of %s at %s failed: %s",
                        self._evaluated,
                        self._site_key(_addressee(reply, self._sent)),
                        reply.error.reason,
                    )
                    continue
                self.evaluations[str(reply.content[SITE]["site"])] = (
                    str(reply.content[SITE]["modality"]),
                    EvalReply.from_metrics(reply.content[METRICS], self.s.class_names),
                )
        else:
            for reply in self._answered(server_round, MessageType.EVALUATE, replies, self._evaluation_wait):
                scores = EvalReply.from_metrics(reply.content[METRICS], self.s.class_names)
                site = str(reply.content[SITE]["site"])
                self.evaluations[site] = (str(reply.content[SITE]["modality"]), scores)
                self.records[server_round][site].evaluation = scores
        means = [e.dice_mean for _, e in self.evaluations.values() if e.dice_mean == e.dice_mean]
        return MetricRecord({"dice-mean": float(np.mean(means))}) if means else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays (each partition's rule state, as ``<partition>/<name>``) and plain values (the DP accountant)."""
        arrays = {f"{partition}/{k}": v for partition, rule in self.rules.items() for k, v in rule.state_dict().items()}
        return arrays, ({"site_dp_accountant": self.site_dp.accountant.state_dict()} if self.site_dp else {})

    def load_state_dict(self, arrays: dict[str, np.ndarray], values: dict, version: int) -> None:
        """The state of an interrupted run, whose global weights (``self.weights``) are at ``version``."""
        self.version = version
        for partition in sorted({k.split("/", 1)[0] for k in arrays}):
            prefix = f"{partition}/"
            self._rule(partition).load_state_dict(
                {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            )
        self._site_dp_state = values.get("site_dp_accountant")

    def _rule(self, partition: str) -> Rule:
        if partition not in self.rules:
            s = self.s
            self.rules[partition] = make_rule(
                s.strategy,
                trimmed_beta=s.trimmed_beta,
                eta=s.server_lr,
                beta_1=s.server_beta1,
                beta_2=s.server_beta2,
                tau=s.server_tau,
            )
        return self.rules[partition]

    def _start_site_dp(self, num_sites: int) -> None:
        """The site-level DP accountant, made once the first round knows how many sites there are."""
        if self.s.site_dp and self.site_dp is None:
            state = self._site_dp_state
            self.site_dp = (
                SiteLevelDP.restore(self.s.site_dp, state) if state else SiteLevelDP(self.s.site_dp, num_sites)
            )

    # ------------------------------------------------------------------ aggregation
    def _aggregate(
        self, server_round: int, updates: list[dict[str, np.ndarray]], weights: list[float]
    ) -> dict[str, np.ndarray]:
        """Each partition through its rule; under site-level DP, noise of std sigma * C / n on each partition's mean."""
        by_partition: dict[str, list[dict[str, np.ndarray]]] = {}
        for i, update in enumerate(updates):
            for name, value in update.items():
                parts = by_partition.setdefault(partition_of(name), [{} for _ in updates])
                parts[i][name] = value
        updated: dict[str, np.ndarray] = {}
        for partition, parts in sorted(by_partition.items(), key=lambda kv: kv[0] != SHARED):
            senders = [i for i, p in enumerate(parts) if p]
            keys = set(parts[senders[0]])
            if any(set(parts[i]) != keys for i in senders):
                raise ValueError(
                    f"round {server_round}: sites sent different weight sets for partition {partition!r}; they must train the same stage"
                )
            current = {k: self.weights[k] for k in keys}
            result = self._rule(partition).aggregate(
                current, [parts[i] for i in senders], [weights[i] for i in senders]
            )
            if self.site_dp:
                result = self.site_dp.noised(result, len(senders))
            updated.update(result)
            log.info(
                "round %d: aggregated %d tensors of partition %r from %d sites",
                server_round,
                len(keys),
                partition,
                len(senders),
            )
        return updated

    def _trained_weights(self, server_round: int, reply: Message) -> dict[str, np.ndarray] | None:
        """A site's trained weights under the coordinator's names: as sent, or its compressed change
        applied to the global weights (under site-level DP clipped again first: see SiteLevelDP.clipped).
        None for a packet that does not fit the site's part of the model (recorded as the site's error)."""
        site, modality = str(reply.content[SITE]["site"]), str(reply.content[SITE]["modality"])
        arrays = _numpy(reply.content[ARRAYS])
        if COMPRESSED in reply.content:
            start = _for_site(self.weights, modality)
            try:
                packet = Packet.from_arrays(reply.content[COMPRESSED]["names"], arrays)
                changes = decompress(packet, {k: v.shape for k, v in start.items()}, self.s.compression.block)
            except CompressionError as err:
                self.records[server_round][site].errors.append(f"train: {err}")
                log.warning("round %d: update of site %s not used: %s", server_round, site, err)
                return None
            if self.site_dp:
                changes = self.site_dp.clipped(changes)
            self.records[server_round][site].bytes_up_uncompressed = uncompressed_bytes(changes)
            arrays = {k: start[k] + v for k, v in changes.items()}
        return federation_view(arrays, modality, self.weights)

    def _screen(self, server_round: int, updates: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        """Drop non-finite and outlying updates (see server.validation), logged with the site's name."""
        sites = list(updates)
        rejected = screen_updates(list(updates.values()), self.weights, self.s.max_update_norm_ratio)
        for rejection in rejected:
            site = sites[rejection.index]
            log.warning("round %d: update of site %s rejected: %s", server_round, site, rejection.reason)
            self.records[server_round][site].rejected = rejection.reason
        dropped = {sites[r.index] for r in rejected}
        return {site: update for site, update in updates.items() if site not in dropped}

    def _record_training(self, server_round: int, reply: Message) -> bool:
        """Note a site's training scalars; False when it sent no update (its privacy budget is spent)."""
        train = TrainReply.from_metrics(reply.content[METRICS])
        self.records[server_round][str(reply.content[SITE]["site"])].training = train
        if train.dp is not None and train.dp.budget_exhausted:
            log.warning(
                "site %s: privacy budget %.3g spent (epsilon %.3f); it no longer trains, only evaluates",
                reply.content[SITE]["site"],
                train.dp.budget,
                train.dp.epsilon,
            )
        return ARRAYS in reply.content

    # ------------------------------------------------------------------ messages
    def _prepare(
        self, nodes: list[int], server_round: int, message_type: str, grid: Grid, full_split: bool = False
    ) -> list[Message]:
        """Identify the unknown among ``nodes``, then one message per identified node with what it lacks."""
        self.records.setdefault(server_round, {})
        unknown = [n for n in nodes if self.links.setdefault(n, SiteLink()).modality is None]
        if unknown:
            queries = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
            self._sent = queries
            list(
                self._answered(
                    server_round,
                    MessageType.QUERY,
                    grid.send_and_receive(queries, timeout=self.s.round_timeout),
                    self.s.round_timeout,
                )
            )
        self._sent, self._bytes_down = [], {}
        for node in (n for n in nodes if self.links[n].modality is not None):
            # The final evaluation scores the exact global model, whatever compression left out.
            payload = self._payload(node, server_round, exact=full_split)
            self._sent.append(self._message(node, payload, server_round, message_type, full_split=full_split))
            self._bytes_down[node] = (_nbytes(payload.arrays), payload.uncompressed_bytes)
        return self._sent

    def _payload(self, node: int, server_round: int, exact: bool = False) -> Payload:
        """What ``node`` lacks to hold the current global version, from the version it holds already:
        the tensors of the groups changed since, or with compression the packet of its copy's change
        (an exact copy when its copy is unknown, every ``compression-resync`` rounds, or if ``exact``).
        The packet is the change of the global model plus what earlier packets left out (the node's copy
        lags the global model by that residual, which this error feedback keeps from growing)."""
        link, version, compression = self.links[node], self.version, self.s.compression
        if link.version is None or link.version > version:
            return self._full_sync(node, server_round)
        if compression.enabled:
            resync = self.s.compression_resync
            if exact or node not in self.held or (resync and server_round - link.synced_round >= resync):
                return self._full_sync(node, server_round)
            held, current = self.held[node], _for_site(self.weights, link.modality)
            changes = {}  # nothing new since its last packet: what that one left out waits for the next change
            if link.version < version:
                changes = {k: current[k] - v for k, v in held.items() if not np.array_equal(current[k], v)}
            packet = compress(changes, compression.downlink)
            for k, change in decompress(packet, {k: v.shape for k, v in changes.items()}, compression.block).items():
                held[k] += change  # what the node holds once it applies the packet
            return Payload(to_arrays(packet.arrays()), link.version, uncompressed_bytes(changes), packet.names)
        groups = self.s.schedule.groups_changed_between(link.version, version) if link.version < version else ()
        weights = _for_site(self.weights, link.modality, groups)
        return Payload(to_arrays(weights), link.version, uncompressed_bytes(weights))

    def _full_sync(self, node: int, server_round: int) -> Payload:
        """Every weight of the node's modality (never another site's encoder or norms), exact."""
        link = self.links[node]
        weights = _for_site(self.weights, link.modality)
        if self.s.compression.enabled:
            self.held[node] = {k: v.copy() for k, v in weights.items()}
            link.synced_round = server_round
        return Payload(to_arrays(weights), FULL_SYNC, uncompressed_bytes(weights))

    def _message(
        self,
        node: int,
        payload: Payload,
        server_round: int,
        message_type: str,
        foreign_model: str = "",
        full_split: bool = False,
    ) -> Message:
        s = self.s
        instructions = Instructions(
            server_round,
            s.schedule.stage_for_round(server_round),
            s.model_config,
            s.class_names,
            self.version,
            payload.base_version,
            s.proximal_mu,
            s.local_steps,
            s.seed,
            foreign_model,
            s.site_dp.clipping_norm if s.site_dp else 0.0,
            s.study,
            0 if full_split else s.eval_cases,
            s.nsd_tolerance_mm,
            s.num_rounds,
            s.dp,
            s.personal,
            message_type == MessageType.EVALUATE and full_split and not foreign_model,  # the final evaluation
            TEST if full_split else VALIDATION,  # the end's scores are the test cases', never used to choose
            s.compression,
        )
        content = RecordDict({ARRAYS: payload.arrays, CONFIG: ConfigRecord(instructions.to_config())})
        if payload.names is not None:
            content[COMPRESSED] = ConfigRecord({"names": list(payload.names)})
        # A message and its reply expire after its ttl (Flower's default: 12 h), counted from now: never before
        # its exchange's wait, which starts once every message of the exchange is built and pushed.
        wait = self._evaluation_wait if message_type == MessageType.EVALUATE else s.round_timeout
        ttl = max(DEFAULT_TTL, wait + TTL_MARGIN_S)
        return Message(content=content, dst_node_id=node, message_type=message_type, ttl=ttl)

    def _answered(self, server_round: int, message_type: str, replies: Iterable[Message], wait: float) -> list[Message]:
        """The successful replies to the messages last sent, each node's identity learnt; every failure
        (an error reply, or none within ``wait`` seconds) recorded and its node's state forgotten."""
        sent, sites = self._sent, self.records.setdefault(server_round, {})
        answered, ok = set(), []
        for reply in replies:
            node = _addressee(reply, sent)
            answered.add(node)
            if reply.has_error():
                self._failed(node, server_round, message_type, reply.error.reason)
                continue
            identity, link = reply.content[SITE], self.links.setdefault(node, SiteLink())
            link.site, link.modality = str(identity["site"]), str(identity["modality"])
            if message_type != MessageType.QUERY:
                link.version = self.version
                entry = sites.setdefault(link.site, SiteRecord(link.modality))
                down, uncompressed = self._bytes_down.get(node, (0, 0))
                entry.bytes_down = (entry.bytes_down or 0) + down
                if self.s.compression.enabled:
                    entry.bytes_down_uncompressed = (entry.bytes_down_uncompressed or 0) + uncompressed
                entry.bytes_up = (entry.bytes_up or 0) + (
                    _nbytes(reply.content[ARRAYS]) if ARRAYS in reply.content else 0
                )
            ok.append(reply)
        for node in sorted({m.metadata.dst_node_id for m in sent} - answered):
            self._failed(node, server_round, message_type, f"no reply within {wait:.0f} s")
        return ok

    def _failed(self, node: int, server_round: int, message_type: str, reason: str) -> None:
        """Note a node's failure. Whatever it holds, and whoever it is now (a restarted SuperNode may
        play another site), is unknown: it is asked again, then sent everything of its modality."""
        link = self.links.setdefault(node, SiteLink())
        entry = self.records.setdefault(server_round, {}).setdefault(self._site_key(node), SiteRecord(link.modality))
        entry.errors.append(f"{message_type}: {reason}")
        log.warning("round %d %s: site %s failed: %s", server_round, message_type, self._site_key(node), reason)
        link.modality, link.version = None, None
        self.held.pop(node, None)

    def _site_key(self, node: int) -> str:
        link = self.links.get(node)
        return link.site if link and link.site else f"node-{node}"


def _addressee(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: the SuperLink itself sends the error reply of a node that went
    offline (its source is the SuperLink, not the node), so match the message it replies to."""
    for message in sent:
        if message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _for_site(weights: dict[str, np.ndarray], modality: str, groups=None) -> dict[str, np.ndarray]:
    """What a site of ``modality`` gets of ``weights``: the shared ones and its modality's, under its own
    network's names (its modality's norm copies under their plain names), in ``groups`` if given."""
    return site_view(select(weights, groups=groups, modalities=[modality]), modality)


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def _nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())
