"""Selective scan on CPU, forward + backward: our native kernel and PyTorch path vs mamba-ssm's ``selective_scan_ref``.

mamba-ssm cannot be imported without its CUDA extension, so the reference function's source is
taken from the installed package (or an unpacked sdist, --mamba-path) with ``ast`` and executed
with torch/einops: we time mamba-ssm's code, not a copy of it. Without it (or with --no-reference)
only our two paths are measured.

Each (implementation, shape) runs in a fresh subprocess. Ours: the native kernel and the PyTorch path
(FED_SWINUMAMBA_SCAN) alternate in one process, so that a busy machine slows both alike. Peak memory
is that process's peak RSS (VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus
the RSS at that point, over the first full-size fwd+bwd (after one tiny call that pages in the code):
everything it allocates, input gradients included; for ours, that of the native kernel (run first).
Time: the reference runs once (minutes on the big shape); ours reports the median of --repeats
runs of each path after that first one.

    python benchmarks/bench_selective_scan.py [--repeats 5] [--mamba-path DIR_OR_FILE] [--no-reference] [--no-write]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Selective scan"
SHAPES = [  # (b, d, n, l, groups): VMamba SS2D, 4 scan directions as groups
    (1, 384, 16, 1024, 4),
    (1, 768, 16, 3136, 4),
]
INTERFACE = Path("ops") / "selective_scan_interface.py"


def find_interface(mamba_path: str | None) -> Path | None:
    """mamba_ssm/ops/selective_scan_interface.py, found without importing mamba_ssm."""
    if mamba_path:
        p = Path(mamba_path)
        if p.is_file():
            return p
        hits = sorted(p.glob(f"**/mamba_ssm/{INTERFACE.as_posix()}"))
        return hits[0] if hits else None
    spec = importlib.util.find_spec("mamba_ssm")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / INTERFACE).is_file():
            return Path(loc) / INTERFACE
    return None


def load_reference(path: Path):
    """Execute just mamba-ssm's ``selective_scan_ref`` definition with the names it uses."""
    import torch
    import torch.nn.functional as F
    from einops import rearrange, repeat

    src = path.read_text()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref")
    namespace = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["selective_scan_ref"]


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def cpu_counters() -> tuple[float, float, float]:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds used by this process)."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(jiffies[:8]) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return time.perf_counter(), busy, time.process_time()


def others_cpu_share(start) -> float:
    """Share of the machine's CPU time that other processes used since `start` (contention indicator)."""
    (w0, b0, p0), (w1, b1, p1) = start, cpu_counters()
    return max(0.0, (b1 - b0) - (p1 - p0)) / ((w1 - w0) * os.cpu_count())


def worker(impl: str, shape: tuple[int, ...], repeats: int, interface: str | None) -> dict:
    """One implementation on one shape in this (fresh) process: times and peak extra RSS."""
    import torch

    if impl == "ref":
        fns = {"ref": load_reference(Path(interface))}
    else:
        sys.path.insert(0, str(ROOT))
        from fed_swinumamba.ops import selective_scan

        fns = {path: _on_path(selective_scan, path) for path in ("native", "torch")}

    for fn in fns.values():  # page in the kernels' code, which would count as RSS
        inputs, dy = make_inputs((1, 8, 4, 8, 4))
        fn(**inputs, delta_softplus=True).backward(dy)
    inputs, dy = make_inputs(shape)

    def step(fn):
        for v in inputs.values():
            v.grad = None
        t0 = time.perf_counter()
        y = fn(**inputs, delta_softplus=True)
        t1 = time.perf_counter()
        y.backward(dy)
        return t1 - t0, time.perf_counter() - t1

    start = cpu_counters()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    first = step(next(iter(fns.values())))
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    runs = {name: [] for name in fns}
    for _ in range(0 if impl == "ref" else repeats):
        for name, fn in fns.items():
            runs[name].append(step(fn))
    if impl == "ref":
        runs["ref"].append(first)
    timing = {
        name: {
            "fwd_s": statistics.median(r[0] for r in rs),
            "bwd_s": statistics.median(r[1] for r in rs),
            "total_s": statistics.median(sum(r) for r in rs),
            "runs": len(rs),
        }
        for name, rs in runs.items()
    }
    return {
        **timing,
        "peak_mib": peak_mib,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "others_cpu": others_cpu_share(start),
    }


def _on_path(fn, path: str):
    """fn on one of our CPU paths (native kernel / PyTorch), chosen per call through FED_SWINUMAMBA_SCAN."""

    def run(**kwargs):
        os.environ["FED_SWINUMAMBA_SCAN"] = path
        return fn(**kwargs)

    return run


def make_inputs(shape):
    """Scan inputs (leaves requiring grad) and an output gradient."""
    import math

    import torch

    b, d, n, l, g = shape
    gen = torch.Generator().manual_seed(0)
    # Like VMamba's SS2D: dt bias = softplus^-1 of a log-uniform dt in [1e-3, 0.1], A = -exp(rand), no z.
    dt0 = torch.exp(torch.rand(d, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "u": torch.randn(b, d, l, generator=gen),
        "delta": torch.randn(b, d, l, generator=gen),
        "A": -torch.exp(torch.rand(d, n, generator=gen)),
        "B": torch.randn(b, g, n, l, generator=gen),
        "C": torch.randn(b, g, n, l, generator=gen),
        "D": torch.randn(d, generator=gen),
        "delta_bias": dt0 + torch.log(-torch.expm1(-dt0)),
    }
    for v in inputs.values():
        v.requires_grad_()
    return inputs, torch.randn(b, d, l, generator=gen)


def run_worker(impl, shape, repeats, interface) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, ",".join(map(str, shape)), "--repeats", str(repeats)]
    if interface:
        cmd += ["--mamba-path", str(interface)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_section(text: str) -> None:
    """Replace (or append) only the "Selective scan" section of RESULTS.md."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed fwd+bwd runs of each of our paths (the reference runs once)"
    )
    ap.add_argument("--mamba-path", help="selective_scan_interface.py, or a directory (e.g. unpacked sdist) holding it")
    ap.add_argument("--no-reference", action="store_true", help="time only our two paths")
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        impl, shape = args.worker
        print(json.dumps(worker(impl, tuple(map(int, shape.split(","))), args.repeats, args.mamba_path)))
        return 0

    interface = None if args.no_reference else find_interface(args.mamba_path)
    if interface is None:
        print(
            "Timing only our paths: mamba-ssm's selective_scan_interface.py not found or not wanted (install the "
            "source without CUDA: MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation "
            "mamba-ssm, or pass --mamba-path to an unpacked sdist).",
            file=sys.stderr,
        )
        ref_name = None
    else:
        version = re.search(r"__version__ = [\"']([^\"']+)", (interface.parents[1] / "__init__.py").read_text())
        ref_name = f"mamba-ssm {version.group(1) if version else '(version unknown)'} `selective_scan_ref`"
        print(f"reference: {interface}")

    load = os.getloadavg()
    rows = []
    for shape in SHAPES:
        ours = run_worker("ours", shape, args.repeats, None)
        print(
            f"{shape}: native {ours['native']['total_s']:.3f} s, PyTorch path {ours['torch']['total_s']:.3f} s",
            flush=True,
        )
        ref = None
        if interface is not None:
            print("timing the reference once ...", flush=True)
            ref = run_worker("ref", shape, 1, interface)
        rows.append((shape, ref, ours))
    load = (*load, *os.getloadavg())

    header = (
        "| b, d, n, l, groups | native fwd+bwd (s) [fwd / bwd] | PyTorch path fwd+bwd (s) [fwd / bwd] "
        "| native vs PyTorch path | native peak (MiB) | reference fwd+bwd (s) | native vs reference "
        "| reference peak (MiB) | CPU used by other processes (ours / ref) |"
    )
    lines = [header, "|" + "---|" * 9]
    for shape, ref, ours in rows:
        nat, tor = ours["native"], ours["torch"]
        ref_cells = (
            f"{ref['total_s']:.2f} | {ref['total_s'] / nat['total_s']:.0f}x | {ref['peak_mib']:.0f}"
            if ref
            else "not run | | "
        )
        ref_cpu = f"{ref['others_cpu']:.0%}" if ref else "-"
        lines.append(
            f"| {', '.join(map(str, shape))} | {nat['total_s']:.3f} [{nat['fwd_s']:.3f} / {nat['bwd_s']:.3f}] "
            f"| {tor['total_s']:.3f} [{tor['fwd_s']:.3f} / {tor['bwd_s']:.3f}] "
            f"| {tor['total_s'] / nat['total_s']:.1f}x | {ours['peak_mib']:.0f} | {ref_cells} "
            f"| {ours['others_cpu']:.0%} / {ref_cpu} |"
        )
    table = "\n".join(lines)
    print(table)

    torch_version, threads = rows[0][2]["torch_version"], rows[0][2]["threads"]
    versus = (
        f", vs {ref_name} (source executed from the installed package, not imported)"
        if ref_name
        else (" (mamba-ssm's reference not run this time)")
    )
    section = f"""{SECTION}

`fed_swinumamba.ops.selective_scan` on CPU, native kernel and PyTorch path{versus}, forward + backward,
fp32, delta_softplus=True, D and delta_bias given, z=None, B/C grouped (b, 4, n, l), VMamba-like random
inputs. Produced by `python benchmarks/bench_selective_scan.py --repeats {args.repeats}`.

{table}

- Machine: {os.cpu_count()}-core CPU ({cpu_name()}), torch {torch_version}, {threads} intra-op threads, Python {platform.python_version()}.
  Load average (1 / 5 / 15 min) {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, {load[3]:.1f} / {load[4]:.1f} / {load[5]:.1f} at the end.
- Time: wall clock of `y = scan(...)` plus `y.backward(dy)`. The reference is run once (it is slow); our two paths
  alternate in one process, each the median of {args.repeats} runs after a first, untimed one.
- Contention: the share of the machine's CPU time that other processes used while each measurement ran (from
  /proc/stat minus this process's CPU time). Non-zero means the CPU was shared and that timing is pessimistic.
- Peak memory: each measurement runs in a fresh process; peak RSS (VmHWM, reset via /proc/self/clear_refs after
  the inputs are built) minus RSS at that point, over the first full-size fwd+bwd (after one tiny call that pages
  in the code), so it includes the input gradients and everything the allocator had to fetch from the OS.

"""
    if not args.no_write:
        write_section(section)
        print(f"wrote the '{SECTION[3:]}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
