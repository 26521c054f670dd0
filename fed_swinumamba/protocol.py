"""What the coordinator and the sites say to each other: record names and the round instructions.

Lives in the library because both sides need it and neither may import the other. Values are plain
Python types that fit Flower's ConfigRecord / MetricRecord; nothing here imports Flower.

A node's first message, and its first after an error, is a query (Flower's ``MessageType.QUERY``)
with no content: the reply's ``site`` record tells the coordinator which site and modality the node
is, so that no weights of another modality's encoder are ever sent to it.
A train or evaluate message holds an ArrayRecord ``arrays`` (weights to load, or with compression the
change of the site's copy since ``base_version``) and a ConfigRecord ``config`` (the instructions below).
A reply holds ``arrays`` (train only: the weights the site trained, or with compression their change from
the copy it started from; absent when a site whose privacy budget is spent declines to train),
``metrics`` (scalars only) and ``site`` (the site's name and modality: sites are known by name).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .compression import CompressionOptions
from .dp_options import RunDPOptions
from .model import ModelConfig
from .schedule import Stage

ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
# With compression, ``arrays`` hold a compressed change (fed_swinumamba.compression.Packet) and this
# ConfigRecord names the tensors it changes ("names"), in the packet's order.
COMPRESSED = "compressed"
FULL_SYNC = -1  # base_version of a message that carries every weight the site needs
# The metric Flower's strategies weight a site's update by: its number of training patients, at a DP
# site the disclosed (coarsened) count (fed_swinumamba.privacy.disclosed_patient_count).
NUM_EXAMPLES = "num-examples"
_PERSONAL = "personal-"  # prefix of the personal model's scores in an evaluation reply
# The held-out splits an evaluation scores: the validation cases (every round; they choose the best
# checkpoint) or the test cases (the final scores; a site without a test split scores its validation cases).
VALIDATION, TEST = "validation", "test"

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
        raise ValueError(
            f"study name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class PersonalOptions:
    """The personal model every site keeps (it never leaves the site; only its scores may).

    ``finetune``: the final global model fine-tuned for up to ``finetune_steps`` local steps at the final
    evaluation; a site that keeps test cases apart scores it on its validation cases before fine-tuning and
    after each of ``finetune_checks`` equal parts, and keeps the best (early stopping). ``ditto`` (Li et
    al., 2021): a personal model trained every round beside the global one, with the gradient of
    ``ditto_lambda``/2 * ||v - w_global||^2 pulling it towards the global model.

    Either way such a site keeps a personal model other than the global one only if its validation cases
    show a gain larger than ``choice_margin`` standard errors of the paired per-case Dice difference
    (``fed_swinumamba.metrics.paired_gain``; 0: any gain). A margin guards against keeping the luckiest of
    near-equal models, but also withholds real gains that few validation cases cannot certify
    (benchmarks/RESULTS.md).
    """

    method: str = "none"
    ditto_lambda: float = 0.1
    finetune_steps: int = 80
    finetune_checks: int = 8
    choice_margin: float = 0.0

    def to_config(self) -> dict:
        return {
            "personalization": self.method,
            "ditto-lambda": self.ditto_lambda,
            "finetune-steps": self.finetune_steps,
            "finetune-checks": self.finetune_checks,
            "choice-margin": self.choice_margin,
        }

    @classmethod
    def from_config(cls, c) -> PersonalOptions:
        """From the instructions, or from a run config resolved by ``run_config`` (the same names)."""
        return cls(
            str(c["personalization"]),
            float(c["ditto-lambda"]),
            int(c["finetune-steps"]),
            int(c["finetune-checks"]),
            float(c["choice-margin"]),
        )

    @property
    def check_steps(self) -> tuple[int, ...]:
        """The fine-tuning steps after which the model is scored: the ends of ``finetune_checks`` equal parts
        of ``finetune_steps`` (fewer when there are fewer steps than checks)."""
        parts = range(1, self.finetune_checks + 1)
        return tuple(sorted({round(i * self.finetune_steps / self.finetune_checks) for i in parts} - {0}))

    @property
    def candidates(self) -> int:
        """Models a site that keeps test cases apart scores on its validation cases at the final evaluation
        to choose its personal model: the global one and each fine-tuning check, or Ditto's."""
        return {"finetune": 1 + len(self.check_steps), "ditto": 2}.get(self.method, 0)


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
    seed: int = (
        0  # the run's seed: with the round, fixes a site's shuffling and augmentation without DP (never DP noise)
    )
    # Cross-site evaluation: the arrays are another site's locally trained model (named here), to be
    # evaluated and forgotten; the site's copy of the global model stays as it is. "" = the global model.
    foreign_model: str = ""
    # Site-level DP: clip the trained weights' distance from the global weights to this L2 norm (0: no).
    clipping_norm: float = 0.0
    study: str = "default"  # the study whose privacy ledger a DP site spends from
    eval_cases: int = 0  # held-out cases to score, the same ones every round (0: all)
    nsd_tolerance_mm: tuple[float, ...] = (2.0,)  # surface Dice tolerance, one for all classes or one per class
    planned_rounds: int = 1  # rounds of the run: a DP site derives its noise for a target epsilon from them
    dp: RunDPOptions = RunDPOptions()  # the run's DP-SGD request, for a site without a privacy section of its own
    personal: PersonalOptions = PersonalOptions()
    final_evaluation: bool = False  # the run's last evaluation of the global model: where ``finetune`` personalises
    eval_split: str = VALIDATION  # the held-out split to score (VALIDATION or TEST)
    compression: CompressionOptions = CompressionOptions()  # how the site sends its update

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
            "planned-rounds": self.planned_rounds,
            **self.dp.to_config(),
            **self.personal.to_config(),
            "final-evaluation": self.final_evaluation,
            "eval-split": self.eval_split,
            **self.compression.to_config(),
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
                planned_rounds=int(config["planned-rounds"]),
                dp=RunDPOptions.from_config(config),
                personal=PersonalOptions.from_config(config),
                final_evaluation=bool(config["final-evaluation"]),
                eval_split=str(config["eval-split"]),
                compression=CompressionOptions.from_config(config),
            )
        except KeyError as err:
            raise ValueError(
                f"round instructions lack the field {err}: coordinator and site run different versions of fed-swinumamba"
            ) from err


# ---------------------------------------------------------------------------------------------- replies
# Metric names of the replies, defined here only: sites write them, the coordinator reads them.


@dataclass(frozen=True)
class DPRecord:
    """What a DP site reports of its privacy: the study's spent epsilon and the mechanism's parameters,
    all functions of the disclosed patient count and the settings, none of the data."""

    epsilon: float
    disclosed_patients: int
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int  # DP steps the study has taken at this site
    budget: float | None
    budget_exhausted: bool
    reproducible: bool  # noise from the run seed: NOT private
    patients_mapped: bool  # False: each image file counts as one patient

    _FIELDS = ("disclosed-patients", "delta", "noise-multiplier", "max-grad-norm", "sample-rate", "steps")

    def to_metrics(self) -> dict[str, float]:
        metrics = {
            "epsilon": self.epsilon,
            "dp-reproducible": int(self.reproducible),
            "dp-budget-exhausted": int(self.budget_exhausted),
            "dp-patients-mapped": int(self.patients_mapped),
        }
        metrics.update({f"dp-{name}": getattr(self, name.replace("-", "_")) for name in self._FIELDS})
        return metrics | ({"dp-budget": self.budget} if self.budget is not None else {})

    @classmethod
    def from_metrics(cls, m) -> DPRecord:
        return cls(
            epsilon=float(m["epsilon"]),
            disclosed_patients=int(m["dp-disclosed-patients"]),
            delta=float(m["dp-delta"]),
            noise_multiplier=float(m["dp-noise-multiplier"]),
            max_grad_norm=float(m["dp-max-grad-norm"]),
            sample_rate=float(m["dp-sample-rate"]),
            steps=int(m["dp-steps"]),
            budget=float(m["dp-budget"]) if "dp-budget" in m else None,
            budget_exhausted=bool(m["dp-budget-exhausted"]),
            reproducible=bool(m["dp-reproducible"]),
            patients_mapped=bool(m["dp-patients-mapped"]),
        )

    def record(self) -> dict:
        """As metrics.json states it."""
        privacy = {name.replace("-", "_"): float(getattr(self, name.replace("-", "_"))) for name in self._FIELDS}
        privacy |= {"budget_exhausted": float(self.budget_exhausted), "reproducible": float(self.reproducible)}
        privacy |= {"budget": self.budget} if self.budget is not None else {}
        privacy["unit"] = "patient" if self.patients_mapped else "patient = one image file (the site maps no patients)"
        return privacy


@dataclass(frozen=True)
class TrainReply:
    """A site's training scalars. ``num_patients`` is the aggregation weight: its training patients (a DP
    site: the disclosed, coarsened count). A DP site keeps its loss and timings to itself (they are
    functions of the private batches); one whose budget is spent sends no weights and 0 steps."""

    num_patients: int
    steps: int
    train_loss: float | None = None
    first_batch_s: float | None = None
    train_s: float | None = None
    dp: DPRecord | None = None

    def to_metrics(self) -> dict[str, float]:
        metrics = {NUM_EXAMPLES: self.num_patients, "steps": self.steps}
        if self.train_loss is not None:
            metrics |= {
                "train-loss": self.train_loss,
                "first-batch-seconds": self.first_batch_s,
                "train-seconds": self.train_s,
            }
        return metrics | (self.dp.to_metrics() if self.dp else {})

    @classmethod
    def from_metrics(cls, m) -> TrainReply:
        timed = "train-loss" in m
        return cls(
            int(m[NUM_EXAMPLES]),
            int(m["steps"]),
            float(m["train-loss"]) if timed else None,
            float(m["first-batch-seconds"]) if timed else None,
            float(m["train-seconds"]) if timed else None,
            DPRecord.from_metrics(m) if "epsilon" in m else None,
        )


@dataclass(frozen=True)
class EvalReply:
    """A site's scores of one model on its held-out cases, per foreground class name (see fed_swinumamba.metrics)."""

    dice: dict[str, float]
    hd95: dict[str, float]  # mm; the mean over the cases where both masks have the class
    nsd: dict[str, float]
    hd95_unbounded: dict[str, int]  # cases where only one of truth and prediction has the class
    dice_mean: float
    cases_scored: int
    held_out_cases: int
    seconds_per_case: float
    personal: EvalReply | None = None  # the site's personal model on the same cases (scores only)
    split: str = VALIDATION  # the held-out split scored
    full_split_cases: int = 0  # cases a full-split evaluation scores: the test split, or the validation split
    # Validation cases a site with a test split apart scores at the final evaluation to choose its personal
    # model, counted once per candidate model (PersonalOptions.candidates): 0 when it keeps no test split.
    selection_cases: int = 0
    # A personal model's reply at the final evaluation: the site compared it with the global model on its
    # validation cases and kept the global one (it scored best there); the scores are then the global model's.
    kept_global: bool = False

    def to_metrics(self) -> dict[str, float]:
        metrics = {f"{score}-{c}": v for score in ("dice", "hd95", "nsd") for c, v in getattr(self, score).items()}
        metrics |= {f"hd95-unbounded-{c}": n for c, n in self.hd95_unbounded.items()}
        metrics |= {_PERSONAL + k: v for k, v in self.personal.to_metrics().items()} if self.personal else {}
        return metrics | {
            "dice-mean": self.dice_mean,
            NUM_EXAMPLES: self.cases_scored,
            "num-val-cases": self.held_out_cases,
            "eval-seconds-per-case": self.seconds_per_case,
            "eval-test-split": float(self.split == TEST),
            "num-full-split-cases": self.full_split_cases,
            "num-selection-cases": self.selection_cases,
            "kept-global": float(self.kept_global),
        }

    @classmethod
    def from_metrics(cls, m, class_names) -> EvalReply:
        per_class = {score: {c: float(m[f"{score}-{c}"]) for c in class_names} for score in ("dice", "hd95", "nsd")}
        personal = {k.removeprefix(_PERSONAL): v for k, v in m.items() if k.startswith(_PERSONAL)}
        return cls(
            **per_class,
            hd95_unbounded={c: int(m[f"hd95-unbounded-{c}"]) for c in class_names},
            dice_mean=float(m["dice-mean"]),
            cases_scored=int(m[NUM_EXAMPLES]),
            held_out_cases=int(m["num-val-cases"]),
            seconds_per_case=float(m["eval-seconds-per-case"]),
            personal=cls.from_metrics(personal, class_names) if personal else None,
            split=TEST if m["eval-test-split"] else VALIDATION,
            full_split_cases=int(m["num-full-split-cases"]),  # a site of the same app version sends these
            selection_cases=int(m["num-selection-cases"]),
            kept_global=bool(m["kept-global"]),
        )

    def record(self) -> dict:
        """As metrics.json states it."""
        record = {"personal": self.personal.record()} if self.personal else {}
        record |= {
            "dice": self.dice,
            "hd95": self.hd95,
            "nsd": self.nsd,
            "hd95_unbounded": self.hd95_unbounded,
            "dice_mean": self.dice_mean,
            "num_val_cases": self.cases_scored,
            "held_out_cases": self.held_out_cases,
            "eval_s_per_case": self.seconds_per_case,
            "split": self.split,
            "full_split_cases": self.full_split_cases,
            "selection_cases": self.selection_cases,
        }
        if self.kept_global:
            record["kept_global"] = True
        return record
