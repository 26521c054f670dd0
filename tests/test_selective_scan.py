"""The fast selective scan against the plain sequential definition: values, every gradient, vmap, Opacus.

Tests taking the `path` fixture run on both CPU paths: the compiled kernel and the PyTorch scan.
"""

import importlib
import logging
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from fed_swinumamba.ops import native_scan, selective_scan, selective_scan_reference

# The package re-exports the function under the module's name, so fetch the module itself.
ss_module = importlib.import_module("fed_swinumamba.ops.selective_scan")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b=2, d=8, n=4, l=37, groups=2, dtype=torch.float64, seed=0, delta_range=None):
    """Random scan inputs like VMamba's; groups=None gives ungrouped (b, n, l) B/C."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    if delta_range is None:
        delta = 0.5 * rnd(b, d, l)
    else:
        lo, hi = delta_range
        delta = lo + (hi - lo) * torch.rand(b, d, l, generator=gen, dtype=torch.float64)
    x = {
        "u": rnd(b, d, l),
        "delta": delta,
        "A": -torch.exp(torch.rand(d, n, generator=gen, dtype=torch.float64) * 2),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(d),
        "z": rnd(b, d, l),
        "delta_bias": 0.3 * rnd(d),
    }
    return {k: v.to(dtype) for k, v in x.items()}


def value_and_grads(fn, inputs, use, softplus, seed=1):
    """Output of fn and the gradients of a random projection of it wrt every input used."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in use else None) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    used = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad((y * w).sum(), [leaves[k] for k in used])
    return y, dict(zip(used, grads))


def assert_matches(inputs, use, softplus, rtol, atol):
    """Ours on `inputs` vs the reference in fp64 on the same values; results keep the inputs' dtypes."""
    y, g = value_and_grads(selective_scan, inputs, use, softplus)
    ref = {k: v.double() for k, v in inputs.items()}
    y_ref, g_ref = value_and_grads(selective_scan_reference, ref, use, softplus)
    assert y.dtype == inputs["u"].dtype and y.is_contiguous()
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol * y_ref.abs().max().item())
    assert g.keys() == g_ref.keys()
    for k in g:
        assert g[k].dtype == inputs[k].dtype and g[k].shape == inputs[k].shape, k
        torch.testing.assert_close(g[k].double(), g_ref[k], rtol=rtol, atol=atol * g_ref[k].abs().max().item(), msg=k)


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Force one CPU path (FED_SWINUMAMBA_SCAN=native raises rather than falling back)."""
    if request.param == "native" and native_scan.library()[0] is None:
        pytest.skip(native_scan.library()[1])
    monkeypatch.setenv(ss_module.PATH_ENV, request.param)
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 time steps for the default shape (b*d*n = 64), so l=37 has 8 chunks, the last ragged."""
    monkeypatch.setattr(ss_module, "_CHUNK_ELEMENTS", 2 * 8 * 4 * 5)
    monkeypatch.setattr(native_scan, "CHUNK", 5)


OPTION_SETS = [
    ("u", "delta", "A", "B", "C"),
    ("u", "delta", "A", "B", "C", "D"),
    ("u", "delta", "A", "B", "C", "z", "delta_bias"),
    NAMES,
]


@pytest.mark.parametrize("groups", [None, 1, 4])
@pytest.mark.parametrize("use", OPTION_SETS)
@pytest.mark.parametrize("softplus", [False, True])
def test_matches_reference_fp64(path, small_chunks, groups, use, softplus):
    assert_matches(make_inputs(groups=groups), set(use), softplus, rtol=1e-9, atol=1e-10)


def test_state_size_16_matches_reference(path, small_chunks):
    # n = 16 (VMamba's d_state) has its own specialisation in the kernel.
    assert_matches(make_inputs(n=16, groups=4), set(NAMES), True, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_state_sizes_the_kernel_pads_match_reference(path, small_chunks, n):
    # The kernel takes the state in whole vectors of 4; other n are padded with zero states and cut back.
    assert_matches(make_inputs(n=n, groups=2), set(NAMES), True, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 3])
def test_channels_of_a_group_split_over_threads(small_chunks, monkeypatch, threads):
    # One batch element, one group: 3 threads give each a slice of 8 channels (2, 3, 3) with its own dB / dC.
    if native_scan.library()[0] is None:
        pytest.skip(native_scan.library()[1])
    monkeypatch.setenv(ss_module.PATH_ENV, "native")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches(make_inputs(b=1, groups=1), set(NAMES), True, rtol=1e-9, atol=1e-10)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_positive_A_matches_reference(path, small_chunks, dtype, rtol):
    # The kernel skips exp's overflow clamp where softplus and A <= 0 make every delta * A <= 0; one positive
    # entry of A sends the whole scan to the clamped exp, which must give the same result.
    inputs = make_inputs(n=16, groups=4, dtype=dtype)
    inputs["A"][3, 5] = 0.05
    assert_matches(inputs, set(NAMES), True, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("groups", [None, 4])
def test_float32_returns_float32_and_matches(path, groups):
    inputs = make_inputs(groups=groups, dtype=torch.float32)
    assert_matches(inputs, set(NAMES), True, rtol=1e-5, atol=1e-5)


def test_bfloat16_returns_bfloat16_and_computes_in_fp32(path):
    # Same bf16 values in fp64 for the reference: what is left is rounding the results to bf16 (~4e-3).
    assert_matches(make_inputs(groups=4, dtype=torch.bfloat16), set(NAMES), True, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def long_sequence():
    """Inputs of 4096 time steps and the reference's output and gradients (slow: computed once)."""
    inputs = make_inputs(b=1, d=4, n=4, l=4096, groups=2, seed=3)
    return inputs, *value_and_grads(selective_scan_reference, inputs, set(NAMES), True)


def test_long_sequence(path, long_sequence, monkeypatch):
    inputs, y_ref, g_ref = long_sequence
    # PyTorch path: one chunk, then 14 chunks of 300 steps; native: 64 chunks of 64, then 14 of 300.
    for chunk_elements, native_chunk in ((ss_module._CHUNK_ELEMENTS, native_scan.CHUNK), (16 * 300, 300)):
        monkeypatch.setattr(ss_module, "_CHUNK_ELEMENTS", chunk_elements)
        monkeypatch.setattr(native_scan, "CHUNK", native_chunk)
        y, g = value_and_grads(selective_scan, inputs, set(NAMES), True)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
        for k in g:
            torch.testing.assert_close(g[k], g_ref[k], rtol=1e-9, atol=1e-10 * g_ref[k].abs().max().item(), msg=k)


def test_large_delta_is_finite_and_matches(path, small_chunks):
    # exp(delta * A) with delta up to 500 underflows to 0 in fp32: must give zeros, not inf/NaN.
    inputs = make_inputs(groups=2, dtype=torch.float32, delta_range=(50.0, 500.0))
    y, g = value_and_grads(selective_scan, inputs, set(NAMES), True)
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    assert_matches(inputs, set(NAMES), True, rtol=1e-5, atol=1e-5)


def test_ungrouped_equals_single_group(path):
    inputs = make_inputs(groups=1)
    flat = dict(inputs, B=inputs["B"][:, 0], C=inputs["C"][:, 0])
    torch.testing.assert_close(selective_scan(**flat), selective_scan(**inputs), rtol=0, atol=0)


def test_groups_must_divide_channels():
    inputs = make_inputs(d=6, groups=4)
    with pytest.raises(ValueError, match="divisible"):
        selective_scan(**inputs)


def per_sample_loss(fn, w):
    def loss(A_log, D, delta_bias, u, delta, B, C, z):
        return (fn(u, delta, -torch.exp(A_log), B, C, D, z, delta_bias, True) * w).sum()

    return loss


@pytest.mark.parametrize(
    "batched",
    [
        ("u", "delta", "B", "C", "z"),  # Opacus' case: per-sample activations, shared parameters
        ("A_log", "u", "delta", "B", "C", "z"),  # per-sample A: the slice-by-slice path
        ("u",),  # the other inputs shared across the vmapped dim
    ],
)
def test_vmap_grad_equals_looped_autograd(path, small_chunks, batched):
    n_samples = 3
    base = make_inputs(b=2, groups=2)
    gen = torch.Generator().manual_seed(5)
    args = {
        "A_log": torch.rand(8, 4, generator=gen, dtype=torch.float64),
        "D": base["D"],
        "delta_bias": base["delta_bias"],
        **{k: base[k] for k in ("u", "delta", "B", "C", "z")},
    }
    args = {k: torch.stack([v + 0.1 * i for i in range(n_samples)]) if k in batched else v for k, v in args.items()}
    w = torch.randn(2, 8, 37, generator=gen, dtype=torch.float64)
    loss = per_sample_loss(selective_scan, w)
    names = list(args)
    in_dims = tuple(0 if k in batched else None for k in names)
    per_sample = vmap(grad(loss, argnums=tuple(range(len(names)))), in_dims=in_dims)(*args.values())
    for i in range(n_samples):
        leaves = [(v[i] if k in batched else v).clone().requires_grad_() for k, v in args.items()]
        expected = torch.autograd.grad(loss(*leaves), leaves)
        for k, got, exp in zip(names, per_sample, expected):
            torch.testing.assert_close(got[i], exp, rtol=1e-10, atol=1e-12, msg=k)


def test_vmap_forward_matches_loop(path):
    inputs = make_inputs(groups=4)
    stacked = {k: torch.stack([inputs[k], inputs[k].flip(-1)]) for k in ("u", "delta", "B", "C")}
    shared = {k: inputs[k] for k in ("A", "D", "delta_bias")}
    ys = vmap(lambda u, delta, B, C: selective_scan(u, delta, B=B, C=C, delta_softplus=True, **shared))(
        *stacked.values()
    )
    for i in range(2):
        one = {k: v[i] for k, v in stacked.items()}
        torch.testing.assert_close(
            ys[i], selective_scan_reference(**one, **shared, delta_softplus=True), rtol=1e-9, atol=1e-12
        )


class TinySSM(nn.Module):
    """A module owning the scan's parameters, like SS2D; its input packs u, delta, B, C along channels."""

    def __init__(self, d=8, n=4, groups=2):
        super().__init__()
        self.d, self.n, self.groups = d, n, groups
        self.A_logs = nn.Parameter(torch.rand(d, n, dtype=torch.float64))
        self.Ds = nn.Parameter(torch.randn(d, dtype=torch.float64))
        self.dt_bias = nn.Parameter(0.3 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        b, _, l = x.shape
        u, delta, bc = x.split([self.d, self.d, 2 * self.groups * self.n], dim=1)
        B, C = bc.reshape(b, 2, self.groups, self.n, l).unbind(1)
        return selective_scan(
            u, delta, -torch.exp(self.A_logs), B, C, self.Ds, delta_bias=self.dt_bias, delta_softplus=True
        )


def test_opacus_grad_sample_matches_per_sample_autograd(path, small_chunks):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = TinySSM()
    x = torch.randn(4, 2 * 8 + 2 * 2 * 4, 37, dtype=torch.float64)
    w = torch.randn(4, 8, 37, dtype=torch.float64)
    expected = [
        torch.autograd.grad((model(x[i : i + 1]) * w[i : i + 1]).sum(), list(model.parameters())) for i in range(4)
    ]
    gsm = GradSampleModule(model, loss_reduction="sum")
    (gsm(x.requires_grad_()) * w).sum().backward()
    assert hasattr(model, "ft_compute_sample_grad")  # Opacus took its functorch (vmap of grad) path
    for i in range(x.shape[0]):
        for (name, p), exp in zip(model.named_parameters(), expected[i]):
            assert p.grad_sample is not None, name
            torch.testing.assert_close(p.grad_sample[i], exp, rtol=1e-10, atol=1e-12, msg=name)


def test_mamba_import_is_tried_once(monkeypatch):
    monkeypatch.setattr(ss_module, "_MAMBA_TRIED", False)
    monkeypatch.setattr(ss_module, "_MAMBA_FN", None)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)  # importing it raises ImportError
    assert ss_module._mamba_selective_scan_fn() is None
    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    fake.selective_scan_fn = lambda *args: None
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert ss_module._mamba_selective_scan_fn() is None  # the failed attempt is cached
    monkeypatch.setattr(ss_module, "_MAMBA_TRIED", False)
    assert ss_module._mamba_selective_scan_fn() is fake.selective_scan_fn


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded yet in this process, as in a new ClientApp process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_scan.library.cache_clear()
    native_scan.onnxruntime_library.cache_clear()
    yield tmp_path / "fed_swinumamba"
    native_scan.library.cache_clear()
    native_scan.onnxruntime_library.cache_clear()


@pytest.mark.parametrize("compiler, reason", [("no-such-c++", "no C++ compiler"), ("false", "false failed")])
def test_without_a_working_compiler_the_torch_path_runs(fresh_cache, monkeypatch, caplog, compiler, reason):
    monkeypatch.setenv("CXX", compiler)
    inputs = make_inputs()
    with caplog.at_level(logging.WARNING, logger=ss_module.__name__):
        y, g = value_and_grads(selective_scan, inputs, set(NAMES), True)
    assert reason in caplog.text and "PyTorch path" in caplog.text
    assert not list(fresh_cache.glob("**/*.so*"))  # no library and no temporary build left behind
    monkeypatch.setenv(ss_module.PATH_ENV, "torch")
    y_torch, g_torch = value_and_grads(selective_scan, inputs, set(NAMES), True)
    torch.testing.assert_close(y, y_torch, rtol=0, atol=0)
    for k in g:
        torch.testing.assert_close(g[k], g_torch[k], rtol=0, atol=0, msg=k)
    monkeypatch.setenv(ss_module.PATH_ENV, "native")
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        selective_scan(**inputs)


def test_a_compiler_other_than_gcc_gets_no_gcc_only_flags(fresh_cache, monkeypatch, tmp_path):
    # A stand-in for Clang: says so on --version and, like a compiler without them, rejects GCC's scheduling flags.
    real = shutil.which("c++")
    if real is None:
        pytest.skip("no C++ compiler")
    fake = tmp_path / "clang++"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "clang version 17.0.6"; exit 0; }\n'
        'for a in "$@"; do [ "$a" = -fsched-pressure ] && { echo "unknown argument: $a" >&2; exit 1; }; done\n'
        f'exec {real} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    lib, reason = native_scan.library()
    assert reason == "" and lib is not None
    assert not set(native_scan._GCC_FLAGS) & set(native_scan._flags(str(fake)))
    real_is_gcc = (
        "Free Software Foundation" in subprocess.run([real, "--version"], capture_output=True, text=True).stdout
    )
    assert (set(native_scan._GCC_FLAGS) <= set(native_scan._flags(real))) == real_is_gcc


def test_concurrent_builds_leave_one_library_that_later_processes_reuse(fresh_cache, monkeypatch):
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    target = native_scan._library_path(compiler, "selective_scan", native_scan.SOURCE)
    with ThreadPoolExecutor(2) as pool:  # two processes' first calls at once
        list(pool.map(lambda _: native_scan._build(compiler, native_scan.SOURCE, target), range(2)))
    assert [p.name for p in fresh_cache.iterdir()] == [target.name]
    monkeypatch.setattr(native_scan, "_build", None)  # a later process must not build again
    lib, reason = native_scan.library()
    assert lib is not None and reason == ""
    monkeypatch.setenv(ss_module.PATH_ENV, "native")
    inputs = make_inputs(groups=4)
    torch.testing.assert_close(selective_scan(**inputs), selective_scan_reference(**inputs), rtol=1e-9, atol=1e-10)
