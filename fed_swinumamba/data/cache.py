"""The site's on-disk cache of preprocessed cases: compact, read slice by slice, never stale.

Flower starts a fresh ClientApp process for every message, so each message must find the site's data
ready without reading it all: a case is preprocessed once (MONAI transforms) into a folder holding

- ``image.npy``: (S, H, W) float16, the normalised intensities, one slice contiguous per index;
- ``label.npy``: (S, H, W) uint8, class indices;
- ``meta.json``: case, patient, shape, voxel spacing (mm along H, W, S), and for each class the slices
  where it is present (foreground oversampling draws from these without reading the labels).

Slices are read with ``numpy.fromfile`` at their offset, not memory-mapped: pages of a mapping stay in the
process's resident memory once touched, reads do not. An entry is keyed by the identity of its source
files (path, size, modification time) and by the preprocessing (settings and ``PREPROCESSING_VERSION``):
a replaced file or a changed transform is preprocessed again. Entries are written into a temporary folder
and renamed into place, so a process killed mid-write leaves nothing that is later read as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump whenever preprocessing code changes what a cached array means: every entry is then rebuilt.
PREPROCESSING_VERSION = 3
IMAGE_DTYPE, LABEL_DTYPE = np.float16, np.uint8
_META, _IMAGE, _LABEL, _TMP = "meta.json", "image.npy", "label.npy", ".tmp-"
_STALE_SECONDS = 3600.0  # an unused entry or a temporary folder this old is removed


def default_cache_root(site: str) -> Path:
    """``$XDG_CACHE_HOME/fed_swinumamba/<site>`` (``~/.cache/...``): outside the (often read-only) data folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fed_swinumamba" / "sites" / site


def file_identity(path: Path) -> list:
    """What makes a source file's content new: its path, size and modification time (every file of a DICOM folder)."""
    if path.is_dir():
        return [str(path), [file_identity(p) for p in sorted(path.iterdir()) if p.is_file()]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def cache_key(sources: list[Path], settings: object) -> str:
    """Key of a case's entry: its source files' identities, the preprocessing settings and version."""
    text = json.dumps(
        [PREPROCESSING_VERSION, settings, [file_identity(p) for p in sources]], sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case on disk. Nothing is read until asked for."""

    case_id: str
    patient: str
    folder: Path
    shape: tuple[int, int, int]  # (S, H, W)
    spacing: tuple[float, float, float]  # mm along H, W and S
    slices_with: dict[int, tuple[int, ...]]  # class index -> slices where it is present
    constant: bool  # every voxel of the image has the same value (a blank export)

    @property
    def num_slices(self) -> int:
        return self.shape[0]

    def _read(self, name: str, dtype, start: int, count: int) -> np.ndarray:
        _, height, width = self.shape
        path = self.folder / name
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            read_header(f)
            offset = f.tell()
        n = height * width
        data = np.fromfile(path, dtype=dtype, count=count * n, offset=offset + start * n * np.dtype(dtype).itemsize)
        return data.reshape(count, height, width)

    def image_slices(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """(count, H, W) float16 intensities of slices ``start`` ..."""
        return self._read(_IMAGE, IMAGE_DTYPE, start, self.num_slices - start if count is None else count)

    def label_slices(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """(count, H, W) uint8 class indices of slices ``start`` ..."""
        return self._read(_LABEL, LABEL_DTYPE, start, self.num_slices - start if count is None else count)

    @classmethod
    def open(cls, folder: Path) -> CachedCase:
        meta = json.loads((folder / _META).read_text())
        return cls(
            meta["case"],
            meta["patient"],
            folder,
            tuple(meta["shape"]),
            tuple(meta["spacing"]),
            {int(c): tuple(s) for c, s in meta["slices_with"].items()},
            bool(meta["constant"]),
        )


def write_entry(
    folder: Path, case_id: str, patient: str, image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float]
) -> CachedCase:
    """Store one preprocessed case (image and label (S, H, W)) atomically at ``folder``."""
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must both be (S, H, W)")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{_TMP}{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / _IMAGE, np.ascontiguousarray(image, dtype=IMAGE_DTYPE))
        np.save(tmp / _LABEL, np.ascontiguousarray(label, dtype=LABEL_DTYPE))
        present = label.reshape(label.shape[0], -1)
        slices_with = {int(c): np.flatnonzero((present == c).any(axis=1)).tolist() for c in np.unique(label) if c != 0}
        meta = {
            "case": case_id,
            "patient": patient,
            "shape": list(image.shape),
            "spacing": [float(s) for s in spacing],
            "slices_with": slices_with,
            "constant": bool(image.size == 0 or image.min() == image.max()),
        }
        (tmp / _META).write_text(json.dumps(meta))
        try:
            tmp.rename(folder)  # atomic: the entry appears complete or not at all
        except OSError:
            if not (folder / _META).is_file():  # not another process that finished the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(parent, keep=folder)
    return CachedCase.open(folder)


def read_entry(folder: Path) -> CachedCase | None:
    """The entry at ``folder``, or None when there is none (or it is unreadable: it is then rebuilt)."""
    try:
        return CachedCase.open(folder)
    except (OSError, ValueError, KeyError):
        return None


def _remove_stale(parent: Path, keep: Path) -> None:
    """Remove a case's other entries (older files or settings) and dead writes, once they are an hour old:
    a process that opened one of them a moment ago may still be reading it."""
    now = time.time()
    for other in parent.iterdir():
        try:
            if other != keep and now - other.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(other, ignore_errors=True)
        except FileNotFoundError:
            pass
