"""Property-based tests: for any small geometry, dtype, layout and mode, a fused
conv-BN(-add)-ReLU equals the torch.nn modules it replaces, on every backend available.
Examples are derandomised (the same ones every run) and bounded so CI stays fast."""

import copy

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fusedres  # noqa: E402
from fusedres.functional import unfused  # noqa: E402
from fusedres.testing import assert_close  # noqa: E402

from helpers import randomise  # noqa: E402

BACKENDS = [
    b for b, s in fusedres.available_backends().items()
    if s.available and fusedres.backends._device_error(b, torch.device("cpu")) is None
]
# the interpreter runs the triton kernels one program at a time: fewer examples there
EXAMPLES = {"triton": 25}
TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-4, 2e-4)}


@st.composite
def cases(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3]))
    dilation = draw(st.sampled_from([1, 1, 2])) if k == 3 else 1
    stride = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 3))
    padding = draw(st.sampled_from([dilation * (k // 2), 0]))
    smallest = max(1, dilation * (k - 1) + 1 - 2 * padding)  # at least one output pixel
    h, w = draw(st.integers(smallest, smallest + 5)), draw(st.integers(smallest, smallest + 5))
    return dict(
        n=n, c_in=c_in, c_out=c_out, h=h, w=w, k=k, stride=stride, dilation=dilation, groups=groups,
        padding=padding,
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        train=draw(st.sampled_from([True, False])),
        residual=draw(st.booleans()),
        relu=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.cat([t, t], dim=3)[..., ::2]
    return t


def _check(backend, c):
    torch.manual_seed(c["seed"])
    p = (c["h"] + 2 * c["padding"] - c["dilation"] * (c["k"] - 1) - 1) // c["stride"] + 1
    q = (c["w"] + 2 * c["padding"] - c["dilation"] * (c["k"] - 1) - 1) // c["stride"] + 1
    if c["train"] and c["n"] * p * q < 2:
        return  # a single value per channel: an error, covered by the error tests
    m = fusedres.ConvBNAct(
        c["c_in"], c["c_out"], c["k"], c["stride"], c["padding"], c["dilation"], c["groups"], act=c["relu"],
        backend=backend,
    )
    m = randomise(m).to(c["dtype"]).train(c["train"])
    ref = copy.deepcopy(m)
    x = _layout(torch.randn(c["n"], c["c_in"], c["h"], c["w"], dtype=c["dtype"]), c["layout"])
    r = torch.randn(c["n"], c["c_out"], p, q, dtype=c["dtype"]) if c["residual"] else None
    g = torch.randn(c["n"], c["c_out"], p, q, dtype=c["dtype"])
    xa, xb = x.clone().requires_grad_(c["train"]), x.clone().requires_grad_(c["train"])
    ya = m(xa, r)
    with unfused():
        yb = ref(xb, r)
    atol, rtol = TOL[c["dtype"]]
    assert_close(ya, yb, atol=atol, rtol=rtol, name="out")
    if c["train"]:
        ya.backward(g)
        with unfused():
            yb.backward(g)
        assert_close(xa.grad, xb.grad, atol=atol, rtol=rtol, name="x.grad")
        for (name, pa), (_, pb) in zip(m.named_parameters(), ref.named_parameters()):
            assert_close(pa.grad, pb.grad, atol=atol * 10, rtol=rtol * 10, name=f"{name}.grad")
        for (name, ba), (_, bb) in zip(m.named_buffers(), ref.named_buffers()):
            assert_close(ba.double(), bb.double(), atol=atol, rtol=rtol, name=name)


# the interpreted triton kernels take the heavy tier; the block grids cover them by default
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.heavy) if b == "triton" else b for b in BACKENDS])
def test_fused_conv_bn_act_equals_torch_nn(backend):
    @settings(max_examples=EXAMPLES.get(backend, 60), deadline=None, derandomize=True, database=None)
    @given(cases())
    def run(c):
        _check(backend, c)

    run()
