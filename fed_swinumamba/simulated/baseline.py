"""The baselines that federated results are compared with: centralized and local-only.

Both get the federation's budget: the same initial weights (seed and ImageNet file), rounds, unfreezing
stages, learning rates and local steps per site, and a site's batches of a round are the ones it draws in
the federation (``round_seed``); both are scored as the global model is: on the site's validation cases
on evaluation rounds (the first ``eval_cases``), on every test case after the last round (a site without
a test split: every validation case).

- **centralized**: one network (every modality encoder) trained on the union of the sites' training
  data, the sites' data one after another within a round: what pooling the data would give.
- **local-only**: every site trains a network of its own on its own data alone, as it could without the
  federation (no DP: nothing leaves the site, so there is no one to protect it from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..data import SiteConfig, SiteData
from ..model import ModelConfig
from ..model.pretrained import initial_model
from ..protocol import TEST, VALIDATION
from ..schedule import UnfreezingSchedule
from ..training import evaluate_cases, round_seed, train_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """What the federation spent, which a baseline spends too."""

    model_config: ModelConfig
    class_names: tuple[str, ...]
    schedule: UnfreezingSchedule
    num_rounds: int
    local_steps: int = 0  # 0: each site's own training.local_steps
    seed: int = 0
    pretrained_checkpoint: str = ""
    eval_interval: int = 1
    eval_cases: int = 0  # held-out cases per site scored on evaluation rounds (0: all)
    nsd_tolerance_mm: tuple[float, ...] = (2.0,)

    def evaluates(self, server_round: int) -> bool:
        return server_round % self.eval_interval == 0 or server_round == self.num_rounds


def train_pooled(sites: list[SiteConfig], budget: Budget, name: str = "pooled") -> list[dict]:
    """One network trained on ``sites``' data in turn; per evaluation round, the stage and each site's
    scores on its held-out cases (metrics.json's per-site entries)."""
    model, report = initial_model(budget.model_config, budget.seed, budget.pretrained_checkpoint)
    if report:
        log.info(report.summary())
    classes = list(budget.class_names)
    data = [SiteData.from_config(site, classes) for site in sites]
    history = []
    for server_round in range(1, budget.num_rounds + 1):
        stage = budget.schedule.stage_for_round(server_round)
        for site, d in zip(sites, data):
            seed = round_seed(budget.seed, server_round, site.site)  # a site's own batches of this round
            torch.manual_seed(seed)
            train_local(
                model,
                site.modality,
                d.training_batches(site.training.batch_size, np.random.default_rng(seed)),
                groups=stage.trainable_groups,
                lr=stage.lr,
                max_steps=budget.local_steps or site.training.local_steps or None,
                epochs=site.training.local_epochs or 1,
            )
        if not budget.evaluates(server_round):
            continue
        last = server_round == budget.num_rounds
        scores = {}
        for site, d in zip(sites, data):
            split, held = d.held_out(TEST if last else VALIDATION)
            cases = held if last or not budget.eval_cases else held[: budget.eval_cases]
            result = evaluate_cases(
                model, site.modality, cases, classes, site.training.patch_size, budget.nsd_tolerance_mm
            )
            scores[site.site] = {"modality": site.modality, **result.reply(len(held), split).record()}
        log.info("%s round %d: %s", name, server_round, {k: round(v["dice_mean"], 3) for k, v in scores.items()})
        history.append({"round": server_round, "stage": stage.index, "sites": scores})
    return history


def train_centralized(sites: list[SiteConfig], budget: Budget) -> list[dict]:
    """The pooled network of all sites, scored at every site."""
    return train_pooled(sites, budget, "centralized")


def train_local_only(sites: list[SiteConfig], budget: Budget) -> list[dict]:
    """Each site's own network, scored on its own held-out cases; one history with every site per round."""
    histories = [train_pooled([site], budget, f"local-only {site.site}") for site in sites]
    return [
        {
            "round": rounds[0]["round"],
            "stage": rounds[0]["stage"],
            "sites": {k: v for r in rounds for k, v in r["sites"].items()},
        }
        for rounds in zip(*histories)
    ]
