"""Synthetic CT, MRI and ultrasound phantoms with exact ground truth, for the built-in demo.

They are written in the real on-disk formats (MSD-style NIfTI for CT and MRI, optionally CT as DICOM
series, PNG pairs for ultrasound) so that the demo exercises the same loading code as hospital data. Each case has an
organ-like smooth blob (label 1) and, in most cases, a lesion inside it (label 2); CT is in Hounsfield
units with noise, MRI has a multiplicative bias field, ultrasound has speckle and acoustic shadowing.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CLASS_NAMES = ("organ", "lesion")
# Label values as each demo modality stores them (ultrasound masks are 8-bit greys).
DEMO_LABELS = {"ct": {1: "organ", 2: "lesion"}, "mri": {1: "organ", 2: "lesion"}, "us": {255: "organ", 128: "lesion"}}


def _ellipse(shape, center, radii, angle) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    y, x = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return ((x * c + y * s) / radii[1]) ** 2 + ((-x * s + y * c) / radii[0]) ** 2 <= 1.0


def _case_masks(rng: np.random.Generator, size: int, num_slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body, organ, lesion) boolean masks of shape (size, size, num_slices)."""
    body = np.zeros((size, size, num_slices), bool)
    organ = np.zeros_like(body)
    lesion = np.zeros_like(body)
    oc = rng.uniform(0.4, 0.6, 2) * size
    orad = rng.uniform(0.18, 0.26, 2) * size
    angle = rng.uniform(0, np.pi)
    has_lesion = rng.random() < 0.9
    lc = oc + rng.uniform(-0.08, 0.08, 2) * size
    lrad = rng.uniform(0.08, 0.11) * size
    for k in range(num_slices):
        z = (k - (num_slices - 1) / 2) / max(num_slices / 2, 1)  # -1..1 through the volume
        taper = np.sqrt(max(1 - 0.6 * z * z, 0.2))
        body[..., k] = _ellipse((size, size), (size / 2, size / 2), (0.42 * size, 0.47 * size), 0.0)
        organ[..., k] = _ellipse((size, size), oc, orad * taper, angle)
        if has_lesion and abs(z) < 0.8:
            lesion[..., k] = _ellipse((size, size), lc, (lrad * taper, lrad * taper), 0.0) & organ[..., k]
    return body, organ, lesion


def _labels(organ: np.ndarray, lesion: np.ndarray, values: dict[int, str]) -> np.ndarray:
    by_name = {name: value for value, name in values.items()}
    label = np.zeros(organ.shape, np.uint8)
    label[organ] = by_name["organ"]
    label[lesion] = by_name["lesion"]
    return label


def _ct(rng, body, organ, lesion) -> np.ndarray:
    img = np.full(body.shape, -1000.0, np.float32)  # air
    img[body] = -100.0  # fat
    inner = body & ~organ
    img[inner] += 140.0 * (rng.random() > 0.3)  # soft tissue
    organ_hu = 60.0 + rng.normal(0, 5)
    img[organ] = organ_hu
    img[lesion] = organ_hu - rng.uniform(35, 55)  # hypodense lesion
    return img + rng.normal(0, 12.0, img.shape).astype(np.float32)


def _mri(rng, body, organ, lesion) -> np.ndarray:
    img = np.zeros(body.shape, np.float32)
    img[body] = 300.0
    img[organ] = 520.0
    img[lesion] = 900.0
    yy, xx = np.mgrid[: body.shape[0], : body.shape[1]] / body.shape[0]
    bias = 1.0 + 0.3 * np.sin(np.pi * (yy * rng.uniform(0.5, 1.5) + xx * rng.uniform(0.5, 1.5)))
    img *= bias[..., None].astype(np.float32)
    noise = rng.normal(0, 25.0, img.shape + (2,))
    return np.sqrt((img + noise[..., 0]) ** 2 + noise[..., 1] ** 2).astype(np.float32)  # Rician magnitude


def _us(rng, body, organ, lesion) -> np.ndarray:
    img = np.full(body.shape, 0.35, np.float32)
    img[organ] = 0.6
    img[lesion] = 0.2
    # a bright interface above the organ casts an acoustic shadow below it
    rows = np.where(organ.any(axis=1))[0]
    if rows.size:
        top = max(rows.min() - 3, 1)
        cols = slice(int(body.shape[1] * 0.15), int(body.shape[1] * 0.25))
        img[top - 1 : top + 1, cols] = 1.0
        img[top + 1 :, cols] *= 0.45
    speckle = rng.rayleigh(1.0, img.shape).astype(np.float32) / np.sqrt(np.pi / 2)
    img = np.clip(img * speckle, 0, 1)
    yy, xx = np.mgrid[: body.shape[0], : body.shape[1]]
    fan = np.abs(xx - body.shape[1] / 2) <= (yy + 4) * 0.9  # sector-shaped field of view
    return (img * fan) * 255.0


def write_ct_dicom_series(
    volume_hu: np.ndarray, spacing: tuple[float, float, float], folder: Path, case_id: str
) -> Path:
    """Write an (x, y, z) CT volume in HU as a DICOM series, one file per z slice, the way scanners do.

    Voxel (i, j, k) lies at RAS (i, j, k) * spacing, as in the NIfTI phantoms: the DICOM patient frame
    is LPS, so the rows/columns run along -L/-P (ImageOrientationPatient -1,0,0,0,-1,0). Stored as
    unsigned 16 bit with RescaleIntercept -1024.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda *parts: generate_uid(entropy_srcs=[case_id, *map(str, parts)])  # noqa: E731  reproducible
    stored = np.clip(np.rint(volume_hu + 1024), 0, 65535).astype(np.uint16)
    for k in range(stored.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = (
            CTImageStorage,
            uid("slice", k),
            ExplicitVRLittleEndian,
        )
        ds = FileDataset(folder / f"slice_{k:04d}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", f"phantom-{case_id}", k + 1
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing[2]]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]  # (row, column) spacing
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # rows along y, columns along x
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def generate_phantoms(
    out_dir: str | Path,
    modality: str,
    num_cases: int = 16,
    seed: int = 0,
    size: int = 64,
    num_slices: int = 12,
    dicom: bool = False,
) -> Path:
    """Write ``num_cases`` phantom cases of ``modality`` under ``out_dir``; returns ``out_dir``.

    ``dicom``: CT images as DICOM series folders ``imagesTr/<case>/`` (labels stay NIfTI).
    """
    if modality not in DEMO_LABELS:
        raise ValueError(f"modality must be one of {sorted(DEMO_LABELS)}, got {modality!r}")
    if dicom and modality != "ct":
        raise ValueError(f"DICOM phantoms are CT only, not {modality!r}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    values = DEMO_LABELS[modality]
    if modality == "us":
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    else:
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    spacing = (1.5, 1.5, 3.0)
    affine = np.diag([*spacing, 1.0])
    for i in range(num_cases):
        name = f"case_{i:03d}"
        slices = 1 if modality == "us" else num_slices
        body, organ, lesion = _case_masks(rng, size, slices)
        label = _labels(organ, lesion, values)
        if modality == "us":
            image = _us(rng, body[..., 0], organ[..., 0], lesion[..., 0])
            Image.fromarray(image.astype(np.uint8)).save(out / "images" / f"{name}.png")
            Image.fromarray(label[..., 0]).save(out / "masks" / f"{name}.png")
            continue
        image = (_ct if modality == "ct" else _mri)(rng, body, organ, lesion)
        if dicom:
            write_ct_dicom_series(image, spacing, out / "imagesTr" / name, name)
        else:
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), out / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / f"{name}.nii.gz")
    image_file, label_file = (
        ("./images/{}.png", "./masks/{}.png")
        if modality == "us"
        else ("./imagesTr/{}" + ("" if dicom else ".nii.gz"), "./labelsTr/{}.nii.gz")
    )
    meta = {
        "name": f"phantom-{modality}",
        "modality": {"0": modality.upper()},
        "labels": {"0": "background", **{str(v): n for v, n in values.items()}},
        "numTraining": num_cases,
        "training": [
            {"image": image_file.format(f"case_{i:03d}"), "label": label_file.format(f"case_{i:03d}")}
            for i in range(num_cases)
        ],
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out
