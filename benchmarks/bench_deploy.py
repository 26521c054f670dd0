"""Deployment on a CPU: latency per 512 x 512 slice, file size and peak memory of the full-size networks,
PyTorch eager (native scan kernel) against the ONNX export in ONNX Runtime (issue 17).

Per network (swin_umamba, swin_umamba_d; random weights: latency does not depend on them), a checkpoint
of one modality is written and exported with ``fed_swinumamba.export.export_onnx`` (which checks ONNX
Runtime against PyTorch on a sample); then each runtime is measured in a fresh process: the median of
``--repeats`` forward passes of one 1 x 1 x 512 x 512 slice after one untimed pass, the process's peak RSS
(ru_maxrss) and, for ONNX Runtime, where the time goes by operator type (its profiler, one more pass).
The largest |ONNX - PyTorch| relative to the largest |PyTorch| on the same slice is reported too.

    python benchmarks/bench_deploy.py [--repeats 3] [--threads 2] [--out runs/bench_deploy]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIDE = 512
NETWORKS = ("swin_umamba", "swin_umamba_d")


def _slice() -> torch.Tensor:
    return torch.randn(1, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def measure(runtime: str, path: Path, repeats: int, threads: int) -> dict:
    """Latency, peak RSS (and the op profile) of one runtime, in this (fresh) process."""
    torch.set_num_threads(threads)
    image = _slice()
    if runtime == "eager":
        from fed_swinumamba.checkpoint import Checkpoint

        model = Checkpoint.load(path).build_model("ct").eval()

        def forward():
            with torch.no_grad():
                return model(image, "ct")
    else:
        from fed_swinumamba.export import OnnxNetwork

        network = OnnxNetwork(path, threads=threads)

        def forward():
            return network(image, "ct")

    forward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = forward()
        times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "all": times, "peak_mib": _peak_mib()}
    np.save(path.with_suffix(f".{runtime}.npy"), logits.numpy())
    if runtime == "onnx":
        result["profile"] = _profile(path, threads, image)
    return result


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _profile(path: Path, threads: int, image: torch.Tensor) -> dict[str, float]:
    """Seconds per ONNX operator type over one pass (ONNX Runtime's profiler)."""
    import onnxruntime as ort

    from fed_swinumamba.ops import scan_onnx

    options = scan_onnx.session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"image": image.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e6
    return dict(per_op.most_common(6))


def run_network(variant: str, out: Path, repeats: int, threads: int) -> dict:
    from fed_swinumamba.checkpoint import Checkpoint
    from fed_swinumamba.export import export_onnx
    from fed_swinumamba.model import ModelConfig, build_model

    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(variant=variant, modalities=("ct",))
    checkpoint = out / f"{variant}.safetensors"
    torch.manual_seed(0)
    Checkpoint(build_model(config).eval().state_dict(), config, ("organ", "lesion")).save(checkpoint)
    start = time.perf_counter()
    onnx_file = export_onnx(checkpoint, "ct", out / variant)
    export_seconds = time.perf_counter() - start
    row = {"export_seconds": export_seconds, "mib": {}}
    for runtime, path in (("eager", checkpoint), ("onnx", onnx_file)):
        cmd = [sys.executable, __file__, "--measure", runtime, str(path), "--repeats", str(repeats)]
        done = subprocess.run([*cmd, "--threads", str(threads)], capture_output=True, text=True, check=True)
        row[runtime] = json.loads(done.stdout.strip().splitlines()[-1])
        row["mib"][runtime] = path.stat().st_size / 2**20
    eager, exported = np.load(checkpoint.with_suffix(".eager.npy")), np.load(onnx_file.with_suffix(".onnx.npy"))
    row["max_relative_difference"] = float(np.abs(exported - eager).max() / np.abs(eager).max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="where the checkpoints and exports go (default: a temp dir)"
    )
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--measure", nargs=2, metavar=("RUNTIME", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.repeats, args.threads)))
        return
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = {v: run_network(v, out, args.repeats, args.threads) for v in args.networks.split(",")}
    print(
        f"load average before {load[0]:.1f} / {load[1]:.1f}, after {os.getloadavg()[0]:.1f}; {args.threads} threads\n"
    )
    print("| network | runtime | s / 512x512 slice (median) [all] | vs eager | file MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for variant, row in rows.items():
        for runtime in ("eager", "onnx"):
            r = row[runtime]
            speedup = row["eager"]["seconds"] / r["seconds"]
            runs = ", ".join(f"{t:.2f}" for t in r["all"])
            print(
                f"| {variant} | {runtime} | {r['seconds']:.2f} [{runs}] | {speedup:.2f}x | {row['mib'][runtime]:.1f} "
                f"| {r['peak_mib']:.0f} |"
            )
    for variant, row in rows.items():
        profile = ", ".join(f"{op} {s:.2f} s" for op, s in row["onnx"]["profile"].items())
        print(
            f"\n- {variant}: export {row['export_seconds']:.0f} s; ONNX vs eager on the slice "
            f"{row['max_relative_difference']:.1e} relative; ONNX Runtime by operator: {profile}"
        )


if __name__ == "__main__":
    main()
