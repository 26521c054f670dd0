"""Swin-UMamba networks: VMamba encoder, the two decoders of the paper, per-modality input encoders."""

from .config import ModelConfig, build_model, normalisation_state_names
from .swin_umamba import MODALITIES, ModalityEncoder, SwinUMamba, SwinUMambaD
from .vmamba import SS2D, VMambaEncoder, VSSBlock

__all__ = [
    "MODALITIES",
    "ModelConfig",
    "build_model",
    "normalisation_state_names",
    "ModalityEncoder",
    "SwinUMamba",
    "SwinUMambaD",
    "SS2D",
    "VMambaEncoder",
    "VSSBlock",
]
