"""Mamba selective scan: mamba-ssm's CUDA kernel on GPU; on CPU a compiled kernel, else chunked PyTorch.

Signature and layouts follow mamba-ssm's ``selective_scan_fn``; the meaning is
``selective_scan_reference`` below (mamba-ssm's ``selective_scan_ref``).

The CPU paths exist because mamba-ssm's own fallback loops over time with autograd on slices,
whose backward materialises a full-size gradient per step (minutes per layer). Both save only the
inputs plus one state per time chunk and recompute each chunk in the backward pass:

- native (any CPU tensors): a C++/OpenMP kernel (``native_scan``) fusing delta_bias, softplus and
  the D term, built with the system compiler on first use and cached; one pass over the data
  forward, two backward, each channel's state kept in L1 cache.
- torch (where the kernel cannot be built or run): the recurrence as one in-place op per step on
  small time chunks that stay in cache. Both paths compute in fp32 (fp64 for fp64 inputs).

Under ``torch.export`` (the ONNX export) the scan is one opaque operator, ``fed_swinumamba::selective_scan``,
which ``scan_onnx`` writes as a single ONNX node.

``FED_SWINUMAMBA_SCAN=torch`` forces the PyTorch path; ``=native`` requires the kernel (an error
where it cannot run); unset or ``auto`` uses the kernel where it can. Both paths support
``torch.func`` (vmap / grad), which Opacus uses for per-sample gradients.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from . import native_scan

__all__ = ["selective_scan", "selective_scan_reference"]

log = logging.getLogger(__name__)

PATH_ENV = "FED_SWINUMAMBA_SCAN"

_CHUNK_ELEMENTS = (
    1 << 20
)  # 4 MiB of fp32 per chunk buffer: amortises per-chunk ops, small next to the inputs (measured)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/half inputs (as mamba-ssm); fp64 inputs stay fp64 so tests can compare tightly."""
    return torch.promote_types(dtype, torch.float32)


def _as_grouped(x: torch.Tensor) -> torch.Tensor:
    """(b, n, l) -> (b, 1, n, l); (b, g, n, l) unchanged."""
    return x.unsqueeze(1) if x.dim() == 3 else x


_MAMBA_FN = None
_MAMBA_TRIED = False


def _mamba_selective_scan_fn():
    """mamba-ssm's CUDA ``selective_scan_fn``, or None. Imported once: the import fails without its extension."""
    global _MAMBA_FN, _MAMBA_TRIED
    if not _MAMBA_TRIED:
        _MAMBA_TRIED = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except (ImportError, OSError):
            selective_scan_fn = None
        _MAMBA_FN = selective_scan_fn
    return _MAMBA_FN


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """y = selective scan of u; same arguments, layouts and result as mamba-ssm's ``selective_scan_fn``.

    u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l) with channel i using
    group i // (d // g); D, delta_bias: (d,). Returns u's dtype.
    """
    if torch.compiler.is_exporting():
        return _exported_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    # mamba-ssm's autograd.Function has no functorch support, so vmap/grad (Opacus) stays on ours.
    if u.is_cuda and not torch._C._functorch.is_functorch_wrapped_tensor(u):
        fn = _mamba_selective_scan_fn()
        if fn is not None:
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    B, C = _as_grouped(B), _as_grouped(C)
    if u.shape[1] % B.shape[1] or u.shape[1] % C.shape[1]:
        raise ValueError(f"d={u.shape[1]} is not divisible by the groups of B {tuple(B.shape)} / C {tuple(C.shape)}")
    ct = _compute_dtype(u.dtype)
    x = u.to(ct)
    D = x.new_zeros(x.shape[1]) if D is None else D.to(ct)
    delta_bias = x.new_zeros(x.shape[1]) if delta_bias is None else delta_bias.to(ct)
    native = _use_native(x, A.shape[1])
    y, _ = _SelectiveScan.apply(x, delta.to(ct), A.to(ct), B.to(ct), C.to(ct), D, delta_bias, delta_softplus, native)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype).contiguous()


def _exported_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The scan as ``torch.export`` records it: one ``fed_swinumamba::selective_scan`` node, then the z gate."""
    D = u.new_zeros(u.shape[1]) if D is None else D
    delta_bias = u.new_zeros(u.shape[1]) if delta_bias is None else delta_bias
    y = torch.ops.fed_swinumamba.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return y if z is None else y * F.silu(z)


@torch.library.custom_op("fed_swinumamba::selective_scan", mutates_args=())
def _scan_operator(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    delta_softplus: bool,
) -> torch.Tensor:
    """Inference only (no autograd formula): what an exported network runs in place of the scan."""
    with torch.no_grad():
        return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)


@_scan_operator.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    return torch.empty_like(u)


def _use_native(x: torch.Tensor, n: int) -> bool:
    """Whether the compiled kernel runs this scan (see FED_SWINUMAMBA_SCAN in the module docstring)."""
    choice = os.environ.get(PATH_ENV, "auto")
    if choice not in ("auto", "native", "torch"):
        raise ValueError(f"{PATH_ENV}={choice!r}: use auto, native or torch")
    if choice == "torch":
        return False
    reason = _native_unsupported(x, n)
    if reason and choice == "native":
        raise RuntimeError(f"{PATH_ENV}=native, but {reason}")
    if reason:
        _log_once(reason)
    return not reason


def _native_unsupported(x: torch.Tensor, n: int) -> str:
    """Why the kernel cannot run on x, or "" if it can."""
    if x.device.type != "cpu":
        return f"the tensors are on {x.device.type}"
    if n > native_scan.MAX_STATE:
        return f"the kernel takes n <= {native_scan.MAX_STATE}, not {n}"
    return native_scan.library()[1]


@functools.cache
def _log_once(reason: str) -> None:
    log.warning("selective scan on its (slower) PyTorch path: %s", reason)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The definition: a plain loop over time with ordinary autograd (slow; for tests)."""
    ct = _compute_dtype(u.dtype)
    x, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = _as_grouped(B).to(ct), _as_grouped(C).to(ct)
    B = B.repeat_interleave(x.shape[1] // B.shape[1], dim=1)  # (b, d, n, l)
    C = C.repeat_interleave(x.shape[1] // C.shape[1], dim=1)
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    # unbind, not indexing: its backward stacks the steps' gradients once instead of one full-size tensor per step
    for dt, x_t, B_t, C_t in zip(delta.unbind(-1), x.unbind(-1), B.unbind(-1), C.unbind(-1)):
        dt = dt[..., None]
        h = torch.exp(dt * A) * h + dt * B_t * x_t[..., None]
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + x * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)


def _chunk_len(b: int, d: int, n: int, l: int) -> int:
    return max(1, min(l, _CHUNK_ELEMENTS // (b * d * n)))


def _time_major(u, delta, B, C):
    """(b, d, l) -> (l, b, d) and (b, g, n, l) -> (l, b, g, n), contiguous: each time step is one block."""
    dt = delta.permute(2, 0, 1).contiguous()
    du = (delta * u).permute(2, 0, 1).contiguous()
    return dt, du, B.permute(3, 0, 1, 2).contiguous(), C.permute(3, 0, 1, 2).contiguous()


def _chunk_states(dt, du, A, Bt, s, e, h0, a, h):
    """Fill a = exp(delta*A) and h = states for time steps [s, e), starting from state h0 (all (., b, d, n))."""
    m, b, d = e - s, dt.shape[1], dt.shape[2]
    g, n = Bt.shape[2], Bt.shape[3]
    torch.mul(dt[s:e, :, :, None], A, out=a)
    a.exp_()  # delta >= 0 and A < 0 in practice: underflows to 0, never overflows
    torch.mul(du[s:e].view(m, b, g, d // g, 1), Bt[s:e].view(m, b, g, 1, n), out=h.view(m, b, g, d // g, n))
    a_t, h_t = a.unbind(0), h.unbind(0)
    h_t[0].addcmul_(a_t[0], h0)
    for t in range(1, m):
        h_t[t].addcmul_(a_t[t], h_t[t - 1])
    return a_t, h_t


def _torch_scan_forward(u, delta, A, B, C):
    """y (b, d, l) without D/z, and the state entering each time chunk (n_chunks, b, d, n) for the backward."""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    T = _chunk_len(b, d, n, l)
    dt, du, Bt, Ct = _time_major(u, delta, B, C)
    y = u.new_empty(l, b, d)
    h_in = u.new_empty((l + T - 1) // T, b, d, n)
    h_in[0].zero_()
    a, h = u.new_empty(T, b, d, n), u.new_empty(T, b, d, n)
    for c, s in enumerate(range(0, l, T)):
        e = min(s + T, l)
        m = e - s
        _, h_t = _chunk_states(dt, du, A, Bt, s, e, h_in[c], a[:m], h[:m])
        mg, H = m * b * g, d // g
        torch.bmm(Ct[s:e].view(mg, 1, n), h[:m].view(mg, H, n).transpose(1, 2), out=y[s:e].view(mg, 1, H))
        if c + 1 < h_in.shape[0]:
            h_in[c + 1].copy_(h_t[-1])
    return y.permute(1, 2, 0), h_in


def _torch_scan_backward(u, delta, A, B, C, h_in, dy):
    """Gradients (u, delta, A per batch element (b, d, n), B, C) of sum(dy * y), chunk by chunk in reverse."""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    H = d // g
    T = _chunk_len(b, d, n, l)
    dt, du, Bt, Ct = _time_major(u, delta, B, C)
    dyt = dy.permute(2, 0, 1).contiguous()
    g_du, g_dt = u.new_empty(l, b, d), u.new_empty(l, b, d)
    gB, gC = u.new_empty(l, b, g, n), u.new_empty(l, b, g, n)
    gA = u.new_zeros(b, d, n)
    a, h, gh = (u.new_empty(T, b, d, n) for _ in range(3))
    carry = u.new_zeros(b, d, n)  # exp(delta_e * A) * dL/dh_e from the chunk after this one
    for c in reversed(range(h_in.shape[0])):
        s = c * T
        e = min(s + T, l)
        m, mg = e - s, (e - s) * b * g
        a_t, _ = _chunk_states(dt, du, A, Bt, s, e, h_in[c], a[:m], h[:m])
        hc, gc = h[:m], gh[:m]
        # dL/dh_t = dy_t C_t + exp(delta_{t+1} A) dL/dh_{t+1}
        torch.mul(dyt[s:e].view(m, b, g, H, 1), Ct[s:e].view(m, b, g, 1, n), out=gc.view(m, b, g, H, n))
        g_t = gc.unbind(0)
        g_t[-1].add_(carry)
        for t in range(m - 2, -1, -1):
            g_t[t].addcmul_(a_t[t + 1], g_t[t + 1])
        torch.mul(a_t[0], g_t[0], out=carry)
        torch.bmm(dyt[s:e].view(mg, 1, H), hc.view(mg, H, n), out=gC[s:e].view(mg, 1, n))
        torch.bmm(du[s:e].view(mg, 1, H), gc.view(mg, H, n), out=gB[s:e].view(mg, 1, n))
        torch.bmm(Bt[s:e].view(mg, 1, n), gc.view(mg, H, n).transpose(1, 2), out=g_du[s:e].view(mg, 1, H))
        # dL/d(delta_t A) = dL/dh_t * h_{t-1} * exp(delta_t A), built in place in gc
        gc[1:].mul_(hc[:-1])
        gc[0].mul_(h_in[c])
        gc.mul_(a[:m])
        torch.sum(torch.mul(gc, A, out=a[:m]), dim=-1, out=g_dt[s:e])
        gA.add_(gc.mul_(dt[s:e, :, :, None]).sum(0))
    g_dt.addcmul_(g_du, u.permute(2, 0, 1))  # du = delta * u
    return (
        (g_du * dt).permute(1, 2, 0),
        g_dt.permute(1, 2, 0),
        gA,
        gB.permute(1, 2, 3, 0),
        gC.permute(1, 2, 3, 0),
    )


def _torch_delta(delta, delta_bias, softplus):
    """The scan's delta (bias added, softplus applied) and its derivative wrt the raw delta (None: 1)."""
    z = delta + delta_bias[:, None]
    return (F.softplus(z), torch.sigmoid(z)) if softplus else (z, None)


def _torch_forward(u, delta, A, B, C, D, delta_bias, softplus):
    """The PyTorch path of ``native_scan.scan_forward``: y with the D term, and the chunk states."""
    y, h_in = _torch_scan_forward(u, _torch_delta(delta, delta_bias, softplus)[0], A, B, C)
    return y.addcmul(u, D[:, None]), h_in


def _torch_backward(u, delta, A, B, C, D, delta_bias, softplus, h_in, dy):
    """The PyTorch path of ``native_scan.scan_backward``; D's and delta_bias's gradients per batch element."""
    dt, slope = _torch_delta(delta, delta_bias, softplus)
    du, ddt, dA, dB, dC = _torch_scan_backward(u, dt, A, B, C, h_in, dy)
    ddelta = ddt if slope is None else ddt * slope
    return du.addcmul(dy, D[:, None]), ddelta, dA, dB, dC, (dy * u).sum(-1), ddelta.sum(-1)


def _fold(x, bdim, size, dim=0):
    """Move vmap's dim of x to `dim` (expanding if x is unbatched) and merge it into the next dim."""
    x = x.unsqueeze(dim).expand(*x.shape[:dim], size, *x.shape[dim:]) if bdim is None else x.movedim(bdim, dim)
    return x.flatten(dim, dim + 1)


def _vmap_rule(fn, info, in_dims, args, fold_dims, out_dims):
    """vmap for a scan Function: fold vmap's dim into the batch dim (the scan is independent per batch
    element), or, if a per-channel input (A, D, delta_bias) is batched (rare), apply per vmapped slice and stack."""
    size = info.batch_size
    if any(bd is not None and fd is None for bd, fd in zip(in_dims, fold_dims)):
        outs = [fn.apply(*(x if bd is None else x.select(bd, i) for x, bd in zip(args, in_dims))) for i in range(size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    folded = (x if fd is None else _fold(x, bd, size, fd) for x, bd, fd in zip(args, in_dims, fold_dims))
    outs = fn.apply(*folded)
    return tuple(o.unflatten(od, (size, -1)) for o, od in zip(outs, out_dims)), out_dims


class _SelectiveScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, delta_bias, softplus, native) -> (y, states entering each chunk).

    delta is raw (before bias and softplus); the states are saved for the backward. `native` picks
    the kernel for the forward and, through ctx, the same one for the backward (the paths chunk time
    differently).
    """

    @staticmethod
    def forward(u, delta, A, B, C, D, delta_bias, softplus, native):
        return (native_scan.scan_forward if native else _torch_forward)(u, delta, A, B, C, D, delta_bias, softplus)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs[:7], output[1])
        ctx.softplus, ctx.native = inputs[7:]

    @staticmethod
    def backward(ctx, dy, _):
        u, delta, A, B, C, D, delta_bias, h_in = ctx.saved_tensors
        args = (u, delta, A, B, C, D, delta_bias, ctx.softplus, h_in, dy, ctx.native)
        du, ddelta, dA, dB, dC, dD, dbias = _SelectiveScanBackward.apply(*args)
        return du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dbias.sum(0), None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_rule(_SelectiveScan, info, in_dims, args, (0, 0, None, 0, 0, None, None, None, None), (0, 1))


class _SelectiveScanBackward(torch.autograd.Function):
    """The backward as a Function of its own, so vmap(grad(.)) folds it too and keeps the gradients of the
    per-channel inputs (A, D, delta_bias) per sample."""

    @staticmethod
    def forward(u, delta, A, B, C, D, delta_bias, softplus, h_in, dy, native):
        return (native_scan.scan_backward if native else _torch_backward)(
            u, delta, A, B, C, D, delta_bias, softplus, h_in, dy
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        fold_dims = (0, 0, None, 0, 0, None, None, None, 1, 0, None)
        return _vmap_rule(_SelectiveScanBackward, info, in_dims, args, fold_dims, (0,) * 7)
