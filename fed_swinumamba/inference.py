"""Segmenting new images with a trained checkpoint (``python -m fed_swinumamba predict``).

The checkpoint (or an ONNX export of it, ``fed_swinumamba.export``) describes its network, so nothing else is needed; a site config, when given, supplies
that site's preprocessing, geometry (orientation, spacing, channel), slice axis, patch size and label
values. Images go through the same MONAI loading, geometry and intensity transforms as training data,
then slice-wise sliding-window inference; the mask is brought back through the inverse of the geometry
transforms (nearest neighbour) and written on the input's own voxel grid: NIfTI with the input's affine
and header, PNG at its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_modality_model
from .data.datasets import geometry, intensity_transform, slices_first
from .data.site_config import DEFAULT_PREPROCESSING, DataSpec, TrainingSpec, load_site_config
from .export import OnnxNetwork
from .training import predict_slices

NIFTI_SUFFIXES, PNG_SUFFIXES = (".nii.gz", ".nii"), (".png",)


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES + PNG_SUFFIXES)


class Segmenter:
    """One modality's network (from a checkpoint or an export), with that modality's preprocessing."""

    def __init__(
        self,
        network: torch.nn.Module | OnnxNetwork,
        modality: str,
        class_names: Sequence[str],
        *,
        preprocessing: dict | None = None,
        data: DataSpec | None = None,
        roi_size: Sequence[int] = TrainingSpec.patch_size,
        label_values: Sequence[int] | None = None,
    ):
        self.network = network
        data = data or DataSpec(root=Path("."))
        self.modality, self.slice_axis, self.channel, self.roi_size = (
            modality,
            data.slice_axis,
            data.channel,
            tuple(roi_size),
        )
        # Class index -> value written to the mask (the site's own label values when known).
        self.lut = torch.as_tensor(
            label_values if label_values is not None else range(len(class_names) + 1), dtype=torch.int64
        )
        self.load = LoadImaged("image", image_only=True, ensure_channel_first=True)
        self.geometry = Compose(geometry(data.orientation, data.spacing, keys=("image",)))
        self.invert = (
            Invertd("mask", transform=self.geometry, orig_keys="image", nearest_interp=True)
            if self.geometry.transforms
            else None
        )
        self.intensity = intensity_transform(
            modality, preprocessing if preprocessing is not None else DEFAULT_PREPROCESSING[modality]
        )

    @classmethod
    def from_files(
        cls, model: str | Path, modality: str, site_config: str | Path | None = None, device: str = "cpu"
    ) -> Segmenter:
        """``model``: a checkpoint (.safetensors) or an export of ``fed_swinumamba export`` (.onnx)."""
        network, class_names = load_network(model, modality, device)
        if site_config is None:
            return cls(network, modality, class_names)
        site = load_site_config(site_config)
        if site.modality != modality:
            raise ValueError(f"{site_config}: site {site.site} is {site.modality}, not {modality}")
        index_of = site.class_mapping_for(list(class_names))  # site value -> class index
        values = [0] * (len(class_names) + 1)
        for value, index in index_of.items():
            if index:
                values[index] = value
        return cls(
            network,
            modality,
            class_names,
            preprocessing=site.preprocessing,
            data=site.data,
            roi_size=site.training.patch_size,
            label_values=values,
        )

    def _one_channel(self, image: MetaTensor, path: str | Path) -> MetaTensor:
        if image.shape[0] == 1:
            return image
        if str(path).lower().endswith(PNG_SUFFIXES):  # an RGB(A) rendering of a grey frame, as in training
            return image[:3].mean(dim=0, keepdim=True)
        if self.channel is None or self.channel >= image.shape[0]:
            raise ValueError(
                f"{path}: image has {image.shape[0]} channels; give a site config whose data.channel says which to use"
            )
        return image[self.channel : self.channel + 1]

    def segment(self, path: str | Path) -> np.ndarray:
        """The mask of one image, on the image's own grid (as MONAI loads it)."""
        loaded = self.load({"image": str(path)})
        item = self.geometry({"image": self._one_channel(loaded["image"], path)})
        image = self.intensity(item)["image"]  # (1, X, Y[, Z]) on the site's grid
        slices = slices_first(image, self.slice_axis)  # (S, H, W)
        labels = predict_slices(self.network, self.modality, slices, self.roi_size)  # (S, H, W)
        grid = labels[0] if image.ndim == 3 else labels.movedim(0, self.slice_axis)  # 2-D image: its one slice
        if self.invert is not None:  # back on the input's grid
            item["mask"] = MetaTensor(grid[None].float(), affine=image.affine)
            grid = self.invert(item)["mask"][0].round().long()
        return self.lut[grid.long()].numpy()

    def predict_file(self, source: Path, target: Path) -> Path:
        mask = self.segment(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
        if source.name.lower().endswith(PNG_SUFFIXES):
            Image.fromarray(mask.T.astype(dtype)).save(target)  # MONAI reads PNGs as (W, H)
        else:
            original = nib.load(str(source))
            header = original.header.copy()
            header.set_data_dtype(dtype)
            nib.save(nib.Nifti1Image(mask.astype(dtype), original.affine, header), str(target))
        return target


def load_network(
    path: str | Path, modality: str, device: str = "cpu"
) -> tuple[torch.nn.Module | OnnxNetwork, tuple[str, ...]]:
    """``modality``'s network and the class names from a checkpoint or an ONNX export (by the file's suffix)."""
    path = Path(path)
    if path.suffix == ".onnx":
        if device != "cpu":
            raise ValueError(f"{path}: an ONNX export runs on the CPU (ONNX Runtime), not on {device}")
        network = OnnxNetwork(path)
        network.check_modality(modality)
        return network, network.class_names
    ckpt, model = load_modality_model(path, modality)
    return model.to(device).eval(), ckpt.class_names


def predict(segmenter: Segmenter, source: str | Path, target: str | Path, progress: bool = True) -> list[Path]:
    """Segment a file (written to ``target``) or every image of a folder (written under ``target``)."""
    source, target = Path(source), Path(target)
    if source.is_file():
        return [segmenter.predict_file(source, target)]
    if not source.is_dir():
        raise FileNotFoundError(f"input {source} does not exist")
    files = sorted(p for p in source.iterdir() if p.is_file() and _is_image(p))
    if not files:
        raise FileNotFoundError(f"input folder {source} holds no NIfTI (.nii, .nii.gz) or PNG image")
    return [
        segmenter.predict_file(f, target / f.name)
        for f in tqdm(files, desc="segmenting", unit="image", disable=not progress)
    ]
