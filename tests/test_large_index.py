"""Indexing stays exact when element offsets pass 2**31.

Triton kernels: inputs are strided views into a large, mostly untouched allocation, so
the offsets of the last batch entries exceed 2**31 while only a few pages are ever
written (Linux commits memory on first touch). Every stride fits in 32 bits; only the
products need 64-bit arithmetic. C++ kernels: a real tensor of more than 2**31 elements
(its input left untouched, so only the output is committed: 4 GiB), given to the
extension's ops directly."""

import pytest
import torch

import fusedres
from fusedres import backends
from fusedres import reference as R
from fusedres.testing import assert_close

BIG = 2**31
STRIDE_N = 2**30 + 4096  # fits in int32; n = 2 puts the offset past 2**31


def _far_view(shape, dtype, seed):
    """An NHWC tensor of `shape` whose batch stride is STRIDE_N elements, filled with random values."""
    n, c, h, w = shape
    assert (n - 1) * STRIDE_N > BIG
    base = torch.empty((n - 1) * STRIDE_N + h * w * c, dtype=dtype)
    v = base.as_strided(shape, (STRIDE_N, 1, w * c, c))
    v.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype))
    return v


_tr = fusedres.available_backends()["triton"]


@pytest.mark.skipif(not _tr.available, reason=f"triton backend not available: {_tr.reason}")
def test_triton_kernels_index_past_2_31():
    T = backends.get("triton")
    dt = torch.float32
    x = _far_view((3, 4, 5, 5), dt, 0)
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    s, t = torch.rand(4) + 0.5, torch.randn(4)
    geom = ([1, 1], [1, 1], [1, 1], 1)
    xc = x.contiguous()

    y, part = T.conv_stats(x, w, s, t, True, *geom)
    yr, partr = R.conv_stats(xc, w, s, t, True, *geom)
    assert_close(y, yr, atol=1e-4, rtol=1e-4, name="conv_stats y")
    m_got, m_want = R.merge_partials(part)[1], R.merge_partials(partr)[1]
    assert_close(m_got, m_want, atol=1e-5, rtol=1e-5, name="batch mean")

    res = _far_view((3, 6, 5, 5), dt, 2)
    bias = torch.randn(6, generator=torch.Generator().manual_seed(3))
    out = T.conv_bias_act(x, w, bias, res, None, None, False, *geom, True)
    want = R.conv_bias_act(xc, w, bias, res.contiguous(), None, None, False, *geom, True)
    assert_close(out, want, atol=1e-4, rtol=1e-4, name="conv_bias_act")

    dy = _far_view((3, 6, 5, 5), dt, 4)
    dw = T.conv_wgrad(dy, x, s, t, True, list(w.shape), *geom)
    dwr = R.conv_wgrad(dy.contiguous(), xc, s, t, True, list(w.shape), *geom)
    assert_close(dw, dwr, atol=1e-3, rtol=1e-4, name="conv_wgrad")

    st = T.batch_stats(x)
    assert_close(R.merge_partials(st)[1], R.merge_partials(R.batch_stats(xc))[1], atol=1e-5, rtol=1e-5,
                 name="batch_stats mean")
    sc, sh = torch.rand(4) + 0.5, torch.randn(4)
    got = T.bn_add_act(x, sc, sh, None, None, None, None, True)
    assert_close(got, R.bn_add_act(xc, sc, sh, None, None, None, None, True), atol=1e-6, rtol=1e-6, name="bn_add_act")


_cpu = fusedres.available_backends()["cpu"]


@pytest.mark.heavy  # allocates and sweeps more than 2**31 elements
@pytest.mark.skipif(not _cpu.available, reason=f"cpu backend not available: {_cpu.reason}")
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cpu_kernels_on_more_than_2_31_elements(layout):
    ops = torch.ops.fusedres_ext  # the kernels themselves, whatever dtypes the backend routes to them
    c = 2 if layout == "nchw" else 16  # NHWC rows of a realistic width
    hw = BIG // c + 512  # N*C*H*W = 2**31 + 512*C
    shape = (1, c, 1, hw)
    y = torch.empty(shape, dtype=torch.bfloat16)  # untouched pages read as zero
    if layout == "nhwc":
        y = y.as_strided(shape, (c * hw, 1, c * hw, c))
    gen = torch.Generator().manual_seed(0)
    tail = torch.randint(-8, 8, (c, 3), generator=gen).to(torch.bfloat16)
    y[0, :, 0, -3:] = tail
    scale = torch.randint(1, 4, (c,), generator=gen).float() / 2
    shift = torch.randint(-4, 4, (c,), generator=gen).float() / 4
    out = ops.bn_add_act(y, scale, shift, None, None, None, None, True)
    assert out.shape == y.shape and out.stride() == y.stride()
    want_tail = torch.relu(tail.float() * scale[:, None] + shift[:, None]).to(torch.bfloat16)
    assert torch.equal(out[0, :, 0, -3:], want_tail), f"{out[0, :, 0, -3:]} != {want_tail}"
    assert torch.equal(out[0, :, 0, :2].float(), torch.relu(shift)[:, None].expand(c, 2))
    del out
    if hasattr(ops, "batch_stats"):
        part = ops.batch_stats(y, 3)
        n, mean, _ = R.merge_partials(part)
        assert n.tolist() == [hw] * c
        assert_close(mean, tail.double().sum(1) / hw, atol=1e-12, rtol=1e-6, name="mean")
