"""One training step (forward + backward + AdamW) of the full-size networks on a 1x1x224x224 slice, on CPU.

Reports seconds per step (median of --repeats after one warm-up), the peak resident memory of the
process after its first step (each network measured in its own subprocess, ru_maxrss), and the share
of the step spent in the selective scan (forward and backward): 1 - t_standin / t_step, where
t_standin is the same step with the scan replaced by an elementwise stand-in that still sends
gradients to all its inputs (so everything around the scan costs the same). Steps with the native
scan kernel, with the scan's PyTorch path (FED_SWINUMAMBA_SCAN=torch) and with the stand-in alternate,
so that a busy machine slows all three alike.

    python benchmarks/bench_train_step.py [--repeats 3] [--threads N] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def measure(variant: str, repeats: int, threads: int) -> dict:
    from monai.losses import DiceCELoss

    from fed_swinumamba.model import ModelConfig, build_model, vmamba

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant=variant, num_classes=3, modalities=("ct",)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(1, 1, 224, 224)
    y = torch.randint(0, 3, (1, 1, 224, 224))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x, "ct"), y).backward()
        optimizer.step()

    scan = vmamba.selective_scan

    def timed_step(scan_path: str) -> tuple[float, float]:
        """(wall, process CPU) seconds of one step with the native kernel, the PyTorch path or the stand-in."""
        vmamba.selective_scan = _standin_scan if scan_path == "standin" else scan
        os.environ["FED_SWINUMAMBA_SCAN"] = "torch" if scan_path == "torch" else "native"
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - t0, time.process_time() - c0

    timed_step("native")  # warm-up; AdamW's state is allocated here, so this is the process's peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = {p: [] for p in ("native", "torch", "standin")}
    for scan_path in times:  # the other warm-ups
        if scan_path != "native":
            timed_step(scan_path)
    for _ in range(repeats):
        for scan_path, t in times.items():
            t.append(timed_step(scan_path))
    wall, cpu = ({p: statistics.median(x[i] for x in t) for p, t in times.items()} for i in (0, 1))
    paths = {
        p: {
            "step_s": round(wall[p], 3),
            "cpu_s": round(cpu[p], 3),
            "scan_share": round(1 - wall["standin"] / wall[p], 3),
            "cpu_scan_share": round(1 - cpu["standin"] / cpu[p], 3),
        }
        for p in ("native", "torch")
    }
    return {
        "variant": variant,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "peak_rss_GiB": round(peak, 2),
        **paths,
    }


def _standin_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Costs almost nothing, yet every scan input gets a gradient, as with the real scan."""
    g = B.shape[1]
    mix = (B * C).sum(2).repeat_interleave(u.shape[1] // g, dim=1)  # (b, d, l)
    return u * (delta + delta_bias[:, None]) * mix + D[:, None] * u + A.sum() * 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--write", help="append the table to this markdown file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats, args.threads)))
        return
    rows = []
    load = os.getloadavg()
    for variant in ("swin_umamba", "swin_umamba_d"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    load = (*load, *os.getloadavg())
    table = [
        f"Training step, 1x1x224x224, forward+backward+AdamW, CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}); median of {args.repeats} steps after a warm-up; peak RSS "
        "of a process that builds only that network (after its first step, native scan); scan share = 1 - (step with "
        "a stand-in scan) / (step), by wall clock and by the process's CPU time (less sensitive to other processes; "
        "with several threads it counts their spin-waiting too). Native kernel, PyTorch path and stand-in steps "
        "alternate in one process. Load "
        f"average (1 / 5 / 15 min) {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, "
        f"{load[3]:.1f} / {load[4]:.1f} / {load[5]:.1f} at the end.",
        "",
        "| network | parameters | peak RSS | scan | seconds / step | time in selective scan | CPU seconds / step "
        "| time in selective scan, by CPU time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for path, name in (("native", "native kernel"), ("torch", "PyTorch path")):
            p = r[path]
            table.append(
                f"| {r['variant']} | {r['params_M']} M | {r['peak_rss_GiB']} GiB | {name} | {p['step_s']} s "
                f"| {100 * p['scan_share']:.1f} % | {p['cpu_s']} s | {100 * p['cpu_scan_share']:.1f} % |"
            )
    text = "\n".join(table)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n## Training step of the full-size networks\n\n" + text + "\n")


if __name__ == "__main__":
    main()
