"""The coordinator's settings, read from the Flower run config (``[tool.flwr.app.config]``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fed_swinumamba.dp_options import RunDPOptions
from fed_swinumamba.model import ModelConfig
from fed_swinumamba.protocol import check_study
from fed_swinumamba.schedule import UnfreezingSchedule

from .site_dp import SiteDPSettings

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian")

# Defaults of every key, so that a run started without pyproject (the simulation's Python API) behaves
# like ``flwr run``; pyproject.toml repeats them for users to edit.
DEFAULTS = {
    "num-server-rounds": 6,
    "rounds-per-stage": 2,
    "frozen-at-start": "stage1,stage2,stage3",
    "lr": 1e-4,
    "lr-decay": 0.8,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "trimmed-beta": 0.2,
    "max-update-norm-ratio": 10.0,
    "fraction-train": 1.0,
    "min-train-sites": 1,
    "min-available-sites": 1,
    "round-timeout": 900.0,
    "eval-interval": 1,
    "cross-site-eval": True,
    "local-steps": 0,
    "eval-cases": 0,
    "nsd-tolerance-mm": "2.0",
    "output-dir": "runs/latest",
    "study": "",
    "resume": False,
    "seed": 0,
    "pretrained-checkpoint": "",
    "demo-data": "runs/demo-data",
    "dp-epsilon": 0.0,
    "dp-noise-multiplier": 0.0,
    "dp-max-grad-norm": 1.0,
    "dp-delta": 0.0,
    "dp-slices-per-case": 2,
    "dp-cases-per-batch": 0,
    "dp-local-steps": 0,
    "dp-frozen": "",
    "dp-lr-scale": 1.0,
    "dp-insecure-reproducible": False,
    "site-dp-noise-multiplier": 0.0,
    "site-dp-clipping-norm": 0.1,
    "site-dp-delta": 1e-5,
    "site-dp-epsilon": 0.0,
    "class-names": "organ,lesion",
    "modalities": "ct,mri,us",
    "model-variant": "swin_umamba",
    "model-dims": "16,32,64,128",
    "model-depths": "1,1,2,1",
    "model-stem-width": 16,
    "model-d-state": 16,
    "model-encoder-block": "vss",
    "model-num-heads": "1,2,4,8",
    "model-deep-supervision": False,
}


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in str(value).split(",") if v.strip())


def _names(value) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _non_negative(key: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"run config {key} must be >= 0, got {value}")
    return value


def _tolerances(value, num_classes: int) -> tuple[float, ...]:
    tolerances = tuple(float(v) for v in str(value).split(",") if v.strip())
    if len(tolerances) not in (1, num_classes) or any(t < 0 for t in tolerances):
        raise ValueError(f"run config nsd-tolerance-mm must be one tolerance in mm or one per class ({num_classes}), got {value!r}")
    return tolerances


def default_study(output_dir: Path) -> str:
    """The study of a run that names none: its output folder's name (``runs/liver`` -> ``liver``), so
    that a resumed or repeated run into the same folder spends from the same privacy ledgers."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", output_dir.resolve().name).lstrip("._-")[:100]
    return name or "default"


@dataclass(frozen=True)
class FederationSettings:
    num_rounds: int
    schedule: UnfreezingSchedule
    model_config: ModelConfig
    class_names: tuple[str, ...]
    strategy: str
    proximal_mu: float
    trimmed_beta: float
    max_update_norm_ratio: float
    fraction_train: float
    min_train_sites: int
    min_available_sites: int
    round_timeout: float
    eval_interval: int
    cross_site_eval: bool
    local_steps: int
    eval_cases: int  # held-out cases per site scored each round (0: all); all of them after the last round
    nsd_tolerance_mm: tuple[float, ...]  # surface Dice tolerance: one for all classes or one per class
    output_dir: Path
    study: str
    resume: bool
    seed: int
    pretrained_checkpoint: str
    site_dp: SiteDPSettings | None
    dp_reproducible: bool  # dp-insecure-reproducible: DP sites draw noise and batches from the run seed: NOT private
    run_config: dict

    @classmethod
    def from_run_config(cls, run_config) -> FederationSettings:
        unknown = set(run_config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown run config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        c = {**DEFAULTS, **dict(run_config)}
        if c["strategy"] not in STRATEGIES:
            raise ValueError(f"run config strategy must be one of {STRATEGIES}, got {c['strategy']!r}")
        dp = RunDPOptions.from_run_config(c)  # a bad dp-* value stops the run before any site trains
        output_dir = Path(str(c["output-dir"])).expanduser()
        class_names = _names(c["class-names"])
        model_config = ModelConfig(
            variant=c["model-variant"],
            num_classes=len(class_names) + 1,
            modalities=_names(c["modalities"]),
            dims=_ints(c["model-dims"]),
            depths=_ints(c["model-depths"]),
            stem_width=int(c["model-stem-width"]),
            d_state=int(c["model-d-state"]),
            encoder_block=c["model-encoder-block"],
            num_heads=_ints(c["model-num-heads"]),
            deep_supervision=bool(c["model-deep-supervision"]),
        )
        schedule = UnfreezingSchedule(
            frozen_at_start=_names(c["frozen-at-start"]),
            rounds_per_stage=int(c["rounds-per-stage"]),
            base_lr=float(c["lr"]),
            lr_decay=float(c["lr-decay"]),
        )
        return cls(
            num_rounds=int(c["num-server-rounds"]),
            schedule=schedule,
            model_config=model_config,
            class_names=class_names,
            strategy=c["strategy"],
            proximal_mu=float(c["proximal-mu"]) if c["strategy"] == "fedprox" else 0.0,
            trimmed_beta=float(c["trimmed-beta"]),
            max_update_norm_ratio=float(c["max-update-norm-ratio"]),
            fraction_train=float(c["fraction-train"]),
            min_train_sites=int(c["min-train-sites"]),
            min_available_sites=int(c["min-available-sites"]),
            round_timeout=float(c["round-timeout"]),
            eval_interval=int(c["eval-interval"]),
            cross_site_eval=bool(c["cross-site-eval"]),
            local_steps=int(c["local-steps"]),
            eval_cases=_non_negative("eval-cases", int(c["eval-cases"])),
            nsd_tolerance_mm=_tolerances(c["nsd-tolerance-mm"], len(class_names)),
            output_dir=output_dir,
            study=check_study(str(c["study"])) if c["study"] else default_study(output_dir),
            resume=bool(c["resume"]),
            seed=int(c["seed"]),
            pretrained_checkpoint=str(c["pretrained-checkpoint"]),
            site_dp=SiteDPSettings.from_run_config(c),
            dp_reproducible=dp.insecure_reproducible,
            run_config=c,
        )
