"""Split one dataset by patient into N hospital sites, with a site YAML each (for simulation)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from ..data.datasets import LAYOUTS, case_stem, read_patient_mapping

SCHEMES = ("iid", "dirichlet", "quantity")


def partition_cases(
    case_ids: list[str],
    num_sites: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    properties: dict[str, float] | None = None,
) -> list[list[str]]:
    """Every case to exactly one site, each site at least one case.

    iid: shuffled round-robin. quantity: site sizes drawn from Dirichlet(alpha). dirichlet: cases are
    binned by ``properties`` (e.g. foreground fraction; iid order if absent) into ``num_sites`` bins and
    each bin's cases spread over sites by Dirichlet(alpha) proportions: sites see skewed case mixes.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not 1 <= num_sites <= len(case_ids):
        raise ValueError(f"cannot split {len(case_ids)} cases into {num_sites} sites")
    rng = np.random.default_rng(seed)
    order = [case_ids[i] for i in rng.permutation(len(case_ids))]
    if scheme == "iid":
        return [sorted(order[i::num_sites]) for i in range(num_sites)]
    if scheme == "quantity":
        share = rng.dirichlet([alpha] * num_sites)
        sizes = 1 + np.floor(share * (len(order) - num_sites)).astype(int)
        sizes[np.argmax(share)] += len(order) - sizes.sum()
        bounds = np.cumsum(sizes)[:-1]
        return [sorted(part) for part in np.split(np.array(order), bounds)]
    ranked = sorted(order, key=lambda c: (properties or {}).get(c, 0.0))
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for bin_cases in np.array_split(np.array(ranked), num_sites):
        share = rng.dirichlet([alpha] * num_sites)
        for case in bin_cases:
            sites[int(rng.choice(num_sites, p=share))].append(str(case))
    for part in sites:  # no empty site: take one case from the largest
        if not part:
            donor = max(range(num_sites), key=lambda j: len(sites[j]))
            part.append(sites[donor].pop())
    return [sorted(p) for p in sites]


def write_site_config(
    path: Path, site: str, modality: str, root: Path, data_format: str, labels: dict[int, str], **sections
) -> Path:
    config = {
        "site": site,
        "modality": modality,
        "data": {"root": os.path.relpath(root, path.parent), "format": data_format},
        "labels": dict(labels),
        **sections,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _link(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a file, or a folder's files (a DICOM series), to ``dst``."""
    if src.is_dir():
        for child in src.iterdir():
            _link(child, dst / child.name)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def dataset_format(data_dir: Path) -> str:
    """msd, dicom (imagesTr holds series folders) or png, from the dataset's layout."""
    if (data_dir / "imagesTr").is_dir():
        return "dicom" if any(p.is_dir() for p in (data_dir / "imagesTr").iterdir()) else "msd"
    if (data_dir / "images").is_dir():
        return "png"
    raise ValueError(f"{data_dir}: neither an MSD / DICOM (imagesTr/labelsTr) nor a PNG (images/masks) dataset")


def dataset_labels(data_dir: Path) -> dict[int, str]:
    """Label value -> class name from the dataset's ``dataset.json`` (MSD's ``labels``; background dropped)."""
    meta_file = data_dir / "dataset.json"
    if not meta_file.is_file():
        raise ValueError(
            f"{data_dir}: no dataset.json to take the label names from; give them (--labels 1=organ,2=lesion)"
        )
    names = json.loads(meta_file.read_text()).get("labels", {})
    labels = {int(v): str(n) for v, n in names.items() if int(v) != 0}
    if not labels:
        raise ValueError(f"{meta_file}: no foreground labels in its 'labels' entry")
    return labels


def split_dataset(
    data_dir: str | Path,
    modality: str,
    num_sites: int,
    scheme: str,
    seed: int,
    out_dir: str | Path,
    labels: dict[int, str] | None = None,
    site_prefix: str | None = None,
) -> list[Path]:
    """Partition ``data_dir`` (MSD, DICOM or PNG layout) by patient into ``num_sites`` site folders + YAMLs.

    Label names come from ``labels`` or the dataset's ``dataset.json``; patients from its ``cases.csv`` or
    ``dataset.json`` (each case its own patient otherwise), and every site gets its patients' ``cases.csv``.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    fmt = dataset_format(data_dir)
    labels = labels or dataset_labels(data_dir)
    images_dir, labels_dir, image_pattern, label_pattern = LAYOUTS[fmt]
    image_files = {case_stem(p): p for p in (data_dir / images_dir).glob(image_pattern)}
    label_files = {case_stem(p): p for p in (data_dir / labels_dir).glob(label_pattern)}
    mapping = read_patient_mapping(data_dir, data_dir.name)
    patient_of = mapping[0] if mapping else {c: c for c in image_files}
    parts = partition_cases(sorted({patient_of[c] for c in image_files}), num_sites, scheme, seed)
    prefix = site_prefix or f"{data_dir.name}_site"
    yamls = []
    for i, patients in enumerate(parts):
        site = prefix if num_sites == 1 else f"{prefix}{i}"
        root = out_dir / site
        names = sorted(c for c in image_files if patient_of[c] in set(patients))
        for case in names:
            _link(image_files[case], root / images_dir / image_files[case].name)
            _link(label_files[case], root / labels_dir / label_files[case].name)
        if mapping:
            (root / "cases.csv").write_text("case,patient\n" + "".join(f"{c},{patient_of[c]}\n" for c in names))
        yamls.append(write_site_config(out_dir / f"{site}.yaml", site, modality, root, fmt, labels))
    return yamls
