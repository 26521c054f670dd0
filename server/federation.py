"""The coordinator's round loop: stage -> instructions -> site replies -> aggregate -> evaluate -> record.

Every round writes ``metrics.json`` and checkpoints (``latest`` and ``best`` by the mean of the sites'
mean Dice), so a run killed at any point resumes at the next round with the right stage.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.logs import NOT_PRIVATE, prefixed
from fed_swinumamba.model import build_model
from fed_swinumamba.params import select
from fed_swinumamba.pretrained import load_vmamba_checkpoint
from fed_swinumamba.protocol import ARRAYS, CONFIG, FULL_SYNC, METRICS, SITE, Instructions

from .aggregation import ModalityAwareAggregator, strategy_factory
from .report import write_report
from .settings import FederationSettings
from .site_dp import SiteLevelDP
from .validation import screen_updates

log = logging.getLogger("fed_swinumamba.server")

# What the weights of an averaging strategy count, as metrics.json and the report state it.
PATIENT_WEIGHTS = ("each site's number of training patients; a site with DP-SGD sends its count rounded down to two "
                   "significant digits (disclosed, outside its DP guarantee)")
EQUAL_WEIGHTS = "equal weights (site-level DP)"


@dataclass
class SiteLink:
    """What the coordinator knows of a connected node: who it is and which global version it holds."""

    site: str | None = None
    modality: str | None = None  # None: unknown, ask the node (a query) before sending it any weights
    version: int | None = None  # None: unknown, send everything of its modality


class Federation:
    def __init__(self, grid: Grid, settings: FederationSettings):
        self.grid = grid
        self.s = settings
        self.links: dict[int, SiteLink] = {}
        self.aggregator = ModalityAwareAggregator(
            strategy_factory(settings.strategy, proximal_mu=settings.proximal_mu, trimmed_beta=settings.trimmed_beta)
        )
        self.out = settings.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.local_models: dict[str, dict[str, np.ndarray]] = {}
        self.cross_site: dict | None = None
        self.final_evaluation: dict | None = None  # every held-out case, when the rounds scored a subset
        self.best = -1.0
        self.site_dp_state: dict | None = None  # the site-level DP accountant of a resumed run
        self.state, self.start_round = self._initial_state()
        if settings.site_dp and settings.cross_site_eval:
            log.warning("site-level DP is on: cross-site evaluation is off (it would send each site's un-noised local model to the others)")

    # ------------------------------------------------------------------ state
    def _initial_state(self) -> tuple[dict[str, np.ndarray], int]:
        latest = self.out / "checkpoints" / "latest.safetensors"
        if self.s.resume and latest.is_file():
            ckpt = Checkpoint.load(latest)
            if ckpt.model_config != self.s.model_config:
                raise ValueError(f"cannot resume {latest}: its model config differs from this run's")
            metrics = self.out / "metrics.json"
            if metrics.is_file():
                self.history = [r for r in json.loads(metrics.read_text())["rounds"] if r["round"] <= ckpt.server_round]
            self.best = float(ckpt.extra.get("best", -1.0))
            self.site_dp_state = ckpt.extra.get("site_dp_accountant")
            log.info("resuming from %s: round %d done, stage %d", latest, ckpt.server_round, ckpt.stage)
            return {k: v.numpy() for k, v in ckpt.state.items()}, ckpt.server_round + 1
        torch.manual_seed(self.s.seed)
        model = build_model(self.s.model_config)
        if self.s.pretrained_checkpoint:
            log.info(load_vmamba_checkpoint(model, self.s.pretrained_checkpoint).summary())
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, 1

    def _checkpoint(self, server_round: int, stage: int, name: str) -> None:
        Checkpoint(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.state.items()},
            self.s.model_config,
            self.s.class_names,
            server_round,
            stage,
            {"run_config": self.s.run_config, "best": self.best, **self._site_dp_checkpoint()},
        ).save(self.out / "checkpoints" / f"{name}.safetensors")

    def _site_dp_checkpoint(self) -> dict:
        site_dp = self.aggregator.site_dp
        return {"site_dp_accountant": site_dp.accountant.state_dict()} if site_dp else {}

    def _start_site_dp(self, num_sites: int) -> None:
        """The site-level DP accountant, made once the first round knows how many sites there are."""
        if self.s.site_dp and self.aggregator.site_dp is None:
            if self.site_dp_state:
                self.aggregator.site_dp = SiteLevelDP.restore(self.s.site_dp, self.site_dp_state)
            else:
                self.aggregator.site_dp = SiteLevelDP(self.s.site_dp, num_sites)

    # ------------------------------------------------------------------ messages
    def _payload(self, node: int, version: int) -> tuple[ArrayRecord, int]:
        """The weights ``node`` lacks to hold global ``version``, and the version it must hold already."""
        link = self.links[node]
        modalities = [link.modality]  # known (see _identify): never another site's encoder
        if link.version is None or link.version > version:
            weights, base = select(self.state, modalities=modalities), FULL_SYNC
        else:
            groups = self.s.schedule.groups_changed_between(link.version, version) if link.version < version else ()
            weights, base = select(self.state, groups=groups, modalities=modalities), link.version
        return _arrays(weights), base

    def _message(
        self, node: int, arrays: ArrayRecord, server_round: int, version: int, base: int, message_type: str, foreign_model: str = "", full_split: bool = False
    ) -> Message:
        instructions = Instructions(
            server_round, self.s.schedule.stage_for_round(server_round), self.s.model_config, self.s.class_names, version, base,
            self.s.proximal_mu, self.s.local_steps, self.s.seed, foreign_model,
            self.s.site_dp.clipping_norm if self.s.site_dp else 0.0, self.s.study, 0 if full_split else self.s.eval_cases, self.s.nsd_tolerance_mm,
        )
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(instructions.to_config())})
        return Message(content=content, dst_node_id=node, message_type=message_type)

    def _messages(self, nodes: list[int], server_round: int, version: int, message_type: str, full_split: bool = False) -> tuple[list[Message], dict[int, int]]:
        messages, bytes_down = [], {}
        for node in nodes:
            arrays, base = self._payload(node, version)
            messages.append(self._message(node, arrays, server_round, version, base, message_type, full_split=full_split))
            bytes_down[node] = _nbytes(arrays)
        return messages, bytes_down

    def _exchange(self, nodes: list[int], server_round: int, version: int, message_type: str, sites: dict, full_split: bool = False) -> list[Message]:
        """Send, wait up to the round timeout, record per site; return the successful replies."""
        messages, bytes_down = self._messages(self._identify(nodes, server_round, sites), server_round, version, message_type, full_split)
        ok = []
        for node, reply in self._replies(messages, server_round, message_type, sites):
            link = self.links[node]
            link.version = version
            entry = sites.setdefault(link.site, {"modality": link.modality})
            entry["bytes_down"] = entry.get("bytes_down", 0) + bytes_down[node]
            entry["bytes_up"] = entry.get("bytes_up", 0) + (_nbytes(reply.content[ARRAYS]) if ARRAYS in reply.content else 0)
            ok.append(reply)
        return ok

    def _identify(self, nodes: list[int], server_round: int, sites: dict) -> list[int]:
        """Those of ``nodes`` whose site and modality are known, after asking the others (a query holds
        no weights): a node's first message, and its first after an error, must not carry any other
        modality's encoder, which with one site per modality is another hospital's own weights."""
        unknown = [n for n in nodes if self.links.setdefault(n, SiteLink()).modality is None]
        if unknown:
            queries = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
            self._replies(queries, server_round, MessageType.QUERY, sites)
        return [n for n in nodes if self.links[n].modality is not None]

    def _replies(self, messages: list[Message], server_round: int, message_type: str, sites: dict) -> list[tuple[int, Message]]:
        """Send ``messages``, wait up to the round timeout and learn each replying node's identity;
        record every failure; return the (node, reply) pairs that succeeded."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.s.round_timeout))
        answered, ok = set(), []
        for reply in replies:
            node = _addressee(reply, messages)
            answered.add(node)
            if reply.has_error():
                self._failed(node, server_round, message_type, reply.error.reason, sites)
                continue
            identity, link = reply.content[SITE], self.links[node]
            link.site, link.modality = str(identity["site"]), str(identity["modality"])
            ok.append((node, reply))
        for node in sorted({m.metadata.dst_node_id for m in messages} - answered):
            self._failed(node, server_round, message_type, f"no reply within {self.s.round_timeout:.0f} s", sites)
        return ok

    def _failed(self, node: int, server_round: int, message_type: str, reason: str, sites: dict) -> None:
        """Note a node's failure. Whatever it holds, and whoever it is now (a restarted SuperNode may
        play another site), is unknown: it is asked again, then sent everything of its modality."""
        link = self.links.setdefault(node, SiteLink())
        entry = sites.setdefault(self._site_key(node), {"modality": link.modality})
        entry.setdefault("errors", []).append(f"{message_type}: {reason}")
        log.warning("round %d %s: site %s failed: %s", server_round, message_type, self._site_key(node), reason)
        link.modality, link.version = None, None

    def _site_key(self, node: int) -> str:
        link = self.links.get(node)
        return link.site if link and link.site else f"node-{node}"

    # ------------------------------------------------------------------ loop
    def wait_for_sites(self, timeout: float = 600.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.s.min_available_sites:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of the required {self.s.min_available_sites} sites connected within {timeout:.0f} s")
            time.sleep(1.0)

    def run(self) -> list[dict]:
        with prefixed(NOT_PRIVATE, log.name, "server.aggregation") if self.s.dp_reproducible else nullcontext():
            if self.s.dp_reproducible:
                log.warning("DP sites that allow it draw their noise and batches from the run seed, which this coordinator knows; their epsilon guarantees nothing")
            return self._run()

    def _run(self) -> list[dict]:
        rng = random.Random(self.s.seed)
        version = self.start_round - 1
        for server_round in range(self.start_round, self.s.num_rounds + 1):
            stage = self.s.schedule.stage_for_round(server_round)
            nodes = self.wait_for_sites()
            k = max(self.s.min_train_sites, round(self.s.fraction_train * len(nodes)))
            sampled = sorted(rng.sample(nodes, min(k, len(nodes))))
            self._start_site_dp(len(nodes))
            site_dp = self.aggregator.site_dp
            if site_dp and not site_dp.budget_allows_round():
                log.warning("round %d: the site-level privacy budget %.3g would be exceeded (spent %.3f); no more training, evaluation goes on", server_round, site_dp.s.budget, site_dp.epsilon())
                sampled = []
            log.info("[ROUND %d/%d] stage %d, lr %.2e, training %s on %d of %d sites", server_round, self.s.num_rounds, stage.index, stage.lr, ",".join(stage.trainable_groups), len(sampled), len(nodes))
            sites: dict[str, dict] = {}
            replies = [r for r in self._exchange(sampled, server_round, version, MessageType.TRAIN, sites) if self._record_training(r, sites)]
            replies = self._screen(server_round, replies, sites)
            # Each site's locally trained model: what it sent over the global model it started from.
            self.local_models = {r.content[SITE]["site"]: {**self.state, **_numpy(r.content[ARRAYS])} for r in replies}
            if replies and len(replies) >= self.s.min_train_sites:
                self.state.update(self.aggregator.aggregate(server_round, self.state, replies))
                version = server_round
                if site_dp:
                    site_dp.record_release(len(replies))
            elif sampled:
                log.warning("round %d: %d sites trained, fewer than min-train-sites=%d; global model unchanged", server_round, len(replies), self.s.min_train_sites)
            if server_round % self.s.eval_interval == 0 or server_round == self.s.num_rounds:
                for reply in self._exchange(sorted(self.grid.get_node_ids()), server_round, version, MessageType.EVALUATE, sites):
                    sites[reply.content[SITE]["site"]].update(evaluation_entry(reply.content[METRICS], self.s.class_names))
            self._record(server_round, stage, sites)
        if self.s.eval_cases and self.history and self.history[-1]["round"] == self.s.num_rounds:
            self.final_evaluation = self._final_evaluation(self.s.num_rounds, version)
            self._write_metrics()
        if self.s.cross_site_eval and not self.s.site_dp and self.local_models and self.history and self.history[-1]["round"] == self.s.num_rounds:
            self.cross_site = self._cross_site_evaluation(self.s.num_rounds, version)
            self._write_metrics()
        write_report(self.out)
        return self.history

    def _final_evaluation(self, server_round: int, version: int) -> dict:
        """The rounds scored ``eval-cases`` held-out cases per site; the final global model, and the best
        checkpoint's model when it is another round's, are scored on every held-out case."""
        sites: dict[str, dict] = {}
        for reply in self._exchange(sorted(self.grid.get_node_ids()), server_round, version, MessageType.EVALUATE, sites, full_split=True):
            sites[reply.content[SITE]["site"]].update(evaluation_entry(reply.content[METRICS], self.s.class_names))
        result = {"global": {"round": server_round, "sites": sites}}
        log.info("final global model on every held-out case:\n%s", dice_table(sites, self.s.class_names))
        best = Checkpoint.load(self.out / "checkpoints" / "best.safetensors") if (self.out / "checkpoints" / "best.safetensors").is_file() else None
        if best is not None and best.server_round != server_round:
            name = f"best checkpoint (round {best.server_round})"
            replies = self._evaluate_elsewhere(name, {k: v.numpy() for k, v in best.state.items()}, server_round, version, full_split=True)
            best_sites = {site: {"modality": modality, **evaluation_entry(m, self.s.class_names)} for site, (modality, m) in replies.items()}
            result["best"] = {"round": best.server_round, "sites": best_sites}
            log.info("%s on every held-out case:\n%s", name, dice_table(best_sites, self.s.class_names))
        return result

    def _evaluate_elsewhere(self, name: str, weights: dict[str, np.ndarray], server_round: int, version: int, full_split: bool = False) -> dict[str, tuple[str, MetricRecord]]:
        """A model other than the current global one (``name``) evaluated at every identified node with that
        node's modality encoder, leaving the node's copy of the global model as it is: site -> (modality, metrics)."""
        nodes = [n for n in sorted(self.grid.get_node_ids()) if self.links.get(n, SiteLink()).modality]
        messages = [
            self._message(n, _arrays(select(weights, modalities=[self.links[n].modality])), server_round, version, FULL_SYNC, MessageType.EVALUATE, name, full_split)
            for n in nodes
        ]
        out = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.s.round_timeout):
            if reply.has_error():
                log.warning("evaluation of %s at %s failed: %s", name, self._site_key(_addressee(reply, messages)), reply.error.reason)
                continue
            out[str(reply.content[SITE]["site"])] = (str(reply.content[SITE]["modality"]), reply.content[METRICS])
        return out

    def _cross_site_evaluation(self, server_round: int, version: int) -> dict:
        """Every site's locally trained model (last round) evaluated on every site's held-out data.

        A site's local model carries only its own modality's encoder as trained; at a site of another
        modality it is evaluated with that modality's encoder from the global model it started from.
        The global row is the final round's evaluation.
        """
        final = self.history[-1]["sites"]
        dice = {"global": {site: s["dice"] for site, s in final.items() if "dice" in s}}
        dice_mean = {"global": {site: s["dice_mean"] for site, s in final.items() if "dice" in s}}
        for name, local in sorted(self.local_models.items()):
            for site, (_, m) in self._evaluate_elsewhere(name, local, server_round, version).items():
                dice.setdefault(name, {})[site] = {c: float(m[f"dice-{c}"]) for c in self.s.class_names}
                dice_mean.setdefault(name, {})[site] = float(m["dice-mean"])
        result = {"round": server_round, "models": list(dice), "sites": sorted(dice["global"]), "dice_mean": dice_mean, "dice": dice}
        log.info("cross-site evaluation (rows: model, columns: site, mean Dice):\n%s", cross_site_table(result))
        return result

    def _screen(self, server_round: int, replies: list[Message], sites: dict) -> list[Message]:
        """Drop non-finite and outlying updates (see server.validation), logged with the site's name."""
        rejected = screen_updates(replies, self.state, self.s.max_update_norm_ratio)
        for rejection in rejected:
            site = str(replies[rejection.index].content[SITE]["site"])
            log.warning("round %d: update of site %s rejected: %s", server_round, site, rejection.reason)
            sites[site]["rejected"] = rejection.reason
        dropped = {r.index for r in rejected}
        return [reply for i, reply in enumerate(replies) if i not in dropped]

    def _record_training(self, reply: Message, sites: dict) -> bool:
        """Note a site's training metrics; False when it sent no update (its privacy budget is spent)."""
        m, entry = reply.content[METRICS], sites[reply.content[SITE]["site"]]
        entry["num_examples"] = int(m["num-examples"])
        if "train-loss" in m:  # a DP site keeps its loss and timings to itself
            entry["train_loss"] = float(m["train-loss"])
            entry["timing"] = {"first_batch_s": float(m["first-batch-seconds"]), "train_s": float(m["train-seconds"])}
        if "epsilon" in m:
            entry["epsilon"] = float(m["epsilon"])
            entry["privacy"] = {k.removeprefix("dp-").replace("-", "_"): float(v) for k, v in m.items() if k.startswith("dp-")}
            mapped = entry["privacy"].pop("patients_mapped", 1.0)
            entry["privacy"]["unit"] = "patient" if mapped else "patient = one image file (the site maps no patients)"
            if m["dp-reproducible"]:
                entry["not_private"] = NOT_PRIVATE.rstrip(": ")
            if m["dp-budget-exhausted"]:
                log.warning("site %s: privacy budget %.3g spent (epsilon %.3f); it no longer trains, only evaluates", entry.get("site", reply.content[SITE]["site"]), float(m["dp-budget"]), float(m["epsilon"]))
                entry["privacy_budget_exhausted"] = True
        return ARRAYS in reply.content

    def _record(self, server_round: int, stage, sites: dict) -> None:
        entry = {"round": server_round, "stage": stage.index, "lr": stage.lr, "trainable_groups": list(stage.trainable_groups), "sites": sites}
        if self.s.dp_reproducible:
            entry["not_private"] = NOT_PRIVATE.rstrip(": ")
        if self.aggregator.site_dp:
            entry["site_dp"] = self.aggregator.site_dp.report()
        self.history.append(entry)
        log.info("round %d global Dice per site:\n%s", server_round, dice_table(sites, self.s.class_names))
        means = [s["dice_mean"] for s in sites.values() if "dice_mean" in s and s["dice_mean"] == s["dice_mean"]]
        score = float(np.mean(means)) if means else None
        if score is not None and score > self.best:
            self.best = score
            self._checkpoint(server_round, stage.index, "best")
        self._checkpoint(server_round, stage.index, "latest")
        self._write_metrics()

    def _write_metrics(self) -> None:
        metrics = {"rounds": self.history, "config": self.s.run_config, "best_mean_dice": self.best if self.best >= 0 else None,
                   "study": self.s.study, "weighting": EQUAL_WEIGHTS if self.s.site_dp else PATIENT_WEIGHTS}
        if self.s.dp_reproducible:
            metrics["not_private"] = NOT_PRIVATE.rstrip(": ")
        if self.cross_site:
            metrics["cross_site"] = self.cross_site
        if self.final_evaluation:
            metrics["final_evaluation"] = self.final_evaluation
        tmp = self.out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1, default=str))
        tmp.replace(self.out / "metrics.json")


def evaluation_entry(m, class_names) -> dict:
    """A site's evaluation reply as metrics.json records it (per class: Dice, HD95 in mm, NSD)."""
    return {
        "dice": {c: float(m[f"dice-{c}"]) for c in class_names},
        "hd95": {c: float(m[f"hd95-{c}"]) for c in class_names},
        "nsd": {c: float(m[f"nsd-{c}"]) for c in class_names},
        "hd95_unbounded": {c: int(m[f"hd95-unbounded-{c}"]) for c in class_names},
        "dice_mean": float(m["dice-mean"]),
        "num_val_cases": int(m["num-examples"]),
        "held_out_cases": int(m["num-val-cases"]),
        "eval_s_per_case": float(m["eval-seconds-per-case"]),
    }


def dice_table(sites: dict, class_names) -> str:
    """Per site: Dice per class and its mean, HD95 (mm) and NSD per class, the cases scored, epsilon under DP."""
    private = any("epsilon" in s for s in sites.values())
    header = (
        f"{'site':<20}{'modality':<9}" + "".join(f"{'Dice ' + c:>12}" for c in class_names) + f"{'mean':>7}"
        + "".join(f"{'HD95 ' + c:>12}" for c in class_names) + "".join(f"{'NSD ' + c:>11}" for c in class_names) + f"{'cases':>7}" + (f"{'epsilon':>9}" if private else "")
    )
    lines = [header]
    for name, s in sorted(sites.items()):
        if "dice" in s:
            epsilon = (f"{s['epsilon']:>9.3f}" if "epsilon" in s else f"{'-':>9}") if private else ""
            notes = ("  budget spent" if s.get("privacy_budget_exhausted") else "") + ("  update rejected" if "rejected" in s else "")
            lines.append(
                f"{name:<20}{s['modality'] or '?':<9}" + "".join(f"{s['dice'][c]:>12.3f}" for c in class_names) + f"{s['dice_mean']:>7.3f}"
                + "".join(f"{s['hd95'][c]:>12.1f}" for c in class_names) + "".join(f"{s['nsd'][c]:>11.3f}" for c in class_names)
                + f"{s['num_val_cases']:>4}/{s['held_out_cases']:<2}" + epsilon + notes
            )
        else:
            lines.append(f"{name:<20}{s.get('modality') or '?':<9}  " + "; ".join(s.get("errors", ["not evaluated"])))
    return "\n".join(lines)


def cross_site_table(result: dict) -> str:
    sites = result["sites"]
    lines = [f"{'model':<20}" + "".join(f"{s:>14}" for s in sites)]
    for model in result["models"]:
        row = result["dice_mean"].get(model, {})
        lines.append(f"{model:<20}" + "".join(f"{row[s]:>14.3f}" if s in row else f"{'-':>14}" for s in sites))
    return "\n".join(lines)


def _addressee(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: the SuperLink itself sends the error reply of a node that went
    offline (its source is the SuperLink, not the node), so match the message it replies to."""
    for message in sent:
        if message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def _arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def _nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())
