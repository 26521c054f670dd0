"""INT8 for small hospitals: static post-training quantisation of an export, calibrated on a site's cases.

``python -m fed_swinumamba export ... --int8 --calibration SITE_YAML`` writes, beside the float32
``<modality>.onnx``, ``<modality>.int8.onnx``: ONNX Runtime's static quantisation in QDQ form with uint8
activations and per-channel int8 weights (U8S8, the x86 CPU layout) of the operators that carry the
network's weights (``QUANTIZED_OPS``) but those that read the image or write the logits; the selective
scans, norms and the rest stay float32 between them.

The activation ranges come from the site's own training cases, fed to the network exactly as ``predict``
feeds them (the site's preprocessing, its patch size, the same sliding windows): the calibration runs
where the command runs, at the site, and no image leaves it. The file records which site calibrated it,
on how many windows, and how often its masks agree with the float32 export's on those windows, so a site
can see what 8 bits cost before it deploys them (the Dice they cost: benchmarks/bench_deploy.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .data import SiteData, load_site_config
from .data.site_config import SiteConfig
from .export import OnnxNetwork, set_metadata
from .ops import scan_onnx
from .training import predict_slices

__all__ = ["QUANTIZED_OPS", "calibration_site", "calibration_windows", "quantize_export"]

QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
DEFAULT_CALIBRATION_WINDOWS = 64


class _WindowRecorder:
    """Stands in for the network in ``predict_slices``: keeps the windows it is shown, answers zeros."""

    def __init__(self, num_classes: int):
        self.num_classes, self.windows = num_classes, []

    def __call__(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        self.windows.extend(w[None].numpy().astype(np.float32) for w in image)
        return image.new_zeros((image.shape[0], self.num_classes, *image.shape[2:]))


def calibration_site(site_config: str | Path, modality: str) -> SiteConfig:
    """The site config that is to calibrate an export of ``modality``; an error naming it if it cannot."""
    site = load_site_config(site_config)
    if site.modality != modality:
        raise ValueError(f"{site_config}: site {site.site} is {site.modality}, not {modality}")
    return site


def calibration_windows(
    site_config: str | Path, modality: str, class_names: list[str], limit: int = DEFAULT_CALIBRATION_WINDOWS
) -> tuple[str, list[np.ndarray]]:
    """The site's name and up to ``limit`` network inputs (1, C, h, w) from its training cases: sliding windows
    as ``predict`` would give them to the network, of up to ``limit`` slices spread evenly over all the cases'
    slices, an equal share of central windows from each (so that the many windows of a large slice do not
    crowd out the other cases)."""
    site = calibration_site(site_config, modality)
    cases = SiteData.from_config(site, class_names).train_cases
    if not cases:
        raise ValueError(f"{site_config}: site {site.site} has no training case to calibrate on")
    slices = [(case, i) for case in cases for i in range(case.num_slices)]
    spread = np.unique(np.linspace(0, len(slices) - 1, min(limit, len(slices))).round().astype(int))
    share = -(-limit // len(spread))  # windows per slice
    windows = []
    for k in spread:
        case, i = slices[k]
        recorder = _WindowRecorder(len(class_names) + 1)
        predict_slices(recorder, modality, case.image_slices(i, 1), site.training.patch_size)
        central = np.linspace(0, len(recorder.windows) - 1, share + 2)[1:-1].round().astype(int)
        windows += [recorder.windows[j] for j in np.unique(central)]
    return site.site, windows[:limit]


class _Inputs:
    """The windows as ONNX Runtime's calibration data reader wants them."""

    def __init__(self, windows: list[np.ndarray], input_name: str):
        self._feeds: Iterator[dict] = iter({input_name: w} for w in windows)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _calibrated_ranges(fp32: Path, windows: list[np.ndarray], scratch: Path):
    """Each quantised operator's input and output ranges over the windows (min-max), computed by ONNX
    Runtime's calibrator in a session that runs the scan nodes."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    class WithScans(MinMaxCalibrater):
        def create_inference_session(self):
            options = scan_onnx.session_options()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.infer_session = ort.InferenceSession(
                self.augmented_model_path, options, providers=self.execution_providers
            )

    calibrator = WithScans(fp32, list(QUANTIZED_OPS), str(scratch / "augmented.onnx"))
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.collect_data(_Inputs(windows, OnnxNetwork.INPUT))
    return calibrator.compute_data()


def _image_and_logit_layers(path: Path) -> list[str]:
    """The layers that read the image and the one that writes the logits: they stay float32, as is usual
    (the image's intensities and the logits' margins are what 8 bits would blur most; a few kB of weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ends = {OnnxNetwork.INPUT, OnnxNetwork.OUTPUT}
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and ends & {*n.input, *n.output}]


def _agreement(int8: OnnxNetwork, fp32: OnnxNetwork, windows: list[np.ndarray], modality: str) -> float:
    """Fraction of the windows' pixels where the two networks pick the same class."""
    same = total = 0
    for window in windows:
        image = torch.from_numpy(window)
        a, b = (net(image, modality).argmax(dim=1) for net in (int8, fp32))
        same, total = same + int((a == b).sum()), total + a.numel()
    return same / total


def quantize_export(fp32_file: str | Path, site_config: str | Path, limit: int = DEFAULT_CALIBRATION_WINDOWS) -> Path:
    """``<modality>.int8.onnx`` beside the float32 export ``fp32_file``, calibrated on ``site_config``'s
    training cases (written atomically; the float32 file is left as it is)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    fp32_file = Path(fp32_file)
    fp32 = OnnxNetwork(fp32_file)
    site, windows = calibration_windows(site_config, fp32.modality, list(fp32.class_names), limit)
    target = fp32_file.with_name(f"{fp32.modality}.int8.onnx")
    tmp = target.with_suffix(".onnx.tmp")
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            ranges = Path(scratch) / "ranges.json"
            save_tensors_data(_calibrated_ranges(fp32_file, windows, Path(scratch)), ranges)
            quantize_static(
                fp32_file,
                tmp,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=_image_and_logit_layers(fp32_file),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibration_cache_path=ranges,
            )
        # quantize_static keeps the float32 file's description, so OnnxNetwork can run the result before
        # it gets its own
        agreement = _agreement(OnnxNetwork(tmp), fp32, windows, fp32.modality)
        calibration = {
            "site": site,
            "windows": len(windows),
            "method": "minmax",
            "ops": list(QUANTIZED_OPS),
            "agreement_with_float32": round(agreement, 6),
        }
        set_metadata(tmp, fp32.meta | {"precision": "int8", "calibration": calibration})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target
