"""Compressed model changes on the wire: 8-bit block quantisation, optional top-k, error feedback.

A message that carries the change of a set of float tensors (a site's update, or the coordinator's
change of the global model since the version a node holds) sends it as one :class:`Packet` of three
flat arrays, whatever the number of tensors (each array on the wire costs a header):

- ``values`` (int8): ``round(x / scale)`` of every element sent, tensor after tensor in ``names`` order;
- ``scales`` (float32): ``max |x| / 127`` of each block of ``block`` elements sent of one tensor (a block
  never spans two tensors, so a small tensor's scale is its own);
- ``mask`` (uint8, top-k only): the positions sent, one bit per element of every tensor (``np.packbits``);
  per tensor the ``ceil(topk * size)`` elements of largest magnitude.

The receiver knows the tensors' shapes (it holds them); the names travel beside the arrays. Each
element's error is at most half its block's scale (top-k: plus the magnitude of what was not sent).
:func:`with_error_feedback` keeps what quantisation and top-k left out as a residual that is added to
the next change (Seide et al., 2014; Karimireddy et al., 2019), so over rounds the sum of what was sent
tracks the sum of the true changes with a bounded difference (the last residual).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

log = logging.getLogger(__name__)

METHODS = ("none", "int8", "int8+topk")
_LEVELS = 127  # int8 levels each side of zero (-128 unused: the grid stays symmetric)
_VALUES, _SCALES, _MASK = "compressed.values", "compressed.scales", "compressed.mask"


class CompressionError(ValueError):
    """A packet that does not fit the tensors it claims to change."""


@dataclass(frozen=True)
class CompressionOptions:
    """How model changes are compressed (run config ``compression``, ``compression-block``, ``compression-topk``)."""

    method: str = "none"
    block: int = 256
    topk: float = 0.1  # fraction of each tensor's elements sent (int8+topk)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"compression must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.block < 1 or not 0 < self.topk <= 1:
            raise ValueError(f"compression block must be >= 1 and top-k in (0, 1], got {self.block}, {self.topk}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def sparse(self) -> bool:
        return self.method == "int8+topk"

    @property
    def downlink(self) -> CompressionOptions:
        """How the coordinator sends a node its copy's change: int8, dense even with top-k, so that every
        node trains from within one quantisation step of the global model (with top-k a node's copy would
        lack most of the last aggregate, and its update, relative to that stale point, is added to the
        current one). Top-k's loss on the demo is the uplink's as much (benchmarks/RESULTS.md)."""
        return CompressionOptions("int8", self.block) if self.enabled else self

    def to_config(self) -> dict:
        return {"compression": self.method, "compression-block": self.block, "compression-topk": self.topk}

    @classmethod
    def from_config(cls, c) -> CompressionOptions:
        """From the instructions, or from a run config resolved by ``run_config`` (the same names)."""
        return cls(str(c["compression"]), int(c["compression-block"]), float(c["compression-topk"]))


@dataclass(frozen=True)
class Packet:
    """The compressed change of the tensors ``names`` (see the module docstring)."""

    names: tuple[str, ...]
    values: np.ndarray  # int8
    scales: np.ndarray  # float32
    mask: np.ndarray | None = None  # uint8 bits, top-k only

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that go on the wire."""
        out = {_VALUES: self.values, _SCALES: self.scales}
        return out | ({_MASK: self.mask} if self.mask is not None else {})

    @classmethod
    def from_arrays(cls, names, arrays: Mapping[str, np.ndarray]) -> Packet:
        missing = {_VALUES, _SCALES} - set(arrays)
        if missing:
            raise CompressionError(f"a compressed message lacks {sorted(missing)}")
        mask = arrays.get(_MASK)
        return cls(tuple(names), np.asarray(arrays[_VALUES]), np.asarray(arrays[_SCALES]), mask)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _quantise(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 per-block scales of the flat float32 ``x``."""
    padded = np.zeros(_blocks(x.size, block) * block, np.float32)
    padded[: x.size] = x
    rows = padded.reshape(-1, block)
    scales = (np.abs(rows).max(axis=1) / _LEVELS).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    values = np.clip(np.rint(rows / safe), -_LEVELS, _LEVELS).astype(np.int8)
    return values.reshape(-1)[: x.size], scales


def _dequantise(values: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    return values.astype(np.float32) * np.repeat(scales, block)[: values.size]


def _kept(x: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``ceil(fraction * size)`` elements of largest magnitude of the flat ``x``."""
    k = min(x.size, math.ceil(fraction * x.size))
    keep = np.zeros(x.size, bool)
    keep[np.argpartition(np.abs(x), x.size - k)[x.size - k :]] = True
    return keep


def compress(changes: Mapping[str, np.ndarray], options: CompressionOptions) -> Packet:
    """The packet of ``changes`` (float tensors), in their order."""
    values, scales, masks = [], [], []
    for name, change in changes.items():
        if not np.issubdtype(np.asarray(change).dtype, np.floating):
            raise CompressionError(f"{name}: only float tensors are compressed, got {np.asarray(change).dtype}")
        flat = np.asarray(change, np.float32).reshape(-1)
        if options.sparse:
            keep = _kept(flat, options.topk)
            masks.append(keep)
            flat = flat[keep]
        v, s = _quantise(flat, options.block)
        values.append(v)
        scales.append(s)
    mask = np.packbits(np.concatenate(masks)) if options.sparse and masks else None
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return Packet(tuple(changes), cat(values, np.int8), cat(scales, np.float32), mask)


def decompress(packet: Packet, shapes: Mapping[str, tuple[int, ...]], block: int) -> dict[str, np.ndarray]:
    """The float32 changes a packet carries; ``shapes`` are the receiver's (a packet naming a tensor it
    lacks, or of the wrong length, is refused)."""
    unknown = [n for n in packet.names if n not in shapes]
    if unknown:
        raise CompressionError(f"a compressed message changes tensors this side does not hold, e.g. {unknown[:3]}")
    sizes = [math.prod(shapes[n]) for n in packet.names]
    if packet.mask is not None:
        if packet.mask.size != _blocks(sum(sizes), 8):
            raise CompressionError(f"top-k mask of {packet.mask.size} bytes for {sum(sizes)} elements")
        bits = np.unpackbits(packet.mask, count=sum(sizes)).astype(bool)
        masks = np.split(bits, np.cumsum(sizes)[:-1])
        sent = [int(m.sum()) for m in masks]
    else:
        masks, sent = [None] * len(sizes), sizes
    if packet.values.size != sum(sent) or packet.scales.size != sum(_blocks(n, block) for n in sent):
        raise CompressionError(
            f"compressed message of {packet.values.size} values and {packet.scales.size} scales does not fit "
            f"{len(sizes)} tensors of {sum(sent)} sent elements in blocks of {block}"
        )
    out, v, s = {}, 0, 0
    for name, size, keep, n in zip(packet.names, sizes, masks, sent, strict=True):
        nb = _blocks(n, block)
        part = _dequantise(packet.values[v : v + n], packet.scales[s : s + nb], block)
        v, s = v + n, s + nb
        if keep is not None:
            dense = np.zeros(size, np.float32)
            dense[keep] = part
            part = dense
        out[name] = part.reshape(shapes[name])
    return out


def with_error_feedback(
    changes: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray], options: CompressionOptions
) -> tuple[Packet, dict[str, np.ndarray]]:
    """The packet of ``changes`` plus what earlier packets left out (``residual``, zero for a tensor it
    lacks: e.g. a group unfrozen this round), and the new residual: what this packet leaves out."""
    corrected = {k: np.asarray(v, np.float32) for k, v in changes.items()}
    for k, v in corrected.items():
        if k in residual and np.shape(residual[k]) == v.shape:
            corrected[k] = v + residual[k]
    packet = compress(corrected, options)
    sent = decompress(packet, {k: v.shape for k, v in corrected.items()}, options.block)
    return packet, {k: corrected[k] - sent[k] for k in corrected}


def uncompressed_bytes(changes: Mapping[str, np.ndarray]) -> int:
    """What the tensors of ``changes`` would cost sent as float32."""
    return sum(4 * int(np.asarray(v).size) for v in changes.values())


def save_residual(path: Path, residual: Mapping[str, np.ndarray], server_round: int) -> None:
    """Keep a site's residual on its disk (atomically: a killed write leaves the previous one), so that a
    restarted SuperNode goes on from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in residual.items()}
    save_file(tensors, str(tmp), metadata={"round": str(server_round)})
    os.replace(tmp, path)


def load_residual(path: Path, server_round: int) -> dict[str, np.ndarray]:
    """The residual a site kept in an earlier round of the run now going on, else none: a run's first
    round starts from zero (as does a tensor the residual lacks). An unreadable file is reported and
    not used: the residual only carries what earlier packets left out."""
    if server_round <= 1 or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            saved_round = int((f.metadata() or {}).get("round", "0"))
        residual = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        log.warning("compression residual %s is unreadable (%s); starting from zero", path, err)
        return {}
    return residual if saved_round < server_round else {}
