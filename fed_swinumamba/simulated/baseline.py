"""The centralized baseline that federated results are compared with.

One network (every modality encoder) is trained on the union of the sites' training data with the
federation's budget: the same rounds, unfreezing stages, learning rates and number of local steps
per site; within a round it trains on the sites' data one after another. It is then evaluated on
each site's held-out cases exactly as the global model is.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..data import SiteConfig, SiteData
from ..model import ModelConfig, build_model
from ..schedule import UnfreezingSchedule
from ..training import evaluate_cases, train_local

log = logging.getLogger(__name__)


def train_centralized(
    sites: list[SiteConfig],
    model_config: ModelConfig,
    class_names: list[str],
    schedule: UnfreezingSchedule,
    num_rounds: int,
    local_steps: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Per round: stage and, per site, Dice of the pooled model on that site's held-out cases."""
    torch.manual_seed(seed)
    model = build_model(model_config)
    data = [SiteData.from_config(site, class_names) for site in sites]
    loaders = [
        d.training_batches(s.training.batch_size, np.random.default_rng(seed + i))
        for i, (s, d) in enumerate(zip(sites, data))
    ]
    history = []
    for server_round in range(1, num_rounds + 1):
        stage = schedule.stage_for_round(server_round)
        for site, loader in zip(sites, loaders):
            steps = local_steps or site.training.local_steps or None
            train_local(
                model,
                site.modality,
                loader,
                groups=stage.trainable_groups,
                lr=stage.lr,
                max_steps=steps,
                epochs=site.training.local_epochs or 1,
            )
        results = {}
        for site, d in zip(sites, data):
            r = evaluate_cases(model, site.modality, d.val_cases, class_names, site.training.patch_size)
            results[site.site] = {"modality": site.modality, "dice": r.dice, "dice_mean": r.dice_mean}
        log.info("centralized round %d: %s", server_round, {k: round(v["dice_mean"], 3) for k, v in results.items()})
        history.append({"round": server_round, "stage": stage.index, "sites": results})
    return history
