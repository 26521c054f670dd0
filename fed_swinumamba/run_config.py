"""The run config: every key the coordinator accepts, with its type, default and check, defined once.

Flower hands the ServerApp ``[tool.flwr.app.config]`` of pyproject.toml merged with ``--run-config``;
the simulation passes the same keys as a dict. Either way :func:`resolve_run_config` turns them into
typed values: an unknown key, or a value of the wrong type or out of range, is an error naming the key,
before any site is contacted. pyproject.toml lists the same keys and defaults for users to edit (a test
holds the two equal). Only the coordinator reads the run config; sites get typed instructions
(:mod:`fed_swinumamba.protocol`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .compression import METHODS as COMPRESSIONS


@dataclass(frozen=True)
class Key:
    default: bool | int | float | str
    doc: str
    check: Callable[[object], bool] | None = None  # the value's range; its type is the default's
    rule: str = ""  # what ``check`` asks for, in the error message


PERSONALIZATIONS = ("none", "finetune", "ditto")  # fed_swinumamba.protocol.PersonalOptions
NORM_PARTITIONS = ("shared", "modality")  # fed_swinumamba.params: modality_norms.<m>.*
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedtrimmedavg", "fedmedian")

_non_negative, _positive = (lambda v: v >= 0), (lambda v: v > 0)
_at_least_one = lambda v: v >= 1  # noqa: E731
_fraction = lambda v: 0 < v <= 1  # noqa: E731

KEYS: Mapping[str, Key] = MappingProxyType(
    {
        "num-server-rounds": Key(6, "rounds of the run", _at_least_one, ">= 1"),
        "rounds-per-stage": Key(2, "rounds of each stage of the unfreezing schedule", _at_least_one, ">= 1"),
        "frozen-at-start": Key(
            "stage1,stage2,stage3", "layer groups frozen in the first stage, unfrozen one per stage from the deepest"
        ),
        "lr": Key(1e-4, "learning rate of the first stage", _positive, "> 0"),
        "lr-decay": Key(0.8, "learning rate factor per stage", _positive, "> 0"),
        "strategy": Key(
            "fedavg",
            "the rule each partition is aggregated with",
            lambda v: v in STRATEGIES,
            f"one of {', '.join(STRATEGIES)}",
        ),
        "proximal-mu": Key(0.01, "FedProx's proximal weight (strategy fedprox)", _non_negative, ">= 0"),
        "trimmed-beta": Key(0.2, "fraction cut at each end by fedtrimmedavg", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
        "server-lr": Key(0.1, "server learning rate eta of fedadam, fedyogi and fedadagrad", _positive, "> 0"),
        "server-beta1": Key(0.9, "first-moment decay of fedadam and fedyogi", lambda v: 0 <= v < 1, "in [0, 1)"),
        "server-beta2": Key(0.99, "second-moment decay of fedadam and fedyogi", lambda v: 0 <= v < 1, "in [0, 1)"),
        "server-tau": Key(1e-3, "adaptivity tau of fedadam, fedyogi and fedadagrad", _positive, "> 0"),
        "max-update-norm-ratio": Key(
            10.0,
            "reject an update whose norm exceeds this times the other sites' median (0: off)",
            _non_negative,
            ">= 0",
        ),
        "fraction-train": Key(1.0, "fraction of the connected sites that train each round", _fraction, "in (0, 1]"),
        "min-train-sites": Key(
            1, "fewest sites that must train for a round to update the model", _at_least_one, ">= 1"
        ),
        "min-available-sites": Key(1, "sites to wait for before a round starts", _at_least_one, ">= 1"),
        "round-timeout": Key(900.0, "seconds to wait for the sites' replies", _positive, "> 0"),
        "eval-interval": Key(
            1, "evaluate the global model every this many rounds (and after the last)", _at_least_one, ">= 1"
        ),
        "cross-site-eval": Key(True, "at the end: every site's local model evaluated at every site"),
        "local-steps": Key(
            0, "training steps per round at every site (0: each site's own setting)", _non_negative, ">= 0"
        ),
        "eval-cases": Key(
            0,
            "held-out cases per site scored each round (0: all); all of them after the last round",
            _non_negative,
            ">= 0",
        ),
        "nsd-tolerance-mm": Key("2.0", 'surface Dice tolerance in mm: one for all classes, or one per class ("2,1")'),
        "norm-partition": Key(
            "shared",
            "normalisation layers: shared (averaged over all sites) or modality (FedBN-style: within each modality)",
            lambda v: v in NORM_PARTITIONS,
            f"one of {', '.join(NORM_PARTITIONS)}",
        ),
        "personalization": Key(
            "finetune",
            "the personal model each site keeps: none, finetune (the final global model fine-tuned locally) or ditto",
            lambda v: v in PERSONALIZATIONS,
            f"one of {', '.join(PERSONALIZATIONS)}",
        ),
        "ditto-lambda": Key(
            0.1, "Ditto's pull of a site's personal model towards the global one", _non_negative, ">= 0"
        ),
        "finetune-steps": Key(
            80, "most local steps that fine-tune the final global model into a personal one", _at_least_one, ">= 1"
        ),
        "finetune-checks": Key(
            8,
            "validation checks along the fine-tuning: a site with test cases apart keeps the best of the global model and these",
            _at_least_one,
            ">= 1",
        ),
        "choice-margin": Key(
            0.0,
            "standard errors of the paired per-case validation Dice by which a personal model must beat the global one to be kept (0: any gain)",
            _non_negative,
            ">= 0",
        ),
        "compression": Key(
            "none",
            "model changes on the wire, both ways: none (float32), int8 (8-bit blocks) or int8+topk (and only the largest)",
            lambda v: v in COMPRESSIONS,
            f"one of {', '.join(COMPRESSIONS)}",
        ),
        "compression-block": Key(256, "elements sharing one int8 scale", _at_least_one, ">= 1"),
        "compression-topk": Key(0.1, "int8+topk: fraction of each tensor's elements sent", _fraction, "in (0, 1]"),
        "compression-resync": Key(
            10,
            "with compression, send each node the exact global model every this many rounds (0: only when needed)",
            _non_negative,
            ">= 0",
        ),
        "output-dir": Key("runs/latest", "metrics, checkpoints and the report"),
        "study": Key(
            "", 'the study whose privacy ledgers DP sites spend from, across runs ("": the output folder\'s name)'
        ),
        "resume": Key(False, "continue the run in output-dir from its latest checkpoint"),
        "seed": Key(0, "initial weights, site sampling, and the sites' shuffling without DP (never DP noise)"),
        "pretrained-checkpoint": Key("", "the VMamba ImageNet release file to initialise the encoder from"),
        "initial-checkpoint": Key(
            "", "a checkpoint of this project to start from, e.g. a pruned one (its pruned widths are the run's)"
        ),
        "dp-epsilon": Key(
            0.0,
            "DP-SGD at every site without a privacy section: each site's budget for the study (0: none)",
            _non_negative,
            ">= 0 (0: no budget)",
        ),
        "dp-noise-multiplier": Key(
            0.0,
            "DP-SGD noise multiplier (0: derived from dp-epsilon for the planned rounds)",
            _non_negative,
            ">= 0 (0: derived from dp-epsilon)",
        ),
        "dp-max-grad-norm": Key(1.0, "clip norm of one patient's gradient", _positive, "> 0"),
        "dp-delta": Key(
            0.0,
            "DP delta (0: min(1e-5, 1 / the disclosed number of training patients))",
            lambda v: 0 <= v < 1,
            "in [0, 1) (0: derived)",
        ),
        "dp-slices-per-case": Key(2, "slices drawn from each sampled patient per DP step", _at_least_one, ">= 1"),
        "dp-cases-per-batch": Key(
            0,
            "expected patients per Poisson batch (0: the site's batch size / slices per patient)",
            _non_negative,
            ">= 0 (0: from the batch size)",
        ),
        "dp-local-steps": Key(
            0, "DP steps per round (0: local-steps)", _non_negative, ">= 0 (0: the run's local steps)"
        ),
        "dp-frozen": Key("", "comma-separated layer groups or parameter-name prefixes never trained under DP"),
        "dp-lr-scale": Key(1.0, "DP steps use the stage's learning rate times this", _positive, "> 0"),
        "dp-insecure-reproducible": Key(
            False,
            "tests and benchmarks only: DP noise and batches from the run seed, NOT private (sites must allow it)",
        ),
        "site-dp-noise-multiplier": Key(
            0.0,
            "site-level DP: noise multiplier of the coordinator's noise on the means (0: off)",
            _non_negative,
            ">= 0",
        ),
        "site-dp-clipping-norm": Key(
            0.1, "site-level DP: each site's update is clipped to this L2 norm", _positive, "> 0"
        ),
        "site-dp-delta": Key(1e-5, "site-level DP delta", lambda v: 0 < v < 1, "in (0, 1)"),
        "site-dp-epsilon": Key(0.0, "site-level DP: total budget over the run (0: no limit)", _non_negative, ">= 0"),
        "class-names": Key("organ,lesion", "the federation's foreground classes, in label order"),
        "modalities": Key("ct,mri,us", "modalities of the network's encoders"),
        "model-variant": Key("swin_umamba", "swin_umamba or swin_umamba_d"),
        "model-dims": Key("16,32,64,128", "channels of the four encoder stages (the paper's: 96,192,384,768)"),
        "model-depths": Key("1,1,2,1", "blocks of the four encoder stages (the paper's: 2,2,9,2)"),
        "model-stem-width": Key(16, "channels of the stem (the paper's: 48)", _at_least_one, ">= 1"),
        "model-d-state": Key(16, "state size of the selective scan", _at_least_one, ">= 1"),
        "model-encoder-block": Key("vss", "vss (VMamba) or hybrid (VMamba + window attention)"),
        "model-num-heads": Key("1,2,4,8", "attention heads of the four stages (hybrid blocks only)"),
        "model-deep-supervision": Key(False, "deep-supervised outputs and loss"),
    }
)


def defaults() -> dict[str, bool | int | float | str]:
    """Every key's default: what pyproject.toml's ``[tool.flwr.app.config]`` lists."""
    return {name: key.default for name, key in KEYS.items()}


def _typed(name: str, key: Key, value: object) -> bool | int | float | str:
    kind = type(key.default)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)  # TOML and --run-config write 1 for 1.0
    elif kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    if type(value) is not kind:
        raise ValueError(f"run config {name} must be a {kind.__name__} (e.g. {key.default!r}), got {value!r}")
    if key.check is not None and not key.check(value):
        raise ValueError(f"run config {name} must be {key.rule}, got {value!r}")
    return value


def parse_value(name: str, text: str) -> bool | int | float | str:
    """A command line's ``name=text``, read as the key's type (``--set study=2024`` stays a name)."""
    if name not in KEYS:
        raise ValueError(f"unknown run config key {name!r}; known: {sorted(KEYS)}")
    kind = type(KEYS[name].default)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"run config {name} must be true or false, got {text!r}")
        return text.lower() == "true"
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(
            f"run config {name} must be a {kind.__name__} (e.g. {KEYS[name].default!r}), got {text!r}"
        ) from None
    return _typed(name, KEYS[name], value)


def resolve_run_config(given: Mapping[str, object]) -> dict[str, bool | int | float | str]:
    """Every key's value: ``given``'s, checked, or the default. Unknown keys are refused by name."""
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown run config keys {unknown}; known: {sorted(KEYS)}")
    return {name: _typed(name, key, given[name]) if name in given else key.default for name, key in KEYS.items()}


__all__ = ["KEYS", "STRATEGIES", "Key", "defaults", "parse_value", "resolve_run_config"]
