"""Model configuration as data: what the coordinator sends to sites and writes into checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch.nn as nn

from .pruning import apply_widths
from .swin_umamba import MODALITIES, SwinUMamba, SwinUMambaD

VARIANTS = ("swin_umamba", "swin_umamba_d")
ENCODER_BLOCKS = ("vss", "hybrid")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter that fixes the network's parameter layout (defaults: the paper's)."""

    variant: str = "swin_umamba"
    in_chans: int = 1
    num_classes: int = 3
    modalities: tuple[str, ...] = MODALITIES
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 9, 2)
    stem_width: int = 48
    d_state: int = 16
    drop_path_rate: float = 0.0
    deep_supervision: bool = False
    encoder_block: str = "vss"
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # hybrid window attention only
    window_size: int = 7  # hybrid window attention only
    pruned: tuple[tuple[str, int], ...] = ()  # channels removed per pruning group (model.pruning.widths)

    def __post_init__(self) -> None:
        for name in ("modalities", "dims", "depths", "num_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "pruned", tuple((str(layer), int(count)) for layer, count in self.pruned))
        if self.variant not in VARIANTS:
            raise ValueError(f"model variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.encoder_block not in ENCODER_BLOCKS:
            raise ValueError(f"encoder block must be one of {ENCODER_BLOCKS}, got {self.encoder_block!r}")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        if len(self.dims) != len(self.depths) or len(self.dims) != 4:
            raise ValueError(f"dims and depths must both have 4 entries, got {self.dims} and {self.depths}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {self.num_classes}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @property
    def total_stride(self) -> int:
        """Input sides must be multiples of this (both variants reach 1/4 before the first stage)."""
        return 4 * 2 ** (len(self.dims) - 1)


def build_model(config: ModelConfig) -> nn.Module:
    """The network described by ``config``, freshly initialised (and pruned to the widths it records)."""
    block_factory = None
    if config.encoder_block == "hybrid":
        from .hybrid import hybrid_block_factory

        block_factory = hybrid_block_factory(
            d_state=config.d_state, num_heads=config.num_heads, window_size=config.window_size
        )
    common = dict(
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        modalities=config.modalities,
        dims=config.dims,
        depths=config.depths,
        d_state=config.d_state,
        drop_path_rate=config.drop_path_rate,
        deep_supervision=config.deep_supervision,
        block_factory=block_factory,
    )
    model = (
        SwinUMamba(stem_width=config.stem_width, **common) if config.variant == "swin_umamba" else SwinUMambaD(**common)
    )
    return apply_widths(model, config.pruned) if config.pruned else model


_NORMALISATIONS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)  # _NormBase: BatchNorm, InstanceNorm


def normalisation_state_names(model: nn.Module) -> list[str]:
    """The state-dict names of every normalisation layer's parameters and statistics (LayerNorm, GroupNorm,
    BatchNorm, InstanceNorm): what FedBN-style aggregation keeps per modality."""
    return [
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, _NORMALISATIONS)
        for name in module.state_dict()
    ]


__all__ = ["ModelConfig", "build_model", "normalisation_state_names", "VARIANTS", "ENCODER_BLOCKS"]
