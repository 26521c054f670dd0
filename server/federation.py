"""The coordinator's run: rounds of the strategy (server.strategy), each recorded and checkpointed.

The round logic — payloads, aggregation, screening, site-level DP — is the strategy's; this driver
adds what a run needs around it: resuming, waiting for sites, the per-round record in metrics.json,
checkpoints (``latest`` with the strategy's state, ``best`` by the mean of the sites' mean Dice), the
final scoring on every test case, cross-site evaluation and the report. A run killed at any
point resumes at the next round with the right stage and the strategy's state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.logs import NOT_PRIVATE, prefixed
from fed_swinumamba.model import normalisation_state_names
from fed_swinumamba.model.pretrained import initial_model
from fed_swinumamba.params import keeps_modality_norms, split_norms

from .records import NOT_PRIVATE_MARK, RoundRecord, SiteRecord
from .report import score_text, write_report
from .settings import FederationSettings
from .strategy import EVAL_FULL_SPLIT, EVAL_MODEL, EVAL_WAIT, ModalityAwareStrategy, to_arrays

log = logging.getLogger("fed_swinumamba.server")

# What the weights of an averaging strategy count, as metrics.json and the report state it.
PATIENT_WEIGHTS = (
    "each site's number of training patients; a site with DP-SGD sends its count rounded down to two "
    "significant digits (disclosed, outside its DP guarantee)"
)
EQUAL_WEIGHTS = "equal weights (site-level DP)"


class Federation:
    def __init__(self, grid: Grid, settings: FederationSettings):
        self.grid = grid
        self.s = settings
        self.out = settings.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.cross_site: dict | None = None
        self.final_evaluation: dict | None = None  # the final and best models on every test case
        self.best = -1.0
        self.strategy, self.start_round = self._initial_strategy()
        if settings.site_dp and settings.cross_site_eval:
            log.warning(
                "site-level DP is on: cross-site evaluation is off (it would send each site's un-noised local model to the others)"
            )

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The global weights (the strategy's)."""
        return self.strategy.weights

    # ------------------------------------------------------------------ state
    def _initial_strategy(self) -> tuple[ModalityAwareStrategy, int]:
        latest = self.out / "checkpoints" / "latest.safetensors"
        if self.s.resume and latest.is_file():
            ckpt = Checkpoint.load(latest)
            if ckpt.model_config != self.s.model_config:
                raise ValueError(f"cannot resume {latest}: its model config differs from this run's")
            if keeps_modality_norms(ckpt.state) != self.s.modality_norms:
                raise ValueError(f"cannot resume {latest}: it was trained with another norm-partition than this run's")
            metrics = self.out / "metrics.json"
            if metrics.is_file():
                self.history = [r for r in json.loads(metrics.read_text())["rounds"] if r["round"] <= ckpt.server_round]
            self.best = float(ckpt.extra.get("best", -1.0))
            strategy = ModalityAwareStrategy(self.s, {k: v.numpy() for k, v in ckpt.state.items()})
            strategy.load_state_dict(
                {k: v.numpy() for k, v in ckpt.server_state.items()},
                ckpt.extra.get("strategy", {}),
                int(ckpt.extra.get("version", ckpt.server_round)),
            )
            log.info("resuming from %s: round %d done, stage %d", latest, ckpt.server_round, ckpt.stage)
            return strategy, ckpt.server_round + 1
        weights, model = self._starting_weights()
        if self.s.modality_norms and not keeps_modality_norms(weights):  # FedBN-style: a copy per modality
            split = split_norms(weights, normalisation_state_names(model), self.s.model_config.modalities)
            weights = {k: np.array(v) for k, v in split.items()}  # each copy its own memory
        elif keeps_modality_norms(weights) and not self.s.modality_norms:
            raise ValueError(
                f"{self.s.initial_checkpoint} keeps its norms per modality: run with norm-partition = modality"
            )
        return ModalityAwareStrategy(self.s, weights), 1

    def _starting_weights(self) -> tuple[dict[str, np.ndarray], torch.nn.Module]:
        """A new run's weights, the initial checkpoint's or fresh ones (with the ImageNet encoder if given), and a
        network they load into (its shared layers' names are the weights')."""
        if self.s.initial_checkpoint:
            ckpt = Checkpoint.load(self.s.initial_checkpoint)
            model = ckpt.build_model(ckpt.model_config.modalities[0])  # every tensor there, in this network's shapes
            log.info(
                "starting from %s (round %d of its run, %d pruned layer groups)",
                self.s.initial_checkpoint,
                ckpt.server_round,
                len(ckpt.model_config.pruned),
            )
            return {k: v.numpy() for k, v in ckpt.state.items()}, model
        model, report = initial_model(self.s.model_config, self.s.seed, self.s.pretrained_checkpoint)
        if report:
            log.info(report.summary())
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, model

    def _checkpoint(self, server_round: int, stage: int, name: str) -> None:
        extra = {"run_config": self.s.run_config, "best": self.best, "version": self.strategy.version}
        server_state = {}
        if name == "latest":  # what a resume needs; the best checkpoint is for use
            arrays, values = self.strategy.state_dict()
            extra["strategy"], server_state = (
                values,
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
            )
        Checkpoint(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.state.items()},
            self.s.model_config,
            self.s.class_names,
            server_round,
            stage,
            extra,
            server_state,
        ).save(self.out / "checkpoints" / f"{name}.safetensors")

    # ------------------------------------------------------------------ loop
    def wait_for_sites(self, timeout: float = 600.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.s.min_available_sites:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of the required {self.s.min_available_sites} sites connected within {timeout:.0f} s"
                )
            time.sleep(1.0)

    def run(self) -> list[dict]:
        with prefixed(NOT_PRIVATE, log.name, "server.strategy") if self.s.dp_reproducible else nullcontext():
            if self.s.dp_reproducible:
                log.warning(
                    "DP sites that allow it draw their noise and batches from the run seed, which this coordinator knows; their epsilon guarantees nothing"
                )
            return self._run()

    def _send(self, messages, timeout: float | None = None) -> list:
        wait = self.s.round_timeout if timeout is None else timeout
        return list(self.grid.send_and_receive(messages, timeout=wait))

    def _run(self) -> list[dict]:
        strategy, no_arrays = self.strategy, to_arrays({})  # the strategy sends from its own weights
        for server_round in range(self.start_round, self.s.num_rounds + 1):
            self.wait_for_sites()
            strategy.aggregate_train(
                server_round, self._send(strategy.configure_train(server_round, no_arrays, ConfigRecord(), self.grid))
            )
            if server_round % self.s.eval_interval == 0 or server_round == self.s.num_rounds:
                strategy.aggregate_evaluate(
                    server_round,
                    self._send(strategy.configure_evaluate(server_round, no_arrays, ConfigRecord(), self.grid)),
                )
            self._record(
                server_round, self.s.schedule.stage_for_round(server_round), strategy.records.pop(server_round, {})
            )
        finished = bool(self.history) and self.history[-1]["round"] == self.s.num_rounds
        if finished:
            self.final_evaluation = self._final_evaluation(self.s.num_rounds)
            self._write_metrics()
        if self.s.cross_site_eval and not self.s.site_dp and strategy.local_models and finished:
            self.cross_site = self._cross_site_evaluation(self.s.num_rounds)
            self._write_metrics()
        write_report(self.out)
        return self.history

    def _evaluate(
        self, server_round: int, name: str = "", weights: dict[str, np.ndarray] | None = None, full_split: bool = False
    ) -> dict[str, dict]:
        """The global model (or the model ``weights`` called ``name``) scored at every node: site -> metrics.json entry."""
        wait = self.s.round_timeout
        if full_split:  # every case: the sites' own timings say how long that takes
            personal = self.s.personal if not name else None  # scored beside the global model only
            models = 1 if personal is None or personal.method == "none" else 2
            finetune = personal.finetune_steps if personal is not None and personal.method == "finetune" else 0
            wait = full_split_timeout(self.s.round_timeout, self._site_timings(), models, finetune)
            log.info(
                "round %d: %s on every held-out case, waiting up to %.0f s", server_round, name or "global model", wait
            )
        config = ConfigRecord({EVAL_MODEL: name, EVAL_FULL_SPLIT: full_split, EVAL_WAIT: wait})
        strategy = self.strategy
        strategy.aggregate_evaluate(
            server_round,
            self._send(strategy.configure_evaluate(server_round, to_arrays(weights or {}), config, self.grid), wait),
        )
        strategy.records.pop(server_round, None)
        return {
            site: {"modality": modality, **scores.record()} for site, (modality, scores) in strategy.evaluations.items()
        }

    def _site_timings(self) -> dict[str, dict]:
        """Each site's newest figures as metrics.json keeps them (seconds per case, the cases of its full split,
        training seconds and steps), this process's last evaluation over them: a resumed run, and a site whose
        last evaluation failed, keep the earlier ones."""
        latest: dict[str, dict] = {}
        for record in self.history:
            for site, entry in record["sites"].items():
                latest[site] = {**latest.get(site, {}), **entry}
        for site, (_, scores) in self.strategy.evaluations.items():
            latest[site] = {**latest.get(site, {}), **scores.record()}
        return latest

    def _final_evaluation(self, server_round: int) -> dict:
        """The rounds scored the sites' validation cases (``eval-cases`` of them, or all), which chose the
        best checkpoint; the final global model, and the best checkpoint's model when it is another round's,
        are scored on every test case (a site without a test split: every validation case)."""
        sites = self._evaluate(server_round, full_split=True)
        result = {"global": {"round": server_round, "sites": sites}}
        log.info("final global model on every test case:\n%s", score_text(sites, self.s.class_names))
        best = (
            Checkpoint.load(self.out / "checkpoints" / "best.safetensors")
            if (self.out / "checkpoints" / "best.safetensors").is_file()
            else None
        )
        if best is not None and best.server_round != server_round:
            name = f"best checkpoint (round {best.server_round})"
            best_sites = self._evaluate(
                server_round, name, {k: v.numpy() for k, v in best.state.items()}, full_split=True
            )
            result["best"] = {"round": best.server_round, "sites": best_sites}
            log.info("%s on every test case:\n%s", name, score_text(best_sites, self.s.class_names))
        return result

    def _cross_site_evaluation(self, server_round: int) -> dict:
        """Every site's locally trained model (last round) evaluated on every site's held-out data.

        A site's local model carries only its own modality's encoder as trained; at a site of another
        modality it is evaluated with that modality's encoder from the global model it started from.
        The global row is the final round's evaluation.
        """
        final = self.history[-1]["sites"]
        dice = {"global": {site: s["dice"] for site, s in final.items() if "dice" in s}}
        dice_mean = {"global": {site: s["dice_mean"] for site, s in final.items() if "dice" in s}}
        for name, local in sorted(self.strategy.local_models.items()):
            for site, entry in self._evaluate(server_round, name, local).items():
                dice.setdefault(name, {})[site] = entry["dice"]
                dice_mean.setdefault(name, {})[site] = entry["dice_mean"]
        result = {
            "round": server_round,
            "models": list(dice),
            "sites": sorted(dice["global"]),
            "dice_mean": dice_mean,
            "dice": dice,
        }
        log.info("cross-site evaluation (rows: model, columns: site, mean Dice):\n%s", cross_site_table(result))
        return result

    def _record(self, server_round: int, stage, sites: dict[str, SiteRecord]) -> None:
        site_dp = self.strategy.site_dp.report() if self.strategy.site_dp else None
        record = RoundRecord(
            server_round, stage.index, stage.lr, stage.trainable_groups, sites, site_dp, self.s.dp_reproducible
        ).to_json()
        self.history.append(record)
        log.info("round %d global Dice per site:\n%s", server_round, score_text(record["sites"], self.s.class_names))
        means = [
            s.evaluation.dice_mean for s in sites.values() if s.evaluation and not math.isnan(s.evaluation.dice_mean)
        ]
        score = float(np.mean(means)) if means else None
        if score is not None and score > self.best:
            self.best = score
            self._checkpoint(server_round, stage.index, "best")
        self._checkpoint(server_round, stage.index, "latest")
        self._write_metrics()

    def _write_metrics(self) -> None:
        metrics = {
            "rounds": self.history,
            "config": self.s.run_config,
            "best_mean_dice": self.best if self.best >= 0 else None,
            "study": self.s.study,
            "weighting": EQUAL_WEIGHTS if self.s.site_dp else PATIENT_WEIGHTS,
        }
        if self.s.dp_reproducible:
            metrics["not_private"] = NOT_PRIVATE_MARK
        if self.cross_site:
            metrics["cross_site"] = self.cross_site
        if self.final_evaluation:
            metrics["final_evaluation"] = self.final_evaluation
        tmp = self.out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1, default=str))
        tmp.replace(self.out / "metrics.json")


FULL_SPLIT_MARGIN = 2.0  # a full split's cases can be larger than those a round scored


def full_split_timeout(round_timeout: float, sites: Mapping[str, Mapping], models: int, finetune_steps: int) -> float:
    """Seconds to wait for an evaluation of every held-out case, from the sites' own figures (metrics.json's
    site entries): per site, its seconds per case times the cases of its full split times the ``models`` it
    scores (with a personal model, plus the validation cases it scores to choose that model), plus the
    ``finetune_steps`` it trains at its last seconds per step; the largest of these
    with a margin, never less than ``round_timeout``. A round scores a subset (``eval-cases``) that fits the
    round's wait; the end scores every case, which at a hospital with many full-size volumes does not
    (benchmarks/RESULTS.md: twenty 512 x 512 CT volumes take 9 min per model on two cores)."""
    needed = []
    for entry in sites.values():
        cases = entry.get("full_split_cases", 0) * models + (entry.get("selection_cases", 0) if models > 1 else 0)
        seconds = entry.get("eval_s_per_case", 0.0) * cases
        train_s, steps = entry.get("timing", {}).get("train_s"), entry.get("steps")
        if finetune_steps and train_s and steps:  # a DP site keeps its training time to itself
            seconds += train_s / steps * finetune_steps
        needed.append(FULL_SPLIT_MARGIN * seconds)
    return max([round_timeout, *needed])


def cross_site_table(result: dict) -> str:
    sites = result["sites"]
    lines = [f"{'model':<20}" + "".join(f"{s:>14}" for s in sites)]
    for model in result["models"]:
        row = result["dice_mean"].get(model, {})
        lines.append(f"{model:<20}" + "".join(f"{row[s]:>14.3f}" if s in row else f"{'-':>14}" for s in sites))
    return "\n".join(lines)
