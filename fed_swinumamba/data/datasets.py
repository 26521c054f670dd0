"""A site's data: cases and patients, the by-patient split, MONAI transforms per modality, datasets.

Deterministic preprocessing (load, geometry checks, reorientation and resampling, intensity
normalisation, label mapping) runs once per case into the site's cache (``cache.py``); every message
then opens the cache's entries and reads slices as it needs them, so a message's memory and start-up
do not grow with the number of cases. Volumes are cached as (S, H, W) with the slice axis first.

Training draws 2-D crops: a draw picks a training case, and with probability ``pos_fraction`` a
foreground class present in the case, one of the slices where that class is present, and a crop
centred on one of its voxels (nnU-Net forces a share of its patches onto foreground in the same way);
otherwise a random slice and a random crop. Which slices hold which class is indexed in the cache.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from torch.utils.data import DataLoader, Dataset, Sampler

from ..protocol import TEST, VALIDATION
from .cache import CachedCase, cache_key, read_entry, write_entry
from .site_config import SiteConfig

KEYS = ("image", "label")
PATIENT_FILES = ("cases.csv", "dataset.json")  # where a dataset maps its case files to patients
AFFINE_TOLERANCE_MM = 1e-3  # image and label affines may differ by this much (float32 headers round)

log = logging.getLogger(__name__)

# MONAI's LoadImage instantiates every reader it knows, including the GPU DICOM decoder (nvImageCodec),
# which warns in every process where it is unavailable; the plain pydicom decoders are what sites use.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


class SiteDataError(ValueError):
    """Bad data at a site: names the site, the file and the problem (never image content)."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path
    patient: str  # the privacy and split unit; the case itself when the dataset maps no patients


def case_stem(path: Path) -> str:
    """The case name of an image or label file (or DICOM series folder)."""
    name = path.name
    if path.is_dir():
        return name
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# Per data format: image folder, label folder, image pattern, label pattern. A DICOM image is a folder
# holding one series (imagesTr/<case>/*.dcm); its label is a NIfTI on the same grid, as annotation tools save them.
LAYOUTS = {
    "msd": ("imagesTr", "labelsTr", "*.nii*", "*.nii*"),
    "dicom": ("imagesTr", "labelsTr", "*/", "*.nii*"),
    "png": ("images", "masks", "*.png", "*.png"),
}

READERS = {"msd": "NibabelReader", "png": "PILReader"}  # MONAI readers of the single-file formats


def read_patient_mapping(root: Path, site: str) -> tuple[dict[str, str], Path] | None:
    """Case name -> patient, from ``cases.csv`` (columns ``case,patient``) or the ``patient`` field of the
    ``training`` entries of an MSD ``dataset.json``; None when the dataset has neither."""
    table, source = root / PATIENT_FILES[0], root / PATIENT_FILES[1]
    if table.is_file():
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"case", "patient"} <= set(rows[0]):
            raise SiteDataError(f"site {site}: {table}: needs a header row 'case,patient' and one row per case")
        return {r["case"].strip(): r["patient"].strip() for r in rows}, table
    if source.is_file():
        try:
            entries = json.loads(source.read_text()).get("training", [])
        except (json.JSONDecodeError, AttributeError) as err:
            raise SiteDataError(f"site {site}: {source}: not a readable dataset.json ({err})") from None
        mapped = {
            case_stem(Path(e["image"])): str(e["patient"])
            for e in entries
            if isinstance(e, dict) and "patient" in e and "image" in e
        }
        return (mapped, source) if mapped else None
    return None


def list_cases(config: SiteConfig) -> list[Case]:
    """Image/label pairs of the site's folder, with their patients; unmatched names are an error, not a skip."""
    root, site = config.data.root, config.site
    images_dir, labels_dir, image_pattern, label_pattern = LAYOUTS[config.data.format]
    for folder in (root, root / images_dir, root / labels_dir):
        if not folder.is_dir():
            raise SiteDataError(f"site {site}: data folder {folder} does not exist (from {config.source})")
    images = {case_stem(p): p for p in sorted((root / images_dir).glob(image_pattern))}
    labels = {case_stem(p): p for p in sorted((root / labels_dir).glob(label_pattern))}
    if not images:
        raise SiteDataError(f"site {site}: no {image_pattern} image in {root / images_dir}")
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        side = images_dir if unmatched[0] in images else labels_dir
        raise SiteDataError(
            f"site {site}: {root / side / unmatched[0]}: no matching file in the other folder ({len(unmatched)} unmatched names)"
        )
    mapping = read_patient_mapping(root, site)
    if mapping is None:
        return [Case(cid, images[cid], labels[cid], cid) for cid in sorted(images)]
    patients, source = mapping
    missing = sorted(set(images) - set(patients))
    if missing:
        raise SiteDataError(f"site {site}: {source}: case {missing[0]} has no patient ({len(missing)} cases unmapped)")
    return [Case(cid, images[cid], labels[cid], patients[cid]) for cid in sorted(images)]


def split_cases(
    cases: Sequence,
    val_fraction: float,
    seed: int,
    patient_of=lambda c: getattr(c, "patient", c),
    test_fraction: float = 0.0,
) -> tuple[list, list, list]:
    """Deterministic split by patient into training, validation and test cases: all of a patient's cases
    fall on one side. At least one patient trains; with ``test_fraction`` > 0 at least one is kept for the
    test, and the validation patients are those of the split without a test part (adding one takes from
    the training patients only)."""
    patients = sorted({patient_of(c) for c in cases})
    random.Random(seed).shuffle(patients)
    n = len(patients)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    n_test = min(max(1, round(n * test_fraction)), n - n_val - 1) if test_fraction > 0 else 0
    side = {p: 1 for p in patients[:n_val]} | {p: 2 for p in patients[n_val : n_val + n_test]}
    order = {p: i for i, p in enumerate(patients)}
    ranked = sorted(cases, key=lambda c: order[patient_of(c)])  # stable: a patient's cases keep their order
    parts: tuple[list, list, list] = ([], [], [])
    for c in ranked:
        parts[side.get(patient_of(c), 0)].append(c)
    return parts


class CheckGeometryd(MapTransform):
    """Image and label on one grid: same shape and affine. A label exported with another orientation
    (same shape, mirrored affine) would otherwise train on misaligned masks. Multi-channel images need
    the site's ``data.channel``."""

    def __init__(self, site: str, channel: int | None, data_format: str):
        super().__init__(KEYS)
        self.site, self.channel, self.format = site, channel, data_format

    def __call__(self, data):
        d = dict(data)
        image, label, path, label_path = d["image"], d["label"], d["source_image"], d["source_label"]
        if image.shape[1:] != label.shape[1:]:
            raise SiteDataError(
                f"site {self.site}: {path}: image shape {tuple(image.shape[1:])} differs from label shape {tuple(label.shape[1:])} ({label_path})"
            )
        if self.format != "png" and not np.allclose(
            image.affine.numpy(), label.affine.numpy(), rtol=0, atol=AFFINE_TOLERANCE_MM
        ):
            raise SiteDataError(
                f"site {self.site}: {path} and {label_path}: image and label affines differ (not on the same grid: "
                f"image {np.round(image.affine.numpy(), 3).tolist()}, label {np.round(label.affine.numpy(), 3).tolist()})"
            )
        if image.shape[0] > 1:
            if self.format == "png":  # an RGB(A) rendering of a grey ultrasound frame
                d["image"] = image[:3].mean(dim=0, keepdim=True)
            elif self.channel is None:
                raise SiteDataError(
                    f"site {self.site}: {path}: image has {image.shape[0]} channels; set data.channel to the one to use"
                )
            elif self.channel >= image.shape[0]:
                raise SiteDataError(
                    f"site {self.site}: {path}: data.channel {self.channel} but the image has {image.shape[0]} channels"
                )
            else:
                d["image"] = image[self.channel : self.channel + 1]
        if label.shape[0] > 1:
            if self.format != "png":
                raise SiteDataError(
                    f"site {self.site}: {label_path}: label has {label.shape[0]} channels; expected one map of label values"
                )
            d["label"] = label[:1]
        return d


class CheckLabelsd(MapTransform):
    """Finite intensities and known label values, mapped to class indices."""

    def __init__(self, site: str, mapping: dict[int, int]):
        super().__init__(KEYS)
        self.site = site
        self.lut = torch.zeros(max(mapping) + 1, dtype=torch.uint8)
        for value, index in mapping.items():
            self.lut[value] = index
        self.known = set(mapping)

    def __call__(self, data):
        d = dict(data)
        if not torch.isfinite(torch.as_tensor(d["image"])).all():
            raise SiteDataError(f"site {self.site}: {d['source_image']}: image has NaN or infinite intensities")
        lab = torch.as_tensor(d["label"]).round().long()
        unknown = sorted(set(torch.unique(lab).tolist()) - self.known)
        if unknown:
            raise SiteDataError(
                f"site {self.site}: {d['source_label']}: label values {unknown} are not in the site's label mapping {sorted(self.known)}"
            )
        d["label"] = self.lut[lab]
        return d


def intensity_transform(modality: str, pre: dict):
    """Modality normalisation to a range the network expects, as configured (data, not code)."""
    if modality == "ct":
        lo, hi = pre["window"]
        return ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if modality == "mri":
        lo, hi = pre["percentiles"]
        return Compose(
            [
                ScaleIntensityRangePercentilesd("image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
                NormalizeIntensityd("image", nonzero=True),
            ]
        )
    return ScaleIntensityd("image", minv=0.0, maxv=1.0)


def loading(data_format: str, orientation: str | None, keys: Sequence[str] = KEYS) -> list:
    """Read image (and label). DICOM series and their NIfTI labels are brought to one voxel order (RAS
    unless ``data.orientation`` says otherwise): the two formats store the same grid differently."""
    if data_format != "dicom":
        return [LoadImaged(keys, reader=READERS[data_format], image_only=True, ensure_channel_first=True)]
    readers = {"image": "PydicomReader", "label": "NibabelReader"}
    return [LoadImaged(k, reader=readers[k], image_only=True, ensure_channel_first=True) for k in keys] + (
        [] if orientation else [Orientationd(keys, axcodes="RAS")]
    )


def geometry(orientation: str | None, spacing: Sequence[float] | None, keys: Sequence[str] = KEYS) -> list:
    """Reorient and resample volumes as configured (labels with nearest neighbour)."""
    steps = []
    if orientation:
        steps.append(Orientationd(keys, axcodes=orientation))
    if spacing:
        steps.append(Spacingd(keys, pixdim=spacing, mode=("bilinear", "nearest")[: len(keys)]))
    return steps


def preprocessing(config: SiteConfig, class_names: Sequence[str]) -> Compose:
    """Source files -> image and label MetaTensors (C, X, Y[, Z]) on the configured grid, checked."""
    return Compose(
        [
            *loading(config.data.format, config.data.orientation),
            CheckGeometryd(config.site, config.data.channel, config.data.format),
            *geometry(config.data.orientation, config.data.spacing),
            intensity_transform(config.modality, config.preprocessing),
            CheckLabelsd(config.site, config.class_mapping_for(list(class_names))),
        ]
    )


def slices_first(volume: torch.Tensor, slice_axis: int) -> np.ndarray:
    """(1, X, Y, Z) -> (S, H, W) with the slice axis first; a 2-D (1, H, W) image -> (1, H, W)."""
    x = torch.as_tensor(volume)[0]
    return (x[None] if x.ndim == 2 else x.movedim(slice_axis, 0)).numpy()


def voxel_spacing(volume: MetaTensor, slice_axis: int) -> tuple[float, float, float]:
    """mm per voxel along (H, W, S) of ``slices_first``'s arrays, from the volume's affine."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    per_axis = np.sqrt((affine[:-1, :-1] ** 2).sum(axis=0)).tolist()
    if len(per_axis) == 2:  # 2-D image: pixel units unless its format has a spacing
        return (per_axis[0], per_axis[1], 1.0)
    in_plane = [s for a, s in enumerate(per_axis) if a != slice_axis]
    return (in_plane[0], in_plane[1], per_axis[slice_axis])


def _settings(config: SiteConfig, class_names: Sequence[str]) -> list:
    """Everything in the site config that changes a cached case."""
    d = config.data
    return [
        config.modality,
        config.preprocessing,
        sorted(config.labels.items()),
        d.format,
        d.slice_axis,
        d.orientation,
        d.spacing,
        d.channel,
        list(class_names),
    ]


def site_data_error(err: Exception, site: str, path: Path | str) -> SiteDataError:
    """The SiteDataError behind a MONAI transform failure, or one naming the file and the root cause.

    MONAI wraps whatever a transform raised in ``RuntimeError("applying transform ...")``; a corrupt
    file surfaces as any of nibabel's or PIL's errors underneath.
    """
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, SiteDataError):
        cause = cause.__cause__
    if isinstance(cause, SiteDataError):
        return cause
    return SiteDataError(f"site {site}: {path}: cannot be loaded ({type(cause).__name__}: {cause})")


def preprocess(
    config: SiteConfig, transform: Compose, case: Case
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One case through the site's transforms: image and label (S, H, W), spacing along (H, W, S)."""
    item = {
        "image": str(case.image),
        "label": str(case.label),
        "source_image": str(case.image),
        "source_label": str(case.label),
    }
    try:
        out = transform(item)
    except Exception as err:
        raise site_data_error(err, config.site, case.image) from None
    axis = config.data.slice_axis
    return slices_first(out["image"], axis), slices_first(out["label"], axis), voxel_spacing(out["image"], axis)


def cached_cases(config: SiteConfig, class_names: Sequence[str], cases: Sequence[Case]) -> list[CachedCase]:
    """The cache entries of ``cases``, preprocessing those that are missing or stale."""
    settings, transform, out = _settings(config, class_names), None, []
    for i, case in enumerate(cases):
        folder = config.cache_dir / case.case_id / cache_key([case.image, case.label], settings)
        entry = read_entry(folder)
        if entry is None:
            transform = transform or preprocessing(config, class_names)
            image, label, spacing = preprocess(config, transform, case)
            try:
                entry = write_entry(folder, case.case_id, case.patient, image, label, spacing)
            except OSError as err:
                raise SiteDataError(
                    f"site {config.site}: cache folder {config.cache_dir} is not writable ({err}); set training.cache_dir"
                ) from None
            log.info("site %s: preprocessed case %d of %d into the cache", config.site, i + 1, len(cases))
        out.append(entry)
    return out


# ------------------------------------------------------------------------------ training draws
@dataclass(frozen=True)
class Draw:
    """One training crop to make: case, slice, the class its centre must show (0: anywhere), and the
    seed of its crop position and augmentation (so that results do not depend on loader workers)."""

    case: int
    slice: int
    target_class: int
    seed: int


def draw(case_index: int, case: CachedCase, pos_fraction: float, rng: np.random.Generator) -> Draw:
    """A crop of ``case``: foreground-centred with probability ``pos_fraction`` when it has foreground."""
    seed = int(rng.integers(2**31))
    if case.slices_with and rng.random() < pos_fraction:
        target = int(rng.choice(sorted(case.slices_with)))
        return Draw(case_index, int(rng.choice(case.slices_with[target])), target, seed)
    return Draw(case_index, int(rng.integers(case.num_slices)), 0, seed)


class DrawSampler(Sampler):
    """``num_draws`` draws per pass, over cases chosen uniformly (every case weighs the same)."""

    def __init__(self, cases: Sequence[CachedCase], pos_fraction: float, num_draws: int, rng: np.random.Generator):
        self.cases, self.pos_fraction, self.num_draws, self.rng = cases, pos_fraction, num_draws, rng

    def __len__(self) -> int:
        return self.num_draws

    def __iter__(self) -> Iterator[Draw]:
        for _ in range(self.num_draws):
            c = int(self.rng.integers(len(self.cases)))
            yield draw(c, self.cases[c], self.pos_fraction, self.rng)


def augmentation(patch_size: Sequence[int], augment: bool) -> Compose:
    steps = [
        RandFlipd(KEYS, prob=0.5, spatial_axis=0),
        RandFlipd(KEYS, prob=0.5, spatial_axis=1),
        RandRotate90d(KEYS, prob=0.5),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ]
    return Compose(
        [SpatialPadd(KEYS, spatial_size=patch_size), *(steps if augment else []), EnsureTyped(KEYS, track_meta=False)]
    )


class TrainingSlices(Dataset):
    """Training items by ``Draw``: image (1, h, w) float32 and label (1, h, w) int64 crops of one slice."""

    def __init__(self, cases: Sequence[CachedCase], num_classes: int, patch_size: Sequence[int], augment: bool):
        self.cases, self.patch_size = list(cases), tuple(patch_size)
        self.num_slices = sum(c.num_slices for c in self.cases)
        self.augment = augmentation(patch_size, augment)
        self.uniform_crop = RandSpatialCropd(KEYS, roi_size=patch_size, random_size=False)
        self.class_crops = {
            k: RandCropByLabelClassesd(
                KEYS,
                label_key="label",
                spatial_size=patch_size,
                ratios=[int(i == k) for i in range(num_classes)],
                num_classes=num_classes,
                num_samples=1,
                allow_smaller=True,
            )
            for k in range(1, num_classes)
        }

    def __len__(self) -> int:
        return self.num_slices

    def __getitem__(self, d: Draw) -> dict:
        case = self.cases[d.case]
        image = torch.from_numpy(case.image_slices(d.slice, 1).astype(np.float32))
        label = torch.from_numpy(case.label_slices(d.slice, 1).astype(np.int64))
        crop = self.class_crops[d.target_class] if d.target_class else self.uniform_crop
        rng = np.random.RandomState(d.seed)
        crop.set_random_state(state=rng)
        self.augment.set_random_state(state=rng)
        item = crop({"image": image, "label": label})
        item = self.augment(item[0] if isinstance(item, list) else item)
        return {"image": torch.as_tensor(item["image"]).float(), "label": torch.as_tensor(item["label"]).long()}


class PatientCrops(Dataset):
    """DP training items: ``slices_per_patient`` crops of one training patient's cases, stacked.

    Item p -> image (k, 1, h, w), label (k, 1, h, w). The patient is the privacy unit, so DP-SGD samples
    and clips whole patients; which cases, slices and crops a step sees is drawn here from ``rng``.
    """

    def __init__(self, slices: TrainingSlices, slices_per_patient: int, pos_fraction: float, rng: np.random.Generator):
        self.slices, self.k, self.pos_fraction, self.rng = slices, slices_per_patient, pos_fraction, rng
        by_patient: dict[str, list[int]] = {}
        for i, case in enumerate(slices.cases):
            by_patient.setdefault(case.patient, []).append(i)
        self.patients = [by_patient[p] for p in sorted(by_patient)]

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, p: int) -> dict:
        own = self.patients[p]
        items = [
            self.slices[draw(c, self.slices.cases[c], self.pos_fraction, self.rng)]
            for c in self.rng.choice(own, size=self.k)
        ]
        return {
            "image": torch.stack([it["image"] for it in items]),
            "label": torch.stack([it["label"] for it in items]),
        }


@dataclass
class SiteData:
    """A site's training and held-out cases, as cache entries: opened, not read."""

    config: SiteConfig
    train_cases: list[CachedCase]
    val_cases: list[CachedCase]
    class_names: list[str]
    patients_mapped: bool  # False: the dataset maps no patients, so each case (file) counts as one
    test_cases: list[CachedCase] = field(default_factory=list)  # scored only at the end; empty: none kept apart

    def held_out(self, split: str) -> tuple[str, list[CachedCase]]:
        """The split an evaluation asking for ``split`` scores, and its cases: the test cases, or the
        validation cases (asked for, or the site keeps no test split)."""
        if split == TEST and self.test_cases:
            return TEST, self.test_cases
        return VALIDATION, self.val_cases

    @property
    def num_train_cases(self) -> int:
        return len(self.train_cases)

    @property
    def num_train_patients(self) -> int:
        return len({c.patient for c in self.train_cases})

    @property
    def num_train_slices(self) -> int:
        return sum(c.num_slices for c in self.train_cases)

    def training_slices(self) -> TrainingSlices:
        t = self.config.training
        return TrainingSlices(self.train_cases, len(self.class_names) + 1, t.patch_size, t.augment)

    def training_batches(self, batch_size: int, rng: np.random.Generator) -> DataLoader:
        """One pass of foreground-oversampled crops (as many as there are training slices), prefetched by
        ``training.loader_workers`` processes."""
        t = self.config.training
        sampler = DrawSampler(self.train_cases, t.pos_fraction, self.num_train_slices, rng)
        workers = t.loader_workers
        return DataLoader(
            self.training_slices(),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )

    def patient_crops(self, slices_per_patient: int, rng: np.random.Generator) -> PatientCrops:
        return PatientCrops(self.training_slices(), slices_per_patient, self.config.training.pos_fraction, rng)

    @classmethod
    def from_config(cls, config: SiteConfig, class_names: Sequence[str]) -> SiteData:
        cases = list_cases(config)
        split = config.split
        train, val, test = split_cases(cases, split.val_fraction, split.seed, test_fraction=split.test_fraction)
        entries = cached_cases(config, class_names, train + val + test)
        for entry in entries:
            if entry.constant:
                log.warning(
                    "site %s: case %s has a constant image (a blank export?); python -m client check-site lists such problems",
                    config.site,
                    entry.case_id,
                )
        mapped = read_patient_mapping(config.data.root, config.site) is not None
        n, m = len(train), len(train) + len(val)
        return cls(config, entries[:n], entries[n:m], list(class_names), mapped, entries[m:])
