"""The selective scan as one ONNX operator, and its ONNX Runtime implementation.

VMamba's scan is a recurrence over every pixel of a feature map (16 384 steps at 512 x 512). In ONNX's
standard operators it becomes either a Loop of that many steps or a parallel scan that materialises
(batch, channels, state, pixels) tensors, hundreds of MB per layer: both far slower on a CPU than the
sequential kernel. So the export writes each scan as a single node ``ai.onnx.contrib::SelectiveScan``
(the domain onnxruntime-extensions gives Python-implemented operators). ONNX Runtime runs it with the scan's
compiled CPU kernel built as an operator library (``native_scan.onnxruntime_library``, on ONNX Runtime's
thread pool), or, where no C++ compiler is at hand, through onnxruntime-extensions as a Python operator
(several times slower: it hands its output back as a Python list).

The node's meaning is mamba-ssm's ``selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias,
delta_softplus)`` (``selective_scan.selective_scan_reference``); inputs, all float32:
u, delta (b, d, l); A (d, n); B, C (b, g, n, l); D, delta_bias (d,); attribute delta_softplus (0 or 1);
output y (b, d, l).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from . import native_scan
from .selective_scan import selective_scan

__all__ = ["OP_DOMAIN", "OP_TYPE", "session_options", "translation_table"]

log = logging.getLogger(__name__)

OP_DOMAIN, OP_TYPE = "ai.onnx.contrib", "SelectiveScan"
_INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


@functools.cache
def _opset():
    """The operator's ONNX schema (registered once per process) and its onnxscript opset."""
    import onnx
    import onnxscript

    if not onnx.defs.has(OP_TYPE, OP_DOMAIN):
        param = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(
            onnx.defs.OpSchema(
                OP_TYPE,
                OP_DOMAIN,
                1,
                doc=__doc__,
                inputs=[param(name, "T") for name in _INPUTS],
                outputs=[param("y", "T")],
                type_constraints=[("T", ["tensor(float)"], "float32 only")],
                attributes=[
                    onnx.defs.OpSchema.Attribute(
                        "delta_softplus", onnx.defs.OpSchema.AttrType.INT, "softplus(delta + delta_bias)"
                    )
                ],
            )
        )
    return onnxscript.values.Opset(OP_DOMAIN, 1)


def _translate(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = False):
    return _opset().SelectiveScan(u, delta, A, B, C, D, delta_bias, delta_softplus=int(delta_softplus))


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the scan operator -> the ONNX node."""
    _opset()
    return {torch.ops.fed_swinumamba.selective_scan.default: _translate}


@functools.cache
def _register_implementation() -> str:
    """Declare the node's implementation to onnxruntime-extensions (once); its library's path."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(
        op_type=OP_TYPE,
        inputs=[PyCustomOpDef.dt_float] * len(_INPUTS),
        outputs=[PyCustomOpDef.dt_float],
        attrs={"delta_softplus": PyCustomOpDef.dt_int64},
    )
    def _selective_scan(*arrays, **attrs):
        u, delta, A, B, C, D, bias = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in arrays)
        with torch.no_grad():
            y = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=bool(attrs["delta_softplus"]))
        return y.numpy()

    return get_library_path()


def _register(options) -> None:
    """Register the scan's implementation with `options`: the compiled operator, else the Python one."""
    path, why = native_scan.onnxruntime_library()
    if path is not None:
        try:
            options.register_custom_ops_library(str(path))
            return
        except Exception as err:  # onnxruntime raises its own untyped errors (e.g. a runtime older than 1.17)
            why = f"ONNX Runtime did not load {path}: {err}"
    log.warning("the selective scan runs as a Python operator in ONNX Runtime, several times slower: %s", why)
    options.register_custom_ops_library(_register_implementation())


def session_options(threads: int | None = None):
    """ONNX Runtime session options able to run exported networks (the scan node registered)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    _register(options)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options
