"""ImageNet initialisation from the official VMamba-T checkpoint.

The file is ``vssmtiny_dp01_ckpt_epoch_292.pth`` (VMamba-T "v0", 82.2 % ImageNet-1k top-1), published
on VMamba's GitHub release page under the tag ``#v0cls``. Nothing here downloads it: the user gives
its local path. It is a VMamba training checkpoint: ``{model, optimizer, lr_scheduler, max_accuracy,
scaler, epoch, config}`` with ``config`` a pickled yacs ``CfgNode`` (and ``model_ema`` for EMA runs).
It is read with ``restricted_pickle.load_untrusted``, which never runs code from the file; the
weights come from its ``"model"`` entry (the weights VMamba's reported accuracy is measured on),
or from another entry such as ``"model_ema"`` if asked, and the report says which.

Rules, applied identically to a bare ``VMambaEncoder`` and to the encoder inside ``SwinUMamba`` /
``SwinUMambaD``:
- ``norm.*`` and ``head.*`` (the ImageNet classifier) are dropped;
- ``layers.*`` must match the encoder exactly: a key the encoder lacks, or a shape mismatch, is an
  error naming the key and both shapes — never a silent skip;
- ``patch_embed.*`` goes into every patch embedding that sees the image (the encoder's own, or
  each modality encoder's). Input channels other than 3 follow timm's ``adapt_input_conv``:
  for 1 channel the RGB filters are summed (a grey image equals R = G = B, so the first
  activations are unchanged for grey input); for C > 3 the RGB filters are tiled and scaled by
  3 / C. Swin-UMamba embeds its 48-channel stem output with patch 2, which has no ImageNet
  counterpart: those embeddings stay freshly initialised, as in the paper, and the report says so.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.models import adapt_input_conv

from ..restricted_pickle import CodeExecutionRefused, InertObject, load_untrusted
from .config import ModelConfig, build_model
from .vmamba import PatchEmbed2D, VMambaEncoder

__all__ = [
    "PretrainedReport",
    "CheckpointError",
    "CheckpointWeights",
    "initial_model",
    "load_vmamba_checkpoint",
    "read_checkpoint",
]

VMAMBA_T_URL_HINT = "VMamba GitHub releases, tag #v0cls, file vssmtiny_dp01_ckpt_epoch_292.pth"
_CLASSIFIER_PREFIXES = ("norm.", "head.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, unreadable, unsafe, or not fitting the network."""


@dataclass
class CheckpointWeights:
    """The state dict taken from a checkpoint file, and what else the file held."""

    state: dict[str, torch.Tensor]
    entry: str | None  # the file's top-level entry the state came from; None for a flat state dict
    other_weights: list[str] = field(default_factory=list)  # other entries holding a state dict, not used
    inert: dict[str, str] = field(default_factory=dict)  # entry -> pickled class, kept as data, never imported


@dataclass
class PretrainedReport:
    """Which parameters of the target module came from the checkpoint and which are fresh."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # parameter -> rule applied
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # checkpoint keys deliberately not used
    entry: str | None = None  # see CheckpointWeights
    other_weights: list[str] = field(default_factory=list)
    inert: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, source: str | Path, weights: CheckpointWeights) -> PretrainedReport:
        """An empty report that already says where in the file the weights came from."""
        return cls(
            source=str(source),
            entry=weights.entry,
            other_weights=list(weights.other_weights),
            inert=dict(weights.inert),
        )

    def summary(self) -> str:
        origin = f"weights from entry {self.entry!r}" if self.entry else "weights from a flat state dict"
        if self.other_weights:
            origin += f" (not used: {', '.join(map(repr, self.other_weights))})"
        text = (
            f"{self.source}: {len(self.loaded)} tensors from ImageNet ({len(self.adapted)} adapted), "
            f"{len(self.fresh)} freshly initialised, {len(self.dropped)} checkpoint keys dropped; {origin}"
        )
        if self.inert:
            text += "; pickled objects kept as inert data, never imported: " + ", ".join(
                f"{k} ({v})" for k, v in self.inert.items()
            )
        return text


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_file(path: Path, what: str) -> object:
    """The file's contents: safetensors by suffix, else PyTorch pickle without running code from it."""
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(path)
        return load_untrusted(path)
    except CodeExecutionRefused as err:
        raise CheckpointError(
            f"{what} {path} is refused: unpickling it would run code from the file ({err}). Nothing from it was run; use the official release file."
        ) from err
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, SafetensorError) as err:
        raise CheckpointError(
            f"{what} {path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); is the download complete?"
        ) from err


def read_checkpoint(path: str | Path, what: str = "ImageNet checkpoint", entry: str = "model") -> CheckpointWeights:
    """The state dict in ``entry`` of a ``{"model": state_dict, ...}`` training checkpoint, or a flat state dict.

    ``path`` may be a PyTorch file (read without running code from it, see ``restricted_pickle``) or
    a ``.safetensors`` file (timm's release format, always flat).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist. Download it from {VMAMBA_T_URL_HINT} and pass its path.")
    obj = _load_file(path, what)
    if _is_state_dict(obj):
        return CheckpointWeights(state=obj, entry=None)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{what} {path} holds a {type(obj).__name__}, not a state dict or a dict with a {entry!r} entry"
        )
    holding_weights = [key for key, value in obj.items() if _is_state_dict(value)]
    if entry not in holding_weights:
        raise CheckpointError(
            f"{what} {path} has no state dict under {entry!r}; entries holding one: {holding_weights or 'none'}"
        )
    return CheckpointWeights(
        state=obj[entry],
        entry=entry,
        other_weights=[key for key in holding_weights if key != entry],
        inert={str(key): type(value).pickled_global for key, value in obj.items() if isinstance(value, InertObject)},
    )


def _target(module: nn.Module) -> tuple[VMambaEncoder, str, dict[str, PatchEmbed2D]]:
    """The encoder inside ``module``, its name prefix, and the patch embeddings that see the image."""
    if isinstance(module, VMambaEncoder):
        embeds = {"patch_embed": module.patch_embed} if module.patch_embed is not None else {}
        return module, "", embeds
    encoder = getattr(module, "encoder", None)
    modality_encoders = getattr(module, "modality_encoders", None)
    if not isinstance(encoder, VMambaEncoder) or modality_encoders is None:
        raise TypeError(
            f"cannot load VMamba weights into {type(module).__name__}: expected a VMambaEncoder or a network with .encoder and .modality_encoders"
        )
    embeds = {f"modality_encoders.{m}.patch_embed": me.patch_embed for m, me in modality_encoders.items()}
    return encoder, "encoder.", embeds


def _load_patch_embed(
    ckpt: dict[str, torch.Tensor], prefix: str, embed: PatchEmbed2D, report: PretrainedReport
) -> dict[str, torch.Tensor]:
    """ImageNet patch-embedding tensors for ``embed``, adapted to its input channels, or {} if it cannot take them."""
    weight = ckpt["patch_embed.proj.weight"]  # (D, 3, p, p)
    target = embed.proj.weight
    if target.shape[0] != weight.shape[0] or target.shape[2:] != weight.shape[2:]:
        return {}  # different width or patch size: an embedding of something else than the image
    out = {f"{prefix}.{k}": ckpt[f"patch_embed.{k}"] for k in ("proj.bias", "norm.weight", "norm.bias")}
    if target.shape[1] != weight.shape[1]:
        report.adapted[f"{prefix}.proj.weight"] = (
            f"timm adapt_input_conv {weight.shape[1]} -> {target.shape[1]} channels"
        )
        weight = adapt_input_conv(target.shape[1], weight)
    out[f"{prefix}.proj.weight"] = weight
    return out


def load_vmamba_checkpoint(module: nn.Module, path: str | Path, entry: str = "model") -> PretrainedReport:
    """Load the VMamba-T ImageNet weights into ``module`` (an encoder or a Swin-UMamba network).

    ``entry`` is the file's state dict to use: ``"model"`` (default), or ``"model_ema"`` in files of EMA runs.
    """
    weights = read_checkpoint(path, entry=entry)
    ckpt = weights.state
    encoder, enc_prefix, embeds = _target(module)
    report = PretrainedReport.of(path, weights)
    encoder_state = encoder.state_dict()
    new_state: dict[str, torch.Tensor] = {}

    for key, value in ckpt.items():
        if key.startswith(_CLASSIFIER_PREFIXES):
            report.dropped.append(key)
        elif key.startswith("layers."):
            if key not in encoder_state:
                raise CheckpointError(
                    f"{path}: checkpoint key {key!r} {tuple(value.shape)} has no place in the encoder (dims {encoder.dims}, depths {encoder.depths})"
                )
            if encoder_state[key].shape != value.shape:
                raise CheckpointError(
                    f"{path}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(encoder_state[key].shape)}"
                )
            new_state[enc_prefix + key] = value
        elif not key.startswith("patch_embed."):
            raise CheckpointError(
                f"{path}: unexpected checkpoint key {key!r} {tuple(value.shape)}; is this the VMamba-T v0 checkpoint?"
            )

    if "patch_embed.proj.weight" not in ckpt:
        raise CheckpointError(f"{path}: no patch_embed.proj.weight; is this the VMamba-T v0 checkpoint?")
    embedded = False
    for prefix, embed in embeds.items():
        tensors = _load_patch_embed(ckpt, prefix, embed, report)
        new_state.update(tensors)
        embedded |= bool(tensors)
    if not embedded:
        report.dropped.extend(k for k in ckpt if k.startswith("patch_embed."))

    model_state = module.state_dict()
    with torch.no_grad():
        for name, value in new_state.items():
            model_state[name].copy_(value.to(model_state[name].dtype))
    report.loaded = sorted(new_state)
    report.fresh = sorted(name for name, _ in module.named_parameters() if name not in new_state)
    return report


def initial_model(
    model_config: ModelConfig, seed: int, pretrained_checkpoint: str | Path | None = None
) -> tuple[nn.Module, PretrainedReport | None]:
    """The network a federation (and each of its baselines) starts from: initialised under ``seed``, then
    the ImageNet release file's encoder if one is given."""
    torch.manual_seed(seed)
    model = build_model(model_config)
    report = load_vmamba_checkpoint(model, pretrained_checkpoint) if pretrained_checkpoint else None
    return model, report
