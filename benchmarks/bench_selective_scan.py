"""Selective scan on CPU, forward + backward: ours vs mamba-ssm's own ``selective_scan_ref``.

mamba-ssm cannot be imported without its CUDA extension, so the reference function's source is
taken from the installed package (or an unpacked sdist, --mamba-path) with ``ast`` and executed
with torch/einops: we time mamba-ssm's code, not a copy of it.

Each (implementation, shape) runs in a fresh subprocess. Peak memory is that process's peak RSS
(VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus the RSS at that point, over
the first full-size fwd+bwd (after one tiny call that pages in the code): everything it allocates,
input gradients included.
Time: the reference runs once (minutes on the big shape); ours reports the median of --repeats
runs after that first one.

    python benchmarks/bench_selective_scan.py [--repeats 5] [--mamba-path DIR_OR_FILE] [--no-write]
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
        fn = load_reference(Path(interface))
    else:
        sys.path.insert(0, str(ROOT))
        from fed_swinumamba.ops import selective_scan as fn

    inputs, dy = make_inputs((1, 8, 4, 8, 4))
    fn(**inputs, delta_softplus=True).backward(dy)  # page in the kernels' code, which would count as RSS
    inputs, dy = make_inputs(shape)

    def step():
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
    first = step()
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    runs = [first] if impl == "ref" else [step() for _ in range(repeats)]
    fwd = statistics.median(r[0] for r in runs)
    bwd = statistics.median(r[1] for r in runs)
    return {"fwd_s": fwd, "bwd_s": bwd, "total_s": statistics.median(sum(r) for r in runs), "runs": len(runs),
            "peak_mib": peak_mib, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "others_cpu": others_cpu_share(start)}


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
    ap.add_argument("--repeats", type=int, default=5, help="timed fwd+bwd runs of ours (the reference runs once)")
    ap.add_argument("--mamba-path", help="selective_scan_interface.py, or a directory (e.g. unpacked sdist) holding it")
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        impl, shape = args.worker
        print(json.dumps(worker(impl, tuple(map(int, shape.split(","))), args.repeats, args.mamba_path)))
        return 0

    interface = find_interface(args.mamba_path)
    if interface is None:
        print("mamba-ssm's selective_scan_interface.py not found: install the source without CUDA "
              "(MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm) "
              "or pass --mamba-path to an unpacked sdist.", file=sys.stderr)
        return 1
    version = re.search(r"__version__ = [\"']([^\"']+)", (interface.parents[1] / "__init__.py").read_text())
    ref_name = f"mamba-ssm {version.group(1) if version else '(version unknown)'} `selective_scan_ref`"
    print(f"reference: {interface}")

    rows = []
    for shape in SHAPES:
        ours = run_worker("ours", shape, args.repeats, None)
        print(f"{shape}: ours {ours['total_s']:.3f} s, timing the reference once ...", flush=True)
        ref = run_worker("ref", shape, 1, interface)
        rows.append((shape, ref, ours))

    header = ("| b, d, n, l, groups | reference fwd+bwd (s) | ours fwd+bwd (s) [fwd / bwd] | speed-up "
              "| reference peak (MiB) | ours peak (MiB) | CPU used by other processes (ref / ours) |")
    lines = [header, "|" + "---|" * 7]
    for shape, ref, ours in rows:
        lines.append(f"| {', '.join(map(str, shape))} | {ref['total_s']:.2f} | {ours['total_s']:.3f} "
                     f"[{ours['fwd_s']:.3f} / {ours['bwd_s']:.3f}] | {ref['total_s'] / ours['total_s']:.0f}x "
                     f"| {ref['peak_mib']:.0f} | {ours['peak_mib']:.0f} "
                     f"| {ref['others_cpu']:.0%} / {ours['others_cpu']:.0%} |")
    table = "\n".join(lines)
    print(table)

    torch_version, threads = rows[0][2]["torch"], rows[0][2]["threads"]
    section = f"""{SECTION}

`fed_swinumamba.ops.selective_scan` (CPU path) vs {ref_name} (source executed from the installed
package, not imported), forward + backward, fp32, delta_softplus=True, D and delta_bias given, z=None,
B/C grouped (b, 4, n, l), VMamba-like random inputs. Produced by `python benchmarks/bench_selective_scan.py
--repeats {args.repeats}`.

{table}

- Machine: {os.cpu_count()}-core CPU ({cpu_name()}), torch {torch_version}, {threads} intra-op threads, Python {platform.python_version()}.
- Time: wall clock of `y = scan(...)` plus `y.backward(dy)`. The reference is run once (it is slow); ours is the
  median of {args.repeats} runs after a first, untimed one.
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
