"""Swin-UMamba and Swin-UMamba† (Liu et al., MICCAI 2024) with per-modality input encoders.

Both networks share one VMamba encoder (ImageNet-initialised) and one decoder across all sites; the
layers that first see raw intensities form a *modality encoder*, one per modality (``ct``, ``mri``,
``us``), because a CT in Hounsfield units, a bias-field MRI and a speckled ultrasound image need
different first filters. The federation averages ``modality_encoders.<m>.*`` only among the sites
of modality ``m`` and everything else over all sites (see ``fed_swinumamba.params``).

Modality encoder contents (all parameters whose input is, or is one layer away from, raw intensities):
- ``SwinUMamba``: the 7x7 stride-2 conv stem, the patch-2 embedding of the stem output into the
  VMamba encoder, and the full-resolution residual skip block on the raw input (``encoder1`` in the paper).
- ``SwinUMambaD``: the patch-4 embedding of the raw input (ImageNet-initialised, see ``pretrained``).

Inputs are 2-D slices ``(B, in_chans, H, W)`` with H and W multiples of ``total_stride`` (32 with
the default 4 stages); other sizes raise a ValueError (pad them, or use sliding-window inference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

from .vmamba import BlockFactory, PatchEmbed2D, VMambaEncoder, VSSBlock

__all__ = ["MODALITIES", "ModalityEncoder", "SwinUMamba", "SwinUMambaD", "PatchExpand2D"]

MODALITIES = ("ct", "mri", "us")


class ModalityEncoder(nn.Module):
    """The input layers of one modality.

    With ``stem_width`` (Swin-UMamba): stem = Conv7x7/2 + InstanceNorm (B, C_in, H, W) -> (B, S, H/2, W/2),
    patch_embed of the stem output -> tokens (B, H/(2p), W/(2p), D), and skip = residual block on the
    raw input -> (B, S, H, W). Without (Swin-UMamba†): patch_embed of the raw input only.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int, stem_width: int | None = None, norm_name: str = "instance"
    ):
        super().__init__()
        if stem_width:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3),
                nn.InstanceNorm2d(stem_width, eps=1e-5, affine=True),
            )
            self.skip = UnetrBasicBlock(
                2, in_chans, stem_width, kernel_size=3, stride=1, norm_name=norm_name, res_block=True
            )
        else:
            self.stem = None
            self.skip = None
        self.patch_embed = PatchEmbed2D(stem_width or in_chans, embed_dim, patch_size)


def _check_modality(modules: nn.ModuleDict, modality: str) -> nn.Module:
    if modality not in modules:
        raise KeyError(f"this network has no encoder for modality {modality!r}; it was built for {sorted(modules)}")
    return modules[modality]


def _check_input(x: torch.Tensor, in_chans: int, stride: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected a (B, {in_chans}, H, W) batch of 2-D slices, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(
            f"input size {h}x{w} must be divisible by {stride}; pad it or use sliding-window inference with a roi that is"
        )


class SwinUMamba(nn.Module):
    """Swin-UMamba: conv stem, patch-2 VMamba encoder on it, UNETR-style residual skip and up blocks.

    Defaults are the paper's (about 60 M parameters with 3 modality encoders of 1 channel).
    ``forward(x, modality)`` returns logits (B, num_classes, H, W), or with ``deep_supervision`` in
    training mode a list of logits at full, 1/2, 1/4 and 1/8 resolution.
    """

    layer_groups = ("stem", "stage1", "stage2", "stage3", "stage4", "decoder", "heads")

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        modalities: Sequence[str] = MODALITIES,
        stem_width: int = 48,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 9, 2),
        d_state: int = 16,
        drop_path_rate: float = 0.0,
        norm_name: str = "instance",
        deep_supervision: bool = False,
        block_factory: BlockFactory | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.modality_encoders = nn.ModuleDict(
            {
                m: ModalityEncoder(in_chans, dims[0], patch_size=2, stem_width=stem_width, norm_name=norm_name)
                for m in modalities
            }
        )
        self.encoder = VMambaEncoder(
            patch_size=None,
            dims=dims,
            depths=depths,
            d_state=d_state,
            drop_path_rate=drop_path_rate,
            block_factory=block_factory,
        )
        self.total_stride = 2 * 2 * 2 ** (len(dims) - 1)  # stem, patch embedding, downsamplings
        widths = (stem_width, *dims)  # channels at 1/2, 1/4, ... of the input
        # Residual blocks on the stem output and on stages 1..3 (the last stage is the bottleneck).
        self.skips = nn.ModuleList(
            UnetrBasicBlock(2, widths[i], widths[i + 1], kernel_size=3, stride=1, norm_name=norm_name, res_block=True)
            for i in range(len(dims))
        )
        # Up blocks from the bottleneck (dims[-1]) to full resolution (stem_width), deepest first.
        up_out = (*reversed(widths[1:]), stem_width)  # e.g. 768, 384, 192, 96, 48
        up_in = (dims[-1], *up_out[:-1])
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(
                2, up_in[i], up_out[i], kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True
            )
            for i in range(len(up_out))
        )
        self.refine = UnetrBasicBlock(
            2, stem_width, stem_width, kernel_size=3, stride=1, norm_name=norm_name, res_block=True
        )
        self.heads = nn.ModuleList(UnetOutBlock(2, widths[i], num_classes) for i in range(4))

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor | list[torch.Tensor]:
        return self.decode(self.encode(x, modality))

    def encode(self, x: torch.Tensor, modality: str) -> list[torch.Tensor]:
        """The features the decoder reads: [raw-input skip (S, H), stem (S, H/2), stage i (dims[i], H/2**(i+2))...]."""
        _check_input(x, self.in_chans, self.total_stride)
        me = _check_modality(self.modality_encoders, modality)
        stem = me.stem(x)
        return [me.skip(x), stem, *self.encoder.forward_stages(me.patch_embed(stem))]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """``encode``'s features -> logits; the part of the network that is the same for every modality."""
        raw_skip, stem, *stages = features
        skips = [raw_skip] + [blk(f) for blk, f in zip(self.skips, [stem, *stages[:-1]])]
        y = stages[-1]
        decoded = []
        for up, skip in zip(self.up_blocks, reversed(skips)):
            y = up(y, skip)
            decoded.append(y)
        out = self.refine(y)
        if self.deep_supervision and self.training:
            # full, 1/2, 1/4, 1/8 resolution: decoder outputs with widths stem_width, dims[0], dims[1], dims[2]
            features = [out, decoded[-2], decoded[-3], decoded[-4]]
            return [head(f) for head, f in zip(self.heads, features)]
        return self.heads[0](out)


class PatchExpand2D(nn.Module):
    """Swin-Unet patch expanding: Linear(C -> s*s*C/s'), pixel-shuffle by ``scale``, LayerNorm.

    (B, H, W, C) -> (B, s*H, s*W, out_dim) with out_dim = C/2 for scale 2 (and C for the final x4).
    """

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim or dim // 2
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x).reshape(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return self.norm(x)


class DecoderStage(nn.Module):
    """Swin-UMamba† decoder stage: expand x2, concat the skip, Linear back to the skip width, VSS blocks."""

    def __init__(self, dim_below: int, dim_skip: int, depth: int, d_state: int, drop_path: Sequence[float]):
        super().__init__()
        self.expand = PatchExpand2D(dim_below, 2, dim_skip)
        self.concat_back = nn.Linear(2 * dim_skip, dim_skip)
        self.blocks = nn.ModuleList(VSSBlock(dim_skip, d_state=d_state, drop_path=drop_path[i]) for i in range(depth))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.concat_back(torch.cat([self.expand(x), skip], dim=-1))
        for blk in self.blocks:
            x = blk(x)
        return x


class SwinUMambaD(nn.Module):
    """Swin-UMamba†: patch-4 VMamba encoder on the input, Mamba decoder, final x4 patch expansion.

    About 27-28 M parameters at the default widths. The patch embedding is the modality encoder and
    loads the ImageNet weights (3 RGB input filters adapted to ``in_chans``, see ``pretrained``).
    """

    layer_groups = ("stem", "stage1", "stage2", "stage3", "stage4", "decoder", "heads")

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        modalities: Sequence[str] = MODALITIES,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 9, 2),
        decoder_depth: int = 2,
        d_state: int = 16,
        drop_path_rate: float = 0.0,
        deep_supervision: bool = False,
        block_factory: BlockFactory | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.modality_encoders = nn.ModuleDict(
            {m: ModalityEncoder(in_chans, dims[0], patch_size=4) for m in modalities}
        )
        self.encoder = VMambaEncoder(
            patch_size=None,
            dims=dims,
            depths=depths,
            d_state=d_state,
            drop_path_rate=drop_path_rate,
            block_factory=block_factory,
        )
        self.total_stride = 4 * 2 ** (len(dims) - 1)
        n_up = len(dims) - 1
        dpr = torch.linspace(drop_path_rate, 0, n_up * decoder_depth).tolist()
        self.decoder = nn.ModuleList(
            DecoderStage(
                dims[-1 - i], dims[-2 - i], decoder_depth, d_state, dpr[i * decoder_depth : (i + 1) * decoder_depth]
            )
            for i in range(n_up)
        )
        self.final_expand = PatchExpand2D(dims[0], 4, dims[0])
        # heads[0] at full resolution, heads[1:] on the decoder stages from the shallowest (1/4) to the deepest.
        self.heads = nn.ModuleList(nn.Conv2d(d, num_classes, 1) for d in (dims[0], *dims[:n_up]))

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor | list[torch.Tensor]:
        _check_input(x, self.in_chans, self.total_stride)
        me = _check_modality(self.modality_encoders, modality)
        stages = self.encoder.forward_stages(me.patch_embed(x))
        y = stages[-1].permute(0, 2, 3, 1)
        decoded = []
        for stage, skip in zip(self.decoder, reversed(stages[:-1])):
            y = stage(y, skip.permute(0, 2, 3, 1))
            decoded.append(y)
        full = self.final_expand(y).permute(0, 3, 1, 2)
        if self.deep_supervision and self.training:
            features = [full] + [d.permute(0, 3, 1, 2) for d in reversed(decoded)]
            return [head(f) for head, f in zip(self.heads, features)]
        return self.heads[0](full)
