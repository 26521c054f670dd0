"""Structured pruning (L1): decided once by the coordinator, recorded as widths, rebuilt by every site, trained back."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import CLASSES, TINY, TINY_MODEL

from fed_swinumamba.__main__ import main
from fed_swinumamba.checkpoint import Checkpoint, prune_checkpoint
from fed_swinumamba.model import SS2D, build_model, normalisation_state_names
from fed_swinumamba.model.pruning import prune_l1
from fed_swinumamba.params import keeps_modality_norms, modality_norm_name, split_norms
from server.settings import FederationSettings
from simulation.runner import run_federated_simulation


def _model(variant: str = "swin_umamba", **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY_MODEL, variant=variant, **changes)).eval()


def _step(steps, layer: str) -> tuple[int, ...]:
    (removed,) = [s.removed for s in steps if s.layer == layer]
    return removed


def test_the_channels_of_smallest_l1_norm_are_the_ones_removed():
    model = _model()
    ss2d = model.encoder.layers[2].blocks[0].self_attention  # d_inner 64
    weak_inner = [3, 17, 40]
    with torch.no_grad():
        for w in (ss2d.in_proj.weight[: ss2d.d_inner], ss2d.out_proj.weight.T):
            w[weak_inner] *= 1e-3
    conv1, conv2 = model.refine.layer.conv1.conv, model.refine.layer.conv2.conv  # 8 channels between them
    with torch.no_grad():
        conv1.weight[5] *= 1e-3
        conv2.weight[:, 5] *= 1e-3
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    steps = prune_l1(model, 0.3)
    removed = _step(steps, "encoder.layers.2.blocks.0.self_attention")
    assert set(weak_inner) <= set(removed)
    assert (64 - len(removed)) % 8 == 0 and 0.25 <= len(removed) / 64 <= 0.35  # about 30 %, kernel-friendly
    assert 5 in _step(steps, "refine.layer.conv1.conv")
    # The kept channels keep their weights, in every tensor that has them (x and z rows, the 4 directions' A).
    keep = [c for c in range(64) if c not in removed]
    prefix = "encoder.layers.2.blocks.0.self_attention."
    state = model.state_dict()
    in_proj = reference[prefix + "in_proj.weight"]
    assert torch.equal(state[prefix + "in_proj.weight"], torch.cat([in_proj[keep], in_proj[[64 + c for c in keep]]]))
    a_rows = [k * 64 + c for k in range(4) for c in keep]
    assert torch.equal(state[prefix + "A_logs"], reference[prefix + "A_logs"][a_rows])
    assert torch.equal(state[prefix + "x_proj_weight"], reference[prefix + "x_proj_weight"][:, :, keep])
    assert torch.equal(state[prefix + "dt_projs_bias"], reference[prefix + "dt_projs_bias"][:, keep])
    assert ss2d.d_inner == len(keep)


@pytest.mark.parametrize("variant", ["swin_umamba", "swin_umamba_d"])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_a_pruned_checkpoint_rebuilds_from_its_recorded_widths(variant, deep_supervision, tmp_path):
    model = _model(variant, deep_supervision=deep_supervision)
    config = dataclasses.replace(TINY_MODEL, variant=variant, deep_supervision=deep_supervision)
    path = Checkpoint(model.state_dict(), config, CLASSES, server_round=5, stage=2).save(tmp_path / "c.safetensors")
    pruned = prune_checkpoint(Checkpoint.load(path), 0.3)
    pruned.save(tmp_path / "p.safetensors")

    loaded = Checkpoint.load(tmp_path / "p.safetensors")
    assert loaded.model_config.pruned == pruned.model_config.pruned and loaded.model_config.pruned
    assert loaded.extra["pruned_from"] == {"ratio": 0.3, "round": 5, "stage": 2}
    rebuilt = loaded.build_model("ct")  # strict: every tensor in its pruned shape
    kept = sum(p.numel() for p in rebuilt.parameters())
    assert kept < 0.8 * sum(p.numel() for p in model.parameters())
    ss2d = [m for m in rebuilt.modules() if isinstance(m, SS2D)]
    assert ss2d and all(abs(m.d_inner / (2 * m.d_model) - 0.7) <= 0.06 for m in ss2d)
    image = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    pruned_in_memory = build_model(loaded.model_config)
    pruned_in_memory.load_state_dict(pruned.state)
    rebuilt.train(deep_supervision)
    pruned_in_memory.train(deep_supervision)
    with torch.no_grad():
        a, b = rebuilt(image, "ct"), pruned_in_memory(image, "ct")
    for x, y in zip(a if deep_supervision else [a], b if deep_supervision else [b]):
        assert x.shape[1] == len(CLASSES) + 1 and torch.equal(x, y)
    with pytest.raises(ValueError, match="already pruned"):
        prune_checkpoint(loaded, 0.3)


def test_per_modality_norms_lose_the_same_channels_and_stay_their_modality_s():
    model = _model()
    ss2d = model.encoder.layers[1].blocks[0].self_attention  # d_inner 32: 30 % is 10 channels
    weak = [0, 2, 5, 9, 11, 16, 20, 24, 29, 31]
    with torch.no_grad():
        for w in (ss2d.in_proj.weight[:32], ss2d.in_proj.weight[32:], ss2d.out_proj.weight.T):
            w[weak] *= 1e-3
    weights = split_norms(model.state_dict(), normalisation_state_names(model), TINY_MODEL.modalities)
    name = "encoder.layers.1.blocks.0.self_attention.out_norm.weight"
    for i, m in enumerate(TINY_MODEL.modalities):
        weights[modality_norm_name(m, name)] = torch.arange(32.0) + 100 * i
    pruned = prune_checkpoint(Checkpoint(weights, TINY_MODEL, CLASSES), 0.3)
    assert keeps_modality_norms(pruned.state)
    keep = torch.tensor([c for c in range(32) if c not in weak])
    for i, m in enumerate(TINY_MODEL.modalities):
        assert torch.equal(pruned.state[modality_norm_name(m, name)], keep.float() + 100 * i)
        pruned.build_model(m)  # strict: each modality's network in the pruned shapes


def test_a_run_starts_from_a_pruned_checkpoint_only_if_its_network_is_the_run_s(tmp_path):
    config = FederationSettings.from_run_config(TINY).model_config
    pruned = prune_checkpoint(Checkpoint(build_model(config).state_dict(), config, CLASSES), 0.3)
    path = pruned.save(tmp_path / "pruned.safetensors")
    settings = FederationSettings.from_run_config({**TINY, "initial-checkpoint": str(path)})
    assert settings.model_config == pruned.model_config
    with pytest.raises(ValueError, match=r"differs from this run's model-\* keys in \['d_state'\]"):
        FederationSettings.from_run_config({**TINY, "model-d-state": 8, "initial-checkpoint": str(path)})
    with pytest.raises(ValueError, match="classes"):
        FederationSettings.from_run_config({**TINY, "class-names": "liver", "initial-checkpoint": str(path)})
    with pytest.raises(ValueError, match="not both"):
        FederationSettings.from_run_config(
            {**TINY, "initial-checkpoint": str(path), "pretrained-checkpoint": str(tmp_path / "imagenet.pth")}
        )


def test_prune_command_refuses_a_ratio_outside_zero_to_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--checkpoint", "c.safetensors", "--ratio", "1.0", "--out", str(tmp_path / "p.safetensors")])
    assert "must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_federation_trains_the_pruned_network_back(three_sites, tmp_path):
    source = tmp_path / "final.safetensors"
    config = FederationSettings.from_run_config(TINY).model_config
    Checkpoint(build_model(config).state_dict(), config, CLASSES, server_round=6).save(source)
    pruned_path = tmp_path / "pruned.safetensors"
    assert main(["prune", "--checkpoint", str(source), "--ratio", "0.3", "--out", str(pruned_path)]) == 0
    overrides = {
        **TINY,
        "initial-checkpoint": str(pruned_path),
        "num-server-rounds": 1,
        "frozen-at-start": "",
        "local-steps": 2,
        "personalization": "none",
    }
    metrics = run_federated_simulation(three_sites, tmp_path / "run", overrides)
    assert all("errors" not in s for s in metrics["rounds"][0]["sites"].values())
    pruned, trained = Checkpoint.load(pruned_path), Checkpoint.load(tmp_path / "run/checkpoints/latest.safetensors")
    assert trained.model_config.pruned == pruned.model_config.pruned
    assert {k: v.shape for k, v in trained.state.items()} == {k: v.shape for k, v in pruned.state.items()}
    for name in ("refine.layer.conv1.conv.weight", "encoder.layers.0.blocks.0.self_attention.in_proj.weight"):
        assert not np.allclose(trained.state[name].numpy(), pruned.state[name].numpy())
