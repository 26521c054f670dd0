"""`python -m fed_swinumamba predict`: masks on the input's grid that reproduce the federation's evaluation."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

from fed_swinumamba.__main__ import main
from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.data import SiteData, load_site_config
from fed_swinumamba.model import build_model
from fed_swinumamba.training import evaluate_cases

CLASSES = ["organ", "lesion"]


def _dice(pred: np.ndarray, label: np.ndarray) -> list[float]:
    """2 |P & T| / (|P| + |T|) per foreground class; NaN where the class is in neither."""
    out = []
    for c in (1, 2):
        p, t = pred == c, label == c
        out.append(2 * (p & t).sum() / (p.sum() + t.sum()) if p.any() or t.any() else float("nan"))
    return out


def test_predict_keeps_shape_and_affine_and_reproduces_the_evaluation_dice(trained_checkpoint, tmp_path):
    path, model, ct, data = trained_checkpoint
    case = data.val_cases[0]
    image_file = next(p for p in (ct.data.root / "imagesTr").iterdir() if p.name.startswith(case.case_id))
    label_file = ct.data.root / "labelsTr" / image_file.name
    out = tmp_path / "mask.nii.gz"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                "--modality",
                "ct",
                "--input",
                str(image_file),
                "--output",
                str(out),
                "--site-config",
                str(ct.source),
            ]
        )
        == 0
    )

    source, written = nib.load(str(image_file)), nib.load(str(out))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert written.header.get_zooms() == source.header.get_zooms()
    mask = np.asarray(written.dataobj)
    assert set(np.unique(mask)) <= {0, 1, 2} and (mask > 0).any()

    expected = evaluate_cases(model, "ct", [case], CLASSES, ct.training.patch_size)
    got = _dice(mask, np.asarray(nib.load(str(label_file)).dataobj))
    assert got == pytest.approx([expected.dice[c] for c in CLASSES], abs=1e-6, nan_ok=True)


def test_predict_a_folder_of_png_images_writes_masks_of_the_same_size(trained_checkpoint, three_sites, tmp_path):
    path = trained_checkpoint[0]
    us = load_site_config(three_sites[2])
    images = us.data.root / "images"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                "--modality",
                "us",
                "--input",
                str(images),
                "--output",
                str(tmp_path),
                "--site-config",
                str(us.source),
            ]
        )
        == 0
    )
    for source in images.iterdir():
        mask = np.array(Image.open(tmp_path / source.name))
        assert mask.shape == np.array(Image.open(source)).shape[:2]
        assert set(np.unique(mask)) <= {0, 128, 255}  # written back in the site's own label values


def test_predict_refuses_a_modality_the_checkpoint_has_no_encoder_for(
    trained_checkpoint, three_sites, tmp_path, capsys
):
    path = trained_checkpoint[0]
    image = next((load_site_config(three_sites[1]).data.root / "imagesTr").iterdir())
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                "--modality",
                "mri",
                "--input",
                str(image),
                "--output",
                str(tmp_path / "m.nii.gz"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(path) in err and "no encoder for modality 'mri'" in err and "ct, us" in err


def test_predict_applies_the_sites_geometry_and_writes_the_mask_back_on_the_input_grid(
    trained_checkpoint, three_sites, tmp_path, monkeypatch
):
    """A site that trains reoriented (LPS) and resampled (3 mm in-plane) data: the network sees that grid, and
    the mask comes back on the input's. A network that returned the true labels gives back the true mask."""
    import yaml

    import fed_swinumamba.inference as inference

    path = trained_checkpoint[0]
    site_yaml = tmp_path / "lps.yaml"
    config = yaml.safe_load(three_sites[0].read_text())
    config["data"].update(
        root=str(load_site_config(three_sites[0]).data.root), orientation="LPS", spacing=[3.0, 3.0, 0]
    )
    config["training"] = {"patch_size": [32, 32], "cache_dir": str(tmp_path / "cache")}
    site_yaml.write_text(yaml.safe_dump(config))
    site = load_site_config(site_yaml)
    case = SiteData.from_config(site, CLASSES).val_cases[0]
    seen = []

    def perfect(model, modality, slices, roi_size):
        seen.append(tuple(slices.shape))
        return torch.from_numpy(case.label_slices())  # the truth, on the site's grid

    monkeypatch.setattr(inference, "predict_slices", perfect)
    image_file = site.data.root / "imagesTr" / f"{case.case_id}.nii.gz"
    out = tmp_path / "mask.nii.gz"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                "--modality",
                "ct",
                "--input",
                str(image_file),
                "--output",
                str(out),
                "--site-config",
                str(site_yaml),
            ]
        )
        == 0
    )
    assert seen == [(3, 16, 16)]  # the network saw the 3 mm grid: 32 x 32 at 1.5 mm -> 16 x 16
    source, written = nib.load(str(image_file)), nib.load(str(out))
    assert written.shape == source.shape == (32, 32, 3) and np.allclose(written.affine, source.affine)
    truth = np.asarray(nib.load(str(site.data.root / "labelsTr" / image_file.name)).dataobj)
    dice = _dice(np.asarray(written.dataobj), truth)
    assert dice[0] > 0.75  # nearest-neighbour 2x down and up again (0.83 here); the same mask left mirrored: 0.31


def test_windows_of_one_constant_value_are_computed_once_with_the_same_logits():
    """Air after the CT window is exactly 0: its windows go through the network once, with unchanged logits."""
    from fed_swinumamba.training import once_per_constant_window

    config = tiny_model("ct")
    torch.manual_seed(0)
    model = build_model(config).eval()
    windows = torch.rand(6, 1, 32, 32)
    windows[1], windows[3], windows[4] = 0.0, 0.0, 0.75  # two air windows and one of another constant
    seen = []

    def network(x):
        seen.append(len(x))
        return model(x, "ct")

    with torch.inference_mode():
        expected = model(windows, "ct")
        got = once_per_constant_window(network)(windows)
    assert seen == [5]  # 3 varied windows + 2 distinct constants
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sliding_window_prediction_keeps_no_autograd_graph():
    """Inference runs without gradients: a graph kept over a volume's windows took 7 GB for 8 CT slices."""
    from fed_swinumamba.training import predict_slices

    config = tiny_model("ct")
    model = build_model(config)
    grad_modes = []
    model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    labels = predict_slices(model, "ct", torch.rand(3, 64, 64), (32, 32), sw_batch_size=4)
    assert labels.shape == (3, 64, 64) and labels.dtype == torch.uint8
    assert grad_modes and not any(grad_modes)


@pytest.mark.parametrize("roi, expected_batch", [((32, 32), 64), ((64, 64), 16), ((128, 128), 4), ((256, 256), 1)])
def test_sliding_windows_are_batched_up_to_a_pixel_budget_per_network_call(roi, expected_batch):
    """Small windows go many to a call, a large one alone: batches of 512 x 512 windows cost the full-size
    network time and memory (benchmarks/RESULTS.md)."""
    from fed_swinumamba.training import WINDOW_PIXELS_PER_CALL, predict_slices

    calls = []

    def network(x, modality):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 3, *x.shape[2:])

    side = 256
    slices = torch.rand(8, side, side)  # varied windows: none computed once per constant
    predict_slices(network, "ct", slices, roi)
    assert max(calls) == expected_batch == max(1, WINDOW_PIXELS_PER_CALL // (roi[0] * roi[1]))
    assert sum(calls) >= 8  # every slice's windows were computed


def test_predict_uses_the_modality_s_own_norms_of_a_checkpoint_that_keeps_them_apart(trained_checkpoint, tmp_path):
    """norm-partition = modality: the CT segmenter gets the CT copies, the US segmenter the US copies."""
    from fed_swinumamba.inference import Segmenter
    from fed_swinumamba.model import normalisation_state_names
    from fed_swinumamba.params import split_norms

    path, model, ct, _ = trained_checkpoint
    ckpt = Checkpoint.load(path)
    split = split_norms(ckpt.state, normalisation_state_names(model), ("ct", "us"))
    norm = "encoder.layers.3.blocks.0.ln_1.weight"
    split = {k: v.clone() for k, v in split.items()}
    split[f"modality_norms.us.{norm}"] += 1.0  # the US sites' norms moved elsewhere
    fedbn = tmp_path / "fedbn.safetensors"
    Checkpoint(split, ckpt.model_config, ckpt.class_names, 3, 1).save(fedbn)
    for modality, expected in (("ct", ckpt.state[norm]), ("us", ckpt.state[norm] + 1.0)):
        segmenter = Segmenter.from_files(fedbn, modality)
        assert torch.equal(segmenter.network.state_dict()[norm], expected)
