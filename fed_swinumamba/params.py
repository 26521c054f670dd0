"""Parameter naming shared by the server and the sites.

Two questions about every parameter name decide how the federation treats it:
- *which modality owns it* — ``modality_encoders.<m>.*`` belong to modality ``m`` and are averaged
  only among that modality's sites; everything else is shared and averaged over all sites;
- *which layer group it is in* — the unfreezing schedule trains whole groups, from shallow to deep:
  ``stem`` (the modality encoders), ``stage1`` .. ``stage4`` (VMamba stages, each with its
  downsample), ``decoder`` (skip, up and decoder blocks) and ``heads`` (segmentation outputs).

Both answers come from the name alone, so the coordinator never needs to build a network to route
an update.

With modality-local normalisation (FedBN-style, run config ``norm-partition = modality``) the coordinator
keeps one copy of every shared normalisation parameter per modality, named
``modality_norms.<m>.<parameter name>``: it belongs to modality ``m`` and to the layer group of the
parameter it copies. A site's network has the one copy of its modality under the plain name
(:func:`site_view`); the coordinator renames what the site sends back (:func:`federation_view`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

LAYER_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "decoder", "heads")
SHARED = "shared"

_MODALITY = re.compile(r"^modality_encoders\.([^.]+)\.")
_MODALITY_NORM = re.compile(r"^modality_norms\.([^.]+)\.(.+)$")
_STAGE = re.compile(r"^encoder\.layers\.(\d+)\.")
_DECODER_PREFIXES = ("skips.", "up_blocks.", "refine.", "decoder.", "final_expand.")

T = TypeVar("T")


def modality_of(name: str) -> str | None:
    """The modality that owns parameter ``name``, or None for a shared parameter."""
    match = _MODALITY.match(name) or _MODALITY_NORM.match(name)
    return match.group(1) if match else None


def partition_of(name: str) -> str:
    """Aggregation partition: the owning modality, or ``"shared"``."""
    return modality_of(name) or SHARED


def group_of(name: str) -> str:
    """The layer group of parameter ``name`` (raises for a name outside the network layout)."""
    if _MODALITY.match(name):
        return "stem"
    norm = _MODALITY_NORM.match(name)
    if norm:
        return group_of(norm.group(2))
    stage = _STAGE.match(name)
    if stage:
        return f"stage{int(stage.group(1)) + 1}"
    if name.startswith(_DECODER_PREFIXES):
        return "decoder"
    if name.startswith("heads."):
        return "heads"
    raise ValueError(f"parameter {name!r} belongs to no layer group of {LAYER_GROUPS}")


def check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """Validate layer-group names, keeping the shallow-to-deep order."""
    groups = set(groups)
    unknown = groups - set(LAYER_GROUPS)
    if unknown:
        raise ValueError(f"unknown layer groups {sorted(unknown)}; known: {', '.join(LAYER_GROUPS)}")
    return tuple(g for g in LAYER_GROUPS if g in groups)


def select(
    params: Mapping[str, T], *, groups: Iterable[str] | None = None, modalities: Iterable[str] | None = None
) -> dict[str, T]:
    """The entries of ``params`` in the given layer groups, keeping shared ones and those of ``modalities``.

    ``modalities=None`` keeps every modality's encoder; ``groups=None`` keeps every group.
    """
    groups = None if groups is None else set(check_groups(groups))
    modalities = None if modalities is None else set(modalities)
    out = {}
    for name, value in params.items():
        owner = modality_of(name)
        if modalities is not None and owner is not None and owner not in modalities:
            continue
        if groups is not None and group_of(name) not in groups:
            continue
        out[name] = value
    return out


def keeps_modality_norms(names: Iterable[str]) -> bool:
    """Whether weights of these names keep normalisation layers per modality (``norm-partition = modality``)."""
    return any(_MODALITY_NORM.match(name) for name in names)


def modality_norm_name(modality: str, name: str) -> str:
    """The coordinator's name of modality ``modality``'s copy of the normalisation parameter ``name``."""
    return f"modality_norms.{modality}.{name}"


def split_norms(params: Mapping[str, T], norm_names: Iterable[str], modalities: Iterable[str]) -> dict[str, T]:
    """``params`` with each shared parameter of ``norm_names`` replaced by one copy per modality."""
    norm_names, modalities = set(norm_names), tuple(modalities)
    out: dict[str, T] = {}
    for name, value in params.items():
        if name in norm_names and modality_of(name) is None:
            out |= {modality_norm_name(m, name): value for m in modalities}
        else:
            out[name] = value
    return out


def site_view(params: Mapping[str, T], modality: str) -> dict[str, T]:
    """What a site of ``modality`` holds of ``params``: its modality's norm copies under their plain names,
    no other modality's (call it on :func:`select` ``modalities=[modality]``'s output or on a whole model)."""
    out: dict[str, T] = {}
    for name, value in params.items():
        norm = _MODALITY_NORM.match(name)
        if norm is None:
            out[name] = value
        elif norm.group(1) == modality:
            out[norm.group(2)] = value
    return out


def federation_view(update: Mapping[str, T], modality: str, federation: Mapping[str, object]) -> dict[str, T]:
    """A site's ``update`` under the coordinator's names: a parameter of which ``federation`` keeps
    per-modality copies becomes its ``modality``'s copy."""
    return {
        (modality_norm_name(modality, k) if modality_norm_name(modality, k) in federation else k): v
        for k, v in update.items()
    }
