"""Structured channel pruning with the L1 criterion: decided once on trained weights, replayed by width anywhere.

Two kinds of pruning group, each losing about ``ratio`` of its channels (see ``_removed``), those of smallest L1 norm:
- every SS2D's inner width (D_inner: in_proj's x and z rows, the depthwise conv, the scan's per-direction
  parameters, out_norm and out_proj's columns), in the encoder and in Swin-UMamba†'s decoder
  (``SS2D.inner_l1`` / ``SS2D.prune_inner``);
- Swin-UMamba's convolutional decoder (skip, up and refine blocks): torch-pruning's dependency graph over
  ``SwinUMamba.decode`` finds which convolutions and norms share a channel (residual sums, concatenations)
  and ranks them with its ``MagnitudeImportance(p=1)``.
Kept whole: the encoder's stage widths (the ImageNet layout, added to in every block's residual), the modality
encoders (each modality's own), and the class outputs.

A plan is the removed channel indices per group (``PruningStep``). A network's shape only needs how many
were removed (``widths``), which is what ``ModelConfig.pruned`` records: ``build_model`` replays it on a fresh
network (removing the first channels; the weights come from the checkpoint), so the coordinator, the sites,
export and predict build the same pruned network from the config alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

from .swin_umamba import SwinUMamba
from .vmamba import SS2D

__all__ = ["PruningStep", "prune_l1", "apply_pruning", "widths", "apply_widths"]


@dataclass(frozen=True)
class PruningStep:
    """``removed`` channels of the group rooted at ``layer``: an SS2D (its inner channels) or the layer whose
    output channels root a torch-pruning group (indices as they were when the step ran)."""

    layer: str
    removed: tuple[int, ...]


def widths(steps: Iterable[PruningStep]) -> tuple[tuple[str, int], ...]:
    """What ``ModelConfig.pruned`` records of a plan: the layer and how many channels it lost."""
    return tuple((step.layer, len(step.removed)) for step in steps)


def apply_widths(model: nn.Module, pruned: Sequence[tuple[str, int]]) -> nn.Module:
    """``model`` (freshly built, unpruned) reshaped to the recorded widths: a network to load pruned weights into."""
    return apply_pruning(model, [PruningStep(layer, tuple(range(count))) for layer, count in pruned])


CHANNEL_MULTIPLE = 8  # vectorised kernels, INT8's above all, are slower on other channel counts (measured)


def _removed(channels: int, ratio: float) -> int:
    """How many to remove so that about ``1 - ratio`` remain: the nearest multiple of ``CHANNEL_MULTIPLE`` where
    the layer had one and at least 4 of them remain (full-size layers; small ones keep the exact ratio)."""
    kept = int(channels * (1 - ratio))
    if channels % CHANNEL_MULTIPLE == 0 and kept >= 4 * CHANNEL_MULTIPLE:
        kept = round(kept / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    return channels - kept


def _ss2d_steps(model: nn.Module, ratio: float) -> list[PruningStep]:
    steps = []
    for name, module in model.named_modules():
        if isinstance(module, SS2D):
            count = _removed(module.d_inner, ratio)
            weakest = torch.argsort(module.inner_l1(), stable=True)[:count]
            steps.append(PruningStep(name, tuple(sorted(int(i) for i in weakest))))
    return steps


def _decode_every_head(model: SwinUMamba, features: list[torch.Tensor]):
    # torch-pruning traces in eval mode; the deep-supervised heads, which read inner decoder widths, run in training
    model.train(model.deep_supervision)
    return model.decode(features)


def _decoder_graph(model: SwinUMamba):
    """torch-pruning's dependency graph of the decoder, traced from encoder features of a small input (the
    encoder is outside the trace: its widths are not pruned)."""
    import torch_pruning as tp

    side = 2 * model.total_stride
    training = model.training
    with torch.no_grad():
        features = model.eval().encode(torch.zeros(1, model.in_chans, side, side), next(iter(model.modality_encoders)))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters")  # SS2D's: in the encoder, not traced
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=features, forward_fn=_decode_every_head)
    finally:
        model.train(training)
    return graph


def _sync_parameterless_norms(model: nn.Module) -> None:
    """MONAI's default InstanceNorms have no parameters, so the graph does not see them: give each the width of
    the convolution it follows (it only uses it to warn)."""
    for block in model.modules():
        if isinstance(block, (UnetResBlock, UnetBasicBlock)):
            for i in (1, 2, 3):
                conv, norm = getattr(block, f"conv{i}", None), getattr(block, f"norm{i}", None)
                if isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.affine:
                    norm.num_features = conv.conv.out_channels


def _fixed_outputs(model: SwinUMamba) -> list[nn.Module]:
    """Layers whose output width must stay: the class outputs, and a skip block's last conv where the block's
    shortcut is the identity on an encoder feature (which the trace sees as a constant input)."""
    identity_shortcut = [block.layer.conv2.conv for block in model.skips if not hasattr(block.layer, "conv3")]
    return [*model.heads.modules(), *identity_shortcut]


def _prune_out_channels(graph, module: nn.Module, removed: Sequence[int]) -> None:
    """Remove output channels ``removed`` of ``module`` and, through the graph, every channel coupled to them."""
    graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, list(removed)).prune()


def _decoder_steps(model: nn.Module, ratio: float) -> list[PruningStep]:
    """Prune Swin-UMamba's conv decoder (L1, per group) in place and return what was removed."""
    if not isinstance(model, SwinUMamba):
        return []
    import torch_pruning as tp

    graph = _decoder_graph(model)
    names = {module: name for name, module in model.named_modules()}
    importance = tp.importance.MagnitudeImportance(p=1)
    fixed = _fixed_outputs(model)
    steps = []  # groups come one at a time, each measured on the weights left by the previous one
    for group in graph.get_all_groups(ignored_layers=fixed, root_module_types=(nn.Conv2d, nn.ConvTranspose2d)):
        root = group[0].dep.target.module
        count = _removed(graph.get_out_channels(root), ratio)
        if not count:
            continue
        weakest = torch.argsort(importance(group), stable=True)[:count]
        removed = tuple(sorted(int(i) for i in weakest))
        _prune_out_channels(graph, root, removed)
        steps.append(PruningStep(names[root], removed))
    _sync_parameterless_norms(model)
    return steps


def prune_l1(model: nn.Module, ratio: float) -> list[PruningStep]:
    """Remove ``ratio`` of the channels of every pruning group of ``model`` (in place), those of smallest L1
    norm, and return the plan (``apply_pruning`` replays it on another copy of the same weights)."""
    if not 0 < ratio < 1:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    steps = _ss2d_steps(model, ratio)
    apply_pruning(model, steps)
    return steps + _decoder_steps(model, ratio)


def apply_pruning(model: nn.Module, steps: Sequence[PruningStep]) -> nn.Module:
    """Replay a plan on ``model`` in place (the layers named in ``steps`` must be in it); returns ``model``."""
    modules = dict(model.named_modules())
    unknown = [step.layer for step in steps if step.layer not in modules]
    if unknown:
        raise ValueError(f"pruning plan names layers this network does not have: {unknown[:3]}")
    graph = None
    for step in steps:
        module = modules[step.layer]
        if isinstance(module, SS2D):
            module.prune_inner(step.removed)
            continue
        if graph is None:
            graph = _decoder_graph(model)
        _prune_out_channels(graph, module, step.removed)
    _sync_parameterless_norms(model)
    return model
