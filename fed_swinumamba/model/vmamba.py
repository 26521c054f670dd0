"""VMamba encoder in the exact "v0" layout of the VMamba-T ImageNet checkpoint.

Swin-UMamba's encoder is VMamba (Liu et al., 2024): a hierarchy of VSS blocks, each a residual
2-D selective scan (SS2D) with no MLP. Module and parameter names follow the official
``vssmtiny_dp01_ckpt_epoch_292.pth`` so that its state dict loads without renaming
(``layers.{i}.blocks.{j}.self_attention.*``, ``layers.{i}.downsample.*``).

Tensors inside the blocks are channels-last ``(B, H, W, C)``; the encoder returns channels-first maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from ..ops import selective_scan

__all__ = [
    "PatchEmbed2D",
    "PatchMerging2D",
    "SS2D",
    "VSSBlock",
    "VSSLayer",
    "VMambaEncoder",
    "BlockFactory",
    "cross_scan",
    "cross_merge",
]

# Builds the block at (stage index, block index) with its dim and drop-path rate.
BlockFactory = Callable[[int, int, int, float], nn.Module]


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unfold a map into the four VMamba scan orders.

    (B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, and both of them reversed.
    """
    b, d, h, w = x.shape
    row_major = x.reshape(b, d, h * w)
    col_major = x.transpose(2, 3).reshape(b, d, h * w)
    forward = torch.stack([row_major, col_major], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fold the four scan outputs back to row-major order and sum them: (B, 4, D, L) -> (B, D, L)."""
    b, _, d, length = ys.shape
    reversed_back = ys[:, 2:4].flip(-1)
    row = ys[:, 0] + reversed_back[:, 0]
    col = ys[:, 1] + reversed_back[:, 1]
    col_as_row = col.reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    return row + col_as_row


class PatchEmbed2D(nn.Module):
    """Non-overlapping patch embedding, Conv2d(kernel = stride = patch) then LayerNorm.

    (B, C_in, H, W) -> (B, H/p, W/p, D).
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"PatchEmbed2D: input size {h}x{w} is not divisible by the patch size {self.patch_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """2x downsampling: concatenate each 2x2 neighbourhood, LayerNorm(4C), Linear(4C -> 2C).

    (B, H, W, C) -> (B, H/2, W/2, 2C). The concatenation order (x[0::2,0::2], x[1::2,0::2],
    x[0::2,1::2], x[1::2,1::2]) is the one the ImageNet weights were trained with.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            raise ValueError(
                f"PatchMerging2D: feature map {h}x{w} has an odd side; input sizes must be divisible by the network's total stride"
            )
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SS2D(nn.Module):
    """2-D selective scan: the token mixer of a VSS block.

    in_proj splits into a branch x (depthwise 3x3 conv + SiLU, then scanned in four directions with
    input-dependent dt, B, C) and a gate z; out = out_proj(LN(sum of the 4 scans) * SiLU(z)).
    The per-direction projections are stacked parameters (``x_proj_weight``, ``dt_projs_*``) as in
    the checkpoint; ``A_logs`` and ``Ds`` hold the 4 directions' d_inner rows one after another.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        num_directions: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.num_directions = num_directions
        k, d_inner = num_directions, self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True
        )
        self.act = nn.SiLU()
        # (K, R + 2N, D_inner): per direction, the projection of x to (dt, B, C).
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner))
        # (K, D_inner, R) and (K, D_inner): dt up-projection and its bias (the scan's delta_bias).
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        # (K * D_inner, N): A = -exp(A_logs); (K * D_inner,): skip connection D.
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self._init_ssm_parameters(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm_parameters(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """Mamba's initialisation: dt log-uniform in [dt_min, dt_max], A = -(1..N), D = 1."""
        bound = self.d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        dt_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_projs_weight, -dt_std, dt_std)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.A_logs.shape[0], -1)
        self.A_logs.copy_(torch.log(a))
        self.Ds.fill_(1.0)

    @torch.no_grad()
    def inner_l1(self) -> torch.Tensor:
        """L1 importance of each inner channel (D_inner,): the mean over the weights that read or write it of
        each weight's per-channel L1 norm divided by its mean (torch-pruning's group L1 criterion)."""
        d = self.d_inner
        x_rows, z_rows = self.in_proj.weight.abs().split(d)  # (D_inner, C) each
        per_weight = [
            x_rows.sum(1),
            z_rows.sum(1),
            self.conv2d.weight.abs().flatten(1).sum(1),
            self.x_proj_weight.abs().sum((0, 1)),
            self.dt_projs_weight.abs().sum((0, 2)),
            self.out_proj.weight.abs().sum(0),
        ]
        return torch.stack([w / w.mean().clamp_min(1e-12) for w in per_weight]).mean(0)

    @torch.no_grad()
    def prune_inner(self, removed: Sequence[int]) -> None:
        """Remove inner channels (indices into D_inner) from every tensor that has them: in_proj's x and z rows,
        the depthwise conv, the four directions' projections, A, D, out_norm and out_proj's columns."""
        d, k = self.d_inner, self.num_directions
        keep = torch.tensor(sorted(set(range(d)) - set(removed)), dtype=torch.long)
        if len(keep) != d - len(removed) or not len(keep):
            raise ValueError(f"SS2D: cannot remove channels {sorted(removed)} of {d}")
        every_direction = (torch.arange(k)[:, None] * d + keep).reshape(-1)

        def kept(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> nn.Parameter:
            return nn.Parameter(tensor.index_select(dim, index).clone(), requires_grad=tensor.requires_grad)

        self.in_proj.weight = kept(self.in_proj.weight, torch.cat([keep, keep + d]), 0)
        self.conv2d.weight, self.conv2d.bias = kept(self.conv2d.weight, keep, 0), kept(self.conv2d.bias, keep, 0)
        self.x_proj_weight = kept(self.x_proj_weight, keep, 2)
        self.dt_projs_weight = kept(self.dt_projs_weight, keep, 1)
        self.dt_projs_bias = kept(self.dt_projs_bias, keep, 1)
        self.A_logs, self.Ds = kept(self.A_logs, every_direction, 0), kept(self.Ds, every_direction, 0)
        self.out_norm.weight, self.out_norm.bias = (
            kept(self.out_norm.weight, keep, 0),
            kept(self.out_norm.bias, keep, 0),
        )
        self.out_proj.weight = kept(self.out_proj.weight, keep, 1)
        self.d_inner = n = len(keep)
        self.in_proj.out_features, self.out_proj.in_features = 2 * n, n
        self.conv2d.in_channels = self.conv2d.out_channels = self.conv2d.groups = n
        self.out_norm.normalized_shape = (n,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, D_inner, H, W)
        y = self._scan(x)  # (B, D_inner, H*W)
        y = self.out_norm(y.transpose(1, 2).reshape(b, h, w, self.d_inner))
        return self.out_proj(y * F.silu(z))

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        b, d_inner, h, w = x.shape
        k, n, length = self.num_directions, self.d_state, h * w
        xs = cross_scan(x)  # (B, K, D_inner, L)
        # Batched matrix products (k, c, d) @ (b, k, d, l): one MatMul node in ONNX (an Einsum ran 4x slower there).
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (B, K, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (B, K, D_inner, L)
        ys = selective_scan(
            xs.reshape(b, k * d_inner, length).float(),
            dts.reshape(b, k * d_inner, length).float(),
            -torch.exp(self.A_logs.float()),
            bs.float(),  # (B, K, N, L): one B per direction (grouped scan)
            cs.float(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
        ).reshape(b, k, d_inner, length)
        return cross_merge(ys, h, w).to(x.dtype)


class VSSBlock(nn.Module):
    """VMamba v0 block: x + DropPath(SS2D(LayerNorm(x))), no MLP. (B, H, W, C) -> same."""

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, d_state=d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class VSSLayer(nn.Module):
    """One encoder stage: its blocks, then (except in the last stage) a PatchMerging2D.

    ``forward`` returns both the stage output (taken before the downsample: the U-Net's skip) and
    the downsampled input of the next stage.
    """

    def __init__(self, blocks: Sequence[nn.Module], dim: int, downsample: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        for blk in self.blocks:
            x = blk(x)
        return x, (self.downsample(x) if self.downsample is not None else None)


class VMambaEncoder(nn.Module):
    """The VMamba-T backbone without its classifier.

    ``forward(x: (B, C, H, W))`` returns the 4 stage outputs, channels-first, each after its stage's
    blocks and before its downsample, with no final norm: shapes (B, dims[i], H / (p * 2**i), W / (p * 2**i)).
    ``patch_size=None`` builds the stages only (the network in front supplies the tokens, see
    ``forward_stages``), which is how Swin-UMamba puts modality-specific embeddings before a shared encoder.
    ``block_factory`` replaces the VSS blocks (the hybrid variant); parameter names of the SS2D part must stay.
    """

    def __init__(
        self,
        in_chans: int = 3,
        patch_size: int | None = 4,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 9, 2),
        d_state: int = 16,
        drop_path_rate: float = 0.0,
        block_factory: BlockFactory | None = None,
    ):
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"VMambaEncoder: dims {tuple(dims)} and depths {tuple(depths)} must have the same length")
        self.dims = tuple(dims)
        self.depths = tuple(depths)
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed2D(in_chans, dims[0], patch_size) if patch_size else None
        if block_factory is None:

            def block_factory(dim: int, stage: int, index: int, drop_path: float) -> nn.Module:
                return VSSBlock(dim, d_state=d_state, drop_path=drop_path)

        dpr = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())  # stochastic depth decay rule
        self.layers = nn.ModuleList(
            VSSLayer(
                [block_factory(dims[i], i, j, next(dpr)) for j in range(depths[i])],
                dims[i],
                downsample=i < len(dims) - 1,
            )
            for i in range(len(dims))
        )
        self.apply(init_vmamba_weights)

    @property
    def total_stride(self) -> int:
        """Input sides must be multiples of this (patch size times the 2x downsamplings)."""
        return (self.patch_size or 1) * 2 ** (len(self.dims) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.patch_embed is None:
            raise RuntimeError("VMambaEncoder was built without a patch embedding; call forward_stages(tokens)")
        h, w = x.shape[-2:]
        if h % self.total_stride or w % self.total_stride:
            raise ValueError(
                f"VMambaEncoder: input size {h}x{w} must be divisible by {self.total_stride} (patch {self.patch_size} x {len(self.dims) - 1} downsamplings)"
            )
        return self.forward_stages(self.patch_embed(x))

    def forward_stages(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens (B, H, W, dims[0]) channels-last -> 4 channels-first stage outputs."""
        features = []
        x = tokens
        for layer in self.layers:
            out, x = layer(x)
            features.append(out.permute(0, 3, 1, 2).contiguous())
        return features


def init_vmamba_weights(m: nn.Module) -> None:
    """VMamba's init: truncated-normal Linear weights (std .02), zero biases, unit LayerNorms.

    SS2D's own stacked parameters are initialised in SS2D and are untouched here.
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
