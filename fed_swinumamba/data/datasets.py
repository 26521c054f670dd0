"""A site's data: case discovery, the by-case split, MONAI transforms per modality, datasets.

Deterministic preprocessing (load, channel-first, intensity normalisation, label mapping, checks) is
cached on disk with MONAI's PersistentDataset, because Flower starts a fresh ClientApp process for
every message: without the cache each round would re-read and re-process every volume.
3-D volumes are kept as (1, H, W, S) with the slice axis last and trained slice by slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from torch.utils.data import Dataset

from .site_config import SiteConfig

KEYS = ("image", "label")

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


def list_cases(config: SiteConfig) -> list[Case]:
    """Image/label pairs of the site's folder; unmatched names are an error, not a skip."""
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
        raise SiteDataError(f"site {site}: {root / side / unmatched[0]}: no matching file in the other folder ({len(unmatched)} unmatched names)")
    return [Case(cid, images[cid], labels[cid]) for cid in sorted(images)]


def split_cases(cases: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split by case (a case's slices never fall on both sides)."""
    order = list(cases)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1) if len(order) >= 2 else 0
    return order[n_val:], order[:n_val]


class ToGreyd(MapTransform):
    """PNG images may be RGB(A): keep one channel of intensity."""

    def __call__(self, data):
        d = dict(data)
        for key in self.keys:
            if d[key].shape[0] > 1:
                d[key] = d[key][:3].mean(dim=0, keepdim=True) if key == "image" else d[key][:1]
        return d


class SliceAxisLastd(MapTransform):
    """(1, X, Y, Z) -> (1, H, W, S) with the slice axis last; 2-D (1, H, W) -> (1, H, W, 1)."""

    def __init__(self, keys, axis: int):
        super().__init__(keys)
        self.axis = axis

    def __call__(self, data):
        d = dict(data)
        for key in self.keys:
            x = d[key]
            d[key] = x.unsqueeze(-1) if x.ndim == 3 else x.movedim(1 + self.axis, -1)
        return d


class CheckCased(MapTransform):
    """Shape agreement, finite intensities and known label values, mapped to class indices."""

    def __init__(self, site: str, mapping: dict[int, int]):
        super().__init__(KEYS)
        self.site = site
        self.mapping = mapping

    def __call__(self, data):
        d = dict(data)
        image, label, path = d["image"], d["label"], d["source_image"]
        if image.shape[1:] != label.shape[1:]:
            raise SiteDataError(f"site {self.site}: {path}: image shape {tuple(image.shape[1:])} differs from label shape {tuple(label.shape[1:])} ({d['source_label']})")
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise SiteDataError(f"site {self.site}: {path}: image has NaN or infinite intensities")
        lab = torch.as_tensor(label).round().long()
        unknown = sorted(set(torch.unique(lab).tolist()) - set(self.mapping))
        if unknown:
            raise SiteDataError(f"site {self.site}: {d['source_label']}: label values {unknown} are not in the site's label mapping {sorted(self.mapping)}")
        lut = torch.zeros(max(self.mapping) + 1, dtype=torch.long)
        for value, index in self.mapping.items():
            lut[value] = index
        d["image"] = torch.as_tensor(image).float()
        d["label"] = lut[lab].to(torch.uint8)
        return d


def intensity_transform(modality: str, pre: dict):
    """Modality normalisation to a range the network expects, as configured (data, not code)."""
    if modality == "ct":
        lo, hi = pre["window"]
        return ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if modality == "mri":
        lo, hi = pre["percentiles"]
        return Compose([ScaleIntensityRangePercentilesd("image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True), NormalizeIntensityd("image", nonzero=True)])
    return ScaleIntensityd("image", minv=0.0, maxv=1.0)


def loading(config: SiteConfig) -> list:
    """Read image and label. DICOM series and their NIfTI labels are brought to one voxel order (RAS
    unless ``data.orientation`` says otherwise): the two formats store the same grid differently."""
    if config.data.format != "dicom":
        return [LoadImaged(KEYS, reader=READERS[config.data.format], image_only=True, ensure_channel_first=True)]
    return [
        LoadImaged("image", reader="PydicomReader", image_only=True, ensure_channel_first=True),
        LoadImaged("label", reader="NibabelReader", image_only=True, ensure_channel_first=True),
        *([] if config.data.orientation else [Orientationd(KEYS, axcodes="RAS")]),
    ]


def geometry(config: SiteConfig) -> list:
    """Reorient and resample volumes as configured (labels with nearest neighbour)."""
    steps = []
    if config.data.orientation:
        steps.append(Orientationd(KEYS, axcodes=config.data.orientation))
    if config.data.spacing:
        steps.append(Spacingd(KEYS, pixdim=config.data.spacing, mode=("bilinear", "nearest")))
    return steps


def preprocessing(config: SiteConfig, class_names: list[str]) -> Compose:
    return Compose([
        *loading(config),
        *geometry(config),
        ToGreyd(KEYS),
        intensity_transform(config.modality, config.preprocessing),
        CheckCased(config.site, config.class_mapping_for(class_names)),
        SliceAxisLastd(KEYS, config.data.slice_axis),
        EnsureTyped(KEYS, track_meta=False),
    ])


def augmentation(config: SiteConfig) -> Compose:
    t = config.training
    steps = [
        SpatialPadd(KEYS, spatial_size=t.patch_size),
        RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=t.patch_size, pos=t.pos_fraction, neg=1.0 - t.pos_fraction, num_samples=1, allow_smaller=False),
    ]
    if t.augment:
        steps += [
            RandFlipd(KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(KEYS, prob=0.5, spatial_axis=1),
            RandRotate90d(KEYS, prob=0.5),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return Compose([*steps, EnsureTyped(KEYS, track_meta=False)])


class SliceDataset(Dataset):
    """Training items: random crops of single slices of the training cases."""

    def __init__(self, volumes: list[dict], transform: Compose):
        self.volumes = volumes
        self.index = [(c, s) for c, v in enumerate(volumes) for s in range(v["image"].shape[-1])]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        c, s = self.index[i]
        v = self.volumes[c]
        item = self.transform({"image": v["image"][..., s], "label": v["label"][..., s]})[0]
        return {"image": torch.as_tensor(item["image"]).float(), "label": torch.as_tensor(item["label"]).long(), "case_index": c}

    def slice_indices_by_case(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.volumes]
        for i, (c, _) in enumerate(self.index):
            out[c].append(i)
        return out


class CaseCrops(Dataset):
    """DP training items: ``slices_per_case`` random slice crops of one training case, stacked.

    Item c -> image (k, C, H, W), label (k, 1, H, W). The case is the privacy unit, so DP-SGD samples and
    clips whole cases; which of its slices a step sees is drawn here, from ``seed``.
    """

    def __init__(self, slices: SliceDataset, slices_per_case: int, seed: int):
        self.slices, self.slices_per_case = slices, slices_per_case
        self.by_case = slices.slice_indices_by_case()
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.by_case)

    def __getitem__(self, c: int) -> dict:
        own = self.by_case[c]
        picks = self.rng.choice(own, size=self.slices_per_case, replace=len(own) < self.slices_per_case)
        items = [self.slices[int(i)] for i in picks]
        return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}


@dataclass
class SiteData:
    train_dataset: SliceDataset
    val_cases: list[dict]
    class_names: list[str]

    @property
    def num_train_cases(self) -> int:
        return len(self.train_dataset.volumes)

    @property
    def num_train_slices(self) -> int:
        return len(self.train_dataset)

    @classmethod
    def from_config(cls, config: SiteConfig, class_names: list[str]) -> SiteData:
        cases = list_cases(config)
        train, val = split_cases(cases, config.split.val_fraction, config.split.seed)
        transform = preprocessing(config, class_names)
        signature = json.dumps([config.modality, config.preprocessing, sorted(config.labels.items()), config.data.slice_axis, config.data.orientation, config.data.spacing, list(class_names)])
        cache = config.cache_dir / hashlib.sha1(signature.encode()).hexdigest()[:12]
        volumes = {}
        for split, group in (("train", train), ("val", val)):
            items = [{"image": str(c.image), "label": str(c.label), "source_image": str(c.image), "source_label": str(c.label)} for c in group]
            ds = PersistentDataset(items, transform, cache_dir=cache)
            volumes[split] = [_load(ds, i, group[i], config.site) for i in range(len(group))]
        for item, case in zip(volumes["val"], val):
            item["case"] = case.case_id
        return cls(SliceDataset(volumes["train"], augmentation(config)), volumes["val"], list(class_names))


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


def _load(ds: PersistentDataset, i: int, case: Case, site: str) -> dict:
    try:
        item = ds[i]
    except Exception as err:
        raise site_data_error(err, site, case.image) from None
    return {"image": torch.as_tensor(np.asarray(item["image"])), "label": torch.as_tensor(np.asarray(item["label"]))}
