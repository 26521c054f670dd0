"""The coordinator's settings: the run config (``fed_swinumamba.run_config``), resolved into typed values."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.compression import CompressionOptions
from fed_swinumamba.dp_options import RunDPOptions
from fed_swinumamba.model import ModelConfig
from fed_swinumamba.protocol import PersonalOptions, check_study
from fed_swinumamba.run_config import resolve_run_config
from fed_swinumamba.schedule import UnfreezingSchedule

from .site_dp import SiteDPSettings


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in str(value).split(",") if v.strip())


def _names(value) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _tolerances(value, num_classes: int) -> tuple[float, ...]:
    tolerances = tuple(float(v) for v in str(value).split(",") if v.strip())
    if len(tolerances) not in (1, num_classes) or any(t < 0 for t in tolerances):
        raise ValueError(
            f"run config nsd-tolerance-mm must be one tolerance in mm or one per class ({num_classes}), got {value!r}"
        )
    return tolerances


def default_study(output_dir: Path) -> str:
    """The study of a run that names none: its output folder's name (``runs/liver`` -> ``liver``), so
    that a resumed or repeated run into the same folder spends from the same privacy ledgers."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", output_dir.resolve().name).lstrip("._-")[:100]
    return name or "default"


def _initial_model_config(path: str, run: ModelConfig, class_names: tuple[str, ...]) -> ModelConfig:
    """The model config of the checkpoint a run starts from: the run's model-* keys, plus the widths it was
    pruned to. Any other difference is refused by name, before any site is contacted."""
    meta = Checkpoint.read_meta(path)
    theirs = ModelConfig.from_dict(meta["model_config"])
    ours = run.to_dict()
    differ = [k for k, v in replace(theirs, pruned=()).to_dict().items() if ours[k] != v]
    if differ:
        raise ValueError(f"initial-checkpoint {path}: its network differs from this run's model-* keys in {differ}")
    if tuple(meta["class_names"]) != class_names:
        raise ValueError(f"initial-checkpoint {path}: classes {meta['class_names']}, this run's {list(class_names)}")
    return theirs


@dataclass(frozen=True)
class FederationSettings:
    num_rounds: int
    schedule: UnfreezingSchedule
    model_config: ModelConfig
    class_names: tuple[str, ...]
    strategy: str
    proximal_mu: float
    trimmed_beta: float
    server_lr: float  # fedadam, fedyogi, fedadagrad
    server_beta1: float
    server_beta2: float
    server_tau: float
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
    initial_checkpoint: str  # a checkpoint to start from (its model config, pruned widths included, is the run's)
    site_dp: SiteDPSettings | None
    dp: RunDPOptions  # the DP-SGD request sent to every site (dp-* keys)
    personal: PersonalOptions  # the personal model every site keeps
    modality_norms: bool  # norm-partition = modality: normalisation layers aggregated within each modality
    compression: CompressionOptions  # model changes on the wire, both ways
    compression_resync: int  # with compression: rounds between exact syncs of a node's copy (0: only when needed)
    run_config: dict

    @property
    def dp_reproducible(self) -> bool:
        """dp-insecure-reproducible: DP sites draw noise and batches from the run seed: NOT private."""
        return self.dp.insecure_reproducible

    @classmethod
    def from_run_config(cls, run_config) -> FederationSettings:
        c = resolve_run_config(run_config)  # an unknown key or a bad value stops the run before any site is contacted
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
        if c["initial-checkpoint"]:
            model_config = _initial_model_config(str(c["initial-checkpoint"]), model_config, class_names)
            if c["pretrained-checkpoint"]:
                raise ValueError("give initial-checkpoint or pretrained-checkpoint, not both: a run starts from one")
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
            server_lr=c["server-lr"],
            server_beta1=c["server-beta1"],
            server_beta2=c["server-beta2"],
            server_tau=c["server-tau"],
            max_update_norm_ratio=float(c["max-update-norm-ratio"]),
            fraction_train=float(c["fraction-train"]),
            min_train_sites=int(c["min-train-sites"]),
            min_available_sites=int(c["min-available-sites"]),
            round_timeout=float(c["round-timeout"]),
            eval_interval=int(c["eval-interval"]),
            cross_site_eval=bool(c["cross-site-eval"]),
            local_steps=int(c["local-steps"]),
            eval_cases=c["eval-cases"],
            nsd_tolerance_mm=_tolerances(c["nsd-tolerance-mm"], len(class_names)),
            output_dir=output_dir,
            study=check_study(str(c["study"])) if c["study"] else default_study(output_dir),
            resume=bool(c["resume"]),
            seed=int(c["seed"]),
            pretrained_checkpoint=str(c["pretrained-checkpoint"]),
            initial_checkpoint=str(c["initial-checkpoint"]),
            site_dp=SiteDPSettings.from_run_config(c),
            dp=RunDPOptions.from_run_config(c),
            personal=PersonalOptions.from_config(c),
            modality_norms=c["norm-partition"] == "modality",
            compression=CompressionOptions.from_config(c),
            compression_resync=int(c["compression-resync"]),
            run_config=c,
        )
