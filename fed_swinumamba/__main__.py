"""Command line of the library.

python -m fed_swinumamba predict --checkpoint CKPT|ONNX --modality ct|mri|us --input PATH --output PATH [--site-config YAML]
python -m fed_swinumamba export --checkpoint CKPT --modality ct|mri|us --out DIR
"""

from __future__ import annotations

import argparse
import sys

from .data.site_config import MODALITIES
from .export import ExportError, export_onnx
from .inference import Segmenter, predict


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
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            print(f"wrote {export_onnx(args.checkpoint, args.modality, args.out)}")
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
