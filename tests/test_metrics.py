"""Dice, HD95 and NSD per class on hand-made cases whose surface distances are worked out by hand."""

import math
import warnings

import numpy as np
import pytest
import torch

from fed_swinumamba import metrics
from fed_swinumamba.metrics import ClassScores, ClassSummary, SiteScores, case_scores, paired_gain


def plates(label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two parallel plates one voxel thick in a (z, y, x) = (6, 4, 8) volume.

    A one-voxel-thick mask is all surface (erosion removes every voxel), so the surface distances are
    those between voxel centres. Truth: z = 1, y in 0..1, x in 0..5 (12 voxels); prediction: z = 3,
    y in 0..1, x in 0..3 (8 voxels), two slices above the truth's first four columns.
    """
    truth, prediction = np.zeros((6, 4, 8), np.int64), np.zeros((6, 4, 8), np.int64)
    truth[1, 0:2, 0:6] = label
    prediction[3, 0:2, 0:4] = label
    return prediction, truth


# With spacing (z, y, x) = (1.5, 1, 2) mm, dz = 2 slices is 3 mm and one column 2 mm:
#   prediction -> truth: each of the 8 voxels lies 3 mm straight above a truth voxel: 8 x 3.
#   truth -> prediction: columns 0..3 lie 3 mm below: 8 x 3; column 4 is one column past the prediction's
#   edge: sqrt(3^2 + 2^2) = sqrt(13), 2 voxels; column 5 two columns past: sqrt(3^2 + 4^2) = 5, 2 voxels.
# HD95: the 95th percentile of the 12 truth distances sits at sorted position 0.95 * 11 = 10.45, between
# the two 5s -> 5; that of the prediction's is 3; the larger is 5 mm.
# NSD at 4 mm: 8 + (8 + 2) of the 20 surface voxels are within it -> 0.9; at 3.5 mm: (8 + 8) / 20 = 0.8.
PLATE_SPACING = (1.5, 1.0, 2.0)


def test_hd95_and_nsd_of_parallel_plates_in_mm():
    prediction, truth = plates()
    scores = case_scores(prediction, truth, num_classes=2, tolerance=4.0, spacing=PLATE_SPACING)
    assert scores[1].dice == 0.0  # disjoint plates
    assert scores[1].hd95 == pytest.approx(5.0, rel=1e-6)
    assert scores[1].nsd == pytest.approx(18 / 20)


def test_spacing_changes_the_distances_pixels_without_it():
    # In voxel units dz = 2, and the columns past the edge are sqrt(4 + 1) and sqrt(4 + 4) away:
    # HD95 = sqrt(8) (the two largest of the 12 truth distances again); NSD at 2.5 voxels counts sqrt(5) = 2.24
    # but not sqrt(8) = 2.83 -> (8 + 8 + 2) / 20.
    prediction, truth = plates()
    scores = case_scores(prediction, truth, num_classes=2, tolerance=2.5)
    assert scores[1].hd95 == pytest.approx(math.sqrt(8), rel=1e-6)
    assert scores[1].nsd == pytest.approx(18 / 20)


def test_each_class_has_its_own_tolerance():
    prediction, truth = plates(label=1)
    prediction2, truth2 = plates(label=2)
    prediction[:, 2:4], truth[:, 2:4] = prediction2[:, 0:2], truth2[:, 0:2]  # the same plates, class 2, at y in 2..3
    scores = case_scores(
        torch.as_tensor(prediction), torch.as_tensor(truth), num_classes=3, tolerance=[4.0, 3.5], spacing=PLATE_SPACING
    )
    assert scores[1].nsd == pytest.approx(18 / 20)
    assert scores[2].nsd == pytest.approx(16 / 20)  # sqrt(13) = 3.61 is outside 3.5 mm
    assert scores[1].hd95 == scores[2].hd95 == pytest.approx(5.0, rel=1e-6)


def test_hd95_nsd_and_dice_of_concentric_squares_in_2d():
    # Truth: the 3x3 square rows/cols 3..5; its surface is the ring of 8 around the centre pixel. Prediction:
    # the 5x5 square rows/cols 2..6, ring of 16. Spacing (rows, cols) = (1, 3) mm.
    #   prediction -> truth: top/bottom side pixels off the corners one row from the truth: 6 x 1; left/right
    #   ones one column from it: 6 x 3; corners one row and one column: 4 x sqrt(1 + 9) = sqrt(10).
    #   truth -> prediction: its top and bottom rows, one row inside the prediction's: 6 x 1; (4, 3) and (4, 5),
    #   3 mm from the side columns but 2 rows (2 mm) from the top and bottom rows: 2 x 2.
    # HD95: prediction's sorted position 0.95 * 15 = 14.25 between two sqrt(10)s; truth's 0.95 * 7 = 6.65
    # between the two 2s; the larger is sqrt(10). NSD at 2.5 mm: (6 + 8) / 24. Dice: 2 * 9 / (9 + 25).
    truth, prediction = np.zeros((9, 9), np.uint8), np.zeros((9, 9), np.uint8)
    truth[3:6, 3:6] = 1
    prediction[2:7, 2:7] = 1
    scores = case_scores(prediction, truth, num_classes=2, tolerance=2.5, spacing=(1.0, 3.0))
    assert scores[1] == ClassScores(
        dice=pytest.approx(9 / 17), hd95=pytest.approx(math.sqrt(10), rel=1e-6), nsd=pytest.approx(14 / 24)
    )
    # In pixels every side is one pixel off and the corners sqrt(2): HD95 = sqrt(2).
    assert case_scores(prediction, truth, num_classes=2, tolerance=2.5)[1].hd95 == pytest.approx(math.sqrt(2), rel=1e-6)


def test_identical_masks_score_perfectly():
    truth = np.zeros((5, 6, 7), np.int64)
    truth[1:4, 2:5, 1:6] = 1
    assert case_scores(truth, truth.copy(), num_classes=2, tolerance=0.0, spacing=(3.0, 0.7, 0.7))[1] == ClassScores(
        1.0, 0.0, 1.0
    )


def test_a_class_in_one_mask_only_or_in_neither():
    truth = np.zeros((8, 8), np.int64)
    prediction = np.zeros((8, 8), np.int64)
    truth[1:3, 1:3] = 1  # class 1 missed
    prediction[5:7, 5:7] = 2  # class 2 hallucinated; class 3 in neither
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided here, not left to MONAI's empty-mask warnings
        scores = case_scores(prediction, truth, num_classes=4, tolerance=1.0)
    assert scores[1] == scores[2] == ClassScores(0.0, math.inf, 0.0)
    assert all(math.isnan(v) for v in (scores[3].dice, scores[3].hd95, scores[3].nsd))


def test_site_means_skip_absent_classes_and_count_unbounded_hd95():
    site = SiteScores()
    site.add({1: ClassScores(0.5, 2.0, 0.8), 2: ClassScores(math.nan, math.nan, math.nan)})
    site.add({1: ClassScores(0.0, math.inf, 0.0), 2: ClassScores(1.0, 0.0, 1.0)})
    site.add({1: ClassScores(1.0, 4.0, 1.0), 2: ClassScores(math.nan, math.nan, math.nan)})
    summary = site.summary()
    assert site.num_cases == 3
    assert summary[1] == ClassSummary(dice=0.5, hd95=3.0, nsd=pytest.approx(0.6), cases=3, hd95_unbounded=1)
    assert summary[2] == ClassSummary(dice=1.0, hd95=0.0, nsd=1.0, cases=1, hd95_unbounded=0)
    assert site.case_dice == [0.5, 0.5, 1.0]  # each case's mean over the classes that count for it
    empty = SiteScores()
    empty.add({1: ClassScores(math.nan, math.nan, math.nan)})
    assert empty.summary()[1].cases == 0 and math.isnan(empty.summary()[1].dice)
    assert math.isnan(empty.case_dice[0])


def test_a_paired_gain_is_the_mean_per_case_difference_with_its_standard_error():
    # differences 0.1, 0.0, 0.2 (the NaN case left out): mean 0.1, sample sd 0.1, standard error 0.1 / sqrt(3)
    gain = paired_gain([0.9, 0.8, 0.7, math.nan], [0.8, 0.8, 0.5, 0.6])
    assert (gain.mean, gain.standard_error, gain.cases) == (pytest.approx(0.1), pytest.approx(0.057735), 3)
    assert gain.exceeds(1.0) and not gain.exceeds(2.0)  # 0.1 is 1.73 standard errors
    one_case = paired_gain([0.9], [0.5])
    assert one_case.standard_error == math.inf and one_case.exceeds(0) and not one_case.exceeds(0.5)
    assert not paired_gain([0.5, 0.6], [0.5, 0.6]).exceeds(0)  # no gain is not a gain, whatever the margin


def test_rejects_inputs_it_cannot_score():
    labels = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="differ in shape"):
        case_scores(labels, np.zeros((4, 5), np.int64), num_classes=2, tolerance=1.0)
    with pytest.raises(ValueError, match="one positive size per axis"):
        case_scores(labels, labels, num_classes=2, tolerance=1.0, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="one per foreground class"):
        case_scores(labels, labels, num_classes=3, tolerance=[1.0])
    with pytest.raises(TypeError, match="integer label map"):
        case_scores(labels.astype(np.float32), labels, num_classes=2, tolerance=1.0)


@pytest.mark.parametrize("chunk", ["one", "truth's", "small"])
def test_both_boundary_scores_equal_monais_own_functions_on_irregular_masks(monkeypatch, chunk):
    """One surface-distance pass gives what MONAI's HD95 and surface Dice compute separately, and each
    surface voxel's distance is MONAI's, in MONAI's order, however the surfaces are chunked: in one chunk,
    in chunks of the truth's surface size (the truth's surface then is one chunk, the prediction's
    several), or in chunks of 5 voxels (mostly a plane each)."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from monai.metrics.utils import get_edge_surface_distance, get_mask_edges
    from scipy import ndimage

    rng = np.random.default_rng(3)
    spacing = [0.8, 0.8, 2.5]
    for _ in range(3):
        truth = ndimage.binary_dilation(rng.random((40, 36, 12)) > 0.995, iterations=3)
        prediction = ndimage.binary_dilation(truth, iterations=1) ^ (rng.random(truth.shape) > 0.97)
        surfaces = get_mask_edges(torch.from_numpy(prediction), torch.from_numpy(truth))
        size = {"one": metrics.SURFACE_CHUNK, "truth's": int(surfaces[1].sum()), "small": 5}[chunk]
        assert chunk != "truth's" or size < int(surfaces[0].sum())
        monkeypatch.setattr(metrics, "SURFACE_CHUNK", size)
        _, directed, _ = get_edge_surface_distance(
            torch.from_numpy(prediction), torch.from_numpy(truth), spacing=spacing, symmetric=True
        )
        for monais, source, target in zip(directed, surfaces, reversed(surfaces), strict=True):
            found = metrics._nearest_surface_distances(source.numpy(), target.numpy(), spacing)
            assert torch.equal(found, monais.float())
        scores = case_scores(
            prediction.astype(np.uint8), truth.astype(np.uint8), num_classes=2, tolerance=1.5, spacing=spacing
        )[1]
        y_pred, y = torch.from_numpy(prediction)[None, None].float(), torch.from_numpy(truth)[None, None].float()
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[1.5], include_background=True, spacing=spacing)
        assert scores.hd95 == pytest.approx(float(hd95), rel=1e-6)
        assert scores.nsd == pytest.approx(float(nsd), rel=1e-6)
        assert 0 < scores.nsd < 1 and scores.hd95 > 0  # irregular masks: neither score is trivially 0 or 1
