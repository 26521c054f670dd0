"""Command line of the library.

python -m fed_swinumamba predict --checkpoint CKPT|ONNX --modality ct|mri|us --input PATH --output PATH [--site-config YAML]
python -m fed_swinumamba export --checkpoint CKPT --modality ct|mri|us --out DIR [--int8 --calibration SITE_YAML]
python -m fed_swinumamba prune --checkpoint CKPT --ratio 0.3 --out PRUNED   (then recovery rounds: initial-checkpoint)
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import Checkpoint, prune_checkpoint
from .data.site_config import MODALITIES
from .export import ExportError, OnnxNetwork, export_onnx
from .inference import Segmenter, predict
from .quantization import DEFAULT_CALIBRATION_WINDOWS, calibration_site, quantize_export


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fed_swinumamba", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment a NIfTI file, a PNG image, or a folder of them")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a .safetensors checkpoint of a run (e.g. runs/demo/checkpoints/best.safetensors), or its .onnx export",
    )
    p.add_argument("--modality", choices=MODALITIES, required=True)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="the mask file, or a folder for the masks of a folder")
    p.add_argument(
        "--site-config", help="a site YAML: its preprocessing, slice axis, patch size and label values are used"
    )
    p.add_argument("--device", default="cpu")
    e = sub.add_parser("export", help="one modality's network of a checkpoint as a self-describing ONNX file")
    e.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint of a run")
    e.add_argument("--modality", choices=MODALITIES, required=True)
    e.add_argument("--out", required=True, help="folder for <modality>.onnx")
    e.add_argument(
        "--int8",
        action="store_true",
        help="also write <modality>.int8.onnx, quantised to 8 bits (needs --calibration; run it at the site)",
    )
    e.add_argument("--calibration", help="the site YAML whose training cases calibrate the INT8 model")
    e.add_argument(
        "--calibration-windows",
        type=_at_least_one,
        default=DEFAULT_CALIBRATION_WINDOWS,
        help="network inputs (sliding windows of the site's slices) to calibrate on",
    )
    r = sub.add_parser(
        "prune",
        help="remove a fraction of the channels (L1) of a checkpoint; train it back with run config initial-checkpoint",
    )
    r.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint of a run (the coordinator's)")
    r.add_argument("--ratio", type=_ratio, required=True, help="fraction of each pruning group's channels to remove")
    r.add_argument("--out", required=True, help="the pruned checkpoint (.safetensors)")
    args = parser.parse_args(argv)
    if args.command == "export" and args.int8 != bool(args.calibration):
        parser.error("--int8 and --calibration go together: the INT8 model is calibrated on a site's own cases")
    try:
        if args.command == "prune":
            source = Checkpoint.load(args.checkpoint)
            pruned = prune_checkpoint(source, args.ratio)
            pruned.save(args.out)
            kept, was = (sum(v.numel() for v in c.state.values()) for c in (pruned, source))
            print(
                f"wrote {args.out}: {kept / 1e6:.2f} M of {was / 1e6:.2f} M parameters; "
                f"train it back with run config initial-checkpoint={args.out}"
            )
            return 0
        if args.command == "export":
            if args.int8:
                calibration_site(args.calibration, args.modality)  # before the export, which takes minutes
            exported = export_onnx(args.checkpoint, args.modality, args.out)
            print(f"wrote {exported}")
            if args.int8:
                int8 = quantize_export(exported, args.calibration, args.calibration_windows)
                calibration = OnnxNetwork(int8).meta["calibration"]
                print(
                    f"wrote {int8}: calibrated on {calibration['windows']} windows of site {calibration['site']}, "
                    f"where its masks agree with float32's on {calibration['agreement_with_float32']:.2%} of pixels"
                )
            return 0
        segmenter = Segmenter.from_files(args.checkpoint, args.modality, args.site_config, args.device)
        written = predict(segmenter, args.input, args.output)
    except (ValueError, FileNotFoundError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} mask(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
