"""Deployable models: one modality's network from a checkpoint as a self-describing ONNX file.

``python -m fed_swinumamba export --checkpoint CKPT --modality M --out DIR`` writes ``DIR/<M>.onnx``: the
network of that modality (its encoder, and its norms where the checkpoint keeps them per modality), with a
dynamic batch and image size (sides multiples of the network's total stride), every selective scan as one
``ai.onnx.contrib::SelectiveScan`` node (``ops.scan_onnx``). The file's metadata (``fed_swinumamba``, JSON)
says what it is: format version, modality, model config, class names, and the checkpoint it came from (its
SHA-256, round and stage), so ``predict`` needs nothing else. The export is checked before it is kept: ONNX
Runtime's output must equal PyTorch's within ``PARITY_RTOL`` on a sample.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_modality_model
from .model import ModelConfig
from .ops import scan_onnx

__all__ = ["ExportError", "OnnxNetwork", "export_onnx", "set_metadata", "FORMAT_VERSION", "PARITY_RTOL"]

FORMAT_VERSION = 1
PARITY_RTOL = 1e-4  # largest |onnx - torch| over the largest |torch| on the sample
_META_KEY = "fed_swinumamba"
_INPUT, _OUTPUT = "image", "logits"


class ExportError(ValueError):
    """An export that cannot be written, read or trusted; the message names the file."""


class _OneModality(torch.nn.Module):
    """The network with its modality fixed: what the ONNX graph holds. (B, C, H, W) -> (B, classes, H, W)."""

    def __init__(self, model: torch.nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image, self.modality)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(checkpoint: str | Path, modality: str, out_dir: str | Path) -> Path:
    """Export ``modality``'s network of a checkpoint to ``out_dir/<modality>.onnx`` (written atomically)."""
    import onnx

    checkpoint = Path(checkpoint)
    ckpt, model = load_modality_model(checkpoint, modality)
    network = _OneModality(model, modality).eval()
    config, stride = ckpt.model_config, ckpt.model_config.total_stride
    sample = torch.randn(2, config.in_chans, 2 * stride, 3 * stride)
    side = {d: torch.export.Dim(f"{d}_over_{stride}", min=1, max=256) for d in ("height", "width")}
    dynamic = {"image": {0: torch.export.Dim("batch"), 2: stride * side["height"], 3: stride * side["width"]}}
    with torch.no_grad():
        program = torch.onnx.export(
            network,
            (sample,),
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_shapes=dynamic,
            custom_translation_table=scan_onnx.translation_table(),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    meta = {
        "format": FORMAT_VERSION,
        "modality": modality,
        "model_config": config.to_dict(),
        "class_names": list(ckpt.class_names),
        "precision": "float32",
        "source": {"checkpoint": checkpoint.name, "sha256": _sha256(checkpoint), "round": ckpt.server_round},
    }
    _set_props(proto, meta)
    target = Path(out_dir) / f"{modality}.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".onnx.tmp")
    onnx.save(proto, str(tmp))
    try:
        exported = OnnxNetwork(tmp)
        with torch.no_grad():
            expected = network(sample)
        _check_parity(exported(sample, modality), expected, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target


def _set_props(proto, meta: dict) -> None:
    import onnx

    onnx.helper.set_model_props(proto, {_META_KEY: json.dumps(meta)})


def set_metadata(path: Path, meta: dict) -> None:
    """Replace the description an exported file carries (``OnnxNetwork.meta``)."""
    import onnx

    proto = onnx.load(str(path))
    _set_props(proto, meta)
    onnx.save(proto, str(path))


def _check_parity(got: torch.Tensor, expected: torch.Tensor, path: Path) -> None:
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not error <= PARITY_RTOL:
        raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {error:.2e} relative (> {PARITY_RTOL})")


class OnnxNetwork:
    """An exported network in ONNX Runtime, called like the PyTorch one: ``net(image, modality) -> logits``."""

    INPUT, OUTPUT = _INPUT, _OUTPUT

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {self.path} does not exist")
        try:
            self.session = ort.InferenceSession(
                str(self.path), scan_onnx.session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own untyped errors (InvalidProtobuf, Fail, ...)
            raise ExportError(f"{self.path} is not a readable ONNX model: {err}") from err
        raw = self.session.get_modelmeta().custom_metadata_map.get(_META_KEY)
        if raw is None:
            raise ExportError(f"{self.path} has no {_META_KEY} metadata; was it written by `fed_swinumamba export`?")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_VERSION:
            raise ExportError(f"{self.path}: export format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
        self.meta = meta
        self.modality: str = meta["modality"]
        self.model_config = ModelConfig.from_dict(meta["model_config"])
        self.class_names: tuple[str, ...] = tuple(meta["class_names"])

    def check_modality(self, modality: str) -> None:
        if modality != self.modality:
            raise ExportError(f"{self.path}: exported for modality {self.modality!r}, not {modality!r}")

    def __call__(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        self.check_modality(modality)
        stride = self.model_config.total_stride
        if image.shape[-1] % stride or image.shape[-2] % stride:
            raise ValueError(f"{self.path}: image sides {tuple(image.shape[-2:])} must be multiples of {stride}")
        array = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run([_OUTPUT], {_INPUT: array})
        return torch.from_numpy(logits)
