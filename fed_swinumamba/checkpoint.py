"""Self-describing checkpoints in safetensors.

A checkpoint holds the global weights and, in the safetensors metadata, everything needed to use or
resume them without any other file: the model config, the class names, the round and stage, and the
run configuration. A coordinator's ``latest`` checkpoint also holds its aggregation state (server-optimiser
moments), as tensors named ``server-state/...``, apart from the model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .model import ModelConfig, build_model
from .model.pruning import apply_pruning, prune_l1, widths
from .params import federation_view, keeps_modality_norms, select, site_view
from .protocol import check_study

_META_KEY = "fed_swinumamba"
_SERVER_STATE = "server-state/"


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    model_config: ModelConfig
    class_names: tuple[str, ...]
    server_round: int = 0
    stage: int = 0
    extra: dict = field(default_factory=dict)  # run config, metrics of the round, ...
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the coordinator's aggregation state

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash mid-write never leaves a truncated checkpoint behind)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model_config": self.model_config.to_dict(),
            "class_names": list(self.class_names),
            "round": self.server_round,
            "stage": self.stage,
            "extra": self.extra,
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state.items()}
        tensors |= {_SERVER_STATE + k: v.detach().contiguous().cpu() for k, v in self.server_state.items()}
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
        return path

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        """The checkpoint's description (model config, classes, round, stage, extra) without its tensors."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
        if raw is None:
            raise ValueError(
                f"checkpoint {path} has no fed_swinumamba metadata (model config, classes); was it written by this project?"
            )
        return json.loads(raw)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        meta = cls.read_meta(path)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
        server_state = {
            k.removeprefix(_SERVER_STATE): state.pop(k) for k in [k for k in state if k.startswith(_SERVER_STATE)]
        }
        return cls(
            state,
            ModelConfig.from_dict(meta["model_config"]),
            tuple(meta["class_names"]),
            meta["round"],
            meta["stage"],
            meta.get("extra", {}),
            server_state,
        )

    def build_model(self, modality: str | None = None) -> torch.nn.Module:
        """The network with these weights (strict: every parameter must be in the checkpoint).

        A checkpoint that keeps normalisation layers per modality (``modality_norms.*``) describes one
        network per modality: ``modality`` says which (that modality's encoder and norms)."""
        config, state = self.model_config, self.state
        if modality is not None:
            config = ModelConfig.from_dict({**config.to_dict(), "modalities": [modality]})
            state = select(site_view(state, modality), modalities=[modality])
        elif keeps_modality_norms(state):
            raise ValueError("this checkpoint keeps its normalisation layers per modality: give the modality")
        model = build_model(config)
        model.load_state_dict(state, strict=True)
        return model


def prune_checkpoint(ckpt: Checkpoint, ratio: float) -> Checkpoint:
    """``ckpt`` with ``ratio`` of the channels of every pruning group removed, those of smallest L1 norm
    (``model.pruning``): the coordinator's step before federated recovery rounds (run config
    ``initial-checkpoint``). Decided once, on the shared weights; per-modality norm copies lose the same channels.
    The result starts a new run: it keeps the round it came from, not the aggregation state."""
    if ckpt.model_config.pruned:
        raise ValueError("this checkpoint is already pruned; prune the unpruned one with the ratio wanted")
    per_modality = keeps_modality_norms(ckpt.state)
    views = (
        {m: ckpt.build_model(m) for m in ckpt.model_config.modalities} if per_modality else {None: ckpt.build_model()}
    )
    first, *others = views.values()
    steps = prune_l1(first, ratio)
    for model in others:
        apply_pruning(model, steps)
    state: dict[str, torch.Tensor] = {}
    for modality, model in views.items():
        weights = model.state_dict()
        state |= weights if modality is None else federation_view(weights, modality, ckpt.state)
    extra = {"pruned_from": {"ratio": ratio, "round": ckpt.server_round, "stage": ckpt.stage}}
    config = replace(ckpt.model_config, pruned=widths(steps))
    return Checkpoint(state, config, ckpt.class_names, ckpt.server_round, ckpt.stage, extra)


def load_modality_model(path: str | Path, modality: str) -> tuple[Checkpoint, torch.nn.Module]:
    """The checkpoint at ``path`` and ``modality``'s network of it; a ValueError naming the file if it has none."""
    ckpt = Checkpoint.load(path)
    available = ckpt.model_config.modalities
    if modality not in available:
        raise ValueError(f"{path}: has no encoder for modality {modality!r}; it was trained for {', '.join(available)}")
    return ckpt, ckpt.build_model(modality)  # its encoder, and its norms if kept per modality


def personal_model_file(state_dir: Path, study: str, site: str) -> Path:
    """Where a site keeps its personal model of ``study``: ``<state_dir>/personal/<study>/<site>.safetensors``."""
    return Path(state_dir) / "personal" / check_study(study) / f"{site}.safetensors"


def residual_file(state_dir: Path, study: str, site: str) -> Path:
    """Where a site keeps what its compressed updates of ``study`` left out (fed_swinumamba.compression):
    ``<state_dir>/compression/<study>/<site>.safetensors``."""
    return Path(state_dir) / "compression" / check_study(study) / f"{site}.safetensors"
