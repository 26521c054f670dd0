"""`python -m fed_swinumamba export`: an ONNX file that ONNX Runtime runs as PyTorch does, and that `predict` uses."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from conftest import CLASSES, TINY_MODEL, _copy_of_site

from fed_swinumamba.__main__ import main
from fed_swinumamba.checkpoint import Checkpoint, prune_checkpoint
from fed_swinumamba.data import SiteData, load_site_config
from fed_swinumamba.export import PARITY_RTOL, ExportError, OnnxNetwork
from fed_swinumamba.model import build_model
from fed_swinumamba.ops import scan_onnx
from fed_swinumamba.quantization import calibration_windows
from fed_swinumamba.training import evaluate_cases


def _checkpoint(path, variant: str) -> tuple:
    config = dataclasses.replace(TINY_MODEL, variant=variant, modalities=("ct", "us"))
    torch.manual_seed(1)
    model = build_model(config).eval()
    Checkpoint(model.state_dict(), config, CLASSES, server_round=4, stage=2).save(path)
    return path, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny CT + US Swin-UMamba checkpoint, 30 % pruned, and its CT network's export (through the CLI).

    One export serves every test here (each takes about a minute on CI's two cores); the other decoder
    (Swin-UMamba†) is exported by the hybrid-encoder test, the unpruned network by the INT8 test.
    """
    root = tmp_path_factory.mktemp("export")
    unpruned, _ = _checkpoint(root / "unpruned.safetensors", "swin_umamba")
    path = prune_checkpoint(Checkpoint.load(unpruned), 0.3).save(root / "best.safetensors")
    model = Checkpoint.load(path).build_model().eval()
    assert main(["export", "--checkpoint", str(path), "--modality", "ct", "--out", str(root / "export")]) == 0
    return path, model, root / "export" / "ct.onnx"


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (3, 1, 32, 96), (2, 1, 128, 64)])
def test_onnx_runtime_equals_pytorch_at_any_batch_and_image_size(exported, shape):
    _, model, onnx_file = exported
    image = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = model(image, "ct")
    got = OnnxNetwork(onnx_file)(image, "ct")
    assert got.shape == expected.shape
    assert float((got - expected).abs().max() / expected.abs().max()) < PARITY_RTOL


def test_every_scan_is_one_custom_node_and_the_file_describes_itself(exported):
    path, model, onnx_file = exported
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    scans = [n for n in graph.node if n.op_type == scan_onnx.OP_TYPE]
    expected_scans = sum(1 for m in model.modules() if type(m).__name__ == "SS2D")
    assert len(scans) == expected_scans and all(n.domain == scan_onnx.OP_DOMAIN for n in scans)
    assert not any(n.op_type in ("Loop", "Scan") for n in graph.node)

    network = OnnxNetwork(onnx_file)
    assert network.modality == "ct" and network.class_names == CLASSES
    assert network.model_config == Checkpoint.load(path).model_config and network.model_config.pruned
    assert network.meta["source"]["round"] == 4 and len(network.meta["source"]["sha256"]) == 64


def test_predict_gives_the_same_mask_from_the_checkpoint_and_from_its_export(exported, three_sites, tmp_path):
    path, _, onnx_file = exported
    site = three_sites[0]  # the CT site
    image = sorted((load_site_config(site).data.root / "imagesTr").iterdir())[0]
    masks = {}
    for name, model in (("checkpoint", path), ("export", onnx_file)):
        out = tmp_path / f"{name}.nii.gz"
        args = ["predict", "--checkpoint", str(model), "--modality", "ct", "--input", str(image), "--output", str(out)]
        assert main([*args, "--site-config", str(site)]) == 0
        masks[name] = np.asarray(nib.load(str(out)).dataobj)
    assert masks["export"].shape == masks["checkpoint"].shape
    assert (masks["export"] != masks["checkpoint"]).mean() < 1e-3  # argmax ties at float rounding only


def test_a_corrupt_or_foreign_export_is_a_clear_error_naming_the_file(exported, tmp_path, capsys):
    _, _, onnx_file = exported
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(onnx_file.read_bytes()[:4096])
    with pytest.raises(ExportError, match="corrupt.onnx is not a readable ONNX model"):
        OnnxNetwork(corrupt)

    foreign = onnx.load(str(onnx_file))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ExportError, match="foreign.onnx has no fed_swinumamba metadata"):
        OnnxNetwork(tmp_path / "foreign.onnx")

    newer = onnx.load(str(onnx_file))
    meta = json.loads(newer.metadata_props[0].value)
    newer.metadata_props[0].value = json.dumps({**meta, "format": meta["format"] + 1})
    onnx.save(newer, str(tmp_path / "newer.onnx"))
    with pytest.raises(ExportError, match="newer.onnx: export format"):
        OnnxNetwork(tmp_path / "newer.onnx")

    args = ["predict", "--checkpoint", str(onnx_file), "--modality", "us", "--input", str(tmp_path), "--output", "x"]
    assert main(args) == 2
    assert "exported for modality 'ct', not 'us'" in capsys.readouterr().err


def test_export_refuses_a_modality_the_checkpoint_has_no_encoder_for(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path / "ct_us.safetensors", "swin_umamba")
    assert main(["export", "--checkpoint", str(path), "--modality", "mri", "--out", str(tmp_path / "out")]) == 2
    assert "ct_us.safetensors: has no encoder for modality 'mri'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_hybrid_encoder_exports_too(tmp_path):
    """Swin-UMamba† (variant d) with window-attention blocks in its encoder (encoder_block = hybrid)."""
    config = dataclasses.replace(
        TINY_MODEL,
        variant="swin_umamba_d",
        encoder_block="hybrid",
        modalities=("ct",),
        num_heads=(1, 2, 4, 8),
        window_size=2,
    )
    torch.manual_seed(2)
    model = build_model(config).eval()
    path = Checkpoint(model.state_dict(), config, CLASSES).save(tmp_path / "hybrid.safetensors")
    assert main(["export", "--checkpoint", str(path), "--modality", "ct", "--out", str(tmp_path)]) == 0
    image = torch.randn(2, 1, 64, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(image, "ct")
    got = OnnxNetwork(tmp_path / "ct.onnx")(image, "ct")
    assert float((got - expected).abs().max() / expected.abs().max()) < PARITY_RTOL


def _weight_bytes(path) -> dict[str, int]:
    """Bytes of the file's stored tensors (weights, scales), by element type."""
    bytes_by_type = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        bytes_by_type[str(array.dtype)] = bytes_by_type.get(str(array.dtype), 0) + array.nbytes
    return bytes_by_type


def test_an_int8_export_calibrated_on_the_site_s_cases_keeps_the_float32_dice(
    trained_checkpoint, three_sites, tmp_path
):
    """INT8 weights (about a quarter of the float32 bytes), calibrated on the CT site's training cases; on
    the site's held-out cases each class's Dice stays within 0.03 of the float32 export's, and ``predict``
    runs it."""
    path, _, ct, data = trained_checkpoint
    out = tmp_path / "export"
    args = ["export", "--checkpoint", str(path), "--modality", "ct", "--out", str(out)]
    assert main([*args, "--int8", "--calibration", str(three_sites[0])]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct.int8.onnx", "ct.onnx"]  # no calibration files left
    fp32, int8 = OnnxNetwork(out / "ct.onnx"), OnnxNetwork(out / "ct.int8.onnx")
    calibration = int8.meta["calibration"]
    assert int8.meta["precision"] == "int8" and calibration["site"] == ct.site and calibration["windows"] > 0
    assert int8.meta["source"] == fp32.meta["source"] and int8.class_names == fp32.class_names

    weights = _weight_bytes(out / "ct.int8.onnx")
    assert weights["int8"] > 0.8 * sum(weights.values())  # what is left in float32: scales, norms, the scans' A and D
    assert sum(weights.values()) < 0.3 * sum(_weight_bytes(out / "ct.onnx").values())

    held_out = data.val_cases + data.test_cases
    fp32_dice, int8_dice = (
        evaluate_cases(net, "ct", held_out, CLASSES, ct.training.patch_size).dice for net in (fp32, int8)
    )
    assert fp32_dice["organ"] > 0.5  # a network that segments, so that the comparison means something
    assert int8_dice == pytest.approx(fp32_dice, abs=0.03, nan_ok=True)

    image = sorted((ct.data.root / "imagesTr").iterdir())[0]
    mask = tmp_path / "int8.nii.gz"
    predict = ["predict", "--checkpoint", str(out / "ct.int8.onnx"), "--modality", "ct", "--input", str(image)]
    assert main([*predict, "--output", str(mask), "--site-config", str(three_sites[0])]) == 0
    assert nib.load(str(mask)).shape == nib.load(str(image)).shape


def test_int8_needs_a_calibration_site_of_the_export_s_modality(trained_checkpoint, three_sites, tmp_path, capsys):
    path = trained_checkpoint[0]
    args = ["export", "--checkpoint", str(path), "--modality", "ct", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main([*args, "--int8"])
    assert "--int8 and --calibration go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--int8", "--calibration", str(three_sites[0]), "--calibration-windows", "0"])
    assert "--calibration-windows: must be at least 1, got 0" in capsys.readouterr().err
    us = load_site_config(three_sites[2])
    assert main([*args, "--int8", "--calibration", str(three_sites[2])]) == 2
    assert f"site {us.site} is us, not ct" in capsys.readouterr().err
    assert not (tmp_path / "out" / "ct.int8.onnx").exists()


def test_calibration_windows_come_from_slices_across_the_site_s_training_cases(three_sites, tmp_path):
    """With 16 x 16 patches each 32 x 32 slice gives 9 sliding windows, so 9 windows could all be the first
    slice's; they are drawn from slices spread over the training cases instead (each window is found as a
    crop of a slice of the case it came from)."""
    patches = "training:\n  patch_size: [16, 16]\n"
    site_yaml = _copy_of_site(three_sites[0], tmp_path, "small_patches.yaml", three_sites[0].read_text(), patches)
    _, windows = calibration_windows(site_yaml, "ct", list(CLASSES), limit=9)
    cases = SiteData.from_config(load_site_config(site_yaml), list(CLASSES)).train_cases
    assert len(windows) == 9 and all(w.shape == (1, 1, 16, 16) for w in windows)

    def source(window):
        for case in cases:
            crops = np.lib.stride_tricks.sliding_window_view(case.image_slices().astype(np.float32), (16, 16), (1, 2))
            if (crops == window[0, 0]).all(axis=(-2, -1)).any():
                return case.case_id
        return None

    sources = [source(w) for w in windows]
    assert None not in sources and len(set(sources)) > 1
