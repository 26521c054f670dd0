"""Seconds to score one real-size CT case's boundaries: HD95 + NSD from one surface-distance pass
(``fed_swinumamba.metrics.case_scores``) against MONAI's ``compute_hausdorff_distance`` and
``compute_surface_dice`` called one after the other, as the evaluation did before.

The case is bench_site_scale's 512 x 512 x S chest CT label map (an organ, a small tumour); two predictions:
one near the truth (the organ one voxel thicker, the tumour thinner: a trained model's case) and one of
scattered voxels (an untrained model's, with large surfaces). Each method runs ``--repeats`` times,
interleaved, and the median is printed. Then each method scores each prediction once more in a fresh
process, which reports the peak resident memory (VmHWM) it added over the case's arrays.

    python benchmarks/bench_boundary_metrics.py --slices 55 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_site_scale import SPACING, make_case  # noqa: E402

from fed_swinumamba.metrics import case_scores  # noqa: E402


def monai_separately(prediction: np.ndarray, truth: np.ndarray, tolerance: float) -> None:
    for c in (1, 2):
        y_pred, y = (
            torch.from_numpy(prediction == c)[None, None].float(),
            torch.from_numpy(truth == c)[None, None].float(),
        )
        compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(SPACING))
        compute_surface_dice(y_pred, y, class_thresholds=[tolerance], include_background=True, spacing=list(SPACING))


def one_pass(prediction: np.ndarray, truth: np.ndarray, tolerance: float) -> None:
    case_scores(prediction, truth, 3, tolerance, SPACING)


METHODS = {"one pass": one_pass, "MONAI's two functions": monai_separately}


def peak_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))


def cases(slices: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The truth (H, W, S) uint8, in the spacing's axis order, and the two predictions."""
    rng = np.random.default_rng(0)
    _, truth = make_case(rng, slices)
    near = ndimage.binary_dilation(truth == 1, iterations=1).astype(np.uint8)
    near[ndimage.binary_erosion(truth == 2, iterations=1)] = 2
    scattered = (rng.integers(0, 3, truth.shape) * (rng.random(truth.shape) < 0.05)).astype(np.uint8)
    return truth, {"near the truth": near, "scattered voxels": scattered}


def added_memory(method: str, prediction: str, slices: int) -> int:
    """MiB a fresh process's peak grows by while ``method`` scores ``prediction`` (this script, ``--measure``)."""
    cmd = [sys.executable, __file__, "--slices", str(slices), "--measure", method, prediction]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=55)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "PREDICTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    truth, predictions = cases(args.slices)
    if args.measure:
        method, prediction = args.measure
        del predictions[next(p for p in predictions if p != prediction)]
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
            f.write("5")
        before = peak_mib()
        METHODS[method](predictions[prediction], truth, 2.0)
        print(peak_mib() - before)
        return
    print(f"512 x 512 x {args.slices} label map, spacing {SPACING} mm, NSD tolerance 2 mm, median of {args.repeats}\n")
    print(
        "| prediction | one pass (s) | MONAI's two functions (s) | speed-up | peak memory added: one pass / MONAI (MiB) |"
    )
    print("|---|---|---|---|---|")
    for name, prediction in predictions.items():
        ours, theirs = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            one_pass(prediction, truth, 2.0)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            monai_separately(prediction, truth, 2.0)
            theirs.append(time.perf_counter() - t)
        a, b = statistics.median(ours), statistics.median(theirs)
        memory = " / ".join(str(added_memory(m, name, args.slices)) for m in METHODS)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.1f}x | {memory} |")


if __name__ == "__main__":
    main()
