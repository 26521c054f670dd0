"""A hospital's site configuration: one YAML file, validated into frozen dataclasses.

Every problem is reported as ``<file>: <dotted.field>: <what is wrong>`` so that an engineer at the
site can fix it without reading code. ``sites/template.yaml`` documents every field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cache import default_cache_root

MODALITIES = ("ct", "mri", "us")
FORMATS = ("msd", "dicom", "png")
DEFAULT_PREPROCESSING = {"ct": {"window": [-200.0, 300.0]}, "mri": {"percentiles": [0.5, 99.5]}, "us": {}}


class SiteConfigError(ValueError):
    def __init__(self, source: str, field_name: str, problem: str):
        super().__init__(f"{source}: {field_name}: {problem}" if field_name else f"{source}: {problem}")


@dataclass(frozen=True)
class DataSpec:
    root: Path
    format: str = "msd"
    slice_axis: int = 2
    orientation: str | None = None  # MONAI axcodes, e.g. "RAS"; None keeps the stored orientation
    spacing: tuple[float, float, float] | None = None  # mm per axis; 0 keeps that axis's spacing
    channel: int | None = None  # the channel of multi-channel volumes to use (e.g. one echo); None: refuse them


@dataclass(frozen=True)
class SplitSpec:
    val_fraction: float = 0.2  # patients held out to score every round and choose the best checkpoint
    seed: int = 0
    test_fraction: float = 0.0  # patients held out for the final scores only (0: the validation cases serve)


@dataclass(frozen=True)
class TrainingSpec:
    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int = 8
    patch_size: tuple[int, int] = (64, 64)
    pos_fraction: float = 0.67
    augment: bool = True
    cache_dir: Path | None = None
    loader_workers: int = 1  # processes that read and crop slices ahead of the training steps


# The numeric fields of a site's privacy section: real numbers, and whole counts.
_PRIVACY_REALS = ("target_epsilon", "noise_multiplier", "delta", "max_grad_norm", "lr_scale", "study_budget")
_PRIVACY_COUNTS = ("slices_per_case", "cases_per_batch", "local_steps", "cases_per_pass")


@dataclass(frozen=True)
class PrivacySpec:
    """DP-SGD at the site; the privacy unit is the case (patient): cases are sampled and clipped, not slices."""

    enabled: bool = False
    target_epsilon: float | None = None  # budget of the study (all its runs); the noise is derived from it for this run
    noise_multiplier: float | None = None  # or given; then target_epsilon, if set, is only the budget
    max_grad_norm: float = 1.0  # clip norm of one case's gradient
    delta: float | None = None  # None: min(1e-5, 1 / disclosed number of training patients)
    slices_per_case: int = 2  # random slices drawn from each sampled case per step
    cases_per_batch: int | None = None  # expected cases per Poisson batch; None: batch_size // slices_per_case
    local_steps: int | None = None  # DP steps per round; None: the run's local steps (larger DP batches need fewer)
    frozen: tuple[str, ...] = ()  # layer groups or parameter-name prefixes this site never trains under DP
    lr_scale: float = 1.0  # DP steps use the stage's learning rate times this (noisy, clipped steps often need more)
    cases_per_pass: int = (
        32  # patients whose per-case gradients are computed at once: bounds DP's memory, not its result
    )
    study_budget: float | None = None  # the most epsilon this site spends on one study over all its runs
    allow_insecure_reproducible: bool = False  # honour the run config's dp-insecure-reproducible (tests only)


@dataclass(frozen=True)
class SiteConfig:
    site: str
    modality: str
    data: DataSpec
    labels: dict[int, str]
    source: Path
    split: SplitSpec = field(default_factory=SplitSpec)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    state_dir: Path | None = None  # what outlives runs (privacy ledgers); None: default_state_dir(site)

    def __post_init__(self):
        if self.state_dir is None:
            object.__setattr__(self, "state_dir", default_state_dir(self.site))

    @property
    def cache_dir(self) -> Path:
        """Preprocessed cases: ``training.cache_dir``, else a user cache folder (the data folder may be read-only)."""
        return self.training.cache_dir or default_cache_root(self.site)

    def class_mapping_for(self, class_names: list[str]) -> dict[int, int]:
        """Site label value -> federation class index (background 0 -> 0)."""
        mapping = {0: 0}
        for value, name in self.labels.items():
            if name not in class_names:
                raise SiteConfigError(
                    str(self.source),
                    f"labels.{value}",
                    f"class {name!r} is not one of the federation's classes {list(class_names)}",
                )
            mapping[value] = class_names.index(name) + 1
        return mapping


def user_data_dir() -> Path:
    """``$XDG_DATA_HOME/fed_swinumamba`` (default ``~/.local/share/fed_swinumamba``): what this user's
    sites keep for themselves."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "fed_swinumamba"


def default_state_dir(site: str) -> Path:
    """``user_data_dir() / <site>``: kept apart from the data and its cache, which may be wiped and
    rebuilt, because a privacy ledger must never be."""
    return user_data_dir() / site


# ---------------------------------------------------------------------------- validation helpers
def _expect(source: str, name: str, value: Any, kind: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise SiteConfigError(source, name, f"must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise SiteConfigError(source, name, f"must be {what}, got {value!r}")
    return value


def _section(source: str, name: str, value: Any, known: set[str], required: set[str] = frozenset()) -> dict:
    if value is None:
        value = {}
    _expect(source, name, value, dict, "a mapping")
    unknown = set(value) - known
    if unknown:
        raise SiteConfigError(
            source,
            f"{name}.{sorted(unknown)[0]}" if name else sorted(unknown)[0],
            f"unknown field (known: {', '.join(sorted(known))})",
        )
    missing = required - set(value)
    if missing:
        raise SiteConfigError(
            source, f"{name}.{sorted(missing)[0]}" if name else sorted(missing)[0], "required field is missing"
        )
    return value


def validate_site_config_dict(raw: Any, source: str = "<dict>", base_dir: Path | None = None) -> SiteConfig:
    """Validate a parsed YAML mapping; relative data roots resolve against ``base_dir``."""
    top = _section(
        source,
        "",
        raw,
        {"site", "modality", "data", "labels", "split", "preprocessing", "training", "privacy", "state_dir"},
        {"site", "modality", "data", "labels"},
    )
    site = _expect(source, "site", top["site"], str, "a name of letters, digits, '_' or '-'")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", site):
        raise SiteConfigError(source, "site", f"must use only letters, digits, '_' or '-', got {site!r}")
    modality = top["modality"]
    if modality not in MODALITIES:
        raise SiteConfigError(source, "modality", f"must be one of {', '.join(MODALITIES)} (got {modality!r})")

    d = _section(
        source, "data", top["data"], {"root", "format", "slice_axis", "orientation", "spacing", "channel"}, {"root"}
    )
    root = Path(_expect(source, "data.root", d["root"], str, "a folder path")).expanduser()
    if not root.is_absolute() and base_dir is not None:
        root = (base_dir / root).resolve()
    fmt = d.get("format", "msd")
    if fmt not in FORMATS:
        raise SiteConfigError(source, "data.format", f"must be one of {', '.join(FORMATS)} (got {fmt!r})")
    axis = _expect(source, "data.slice_axis", d.get("slice_axis", 2), int, "0, 1 or 2")
    if axis not in (0, 1, 2):
        raise SiteConfigError(source, "data.slice_axis", f"must be 0, 1 or 2 (got {axis})")
    orientation, spacing = d.get("orientation"), d.get("spacing")
    if (orientation is not None or spacing is not None) and fmt == "png":
        raise SiteConfigError(
            source,
            "data.orientation" if orientation is not None else "data.spacing",
            "applies to volumes (msd, dicom) only; PNG images carry no geometry",
        )
    if orientation is not None and not (
        isinstance(orientation, str) and len(orientation) == 3 and set(orientation.upper()) <= set("RLAPSI")
    ):
        raise SiteConfigError(
            source, "data.orientation", f"must be 3 axis codes such as RAS or LPS, got {orientation!r}"
        )
    if spacing is not None:
        if not (
            isinstance(spacing, list)
            and len(spacing) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in spacing)
        ):
            raise SiteConfigError(
                source, "data.spacing", f"must be [s0, s1, s2] in mm (0 keeps an axis), got {spacing!r}"
            )
        spacing = tuple(float(v) for v in spacing)
    channel = d.get("channel")
    if channel is not None and (
        fmt == "png" or not isinstance(channel, int) or isinstance(channel, bool) or channel < 0
    ):
        raise SiteConfigError(
            source,
            "data.channel",
            f"must be a channel index >= 0 of multi-channel volumes (msd, dicom), got {channel!r}",
        )

    labels_raw = _expect(source, "labels", top["labels"], dict, "a mapping of label value -> class name")
    labels = {}
    for value, name in labels_raw.items():
        _expect(source, f"labels.{value}", value, int, "an integer label value")
        _expect(source, f"labels.{value}", name, str, "a class name")
        if value == 0:
            raise SiteConfigError(source, "labels.0", "0 is the background and must not be mapped")
        labels[value] = name
    if not labels:
        raise SiteConfigError(source, "labels", "must map at least one label value")

    s = _section(source, "split", top.get("split"), {"val_fraction", "test_fraction", "seed"})
    val_fraction = float(
        _expect(source, "split.val_fraction", s.get("val_fraction", 0.2), (int, float), "a fraction in (0, 1)")
    )
    if not 0 < val_fraction < 1:
        raise SiteConfigError(source, "split.val_fraction", f"must be in (0, 1), got {val_fraction}")
    test_fraction = float(
        _expect(source, "split.test_fraction", s.get("test_fraction", 0.0), (int, float), "a fraction in [0, 1)")
    )
    if not 0 <= test_fraction < 1 - val_fraction:
        raise SiteConfigError(
            source,
            "split.test_fraction",
            f"must be in [0, 1 - val_fraction) = [0, {1 - val_fraction:g}), got {test_fraction}",
        )
    split = SplitSpec(val_fraction, _expect(source, "split.seed", s.get("seed", 0), int, "an integer"), test_fraction)

    known_pre = {"ct": {"window"}, "mri": {"percentiles"}, "us": set()}[modality]
    pre = {**DEFAULT_PREPROCESSING[modality], **_section(source, "preprocessing", top.get("preprocessing"), known_pre)}
    for key in known_pre:
        pair = pre[key]
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
            and pair[0] < pair[1]
        ):
            raise SiteConfigError(source, f"preprocessing.{key}", f"must be [low, high] with low < high, got {pair!r}")

    t = _section(
        source,
        "training",
        top.get("training"),
        {
            "local_epochs",
            "local_steps",
            "batch_size",
            "patch_size",
            "pos_fraction",
            "augment",
            "cache_dir",
            "loader_workers",
        },
    )
    if "local_epochs" in t and "local_steps" in t:
        raise SiteConfigError(source, "training.local_steps", "give local_epochs or local_steps, not both")
    epochs = (
        _expect(source, "training.local_epochs", t["local_epochs"], int, "a positive integer")
        if "local_epochs" in t
        else (None if "local_steps" in t else 1)
    )
    steps = (
        _expect(source, "training.local_steps", t["local_steps"], int, "a positive integer")
        if "local_steps" in t
        else None
    )
    for name, v in (("local_epochs", epochs), ("local_steps", steps)):
        if v is not None and v < 1:
            raise SiteConfigError(source, f"training.{name}", f"must be >= 1, got {v}")
    batch = _expect(source, "training.batch_size", t.get("batch_size", 8), int, "a positive integer")
    patch = t.get("patch_size", [64, 64])
    if not (
        isinstance(patch, list)
        and len(patch) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in patch)
    ):
        raise SiteConfigError(source, "training.patch_size", f"must be [height, width] in pixels, got {patch!r}")
    pos = float(
        _expect(source, "training.pos_fraction", t.get("pos_fraction", 0.67), (int, float), "a fraction in [0, 1]")
    )
    if not 0 <= pos <= 1:
        raise SiteConfigError(source, "training.pos_fraction", f"must be in [0, 1], got {pos}")
    cache = t.get("cache_dir")
    cache = (
        None if cache is None else Path(_expect(source, "training.cache_dir", cache, str, "a folder path")).expanduser()
    )
    if cache is not None and not cache.is_absolute() and base_dir is not None:
        cache = (base_dir / cache).resolve()
    workers = _expect(source, "training.loader_workers", t.get("loader_workers", 1), int, "a number of processes >= 0")
    if workers < 0:
        raise SiteConfigError(
            source, "training.loader_workers", f"must be >= 0 (0: read in the training process), got {workers}"
        )
    training = TrainingSpec(
        epochs,
        steps,
        batch,
        tuple(patch),
        pos,
        _expect(source, "training.augment", t.get("augment", True), bool, "true or false"),
        cache,
        workers,
    )

    p = _section(
        source,
        "privacy",
        top.get("privacy"),
        {"enabled", "frozen", "allow_insecure_reproducible", *_PRIVACY_REALS, *_PRIVACY_COUNTS},
    )
    numbers = {}
    for name in _PRIVACY_REALS + _PRIVACY_COUNTS:
        v = p.get(name)
        if v is not None:
            v = _expect(
                source, f"privacy.{name}", v, int if name in _PRIVACY_COUNTS else (int, float), "a positive number"
            )
            if v <= 0 or (name == "delta" and v >= 1):
                raise SiteConfigError(
                    source,
                    f"privacy.{name}",
                    f"must be a positive number{' below 1' if name == 'delta' else ''}, got {v!r}",
                )
            numbers[name] = v if name in _PRIVACY_COUNTS else float(v)
    enabled = _expect(source, "privacy.enabled", p.get("enabled", False), bool, "true or false")
    if enabled and "target_epsilon" not in numbers and "noise_multiplier" not in numbers:
        raise SiteConfigError(
            source, "privacy", "enabled without target_epsilon or noise_multiplier: give the budget, the noise, or both"
        )
    frozen = _expect(
        source, "privacy.frozen", p.get("frozen", []), list, "a list of layer groups or parameter-name prefixes"
    )
    if not all(isinstance(f, str) and f for f in frozen):
        raise SiteConfigError(
            source, "privacy.frozen", f"must list layer groups or parameter-name prefixes, got {frozen!r}"
        )
    insecure = _expect(
        source,
        "privacy.allow_insecure_reproducible",
        p.get("allow_insecure_reproducible", False),
        bool,
        "true or false",
    )
    privacy = PrivacySpec(enabled, **numbers, frozen=tuple(frozen), allow_insecure_reproducible=insecure)
    state_dir = top.get("state_dir")
    state_dir = (
        None if state_dir is None else Path(_expect(source, "state_dir", state_dir, str, "a folder path")).expanduser()
    )
    if state_dir is not None and not state_dir.is_absolute() and base_dir is not None:
        state_dir = (base_dir / state_dir).resolve()
    data = DataSpec(root, fmt, axis, orientation and orientation.upper(), spacing, channel)
    return SiteConfig(site, modality, data, labels, Path(source), split, pre, training, privacy, state_dir)


def load_site_config(path: str | Path) -> SiteConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SiteConfigError(str(path), "", "site config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise SiteConfigError(str(path), where, f"malformed YAML: {getattr(err, 'problem', err)}") from err
    return validate_site_config_dict(raw, str(path), path.parent)
