"""What the coordinator and the sites say to each other: record names and the round instructions.

Lives in the library because both sides need it and neither may import the other. Values are plain
Python types that fit Flower's ConfigRecord / MetricRecord; nothing here imports Flower.

A node's first message, and its first after an error, is a query (Flower's ``MessageType.QUERY``)
with no content: the reply's ``site`` record tells the coordinator which site and modality the node
is, so that no weights of another modality's encoder are ever sent to it.
A train or evaluate message holds an ArrayRecord ``arrays`` (weights to load) and a ConfigRecord ``config``
(the instructions below). A reply holds ``arrays`` (train only: the weights the site trained; absent when a
site whose privacy budget is spent declines to train),
``metrics`` (scalars only) and ``site`` (the site's name and modality: sites are known by name).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .model import ModelConfig
from .schedule import Stage

ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
FULL_SYNC = -1  # base_version of a message that carries every weight the site needs
# The metric Flower's strategies weight a site's update by: its number of training patients, at a DP
# site the disclosed (coarsened) count (fed_swinumamba.privacy.disclosed_patient_count).
NUM_EXAMPLES = "num-examples"

# A study: the runs whose privacy a site accounts together (one ledger per site and study). Its name
# becomes a file name at the sites, so it is checked on both sides.
_STUDY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# Anything that looks like a file path (two or more components), in a message that leaves a site.
_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/]?(?:[\w.~-]+[\\/])+[\w.~-]+")


def redact_paths(message: str) -> str:
    """``message`` with file paths replaced by ``<path>``: file names can identify patients.

    A site's errors go to the coordinator's log; the paths stay in the site's own log.
    """
    return _PATH.sub("<path>", message)


def check_study(name: str) -> str:
    """``name`` if it is a valid study name (letters, digits, '.', '_', '-'; 100 at most; not starting with '.')."""
    if not _STUDY.fullmatch(name):
        raise ValueError(f"study name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Instructions:
    """One round's instructions to a site.

    ``arrays`` bring the site's copy of the global model from ``base_version`` to ``version``
    (versions count completed aggregations); ``FULL_SYNC`` means they replace it.
    """

    server_round: int
    stage: Stage
    model_config: ModelConfig
    class_names: tuple[str, ...]
    version: int
    base_version: int = FULL_SYNC
    proximal_mu: float = 0.0
    local_steps: int = 0  # 0: the site's own training settings decide
    seed: int = 0  # the run's seed: with the round, fixes a site's shuffling and augmentation without DP (never DP noise)
    # Cross-site evaluation: the arrays are another site's locally trained model (named here), to be
    # evaluated and forgotten; the site's copy of the global model stays as it is. "" = the global model.
    foreign_model: str = ""
    # Site-level DP: clip the trained weights' distance from the global weights to this L2 norm (0: no).
    clipping_norm: float = 0.0
    study: str = "default"  # the study whose privacy ledger a DP site spends from
    eval_cases: int = 0  # held-out cases to score, the same ones every round (0: all)
    nsd_tolerance_mm: tuple[float, ...] = (2.0,)  # surface Dice tolerance, one for all classes or one per class

    def to_config(self) -> dict:
        return {
            "server-round": self.server_round,
            **self.stage.to_config(),
            "model-config": json.dumps(self.model_config.to_dict()),
            "class-names": list(self.class_names),
            "version": self.version,
            "base-version": self.base_version,
            "proximal-mu": self.proximal_mu,
            "local-steps": self.local_steps,
            "seed": self.seed,
            "foreign-model": self.foreign_model,
            "clipping-norm": self.clipping_norm,
            "study": self.study,
            "eval-cases": self.eval_cases,
            "nsd-tolerance-mm": list(self.nsd_tolerance_mm),
        }

    @classmethod
    def from_config(cls, config) -> Instructions:
        try:
            return cls(
                server_round=int(config["server-round"]),
                stage=Stage.from_config(config),
                model_config=ModelConfig.from_dict(json.loads(config["model-config"])),
                class_names=tuple(config["class-names"]),
                version=int(config["version"]),
                base_version=int(config["base-version"]),
                proximal_mu=float(config["proximal-mu"]),
                local_steps=int(config["local-steps"]),
                seed=int(config["seed"]),
                foreign_model=str(config["foreign-model"]),
                clipping_norm=float(config["clipping-norm"]),
                study=check_study(str(config["study"])),
                eval_cases=int(config["eval-cases"]),
                nsd_tolerance_mm=tuple(float(t) for t in config["nsd-tolerance-mm"]),
            )
        except KeyError as err:
            raise ValueError(f"round instructions lack the field {err}: coordinator and site run different versions of fed-swinumamba") from err
