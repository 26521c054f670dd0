"""The selective scan as an ONNX Runtime operator, compiled and Python, against the sequential definition."""

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fed_swinumamba.ops import native_scan, scan_onnx, selective_scan_reference

INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def _one_scan_session(softplus: bool) -> ort.InferenceSession:
    """A graph of one SelectiveScan node, as the export writes it, in a session from ``session_options``."""
    node = helper.make_node(
        scan_onnx.OP_TYPE, list(INPUTS), ["y"], domain=scan_onnx.OP_DOMAIN, delta_softplus=int(softplus)
    )
    graph = helper.make_graph(
        [node],
        "scan",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in INPUTS],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(scan_onnx.OP_DOMAIN, 1)]
    )
    return ort.InferenceSession(
        model.SerializeToString(), scan_onnx.session_options(2), providers=["CPUExecutionProvider"]
    )


def _inputs(b=2, d=8, n=16, l=300, groups=4, seed=0) -> dict[str, np.ndarray]:
    """VMamba-like inputs; l = 300 spans two of the kernel's 256-step chunks. delta, bias >= 0: the scan decays
    with or without softplus."""
    rng = np.random.default_rng(seed)
    x = {
        "u": rng.standard_normal((b, d, l)),
        "delta": 0.5 * np.abs(rng.standard_normal((b, d, l))),
        "A": -np.exp(2 * rng.random((d, n))),
        "B": rng.standard_normal((b, groups, n, l)),
        "C": rng.standard_normal((b, groups, n, l)),
        "D": rng.standard_normal(d),
        "delta_bias": 0.3 * np.abs(rng.standard_normal(d)),
    }
    return {k: v.astype(np.float32) for k, v in x.items()}


@pytest.fixture(params=["compiled", "python"])
def implementation(request, monkeypatch):
    """Sessions get the compiled operator, or the Python one as where no compiler is at hand."""
    if request.param == "compiled" and native_scan.onnxruntime_library()[0] is None:
        pytest.skip(native_scan.onnxruntime_library()[1])
    if request.param == "python":
        monkeypatch.setattr(native_scan, "onnxruntime_library", lambda: (None, "no C++ compiler (test)"))
    return request.param


@pytest.mark.parametrize("n, groups", [(16, 4), (5, 1), (3, 2)])
@pytest.mark.parametrize("softplus", [False, True])
def test_the_operator_equals_the_sequential_scan(implementation, n, groups, softplus):
    x = _inputs(n=n, groups=groups)
    (y,) = _one_scan_session(softplus).run(None, x)
    ref = selective_scan_reference(**{k: torch.from_numpy(v).double() for k, v in x.items()}, delta_softplus=softplus)
    assert y.dtype == np.float32 and y.shape == x["u"].shape
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_without_the_compiled_operator_the_python_one_runs_and_says_why(implementation, caplog):
    with caplog.at_level(logging.WARNING, logger=scan_onnx.__name__):
        _one_scan_session(True)
    assert ("no C++ compiler (test)" in caplog.text) == (implementation == "python")


def test_inputs_of_inconsistent_shapes_are_an_error_naming_the_input():
    if native_scan.onnxruntime_library()[0] is None:
        pytest.skip(native_scan.onnxruntime_library()[1])
    x = _inputs()
    x["C"] = x["C"][..., :-1]
    with pytest.raises(Exception, match=r"SelectiveScan: input C has shape \(2, 4, 16, 299\)"):
        _one_scan_session(True).run(None, x)
