"""Hybrid (window attention + SS2D) encoder: VMamba/Swin weight compatibility, gating, window geometry."""

import pytest
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    get_relative_position_index,
)
from yacs.config import CfgNode

from fed_swinumamba.model import ModelConfig, SwinUMamba, SwinUMambaD, VMambaEncoder, VSSBlock, build_model
from fed_swinumamba.model.hybrid import (
    HybridVSSBlock,
    ShiftedWindowAttention,
    hybrid_block_factory,
    load_swin_attention,
)
from fed_swinumamba.model.pretrained import CheckpointError, load_vmamba_checkpoint

DIMS = (8, 16, 32, 64)
HEADS = (1, 2, 4, 8)
D_STATE = 4


def hybrid_encoder(depths=(2, 2, 3, 2), **kw) -> VMambaEncoder:
    return VMambaEncoder(
        dims=DIMS, depths=depths, d_state=D_STATE, block_factory=hybrid_block_factory(D_STATE, HEADS), **kw
    )


def set_gates(module: torch.nn.Module, bias: float) -> None:
    """Saturate every gate: +100 gives G == 1 (SS2D only), -100 gives G == 0 (window attention only)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, HybridVSSBlock):
                m.gate.bias.fill_(bias)


def test_hybrid_encoder_has_every_vmamba_key_and_loads_vmamba_weights(tmp_path):
    torch.manual_seed(0)
    plain = VMambaEncoder(dims=DIMS, depths=(2, 2, 3, 2), d_state=D_STATE)
    hybrid = hybrid_encoder()
    plain_state, hybrid_state = plain.state_dict(), hybrid.state_dict()
    assert {k: v.shape for k, v in hybrid_state.items() if k in plain_state} == {
        k: v.shape for k, v in plain_state.items()
    }
    extra = set(hybrid_state) - set(plain_state)
    assert extra and all(".window_attention.attn." in k or ".gate." in k for k in extra)

    ckpt = dict(plain_state, **{"norm.weight": torch.ones(64), "head.weight": torch.zeros(10, 64)})
    torch.save({"model": ckpt}, tmp_path / "vmamba.pth")
    report = load_vmamba_checkpoint(hybrid, tmp_path / "vmamba.pth")
    assert report.loaded == sorted(plain_state)
    assert report.fresh == sorted(extra)  # every hybrid-only tensor is a parameter; all others came from the file
    for key, value in plain_state.items():
        assert torch.equal(hybrid.state_dict()[key], value), key

    # With every gate open the hybrid encoder is the VMamba encoder it was loaded from.
    set_gates(hybrid, 100.0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(hybrid(x), plain(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gate_starts_at_half_and_saturates_to_either_branch():
    torch.manual_seed(0)
    block = HybridVSSBlock(8, D_STATE, num_heads=2, shift_size=3).eval()
    vss = VSSBlock(8, D_STATE).eval()
    vss.load_state_dict({k: v for k, v in block.state_dict().items() if k.startswith(("ln_1.", "self_attention."))})
    x = torch.randn(2, 16, 24, 8)
    with torch.no_grad():
        h = block.ln_1(x)
        dynamic, static = block.self_attention(h), block.window_attention(h)
        torch.testing.assert_close(block(x), x + 0.5 * (dynamic + static))
        set_gates(block, 100.0)
        torch.testing.assert_close(block(x), vss(x), rtol=0, atol=1e-6)
        set_gates(block, -100.0)
        torch.testing.assert_close(block(x), x + static, rtol=0, atol=1e-6)


def same_window(size: int, window: int, shift: int) -> torch.Tensor:
    """(size, size) bool: whether two indices share a window of the grid offset by ``shift`` (Swin's shifted partition)."""
    if size <= window:
        return torch.ones(size, size, dtype=torch.bool)
    group = torch.div(torch.arange(size) - shift, window, rounding_mode="floor")
    return group[:, None] == group[None, :]


@pytest.mark.parametrize("fused", [False, True], ids=["softmax", "sdpa"])
@pytest.mark.parametrize("shift,h,w", [(0, 16, 24), (3, 14, 21), (3, 16, 24), (3, 9, 12), (3, 4, 16)])
def test_window_attention_is_local_to_its_shifted_window(fused, shift, h, w):
    """Perturbing one token changes exactly the outputs of its (shifted) window, padding and wrap-around included."""
    torch.manual_seed(0)
    branch = ShiftedWindowAttention(8, num_heads=2, window_size=7, shift_size=shift)
    branch.attn.fused_attn = fused
    rows, cols = same_window(h, 7, shift if h > 7 else 0), same_window(w, 7, shift if w > 7 else 0)
    x = torch.randn(1, h, w, 8)
    with torch.no_grad():
        base = branch(x)
        for r, c in [(0, 0), (h - 1, w - 1), (h // 2, w // 2), (2, w - 2)]:
            y = x.clone()
            y[0, r, c] += 1.0
            changed = (branch(y) - base).abs().amax(-1)[0] > 1e-6
            assert torch.equal(changed, rows[r][:, None] & cols[c][None, :]), (r, c)


def test_shift_changes_large_maps_and_is_skipped_on_maps_within_one_window():
    torch.manual_seed(0)
    plain = ShiftedWindowAttention(8, num_heads=2, shift_size=0)
    shifted = ShiftedWindowAttention(8, num_heads=2, shift_size=3)
    shifted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for h, w in [(16, 24), (8, 8)]:
            x = torch.randn(2, h, w, 8)
            assert (plain(x) - shifted(x)).abs().max() > 1e-3
        for h, w in [(2, 3), (4, 4), (7, 7)]:
            x = torch.randn(2, h, w, 8)
            assert torch.equal(plain(x), shifted(x))


def test_small_map_is_one_window_with_the_cropped_bias_table():
    """A 2x3 map attends as a 2x3 window (no padding in the softmax) with the matching part of the 7x7 table."""
    torch.manual_seed(0)
    branch = ShiftedWindowAttention(8, num_heads=2, window_size=7, shift_size=3)
    small = WindowAttention(8, num_heads=2, window_size=(2, 3))
    table = branch.attn.relative_position_bias_table.detach().view(13, 13, 2)  # (dy + 6, dx + 6, heads)
    state = {k: v for k, v in branch.attn.state_dict().items() if k != "relative_position_bias_table"}
    small.load_state_dict(
        dict(state, relative_position_bias_table=table[5:8, 4:9].reshape(15, 2))
    )  # dy in -1..1, dx in -2..2
    x = torch.randn(2, 2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(branch(x), small(x.view(2, 6, 8)).view(2, 2, 3, 8))


def test_partial_border_windows_ignore_the_padding():
    """On a 9x12 map the 2-row and 5-column border windows act as windows of their own size (padding masked out)."""
    torch.manual_seed(0)
    branch = ShiftedWindowAttention(8, num_heads=2, window_size=7)
    x = torch.randn(1, 9, 12, 8)
    with torch.no_grad():
        out = branch(x)
        for rows, cols in [
            (slice(0, 7), slice(0, 7)),
            (slice(7, 9), slice(0, 7)),
            (slice(0, 7), slice(7, 12)),
            (slice(7, 9), slice(7, 12)),
        ]:
            torch.testing.assert_close(out[:, rows, cols], branch(x[:, rows, cols]))


@pytest.mark.parametrize("shift", [0, 3])
def test_matches_timm_swin_on_maps_of_whole_windows(shift):
    torch.manual_seed(0)
    swin = SwinTransformerBlock(8, (14, 14), num_heads=2, window_size=7, shift_size=shift)
    branch = ShiftedWindowAttention(8, num_heads=2, window_size=7, shift_size=shift)
    branch.attn.load_state_dict(swin.attn.state_dict())
    x = torch.randn(2, 14, 14, 8)
    with torch.no_grad():
        torch.testing.assert_close(branch(x), swin._attn(x))


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory):
    """A flat timm-layout Swin state dict at tiny widths (depths 2-2-2-2), plus an original-Swin index buffer."""
    torch.manual_seed(1)
    swin = SwinTransformer(
        img_size=224, embed_dim=DIMS[0], depths=(2, 2, 2, 2), num_heads=HEADS, window_size=7, num_classes=5
    ).eval()
    with torch.no_grad():
        for name, p in swin.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()  # timm initialises it at std .02; make equality checks meaningful
    state = swin.state_dict()
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path_factory.mktemp("swin") / "swin_tiny.pth"
    torch.save(state, path)
    return path, swin, state


def test_load_swin_attention_fills_matching_blocks_and_reports_the_rest(swin_checkpoint):
    path, swin, state = swin_checkpoint
    encoder = hybrid_encoder(depths=(2, 1, 3, 2))  # stage 1 lacks Swin's block 1; stage 2 has a block Swin lacks
    ss2d_before = {k: v.clone() for k, v in encoder.state_dict().items() if ".self_attention." in k}
    report = load_swin_attention(encoder, path)

    pairs = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    names = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table")
    assert report.loaded == sorted(f"layers.{i}.blocks.{j}.window_attention.attn.{n}" for i, j in pairs for n in names)
    for i, j in pairs:
        for n in names:
            got = encoder.layers[i].blocks[j].window_attention.attn.get_parameter(n)
            assert torch.equal(got, state[f"layers.{i}.blocks.{j}.attn.{n}"])
    assert {f"layers.1.blocks.1.attn.{n}" for n in names} <= set(report.dropped)
    assert set(report.dropped) | {f"layers.{i}.blocks.{j}.attn.{n}" for i, j in pairs for n in names} == set(state)
    fresh_block = encoder.layers[2].blocks[2]
    assert report.fresh == sorted(
        [f"layers.2.blocks.2.{n}" for n, _ in fresh_block.named_parameters() if n.startswith("window_attention.")]
        + [
            f"layers.{i}.blocks.{j}.gate.{n}"
            for i, layer in enumerate(encoder.layers)
            for j in range(len(layer.blocks))
            for n in ("weight", "bias")
        ]
    )
    assert torch.equal(
        encoder.layers[0].blocks[0].window_attention.attn.relative_position_index, get_relative_position_index(7, 7)
    )
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in ss2d_before.items())

    # Same block, same shift (odd blocks shifted in both): the loaded branch is Swin's SW-MSA.
    h = torch.randn(1, 56, 56, DIMS[0])
    with torch.no_grad():
        torch.testing.assert_close(encoder.layers[0].blocks[1].window_attention(h), swin.layers[0].blocks[1]._attn(h))


@pytest.mark.parametrize("release", ["timm safetensors", "microsoft training checkpoint"])
def test_load_swin_attention_reads_the_release_formats(swin_checkpoint, tmp_path, release):
    """timm publishes a flat safetensors file; Microsoft's Swin code saves ``{"model": ..., "config": CfgNode, ...}``."""
    _, _, state = swin_checkpoint
    if release == "timm safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "swin_tiny_patch4_window7_224.pth"
        config = CfgNode({"MODEL": CfgNode({"TYPE": "swin", "NAME": "swin_tiny_patch4_window7_224"})})
        torch.save(
            {"model": state, "optimizer": {}, "lr_scheduler": {}, "max_accuracy": 81.2, "epoch": 299, "config": config},
            path,
        )
    encoder = hybrid_encoder()
    report = load_swin_attention(encoder, path)
    assert len(report.loaded) == 8 * 5  # 2-2-3-2 hybrid blocks, of which Swin's 2-2-2-2 have a twin, 5 tensors each
    assert torch.equal(
        encoder.layers[2].blocks[1].window_attention.attn.qkv.weight, state["layers.2.blocks.1.attn.qkv.weight"]
    )
    assert report.inert == ({} if release == "timm safetensors" else {"config": "yacs.config.CfgNode"})


def test_load_swin_attention_shape_mismatch_names_key_and_shapes_and_copies_nothing(swin_checkpoint, tmp_path):
    path, _, state = swin_checkpoint
    bad = dict(
        state, **{"layers.0.blocks.1.attn.relative_position_bias_table": torch.zeros(81, 1)}
    )  # a 5x5-window table
    torch.save({"model": bad}, tmp_path / "bad.pth")
    encoder = hybrid_encoder()
    before = encoder.layers[0].blocks[0].window_attention.attn.qkv.weight.clone()
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'layers\.0\.blocks\.1\.attn\.relative_position_bias_table'.*\(81, 1\).*\(169, 1\)",
    ):
        load_swin_attention(encoder, tmp_path / "bad.pth")
    assert torch.equal(encoder.layers[0].blocks[0].window_attention.attn.qkv.weight, before)


def test_load_swin_attention_rejects_wrong_targets_and_files(swin_checkpoint, tmp_path):
    path, _, _ = swin_checkpoint
    with pytest.raises(TypeError, match="no HybridVSSBlock"):
        load_swin_attention(VMambaEncoder(dims=DIMS, depths=(1, 1, 1, 1), d_state=D_STATE), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_swin_attention(hybrid_encoder(), tmp_path / "nope.pth")
    partial = {
        k: v for k, v in swin_checkpoint[2].items() if k != "layers.2.blocks.1.attn.qkv.bias"
    }  # as in Swin V2 files
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(
        CheckpointError, match=r"layers\.2\.blocks\.1 has an incomplete attention, missing attn\.qkv\.bias"
    ):
        load_swin_attention(hybrid_encoder(), tmp_path / "partial.pth")
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "not_swin.pth")
    with pytest.raises(CheckpointError, match="no Swin attention tensors"):
        load_swin_attention(hybrid_encoder(), tmp_path / "not_swin.pth")


def test_factory_validates_heads_per_stage():
    with pytest.raises(ValueError, match=r"stage 1 has dim 16, which num_heads\[1\] = 3 does not divide"):
        VMambaEncoder(dims=DIMS, depths=(1, 1, 1, 1), block_factory=hybrid_block_factory(num_heads=(1, 3, 4, 8)))
    with pytest.raises(ValueError, match="no head count for stage 3"):
        VMambaEncoder(dims=DIMS, depths=(1, 1, 1, 1), block_factory=hybrid_block_factory(num_heads=(1, 2, 4)))
    blocks = hybrid_encoder().layers[2].blocks
    assert [b.window_attention.shift_size for b in blocks] == [0, 3, 0]
    assert [b.window_attention.attn.num_heads for b in blocks] == [4, 4, 4]


@pytest.mark.parametrize("variant", ["swin_umamba", "swin_umamba_d"])
def test_hybrid_networks_train_end_to_end(variant, swin_checkpoint):
    torch.manual_seed(0)
    common = dict(
        in_chans=1,
        num_classes=2,
        modalities=("ct",),
        dims=DIMS,
        depths=(2, 1, 1, 1),
        d_state=D_STATE,
        block_factory=hybrid_block_factory(D_STATE, HEADS),
    )
    model = SwinUMamba(stem_width=8, **common) if variant == "swin_umamba" else SwinUMambaD(**common)
    report = load_swin_attention(model, swin_checkpoint[0])
    assert len(report.loaded) == 5 * 5 and all(n.startswith("encoder.layers.") for n in report.loaded)

    x = torch.randn(1, 1, 64, 64)
    out = model(x, "ct")
    assert out.shape == (1, 2, 64, 64)
    out.square().mean().backward()
    # Block 0.1 is shifted on a 16x16 map; block 3.0 sees a 2x2 map (one window, no shift).
    for name in (
        "layers.0.blocks.1.window_attention.attn.qkv.weight",
        "layers.0.blocks.1.window_attention.attn.relative_position_bias_table",
        "layers.3.blocks.0.window_attention.attn.proj.weight",
        "layers.0.blocks.1.gate.weight",
        "layers.3.blocks.0.gate.bias",
    ):
        grad = model.encoder.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_build_model_hybrid_config():
    config = ModelConfig(
        variant="swin_umamba_d",
        dims=DIMS,
        depths=(1, 1, 2, 1),
        d_state=D_STATE,
        encoder_block="hybrid",
        num_heads=HEADS,
    )
    model = build_model(config)
    assert isinstance(model.encoder.layers[2].blocks[1], HybridVSSBlock)
    assert model.encoder.layers[2].blocks[1].window_attention.shift_size == 3
