"""The selective scan's compiled CPU kernel: built on first use, loaded with ctypes.

The C++ source (``_scan_kernel_source.SOURCE``) is compiled with the system compiler (``$CXX``,
else ``c++``) into ``$XDG_CACHE_HOME/fed_swinumamba`` (default ``~/.cache/fed_swinumamba``), under
a name that hashes the source, compiler, flags and CPU, so one build serves every later process.
Concurrent first uses (one ClientApp process per Flower message, Ray actors) each build to a
temporary file and rename it into place atomically. No compiler or a failed build: ``library()``
returns None with the reason, and the scan stays on its PyTorch path.

The same source with ``_scan_onnxruntime_source`` appended is the scan as an ONNX Runtime operator library
(``onnxruntime_library``, used by ``scan_onnx``).

``scan_forward`` / ``scan_backward`` take and return what ``selective_scan._torch_forward`` /
``_torch_backward`` (the PyTorch path) do, except that the states are saved every CHUNK steps.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ._scan_kernel_source import SOURCE
from ._scan_onnxruntime_source import SOURCE as ONNXRUNTIME_SOURCE

__all__ = ["CHUNK", "MAX_STATE", "STATE_MULTIPLE", "library", "onnxruntime_library", "scan_backward", "scan_forward"]

log = logging.getLogger(__name__)

# Time steps per saved state: the backward recomputes a chunk's exp(delta A) and h (2 x 16 KiB at n = 16, fp32).
# 256 measured about 7 % faster than 64 at swin_umamba_d's shapes; it also saves 4x fewer states.
CHUNK = 256
MAX_STATE = 256  # the kernel's largest n (kMaxState)
STATE_MULTIPLE = 4  # the kernel takes n in whole vectors of 4 floats (2 doubles); smaller multiples are padded
# No -ffast-math: exp2_poly's rounding trick needs exact fp. These three let min/max/select vectorise.
_FLAGS = (
    "-O3",
    "-march=native",
    "-fno-trapping-math",
    "-ffinite-math-only",
    "-fno-signed-zeros",
    "-fopenmp",
    "-std=c++20",
    "-shared",
    "-fPIC",
)
# GCC only (Clang has no such options): instruction scheduling before register allocation, aware of register
# pressure. The kernel's loops need more vector registers than x86-64 has; about 5 % faster (benchmarks/RESULTS.md).
_GCC_FLAGS = ("-fschedule-insns", "-fsched-pressure")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_INT, _PTR = ctypes.c_int64, ctypes.c_void_p


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fed_swinumamba"


def _cpu_identity() -> str:
    """-march=native code may not run on another CPU: a cache shared between machines keys builds by CPU."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines()
    except OSError:
        first_cpu = [platform.processor()]
    return "\n".join(
        [platform.machine(), *(x for x in first_cpu if x.startswith(("vendor_id", "model name", "flags")))]
    )


@functools.cache
def _flags(compiler: str) -> tuple[str, ...]:
    """_FLAGS, and _GCC_FLAGS where `compiler` is GCC (its --version names the Free Software Foundation)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return _FLAGS + (_GCC_FLAGS if "Free Software Foundation" in version else ())


def _library_path(compiler: str, name: str, source: str) -> Path:
    key = hashlib.sha256("\0".join([source, compiler, *_flags(compiler), _cpu_identity()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"{name}_{key}.so"


def _build(compiler: str, source: str, target: Path) -> None:
    """Compile `source` to `target` through a temporary file in the same directory (atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "scan.cpp", Path(tmp) / target.name
        src.write_text(source)
        proc = subprocess.run([compiler, *_flags(compiler), str(src), "-o", str(lib)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(lib, target)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for suffix in _SUFFIX.values():
        fwd, bwd = getattr(lib, f"scan_forward_{suffix}"), getattr(lib, f"scan_backward_{suffix}")
        fwd.argtypes = [_PTR] * 9 + [_INT] * 7 + [ctypes.c_int] * 2
        bwd.argtypes = [_PTR] * 16 + [_INT] * 7 + [ctypes.c_int] * 2
        fwd.restype = bwd.restype = ctypes.c_int
    return lib


def _compiled(name: str, source: str) -> tuple[Path | None, str]:
    """(the shared library built from `source`, "") or (None, why it could not be built)."""
    compiler = os.environ.get("CXX") or "c++"
    path = shutil.which(compiler)
    if path is None:
        return None, f"no C++ compiler ({compiler!r} not found; set CXX)"
    try:
        target = _library_path(path, name, source)  # Path.home() raises RuntimeError where there is no home
        if not target.exists():
            log.info("building %s into %s", name, target)
            _build(path, source, target)
        return target, ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"could not build {name}: {e}"


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why it is unavailable). Built at most once per process."""
    path, why = _compiled("selective_scan", SOURCE)
    if path is None:
        return None, why
    try:
        return _declare(ctypes.CDLL(str(path))), ""
    except OSError as e:
        return None, f"could not load the native scan kernel: {e}"


@functools.cache
def onnxruntime_library() -> tuple[Path | None, str]:
    """(the kernel compiled as an ONNX Runtime operator library, "") or (None, why it is unavailable)."""
    return _compiled("selective_scan_onnxruntime", SOURCE + ONNXRUNTIME_SOURCE)


def _slices(b: int, d: int, g: int, threads: int) -> int:
    """Channel slices per (batch, group) so that every thread gets work (slices of a group have own dB/dC)."""
    return max(1, min(d // g, -(-threads // (b * g))))


def _ptrs(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _call(name: str, dtype: torch.dtype, *args) -> None:
    lib, _ = library()
    if getattr(lib, f"{name}_{_SUFFIX[dtype]}")(*args):
        raise ValueError(f"the native scan takes n <= {MAX_STATE} in multiples of {STATE_MULTIPLE}")


def _padded_state(n: int) -> int:
    """The kernel holds a step's n states in whole 16-byte vectors: n rounded up to a multiple of 4."""
    return -(-n // STATE_MULTIPLE) * STATE_MULTIPLE


def _pad_state(x: torch.Tensor) -> torch.Tensor:
    """Zeros appended to the last (state) dimension up to the kernel's multiple. A padded state has A = 0 and
    B = C = 0: it stays 0, adds nothing to y, and its gradients are cut off again by the caller."""
    return torch.nn.functional.pad(x, (0, _padded_state(x.shape[-1]) - x.shape[-1]))


def _group_planes(B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, g, n, l) -> (b, g, l, n'): each time step's states side by side, padded to the kernel's multiple."""
    return _pad_state(B.transpose(2, 3)).contiguous(), _pad_state(C.transpose(2, 3)).contiguous()


def scan_forward(u, delta, A, B, C, D, delta_bias, softplus):
    """y (b, d, l) and the state entering each chunk of CHUNK steps (n_chunks, b, d, n padded)."""
    (b, d, l), g = u.shape, B.shape[1]
    Bt, Ct = _group_planes(B, C)
    padded = Bt.shape[3]
    y = torch.empty_like(u)
    states = u.new_empty(-(-l // CHUNK), b, d, padded)
    threads = torch.get_num_threads()
    inputs = [t.contiguous() for t in (u, delta, _pad_state(A), Bt, Ct, D, delta_bias)]  # alive through the call
    _call(
        "scan_forward",
        u.dtype,
        *_ptrs(*inputs, y, states),
        b,
        d,
        padded,
        l,
        g,
        CHUNK,
        _slices(b, d, g, threads),
        softplus,
        threads,
    )
    return y, states


def scan_backward(u, delta, A, B, C, D, delta_bias, softplus, states, dy):
    """Gradients of sum(dy * y): u, delta, B, C, and A, D, delta_bias per batch element ((b, d, n), (b, d))."""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    Bt, Ct = _group_planes(B, C)
    padded = Bt.shape[3]
    threads = torch.get_num_threads()
    slices = _slices(b, d, g, threads)
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA, dD, dbias = u.new_zeros(b, d, padded), u.new_zeros(b, d), u.new_zeros(b, d)
    dB, dC = u.new_zeros(slices, b, g, l, padded), u.new_zeros(slices, b, g, l, padded)
    inputs = [t.contiguous() for t in (u, delta, _pad_state(A), Bt, Ct, D, delta_bias, states, dy)]
    _call(
        "scan_backward",
        u.dtype,
        *_ptrs(*inputs, du, ddelta, dA, dB, dC, dD, dbias),
        b,
        d,
        padded,
        l,
        g,
        CHUNK,
        slices,
        softplus,
        threads,
    )
    dB, dC = (x.sum(0)[..., :n].transpose(2, 3) for x in (dB, dC))
    return du, ddelta, dA[..., :n], dB, dC, dD, dbias
