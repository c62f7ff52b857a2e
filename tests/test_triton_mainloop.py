"""The triton convolutions' main-loop forms against the reference, under the interpreter
(CPU) or on a GPU: stride-phase dgrad (one launch per phase, only the taps that reach it),
the merged filter-row reduction of few-channel inputs (the RGB stem), and wgrad's two
orientations (transformed input patch as the MMA's A operand, or dy) with per-tap or
flattened columns. Odd sizes, padding, dilation, groups; small shapes for the interpreter."""

import pytest
import torch

import fusedres
from fusedres import backends, reference as R
from fusedres.testing import assert_close

_ST = fusedres.available_backends()["triton"]
if not _ST.available:
    pytest.skip(f"triton backend not available: {_ST.reason}", allow_module_level=True)

from fusedres.triton_kernels import conv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T = backends.get("triton")


def _x(n, c, h, w, cl=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def _w(k, c, r, s, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, c, r, s, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(DEVICE)


@pytest.mark.parametrize("phase,pad,dil,stride,size", [(0, 1, 1, 2, 3), (1, 1, 1, 2, 3), (1, 0, 1, 2, 1),
                                                        (0, 2, 2, 2, 3), (1, 2, 2, 2, 3), (2, 1, 2, 3, 5)])
def test_phase_taps_are_exactly_the_taps_that_reach_the_phase(phase, pad, dil, stride, size):
    r0, step, count, o0, do = conv.phase_taps(phase, pad, dil, stride, size)
    taps = [r0 + t * step for t in range(count)]
    assert taps == [r for r in range(size) if (phase + pad - r * dil) % stride == 0]
    for t, r in enumerate(taps):
        for i in range(4):  # input row h = phase + i*stride reaches output row p
            h = phase + i * stride
            assert (h + pad - r * dil) // stride == i + o0 - t * do


# (name, N, C, H, W, K, kernel, stride, padding, dilation, groups)
DGRAD = [
    ("s2-odd-pad1", 2, 4, 7, 5, 6, 3, 2, 1, 1, 1),
    ("s2-dil2-empty-phases", 1, 3, 9, 8, 4, 3, 2, 2, 2, 1),
    ("s3-dil2-groups", 1, 6, 8, 7, 4, 3, 3, 1, 2, 2),
    ("s2-1x1-projection", 2, 5, 7, 7, 3, 1, 2, 0, 1, 1),
    ("s2-input-smaller-than-stride", 2, 3, 1, 3, 2, 3, 2, 1, 1, 1),
]


@pytest.mark.parametrize("case", DGRAD, ids=[c[0] for c in DGRAD])
def test_strided_dgrad_by_phase(case):
    _, n, c, h, w, k, r, st, pad, dil, g = case
    x = _x(n, c, h, w)
    wt = _w(k, c // g, r, r)
    geom = ([st, st], [pad, pad], [dil, dil], g)
    y = R.conv_stats(x, wt, None, None, False, *geom)[0]
    dy = torch.randn(y.shape, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    got = T.conv_dgrad(dy, wt, list(x.shape), *geom)
    want = R.conv_dgrad(dy, wt, list(x.shape), *geom)
    assert_close(got, want, atol=1e-11, rtol=1e-9, name="dx")
    # with the BatchNorm apply on load (the bn_apply_conv_backward path)
    kk = y.shape[1]
    bs, bt = torch.rand(kk, dtype=torch.float64, device=DEVICE) + 0.5, torch.randn(kk, dtype=torch.float64,
                                                                                     device=DEVICE)
    coefs = torch.randn(3, kk, dtype=torch.float64, device=DEVICE)
    args = (dy, y, bs, bt, coefs, wt, x, None, None, False, *geom, True, False)
    assert_close(T.bn_apply_conv_backward(*args)[0], R.bn_apply_conv_backward(*args)[0], atol=1e-11, rtol=1e-9,
                 name="dx (BN apply)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 11, 10, 5, 7, 2, 3), (2, 2, 6, 7, 3, 3, 2, 1)],
                         ids=["7x7-s2-rgb", "3x3-s2-2ch"])
def test_merged_filter_rows_forward(shape, dtype):
    # channels_last input with few channels: the forward reduces (s, c) as one index
    n, c, h, w, k, ks, st, pad = shape
    x = _x(n, c, h, w, dtype=dtype)
    wt = _w(k, c, ks, ks, dtype=dtype)
    geom = ([st, st], [pad, pad], [1, 1], 1)
    sd = R.stat_dtype(dtype)
    s = (torch.rand(c, dtype=torch.float64) + 0.5).to(sd).to(DEVICE)
    t = torch.randn(c, dtype=torch.float64).to(sd).to(DEVICE)
    tol = dict(atol=1e-11, rtol=1e-9) if dtype == torch.float64 else dict(atol=6e-2, rtol=3e-2)
    for pro in [(None, None, False), (s, t, True)]:
        y, part = T.conv_stats(x, wt, *pro, *geom)
        assert_close(y, R.conv_stats(x, wt, *pro, *geom)[0], name="y", **tol)
    bias = torch.randn(k, dtype=dtype, device=DEVICE)
    got = T.conv_bias_act(x, wt, bias, None, None, None, False, *geom, True)
    assert_close(got, R.conv_bias_act(x, wt, bias, None, None, None, False, *geom, True), name="out", **tol)


# (name, N, C, H, W, K, kernel, stride, padding, dilation, groups, channels_last)
WGRAD = [
    ("3x3-tap-cols", 2, 8, 5, 6, 6, 3, 1, 1, 1, 1, True),
    ("3x3-s2-dil2-groups-tap-cols", 1, 8, 9, 8, 4, 3, 2, 2, 2, 2, True),
    ("7x7-s2-rgb-flat", 1, 3, 9, 9, 4, 7, 2, 3, 1, 1, True),
    ("3x3-nchw-flat", 2, 3, 5, 5, 4, 3, 1, 1, 1, 1, False),
]


@pytest.mark.parametrize("case", WGRAD, ids=[c[0] for c in WGRAD])
def test_wgrad_orientations(case):
    _, n, c, h, w, k, r, st, pad, dil, g, cl = case
    x = _x(n, c, h, w, cl=cl)
    wshape = [k, c // g, r, r]
    geom = ([st, st], [pad, pad], [dil, dil], g)
    wt = _w(*wshape)
    y = R.conv_stats(x, wt, None, None, False, *geom)[0]
    dy = _x(*y.shape, seed=3)
    s = torch.rand(c, dtype=torch.float64, device=DEVICE) + 0.5
    t = torch.randn(c, dtype=torch.float64, device=DEVICE)
    for pro in [(None, None, False), (s, t, True)]:  # dy as A / the transformed patch as A
        got = T.conv_wgrad(dy, x, *pro, wshape, *geom)
        assert_close(got, R.conv_wgrad(dy, x, *pro, wshape, *geom), atol=1e-10, rtol=1e-9, name="dw")
        assert got.is_contiguous()
    kk = y.shape[1]
    bs, bt = torch.rand(kk, dtype=torch.float64, device=DEVICE) + 0.5, torch.randn(kk, dtype=torch.float64,
                                                                                     device=DEVICE)
    coefs = torch.randn(3, kk, dtype=torch.float64, device=DEVICE)
    for pro in [(None, None, False), (s, t, True)]:  # BN apply on load / as one pass first
        args = (dy, y, bs, bt, coefs, wt, x, *pro, *geom, False, True)
        assert_close(T.bn_apply_conv_backward(*args)[1], R.bn_apply_conv_backward(*args)[1], atol=1e-10,
                     rtol=1e-9, name="dw (BN apply)")
