"""Hybrid ("CFFM") encoder block: Swin window attention and VMamba's SS2D in parallel, gated.

SS2D mixes information along whole scan lines with input-dependent (selective) dynamics; a 7x7
window attention is a static, strictly local mixer. Each hybrid block runs both on the same
normalised input and lets a learned per-channel gate choose between them::

    h = ln_1(x)                                   (B, H, W, C) channels-last
    F_dyn = self_attention(h)                     SS2D, the "dynamic" branch
    F_stat = window_attention(h)                  W-MSA (even blocks) / SW-MSA (odd blocks)
    G = sigmoid(gate.weight @ [F_dyn; F_stat] + gate.bias)
    out = x + DropPath(G * F_dyn + (1 - G) * F_stat)

Parameter names keep VMamba's ``ln_1.*`` and ``self_attention.*``, so the VMamba-T ImageNet file
loads into a hybrid encoder with ``pretrained.load_vmamba_checkpoint`` unchanged; the window
attention (``window_attention.attn.*``, timm's ``WindowAttention``) can be initialised from a Swin-T
ImageNet file with ``load_swin_attention``. Note that Swin trained that attention on the output of
its own ``norm1``, whereas here it reads VMamba's ``ln_1`` output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse

from .pretrained import CheckpointError, PretrainedReport, read_checkpoint
from .vmamba import SS2D, BlockFactory, VMambaEncoder

__all__ = ["ShiftedWindowAttention", "FusionGate", "HybridVSSBlock", "hybrid_block_factory", "load_swin_attention"]

SWIN_T_HINT = "timm's swin_tiny_patch4_window7_224 weights (a flat state dict, .safetensors or .bin) or Microsoft's swin_tiny_patch4_window7_224.pth"
# Swin attention tensors by block; relative_position_index (and attn_mask) are buffers and never taken from a file.
_SWIN_ATTENTION_TENSORS = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table")
_SWIN_ATTENTION_KEY = re.compile(
    r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(" + "|".join(map(re.escape, _SWIN_ATTENTION_TENSORS)) + ")"
)
_HYBRID_ONLY = ("window_attention.", "gate.")  # parameters a hybrid block adds to a VSS block


def _axis_regions(size: int, padded: int, shift: int, device: torch.device) -> torch.Tensor:
    """Region of each index along one padded axis: 0 = wraps around in the cyclic shift, 1 = interior, 2 = padding."""
    index = torch.arange(padded, device=device)
    regions = torch.ones(padded, dtype=torch.long, device=device)
    regions[index < shift] = 0
    regions[index >= size] = 2
    return regions


class ShiftedWindowAttention(nn.Module):
    """Swin W-MSA / SW-MSA on a channels-last map of any size: (B, H, W, C) -> (B, H, W, C).

    As in the original Swin, the map is zero-padded at the bottom/right to whole windows, then (for
    SW-MSA) cyclically shifted by ``shift_size``, and tokens that the shift brings together from
    opposite borders are masked from each other. Two choices differ from timm's block:
    - padded tokens are masked out too (timm lets them take part), so real outputs do not depend on
      the padding;
    - along a side no longer than the window there is no shift and one padded window: exactly a
      window equal to the map whose relative-position bias is the matching crop of the
      window_size x window_size table, so one (pretrained) table serves every feature-map size
      (timm instead builds or interpolates a smaller table per resolution).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0):
        super().__init__()
        if window_size < 1 or not 0 <= shift_size < window_size:
            raise ValueError(
                f"ShiftedWindowAttention: need window_size >= 1 and 0 <= shift_size < window_size, got {window_size} and {shift_size}"
            )
        self.window_size = window_size
        self.shift_size = shift_size
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        ws = self.window_size
        shift = (self.shift_size if h > ws else 0, self.shift_size if w > ws else 0)
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        mask = self._attention_mask(h, w, hp, wp, shift, x)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, (ws, ws)).view(-1, ws * ws, c)  # (B * num_windows, ws*ws, C)
        windows = self.attn(windows, mask=mask)
        x = window_reverse(windows.view(-1, ws, ws, c), (ws, ws), hp, wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :h, :w].contiguous()

    def _attention_mask(
        self, h: int, w: int, hp: int, wp: int, shift: tuple[int, int], like: torch.Tensor
    ) -> torch.Tensor | None:
        """Additive (num_windows, ws*ws, ws*ws) mask, 0 within a region and -inf across regions; None if all one region.

        Regions are labelled on the unshifted padded map and shifted with it, so every window holds
        at most the pieces of one shifted-grid window plus padding, each piece its own region.
        Every token sees at least itself, so no softmax row is fully masked.
        """
        if (hp, wp) == (h, w) and not any(shift):
            return None
        rows = _axis_regions(h, hp, shift[0], like.device)
        cols = _axis_regions(w, wp, shift[1], like.device)
        labels = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
        if any(shift):
            labels = torch.roll(labels, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        ws = self.window_size
        labels = window_partition(labels, (ws, ws)).view(-1, ws * ws)  # (num_windows, ws*ws)
        different = labels[:, :, None] != labels[:, None, :]
        return torch.zeros(different.shape, dtype=like.dtype, device=like.device).masked_fill(different, float("-inf"))


class FusionGate(nn.Module):
    """Per-channel gate G = sigmoid(weight @ [a; b] + bias); returns G * a + (1 - G) * b.

    ``weight`` (C, 2C) and ``bias`` (C,) have nn.Linear(2C -> C)'s layout and start at zero, so both
    branches start with weight exactly 0.5. They are plain parameters rather than an nn.Linear
    because VMambaEncoder re-initialises every nn.Linear (truncated normal) after building its blocks.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, 2 * dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(torch.cat([a, b], dim=-1), self.weight, self.bias))
        return g * a + (1 - g) * b


class HybridVSSBlock(nn.Module):
    """VSS block with a parallel (shifted) window-attention branch and a learned gate. (B, H, W, C) -> same."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        drop_path: float = 0.0,
        *,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"HybridVSSBlock: num_heads {num_heads} must be a positive divisor of dim {dim}")
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, d_state=d_state)
        self.window_attention = ShiftedWindowAttention(dim, num_heads, window_size, shift_size)
        self.gate = FusionGate(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        return x + self.drop_path(self.gate(self.self_attention(h), self.window_attention(h)))


def hybrid_block_factory(
    d_state: int = 16, num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7
) -> BlockFactory:
    """A ``VMambaEncoder`` block factory: HybridVSSBlocks with ``num_heads[stage]`` heads, SW-MSA on odd block indices."""
    num_heads = tuple(num_heads)

    def build(dim: int, stage: int, index: int, drop_path: float) -> nn.Module:
        if stage >= len(num_heads):
            raise ValueError(
                f"hybrid_block_factory: no head count for stage {stage}; num_heads {num_heads} has {len(num_heads)} entries"
            )
        heads = num_heads[stage]
        if heads < 1 or dim % heads:
            raise ValueError(
                f"hybrid_block_factory: stage {stage} has dim {dim}, which num_heads[{stage}] = {heads} does not divide"
            )
        shift = window_size // 2 if index % 2 else 0
        return HybridVSSBlock(dim, d_state, drop_path, num_heads=heads, window_size=window_size, shift_size=shift)

    return build


def _hybrid_encoder(module: nn.Module) -> tuple[VMambaEncoder, str]:
    """The VMamba encoder in ``module`` and its name prefix."""
    if isinstance(module, VMambaEncoder):
        return module, ""
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, VMambaEncoder):
        return encoder, "encoder."
    raise TypeError(
        f"cannot load Swin attention into {type(module).__name__}: expected a VMambaEncoder or a network with .encoder"
    )


def load_swin_attention(module: nn.Module, path: str | Path) -> PretrainedReport:
    """Initialise the window-attention branches of a hybrid encoder from a Swin ImageNet checkpoint.

    ``module`` is a ``VMambaEncoder`` built with ``hybrid_block_factory`` or a network with such an
    ``.encoder``. Swin block (i, j)'s ``attn.{qkv,proj}.{weight,bias}`` and
    ``attn.relative_position_bias_table`` go to hybrid block (i, j)'s ``window_attention.attn``;
    every other key (norms, MLPs, downsampling, patch embedding, head, the index/mask buffers, and
    blocks beyond the encoder's depths) is reported dropped. Hybrid blocks the file lacks (Swin-T
    has depths 2-2-6-2, VMamba-T 2-2-9-2) stay fresh. The report covers the hybrid-only parameters:
    ``loaded`` lists those taken from the file, ``fresh`` the rest (the gates always among them);
    SS2D parameters are not this function's and appear in neither. Nothing is copied unless every
    tensor fits: a shape mismatch raises CheckpointError naming the key and both shapes, and a
    block with only some of its five attention tensors in the file is an error too.

    The file may be timm's flat state dict (``model.safetensors`` or ``pytorch_model.bin``) or
    Microsoft's ``{"model": state_dict, ...}`` release or training checkpoint (its pickled yacs
    config is kept as inert data; see ``pretrained.read_checkpoint``). Both name the attention
    tensors alike; they differ only in where the downsampling sits, which is dropped anyway.
    """
    encoder, prefix = _hybrid_encoder(module)
    blocks = {
        (i, j): block
        for i, layer in enumerate(encoder.layers)
        for j, block in enumerate(layer.blocks)
        if isinstance(block, HybridVSSBlock)
    }
    if not blocks:
        raise TypeError(
            f"{type(module).__name__} has no HybridVSSBlock; build its encoder with block_factory=hybrid_block_factory(...)"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Swin checkpoint {path} does not exist; pass the local path of {SWIN_T_HINT}")
    weights = read_checkpoint(path, what="Swin checkpoint")
    ckpt = weights.state
    if not any(_SWIN_ATTENTION_KEY.fullmatch(key) for key in ckpt):
        raise CheckpointError(
            f"{path} holds no Swin attention tensors (layers.<i>.blocks.<j>.attn.qkv.weight, ...); is it {SWIN_T_HINT}?"
        )

    report = PretrainedReport.of(path, weights)
    updates: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (stage, block) -> attention tensor name -> value
    for key, value in ckpt.items():
        match = _SWIN_ATTENTION_KEY.fullmatch(key)
        where = (int(match[1]), int(match[2])) if match else None
        if where not in blocks:
            report.dropped.append(key)
            continue
        target = blocks[where].window_attention.attn.get_parameter(match[3])
        if target.shape != value.shape:
            raise CheckpointError(
                f"{path}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}"
            )
        updates.setdefault(where, {})[match[3]] = value
    for (i, j), tensors in updates.items():
        missing = [name for name in _SWIN_ATTENTION_TENSORS if name not in tensors]
        if missing:  # e.g. Swin V2 files have q_bias / v_bias instead of qkv.bias
            raise CheckpointError(
                f"{path}: Swin block layers.{i}.blocks.{j} has an incomplete attention, missing attn.{', attn.'.join(missing)}; is it {SWIN_T_HINT}?"
            )

    with torch.no_grad():
        for (i, j), tensors in updates.items():
            attn = blocks[(i, j)].window_attention.attn
            for name, value in tensors.items():
                target = attn.get_parameter(name)
                target.copy_(value.to(target.dtype))
                report.loaded.append(f"{prefix}layers.{i}.blocks.{j}.window_attention.attn.{name}")
    report.loaded.sort()
    loaded = set(report.loaded)
    report.fresh = sorted(
        full
        for (i, j), block in blocks.items()
        for name, _ in block.named_parameters()
        if name.startswith(_HYBRID_ONLY) and (full := f"{prefix}layers.{i}.blocks.{j}.{name}") not in loaded
    )
    return report
