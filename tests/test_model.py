"""Swin-UMamba networks, the VMamba encoder's conformance with the original, and ImageNet loading."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode

from fed_swinumamba.model import ModelConfig, SwinUMamba, SwinUMambaD, VMambaEncoder, build_model
from fed_swinumamba.model.pretrained import CheckpointError, load_vmamba_checkpoint
from fed_swinumamba.params import LAYER_GROUPS, group_of, modality_of, select
from fed_swinumamba.restricted_pickle import InertObject, load_untrusted

REFERENCE = Path(__file__).resolve().parent / "data"  # see data/README.md
TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))


def test_encoder_reproduces_original_swin_umamba_features():
    """The reference case was computed with the original VSSMEncoder: same arithmetic, same key layout."""
    expected = torch.load(REFERENCE / "vmamba_mini_expected.pt", weights_only=True)
    encoder = VMambaEncoder(dims=tuple(expected["dims"]), depths=tuple(expected["depths"])).eval()
    report = load_vmamba_checkpoint(encoder, REFERENCE / "vmamba_mini_ckpt.pth")
    assert report.fresh == []
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    with torch.no_grad():
        features = encoder(expected["input"])
    assert len(features) == 4
    for got, want in zip(features, expected["features"]):
        assert got.shape == want.shape
        assert (got - want).norm() / want.norm() < 1e-4


def vmamba_config() -> CfgNode:
    """Part of the yacs config VMamba's training code pickles into its checkpoints (classification/config.py)."""
    config = CfgNode(new_allowed=True)
    config.MODEL = CfgNode({"TYPE": "vssm", "NAME": "vssm_tiny", "DROP_PATH_RATE": 0.1, "NUM_CLASSES": 1000})
    config.MODEL.VSSM = CfgNode({"PATCH_SIZE": 4, "EMBED_DIM": 96, "DEPTHS": [2, 2, 9, 2], "D_STATE": 16})
    config.TRAIN = CfgNode({"EPOCHS": 300, "BASE_LR": 1e-3, "LR_SCHEDULER": CfgNode({"NAME": "cosine"})})
    config.freeze()
    return config


def save_like_vmamba(path: Path, model_state: dict, model_ema_state: dict | None = None) -> None:
    """Write a file as VMamba's ``save_checkpoint_ema`` does (classification/utils/utils.py)."""
    param = nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(4)
    optimizer.step()
    save_state = {
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": CosineLRScheduler(optimizer, t_initial=300).state_dict(),
        "max_accuracy": 82.2,
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "epoch": 292,
        "config": vmamba_config(),
    }
    if model_ema_state is not None:
        save_state |= {"model_ema": model_ema_state, "max_accuracy_ema": 82.0}
    torch.save(save_state, path)


@pytest.fixture(scope="module")
def full_size_checkpoint(tmp_path_factory):
    """A VMamba training checkpoint with the official VMamba-T v0 layout (random values), as the real file is saved."""
    layout = json.loads((REFERENCE / "vmamba_tiny_v0_keys.json").read_text())
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.02 for k, shape in layout.items()}
    path = tmp_path_factory.mktemp("ckpt") / "vssmtiny_dp01_ckpt_epoch_292.pth"
    save_like_vmamba(path, state, model_ema_state=dict(state))  # the EMA entry shares storages: no second copy on disk
    return path, state


def test_vmamba_training_checkpoint_is_refused_by_weights_only_loading(full_size_checkpoint):
    with pytest.raises(pickle.UnpicklingError, match="CfgNode"):
        torch.load(full_size_checkpoint[0], weights_only=True)


def test_full_size_checkpoint_loads_every_encoder_tensor(full_size_checkpoint):
    path, state = full_size_checkpoint
    encoder = VMambaEncoder(in_chans=3)
    report = load_vmamba_checkpoint(encoder, path)
    encoder_tensors = {k for k in state if not k.startswith(("norm.", "head."))}
    assert len(state) == 212 and len(encoder_tensors) == 208
    assert set(report.loaded) == encoder_tensors and report.fresh == []
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    got = encoder.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in encoder_tensors)
    assert report.entry == "model" and report.other_weights == ["model_ema"]
    assert report.inert == {"config": "yacs.config.CfgNode"}
    assert "entry 'model' (not used: 'model_ema')" in report.summary()
    assert "config (yacs.config.CfgNode)" in report.summary()


def test_model_ema_weights_are_used_only_when_asked(tmp_path):
    torch.manual_seed(0)
    model, ema = VMambaEncoder(**TINY).state_dict(), VMambaEncoder(**TINY).state_dict()
    save_like_vmamba(tmp_path / "ema.pth", model, ema)
    for entry, want in (("model", model), ("model_ema", ema)):
        encoder = VMambaEncoder(**TINY)
        report = load_vmamba_checkpoint(encoder, tmp_path / "ema.pth", entry=entry)
        assert report.entry == entry
        assert all(torch.equal(v, want[k]) for k, v in encoder.state_dict().items())
    save_like_vmamba(tmp_path / "no_ema.pth", model)
    with pytest.raises(CheckpointError, match=r"no state dict under 'model_ema'; entries holding one: \['model'\]"):
        load_vmamba_checkpoint(VMambaEncoder(**TINY), tmp_path / "no_ema.pth", entry="model_ema")


def test_pickled_config_is_kept_as_data_never_built(full_size_checkpoint):
    config = load_untrusted(full_size_checkpoint[0])["config"]
    assert isinstance(config, InertObject) and not isinstance(config, CfgNode)
    assert config["MODEL"]["VSSM"]["DEPTHS"] == [2, 2, 9, 2]


class _RunsCode:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("where", ["config", "model"])
@pytest.mark.parametrize("how", ["os.system", "exec"])
def test_checkpoint_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path, how, where):
    marker = tmp_path / "code_ran"
    payload = (
        _RunsCode(os.system, f"touch {marker}")
        if how == "os.system"
        else _RunsCode(exec, f"open({str(marker)!r}, 'w').close()")
    )
    pickle.loads(pickle.dumps(payload))  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    state = VMambaEncoder(**TINY).state_dict()
    contents = {"model": state, "config": payload} if where == "config" else {"model": dict(state, evil=payload)}
    torch.save(contents, tmp_path / "evil.pth")
    with pytest.raises(
        CheckpointError,
        match=r"refused: unpickling it would run code from the file \(the pickle calls (posix\.system|__builtin__\.exec)\)\. Nothing from it was run",
    ):
        load_vmamba_checkpoint(VMambaEncoder(**TINY), tmp_path / "evil.pth")
    assert not marker.exists()


def test_swin_umamba_loads_encoder_and_keeps_stem_embeddings_fresh(full_size_checkpoint):
    path, state = full_size_checkpoint
    model = SwinUMamba(modalities=("ct", "us"))
    report = load_vmamba_checkpoint(model, path)
    assert len(report.loaded) == 204  # every layers.* tensor; the patch-2 stem embedding has no ImageNet twin
    assert all(name.startswith("encoder.layers.") for name in report.loaded)
    assert "modality_encoders.ct.patch_embed.proj.weight" in report.fresh
    assert "decoder" not in " ".join(report.loaded)
    assert torch.equal(
        model.encoder.layers[2].blocks[8].self_attention.Ds, state["layers.2.blocks.8.self_attention.Ds"]
    )


def test_swin_umamba_d_adapts_rgb_patch_embedding_to_one_channel(full_size_checkpoint):
    path, state = full_size_checkpoint
    model = SwinUMambaD(in_chans=1, modalities=("ct", "mri"))
    report = load_vmamba_checkpoint(model, path)
    assert len(report.loaded) == 204 + 2 * 4
    rgb = state["patch_embed.proj.weight"]
    for m in ("ct", "mri"):
        w = model.modality_encoders[m].patch_embed.proj.weight
        assert torch.allclose(w, rgb.sum(dim=1, keepdim=True))
        assert f"modality_encoders.{m}.patch_embed.proj.weight" in report.adapted
    # The rule's point: a grey image embeds exactly as the RGB image with R = G = B did on ImageNet.
    grey = torch.rand(1, 1, 32, 32)
    rgb_conv = nn.Conv2d(3, 96, 4, 4)
    rgb_conv.weight.data, rgb_conv.bias.data = rgb, state["patch_embed.proj.bias"]
    with torch.no_grad():
        assert torch.allclose(
            model.modality_encoders["ct"].patch_embed.proj(grey), rgb_conv(grey.expand(1, 3, 32, 32)), atol=1e-5
        )


def test_checkpoint_shape_mismatch_names_key_and_both_shapes(tmp_path):
    small = VMambaEncoder(**TINY)
    other = VMambaEncoder(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), d_state=8)
    torch.save({"model": other.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'layers\.0\.blocks\.0\.self_attention\.x_proj_weight'.*\(4, 17, 16\).*\(4, 33, 16\)",
    ):
        load_vmamba_checkpoint(small, tmp_path / "c.pth")


def test_checkpoint_key_without_place_is_an_error_not_a_skip(tmp_path):
    deeper = VMambaEncoder(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))
    torch.save({"model": deeper.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"layers\.2\.blocks\.1\..*has no place"):
        load_vmamba_checkpoint(VMambaEncoder(**TINY), tmp_path / "c.pth")


def test_missing_and_corrupt_checkpoint_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*v0cls"):
        load_vmamba_checkpoint(VMambaEncoder(**TINY), tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_vmamba_checkpoint(VMambaEncoder(**TINY), corrupt)


@pytest.mark.parametrize("variant", ["swin_umamba", "swin_umamba_d"])
def test_forward_shapes_modalities_and_deep_supervision(variant):
    config = ModelConfig(
        variant=variant, num_classes=3, modalities=("ct", "us"), stem_width=8, **TINY, deep_supervision=True
    )
    model = build_model(config)
    x = torch.randn(2, 1, 64, 96)
    model.eval()
    assert model(x, "ct").shape == (2, 3, 64, 96)
    model.train()
    outputs = model(x, "us")
    assert outputs[0].shape == (2, 3, 64, 96) and len(outputs) == 4
    assert all(o.shape[-1] < 96 for o in outputs[1:])
    with pytest.raises(KeyError, match="no encoder for modality 'mri'"):
        model(x, "mri")
    with pytest.raises(ValueError, match="must be divisible by 32"):
        model(torch.randn(1, 1, 48, 40), "ct")


def test_modality_encoders_only_see_their_own_modality():
    model = SwinUMamba(num_classes=2, modalities=("ct", "mri"), stem_width=8, **TINY)
    model(torch.randn(1, 1, 32, 32), "ct").sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None for n in grads if modality_of(n) == "ct")
    assert all(grads[n] is None for n in grads if modality_of(n) == "mri")


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
def test_every_parameter_is_in_one_layer_group_in_depth_order(cls):
    model = cls(num_classes=2, **TINY)
    names = [n for n, _ in model.named_parameters()]
    groups = {n: group_of(n) for n in names}
    assert set(groups.values()) == set(LAYER_GROUPS)
    assert groups["encoder.layers.0.downsample.reduction.weight"] == "stage1"
    assert groups["encoder.layers.3.blocks.0.self_attention.A_logs"] == "stage4"
    shared_stem = [n for n in names if group_of(n) == "stem" and modality_of(n) is None]
    assert shared_stem == []  # the stem group is exactly the modality encoders
    only_ct_heads = select(dict(model.named_parameters()), groups=["stem", "heads"], modalities=["ct"])
    assert {modality_of(n) for n in only_ct_heads} == {"ct", None}
    assert {group_of(n) for n in only_ct_heads} == {"stem", "heads"}


def test_full_size_parameter_counts_match_the_paper():
    def count(m):
        return sum(p.numel() for p in m.parameters()) / 1e6

    assert 58 < count(SwinUMamba(modalities=("ct",))) < 62
    assert 27 < count(SwinUMambaD(modalities=("ct",))) < 28


def test_networks_have_no_batch_norm_so_opacus_can_wrap_them():
    from opacus.validators import ModuleValidator

    for cls in (SwinUMamba, SwinUMambaD):
        model = cls(num_classes=2, **TINY)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert ModuleValidator.validate(model, strict=False) == []
