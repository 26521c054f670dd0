"""Deployment on a CPU: latency per 512 x 512 slice, file size and peak memory of the full-size networks,
PyTorch eager (native scan kernel) against the ONNX export in ONNX Runtime, float32 and INT8 (issue 17);
and what INT8 costs in Dice on a trained network's held-out cases.

Per network (swin_umamba, swin_umamba_d; random weights: latency does not depend on them), a checkpoint
of one modality is written and exported with ``fed_swinumamba.export.export_onnx`` (which checks ONNX
Runtime against PyTorch on a sample), then quantised to INT8 (``fed_swinumamba.quantization``) calibrated
on ``--calibration-windows`` 512 x 512 slices of a generated phantom CT site; each runtime is measured in a
fresh process: the median of ``--repeats`` forward passes of one 1 x 1 x 512 x 512 slice after one untimed
pass, the process's peak RSS (VmHWM) and, for ONNX Runtime, where the time goes by operator type (its
profiler, one more pass). The largest |ONNX - PyTorch| relative to the largest |PyTorch| on the same slice
is reported too. ``--volume-slices N``: each runtime also runs ``predict`` (loading, preprocessing, the network
over every slice, writing the mask) on one 512 x 512 x N int16 phantom CT volume with the calibration site's
YAML, once, in another fresh process.

``--prune R``: every network also with R of the channels of each pruning group removed (``prune_checkpoint``),
measured the same way. ``--prune-dice CHECKPOINT SITE_YAML...``: per site, the Dice of the checkpoint, of the
same trained ``--recovery-rounds`` more federated rounds (the control), of its R-pruned network as it is, and
after the same recovery rounds (``initial-checkpoint``), in PyTorch and as INT8.

``--dice CHECKPOINT SITE_YAML...``: per site, its modality's network from a trained checkpoint (e.g. the
demo's ``runs/demo/checkpoints/best.safetensors``) exported, quantised on that site's training cases, and
scored on its held-out cases (its test cases where it keeps them apart) in PyTorch, ONNX Runtime float32
and INT8.

    python benchmarks/bench_deploy.py [--repeats 3] [--threads 2] [--volume-slices 100] [--out runs/bench_deploy]
    python benchmarks/bench_deploy.py --networks "" --dice runs/demo/checkpoints/best.safetensors runs/demo/sites/*.yaml
    python benchmarks/bench_deploy.py --prune 0.3 [--prune-dice runs/demo/checkpoints/latest.safetensors SITES...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
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


def measure_volume(path: Path, image: Path, site: Path, threads: int) -> dict:
    """Seconds and peak RSS of ``predict`` with the checkpoint or export ``path`` on ``image``, loading and writing
    included, in this (fresh) process."""
    from fed_swinumamba.inference import Segmenter

    torch.set_num_threads(threads)
    segmenter = Segmenter.from_files(path, "ct", site)
    start = time.perf_counter()
    segmenter.predict_file(image, path.with_name(path.name + ".mask.nii.gz"))
    return {"volume_seconds": time.perf_counter() - start, "volume_peak_mib": _peak_mib()}


def _peak_mib() -> float:
    """This process's peak RSS since it started: VmHWM, which exec resets (ru_maxrss keeps the parent's peak
    across fork and exec, so every runtime had reported the benchmark's own peak)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


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


def calibration_site(out: Path, windows: int) -> Path:
    """A phantom CT site of real slice size (512 x 512) whose patches are whole slices."""
    from fed_swinumamba.simulated import generate_phantoms, split_dataset

    data = generate_phantoms(out / "calibration_data", "ct", num_cases=max(2, windows // 2), seed=0, size=SIDE)
    (site,) = split_dataset(data, "ct", 1, "iid", 0, out / "calibration_site")
    site.write_text(site.read_text() + f"training:\n  patch_size: [{SIDE}, {SIDE}]\n")
    return site


def phantom_volume(out: Path, slices: int) -> Path:
    """One real-size phantom CT volume, 512 x 512 x ``slices`` int16 NIfTI."""
    from fed_swinumamba.simulated import generate_phantoms

    data = generate_phantoms(out / "volume", "ct", num_cases=1, seed=1, size=SIDE, num_slices=slices)
    (image,) = (data / "imagesTr").iterdir()
    return image


def run_network(
    variant: str,
    out: Path,
    repeats: int,
    threads: int,
    site: Path,
    windows: int,
    volume: Path | None,
    prune: float = 0.0,
) -> dict:
    from fed_swinumamba.checkpoint import Checkpoint, prune_checkpoint
    from fed_swinumamba.export import export_onnx
    from fed_swinumamba.model import ModelConfig, build_model
    from fed_swinumamba.quantization import quantize_export

    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(variant=variant, modalities=("ct",))
    name = f"{variant}_pruned{prune:g}" if prune else variant
    checkpoint = out / f"{name}.safetensors"
    torch.manual_seed(0)
    ckpt = Checkpoint(build_model(config).eval().state_dict(), config, ("organ", "lesion"))
    (prune_checkpoint(ckpt, prune) if prune else ckpt).save(checkpoint)
    start = time.perf_counter()
    onnx_file = export_onnx(checkpoint, "ct", out / name)
    export_seconds = time.perf_counter() - start
    int8_file = quantize_export(onnx_file, site, windows)
    row = {
        "parameters": sum(v.numel() for v in Checkpoint.load(checkpoint).state.values()),
        "export_seconds": export_seconds,
        "int8_seconds": time.perf_counter() - start - export_seconds,
        "benchmark_peak_mib": _peak_mib(),  # this process's so far: exports and calibrations
        "mib": {},
    }
    for runtime, path in (("eager", checkpoint), ("onnx", onnx_file), ("int8", int8_file)):
        row[runtime] = _in_fresh_process(
            "--measure", "eager" if runtime == "eager" else "onnx", path, "--repeats", repeats, "--threads", threads
        )
        if volume:
            row[runtime] |= _in_fresh_process("--measure-volume", path, volume, site, "--threads", threads)
        row["mib"][runtime] = path.stat().st_size / 2**20
    eager = np.load(checkpoint.with_suffix(".eager.npy"))
    for runtime, path in (("onnx", onnx_file), ("int8", int8_file)):
        exported = np.load(path.with_suffix(".onnx.npy"))
        row[runtime]["max_relative_difference"] = float(np.abs(exported - eager).max() / np.abs(eager).max())
    return row


def _in_fresh_process(*args) -> dict:
    """What this script prints, run again with ``args`` in a process of its own (so peak RSS is that run's)."""
    done = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_out_scoring(yaml: Path, class_names: tuple[str, ...]):
    """A site's config, a description of its held-out cases (its test cases where it keeps them apart), and a
    function giving a network's mean Dice on them (the cases are read once for every network scored)."""
    from fed_swinumamba.data import SiteData, load_site_config
    from fed_swinumamba.training import evaluate_cases

    site = load_site_config(yaml)
    data = SiteData.from_config(site, list(class_names))
    split, cases = data.held_out("test" if data.test_cases else "validation")

    def score(network) -> float:
        return evaluate_cases(network, site.modality, cases, class_names, site.training.patch_size).dice_mean

    return site, f"{len(cases)} {split}", score


def dice_table(checkpoint: Path, sites: list[Path], out: Path) -> list[str]:
    """Per site: mean Dice of its modality's network on its held-out cases, PyTorch / ONNX fp32 / INT8 (the
    export command's default calibration)."""
    from fed_swinumamba.checkpoint import Checkpoint, load_modality_model
    from fed_swinumamba.export import OnnxNetwork, export_onnx
    from fed_swinumamba.quantization import quantize_export

    class_names = Checkpoint.load(checkpoint).class_names
    lines = [
        "| site | held-out cases | PyTorch | ONNX Runtime fp32 | INT8 | INT8 - PyTorch | INT8 pixels = fp32 (calibration) |",
        "|---|---|---|---|---|---|---|",
    ]
    for yaml in sites:
        site, held_out, score = held_out_scoring(yaml, class_names)
        _, model = load_modality_model(checkpoint, site.modality)
        fp32_file = export_onnx(checkpoint, site.modality, out / site.site)
        int8 = OnnxNetwork(quantize_export(fp32_file, yaml))
        dice = [score(net) for net in (model.eval(), OnnxNetwork(fp32_file), int8)]
        agreement = int8.meta["calibration"]["agreement_with_float32"]
        lines.append(
            f"| {site.site} | {held_out} | {dice[0]:.4f} | {dice[1]:.4f} | {dice[2]:.4f} | "
            f"{dice[2] - dice[0]:+.4f} | {agreement:.2%} |"
        )
    return lines


def recovery_run(initial: Path, source: Path, sites: list[Path], out: Path, rounds: int) -> Path:
    """``rounds`` federated rounds of ``sites`` from the checkpoint ``initial``, with the config of the run that
    wrote ``source`` except: every layer group trains, at that run's last learning rate, and no personal
    models. Returns the final checkpoint."""
    from fed_swinumamba.checkpoint import Checkpoint
    from fed_swinumamba.run_config import defaults
    from server.settings import FederationSettings

    ckpt = Checkpoint.load(source)
    run_config = ckpt.extra["run_config"]
    lr = FederationSettings.from_run_config(run_config).schedule.stage_for_round(ckpt.server_round).lr
    default = defaults()
    config = {k: v for k, v in run_config.items() if v != default[k] and k not in ("output-dir", "study")}
    config |= {
        "initial-checkpoint": str(initial),
        "frozen-at-start": "",
        "lr": lr,
        "personalization": "none",
        "cross-site-eval": False,
    }
    sets = [a for k, v in config.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    command = ["-m", "simulation", "run", "--sites", *map(str, sites), "--out", str(out), "--rounds", str(rounds)]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, *command, *sets], stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "checkpoints" / "latest.safetensors"


def pruning_dice_table(checkpoint: Path, sites: list[Path], out: Path, ratio: float, rounds: int) -> list[str]:
    """Per site, Dice on its held-out cases of: the checkpoint; the same trained ``rounds`` more rounds (the
    control: what the extra rounds alone give); pruned by ``ratio`` as it is; pruned and trained back for
    ``rounds`` rounds, in PyTorch and as the INT8 export calibrated at the site."""
    from fed_swinumamba.checkpoint import Checkpoint, load_modality_model, prune_checkpoint
    from fed_swinumamba.export import OnnxNetwork, export_onnx
    from fed_swinumamba.quantization import quantize_export

    out.mkdir(parents=True, exist_ok=True)
    source = Checkpoint.load(checkpoint)
    pruned = prune_checkpoint(source, ratio).save(out / "pruned.safetensors")
    control = recovery_run(checkpoint, checkpoint, sites, out / "control", rounds)
    recovered = recovery_run(pruned, checkpoint, sites, out / "recovered", rounds)
    lines = [
        f"| site | held-out cases | checkpoint | +{rounds} rounds (control) | {ratio:.0%} pruned | pruned + {rounds} rounds "
        "| its INT8 | pruned + rounds - control | INT8 - control |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for yaml in sites:
        site, held_out, score = held_out_scoring(yaml, source.class_names)
        dice = [
            score(load_modality_model(path, site.modality)[1].eval())
            for path in (checkpoint, control, pruned, recovered)
        ]
        dice.append(score(OnnxNetwork(quantize_export(export_onnx(recovered, site.modality, out / site.site), yaml))))
        lines.append(
            f"| {site.site} | {held_out} | "
            + " | ".join(f"{d:.4f}" for d in dice)
            + f" | {100 * (dice[3] - dice[1]):+.2f} | {100 * (dice[4] - dice[1]):+.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="where the checkpoints and exports go (default: a temp dir)"
    )
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated; empty: none")
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--dice", nargs="+", metavar="PATH", help="CHECKPOINT SITE_YAML...: INT8's Dice cost")
    parser.add_argument(
        "--prune", type=float, default=0.0, help="also measure the networks with this fraction of channels pruned"
    )
    parser.add_argument(
        "--prune-dice",
        nargs="+",
        metavar="PATH",
        help="CHECKPOINT SITE_YAML...: the Dice that pruning by --prune costs, after --recovery-rounds rounds",
    )
    parser.add_argument("--recovery-rounds", type=int, default=6)
    parser.add_argument(
        "--volume-slices", type=int, default=0, help="also time `predict` on a 512 x 512 x N CT volume (0: not)"
    )
    parser.add_argument("--measure", nargs=2, metavar=("RUNTIME", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--measure-volume", nargs=3, type=Path, metavar=("FILE", "IMAGE", "SITE_YAML"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.repeats, args.threads)))
        return
    if args.measure_volume:
        print(json.dumps(measure_volume(*args.measure_volume, args.threads)))
        return
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        networks = [v for v in args.networks.split(",") if v]
        site = calibration_site(out, args.calibration_windows) if networks else None
        volume = phantom_volume(out, args.volume_slices) if networks and args.volume_slices else None
        rows = {
            (v, ratio): run_network(v, out, args.repeats, args.threads, site, args.calibration_windows, volume, ratio)
            for v in networks
            for ratio in ([0.0, args.prune] if args.prune else [0.0])
        }
        dice = dice_table(Path(args.dice[0]), [Path(p) for p in args.dice[1:]], out) if args.dice else []
        if args.prune_dice:
            checkpoint, *sites = map(Path, args.prune_dice)
            dice += ["", *pruning_dice_table(checkpoint, sites, out / "pruning", args.prune, args.recovery_rounds)]
    print(
        f"load average before {load[0]:.1f} / {load[1]:.1f}, after {os.getloadavg()[0]:.1f}; {args.threads} threads\n"
    )
    if rows:
        print(
            "| network | runtime | s / 512x512 slice (median) [all] | vs unpruned eager | file MiB "
            "| of unpruned fp32 checkpoint | parameters (M) | peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
    labels = {key: f"{key[0]}, {key[1]:.0%} pruned" if key[1] else key[0] for key in rows}
    for (variant, ratio), row in rows.items():
        unpruned = rows[variant, 0.0]
        for runtime in ("eager", "onnx", "int8"):
            r = row[runtime]
            speedup = unpruned["eager"]["seconds"] / r["seconds"]
            runs = ", ".join(f"{t:.2f}" for t in r["all"])
            print(
                f"| {labels[variant, ratio]} | {runtime} | {r['seconds']:.2f} [{runs}] | {speedup:.2f}x "
                f"| {row['mib'][runtime]:.1f} | {row['mib'][runtime] / unpruned['mib']['eager']:.1%} "
                f"| {row['parameters'] / 1e6:.2f} | {r['peak_mib']:.0f} |"
            )
    for key, row in rows.items():
        for runtime in ("onnx", "int8"):
            profile = ", ".join(f"{op} {s:.2f} s" for op, s in row[runtime]["profile"].items())
            print(
                f"\n- {labels[key]} {runtime}: vs eager on the slice {row[runtime]['max_relative_difference']:.1e} "
                f"relative; ONNX Runtime by operator: {profile}"
            )
        print(
            f"- {labels[key]}: export {row['export_seconds']:.0f} s, INT8 calibration and quantisation "
            f"{row['int8_seconds']:.0f} s; the benchmark process's peak RSS so far {row['benchmark_peak_mib']:.0f} MiB"
        )
        if "volume_seconds" in row["eager"]:
            per_runtime = ", ".join(
                f"{runtime} {row[runtime]['volume_seconds']:.0f} s (peak RSS {row[runtime]['volume_peak_mib']:.0f} MiB)"
                for runtime in ("eager", "onnx", "int8")
            )
            print(f"- {labels[key]}: `predict` on a 512 x 512 x {args.volume_slices} CT volume: {per_runtime}")
    if dice:
        print("\n" + "\n".join(dice))


if __name__ == "__main__":
    main()
