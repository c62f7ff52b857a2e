"""The C++ extension's ops (torch.ops.fusedres_ext) called directly on CPU: results vs the
formulas written in plain torch or fusedres.reference (adversarial shapes, every layout and
dtype, NaN/Inf), determinism across thread counts, errors that name the argument, opcheck."""

import os
import subprocess
import sys

import pytest
import torch

from fusedres import _ext, reference

_STATUS = _ext.status()
if not _STATUS["loaded"]:
    pytest.skip(f"fusedres C++ extension not loaded: {_STATUS['reason']}", allow_module_level=True)

ops = torch.ops.fusedres_ext
CL, CF = torch.channels_last, torch.contiguous_format


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _expected_format(y):
    strict_cl = y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    return CL if strict_cl else CF


def _bn_add_act_formula(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
    """The op's definition, in fp32 (fp64 for fp64 y), rounded once to y's dtype."""
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    c = lambda v: v.to(cd).view(1, -1, 1, 1)  # noqa: E731
    z = y.to(cd) * c(scale) + c(shift)
    if sample_scale is not None:
        z = z * sample_scale.to(cd).view(-1, 1, 1, 1)
    if residual is not None:
        r = residual.to(cd)
        if res_scale is not None:
            r = r * c(res_scale) + c(res_shift)
        z = z + r
    if relu:
        z = torch.relu(z)
    return z.to(y.dtype)


def _check_out(got, want, y):
    assert got.dtype == y.dtype and got.shape == y.shape
    assert got.is_contiguous(memory_format=_expected_format(y))
    if y.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    elif y.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    else:  # 16-bit storage: one rounding of the same fp32 value, allow one ulp
        torch.testing.assert_close(got, want, equal_nan=True)


# ------------------------------------------------------------------------------ bn_add_act


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fmt", [CF, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 7, 3, 4), (3, 13, 2, 3), (2, 16, 4, 4)], ids=str)
@pytest.mark.parametrize("mode", ["plain", "residual", "dual", "residual+sample", "dual+sample", "sample"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_bn_add_act_matches_formula(dtype, fmt, shape, mode, relu):
    n, c = shape[:2]
    y = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    scale, shift = torch.randn(c) * 0.5 + 1, torch.randn(c)
    residual = res_scale = res_shift = sample_scale = None
    if mode.startswith(("residual", "dual")):
        # residual stored in the other layout than y: the op must handle it
        other = CL if fmt == CF else CF
        residual = torch.randn(shape, dtype=dtype).contiguous(memory_format=other)
    if mode.startswith("dual"):
        res_scale, res_shift = torch.randn(c), torch.randn(c)
    if "sample" in mode:
        sample_scale = torch.tensor([0.0, 2.0, 0.5])[:n]
    args = (y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)
    _check_out(ops.bn_add_act(*args), _bn_add_act_formula(*args), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fmt", [CF, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_bn_add_act_16bit_storage(dtype, fmt, relu):
    y = torch.randn(2, 7, 3, 5).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(2, 7, 3, 5).to(dtype)
    args = (y, torch.randn(7), torch.randn(7), r, torch.randn(7), torch.randn(7), torch.rand(2), relu)
    _check_out(ops.bn_add_act(*args), _bn_add_act_formula(*args), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fmt", [CF, CL], ids=["nchw", "nhwc"])
def test_bn_add_act_16bit_rounding_matches_torch_bitwise(dtype, fmt):
    # every 16-bit pattern as input; scales that reach overflow, subnormals and exact ties
    y = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    y = y.view(1, 256, 16, 16).contiguous(memory_format=fmt)
    for sc in (1.0, -2.5, 3.7, 1e-3, 1e-6, 1e4, 0.5 + 2**-12):
        for sh in (0.0, 0.3):
            scale, shift = torch.full((256,), sc), torch.full((256,), sh)
            out = ops.bn_add_act(y, scale, shift, None, None, None, None, False)
            want = (y.float() * sc + sh).to(dtype)
            nan = want.isnan()
            assert torch.equal(out.isnan(), nan)
            assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16)), (sc, sh)


def test_bn_add_act_float64_y_takes_float64_or_float32_vectors():
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    s64, t64 = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for s, t in ((s64, t64), (s64.float(), t64.float())):
        args = (y, s, t, None, None, None, None, True)
        _check_out(ops.bn_add_act(*args), _bn_add_act_formula(*args), y)


def test_bn_add_act_any_strides_and_ambiguous_layouts():
    # non-contiguous y (a transposed view) and non-contiguous vectors: made contiguous first
    base = torch.randn(2, 3, 5, 4)
    y = base.transpose(2, 3)
    scale, shift = torch.randn(6)[::2], torch.randn(3)
    args = (y, scale, shift, torch.randn(2, 3, 4, 5), None, None, None, True)
    _check_out(ops.bn_add_act(*args), _bn_add_act_formula(*args), y)
    # contiguous *and* channels_last (H = W = 1): treated as contiguous
    y1 = torch.randn(3, 5, 1, 1).contiguous(memory_format=CL)
    out = ops.bn_add_act(y1, torch.ones(5), torch.zeros(5), None, None, None, None, False)
    assert out.is_contiguous() and torch.equal(out, y1)


def test_bn_add_act_empty_batch():
    for fmt in (CF, CL):
        y = torch.randn(0, 3, 4, 4).contiguous(memory_format=fmt)
        out = ops.bn_add_act(y, torch.ones(3), torch.zeros(3), None, None, None, None, True)
        assert out.shape == y.shape


@pytest.mark.parametrize("fmt", [CF, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_bn_add_act_propagates_nan_like_torch_relu(fmt, dtype):
    y = torch.tensor([float("nan"), -1.0, 2.0, float("inf"), float("-inf"), -0.0]).view(1, 1, 2, 3)
    y = y.expand(2, 3, 2, 3).to(dtype).contiguous(memory_format=fmt)
    one, zero = torch.ones(3), torch.zeros(3)
    out = ops.bn_add_act(y, one, zero, None, None, None, None, True)
    want = torch.relu(y)
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(7.0), want.nan_to_num(7.0))
    # NaN arriving through the residual as well
    r = torch.full_like(y, float("nan"))
    assert ops.bn_add_act(y, one, zero, r, None, None, None, True).isnan().all()


def test_bn_add_act_large_enough_to_run_in_parallel():
    for fmt in (CF, CL):
        y = torch.randn(3, 13, 61, 67).contiguous(memory_format=fmt)
        r = torch.randn(3, 13, 61, 67)
        args = (y, torch.randn(13), torch.randn(13), r, torch.randn(13), torch.randn(13), torch.rand(3), True)
        _check_out(ops.bn_add_act(*args), _bn_add_act_formula(*args), y)


# ------------------------------------------------------------------------------ bn_finalize


def _partials(x, tiles, dtype):
    """[T, 3, C] (count, mean, M2) of x's values per channel, split into the given tile sizes."""
    flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(torch.float64)
    assert sum(tiles) == flat.shape[0]
    rows = []
    for chunk in torch.split(flat, tiles):
        if chunk.shape[0] == 0:
            rows.append(torch.zeros(3, x.shape[1], dtype=torch.float64))
            continue
        mean = chunk.mean(0)
        rows.append(torch.stack([torch.full_like(mean, chunk.shape[0]), mean, ((chunk - mean) ** 2).sum(0)]))
    return torch.stack(rows).to(dtype)


def _two_pass(x, gamma, beta, eps):
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=(0, 2, 3))
    var = x64.var(dim=(0, 2, 3), unbiased=False)
    invstd = 1.0 / torch.sqrt(var + eps)
    scale = gamma.to(torch.float64) * invstd
    return mean, invstd, scale, beta.to(torch.float64) - mean * scale, x64.var(dim=(0, 2, 3), unbiased=True)


@pytest.mark.parametrize(
    "pdtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)], ids=["partials-fp32", "partials-fp64"]
)
@pytest.mark.parametrize("c", [3, 7, 13])
@pytest.mark.parametrize("tiles", [[150], [10, 0, 61, 1, 33, 45], [2] * 75], ids=["one", "uneven", "many"])
def test_bn_finalize_vs_two_pass_float64(pdtype, tol, c, tiles):
    x = torch.randn(3, c, 5, 10, dtype=torch.float64) * 2 + 3
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    momentum, eps = 0.3, 1e-5
    got = ops.bn_finalize(_partials(x, tiles, pdtype), gamma, beta, rm, rv, momentum, eps)
    mean, invstd, scale, shift, unbiased = _two_pass(x, gamma, beta, eps)
    for name, a, b in zip(("mean", "invstd", "scale", "shift"), got, (mean, invstd, scale, shift)):
        assert a.dtype == pdtype and a.shape == (c,), name
        torch.testing.assert_close(a.to(torch.float64), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    rtol = max(tol, 1e-6)  # running stats are float32 tensors here
    torch.testing.assert_close(rm.double(), (1 - momentum) * rm0.double() + momentum * mean, rtol=rtol, atol=rtol)
    torch.testing.assert_close(rv.double(), (1 - momentum) * rv0.double() + momentum * unbiased, rtol=rtol, atol=rtol)


def test_bn_finalize_without_running_stats_and_gamma_in_other_dtypes():
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    gamma, beta = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5).to(torch.bfloat16)
    got = ops.bn_finalize(_partials(x, [7, 11], torch.float32), gamma, beta, None, None, 0.1, 1e-3)
    mean, invstd, scale, shift, _ = _two_pass(x, gamma.float(), beta.float(), 1e-3)
    for a, b in zip(got, (mean, invstd, scale, shift)):
        torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=2e-6)


def test_bn_finalize_running_stats_updated_in_place_in_their_own_dtype_and_strides():
    x = torch.randn(4, 3, 2, 2)
    p = _partials(x, [16], torch.float32)
    mean, _, _, _, unbiased = _two_pass(x, torch.ones(3), torch.zeros(3), 1e-5)
    rm = torch.zeros(3, dtype=torch.float64)
    storage = torch.ones(6)
    rv = storage[::2]  # a strided view: the update must land in `storage`
    ptr = rm.data_ptr()
    ops.bn_finalize(p, torch.ones(3), torch.zeros(3), rm, rv, 0.5, 1e-5)
    assert rm.data_ptr() == ptr and rm.dtype == torch.float64
    torch.testing.assert_close(rm, 0.5 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(storage[::2].double(), 0.5 + 0.5 * unbiased, rtol=1e-6, atol=1e-6)
    assert torch.equal(storage[1::2], torch.ones(3))


def test_bn_finalize_is_deterministic():
    x = torch.randn(4, 9, 8, 8)
    p = _partials(x, [37, 91, 0, 128], torch.float32)
    g, b = torch.rand(9), torch.randn(9)
    first = ops.bn_finalize(p, g, b, None, None, 0.1, 1e-5)
    for _ in range(3):
        again = ops.bn_finalize(p, g, b, None, None, 0.1, 1e-5)
        assert all(torch.equal(u, v) for u, v in zip(first, again))


# ------------------------------------------------------------------------------ batch_stats

DTYPES4 = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 3, 5, 5), (3, 7, 4, 3), (3, 13, 2, 3), (2, 16, 4, 4), (1, 1, 1, 1)]


def _dt_id(d):
    return str(d)[6:]


def _layout(t, fmt):
    """t in layout fmt: "nchw", "nhwc", or "noncontig" (a transposed view, neither layout)."""
    if fmt == "nchw":
        return t.contiguous()
    if fmt == "nhwc":
        return t.contiguous(memory_format=CL)
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def _sum_close(got, want, terms, rel, name):
    """Sums agree to `rel` of the sum of the magnitudes of their terms (cancellation-safe)."""
    got, want, terms = got.double(), want.double(), terms.double()
    bad = (got - want).abs() > rel * (terms + 1e-30)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} channels differ; worst at channel "
        f"{int(((got - want).abs() / (terms + 1e-30)).argmax())}: got {got.tolist()}, want {want.tolist()}"
    )


def _stat_rel(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


@pytest.mark.parametrize("dtype", DTYPES4, ids=_dt_id)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "noncontig"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_stats_matches_reference(dtype, fmt, shape):
    x = _layout((torch.randn(shape) * 3 + 2).to(dtype), fmt)
    got = ops.batch_stats(x, 1)
    want = reference.batch_stats(x)
    assert got.shape == want.shape == (1, 3, shape[1]) and got.dtype == want.dtype
    assert torch.equal(got[0, 0], want[0, 0])
    xf = x.to(want.dtype)
    rel = _stat_rel(dtype)
    _sum_close(got[0, 1], want[0, 1], xf.abs().mean(dim=(0, 2, 3)), rel, "mean")
    _sum_close(got[0, 2], want[0, 2], (xf - want[0, 1].view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3)), rel, "M2")
    # what bn_finalize makes of them: the reference's statistics to rounding
    c = shape[1]
    g, b = torch.rand(c, dtype=got.dtype) + 0.5, torch.randn(c, dtype=got.dtype)
    for a, w in zip(reference.bn_finalize(got, g, b, None, None, 0.1, 1e-5),
                    reference.bn_finalize(want, g, b, None, None, 0.1, 1e-5)):
        torch.testing.assert_close(a, w, rtol=10 * rel, atol=10 * rel)


def _tile_sizes(m, tiles):
    return [m // tiles + (1 if t < m % tiles else 0) for t in range(tiles)]


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("tiles", [2, 5, 13, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dt_id)
def test_batch_stats_tiles_split_the_pixels_evenly_in_nhw_order(fmt, tiles, dtype):
    x = _layout(torch.randn(3, 5, 3, 4, dtype=dtype) + 1, fmt)  # 36 pixels: uneven and empty tiles
    got = ops.batch_stats(x, tiles)
    sizes = _tile_sizes(36, tiles)
    want = _partials(x, sizes, dtype)
    assert got.shape == (tiles, 3, 5) and got.dtype == dtype
    empty = torch.tensor(sizes) == 0
    assert torch.equal(got[:, 0], want[:, 0])
    assert got[empty, 1].isnan().all() and (got[empty, 2] == 0).all()
    rel = _stat_rel(dtype)
    torch.testing.assert_close(got[~empty, 1:], want[~empty, 1:], rtol=rel, atol=rel)
    mean, invstd, _, _, _ = _two_pass(x, torch.ones(5), torch.zeros(5), 1e-5)
    fin = ops.bn_finalize(got.float(), torch.ones(5), torch.zeros(5), None, None, 0.1, 1e-5)
    torch.testing.assert_close(fin[0].double(), mean, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(fin[1].double(), invstd, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_batch_stats_several_blocks_in_parallel_deterministic(fmt):
    # 36300 pixels: more than one 32768-value block per channel in both layouts
    x = _layout(torch.randn(3, 5, 110, 110) * 4 - 1, fmt)
    want = reference.batch_stats(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.batch_stats(x, 1)
        torch.set_num_threads(max(2, threads))
        many = ops.batch_stats(x, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many), "batch_stats depends on the thread count"
    assert torch.equal(many, ops.batch_stats(x, 1))
    _sum_close(many[0, 1], want[0, 1], x.abs().mean(dim=(0, 2, 3)), 2e-6, "mean")
    _sum_close(many[0, 2], want[0, 2], want[0, 2], 2e-6, "M2")


def test_batch_stats_empty_batch_and_specials_like_reference():
    for fmt in ("nchw", "nhwc"):
        e = _layout(torch.randn(0, 3, 4, 4), fmt)
        got, want = ops.batch_stats(e, 1), reference.batch_stats(e)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
        x = torch.randn(2, 4, 3, 3)
        x[0, 0, 1, 1] = float("inf")  # channel 0: mean +Inf, M2 NaN
        x[1, 1, 0, 2] = float("nan")  # channel 1: NaN
        x[0, 2, 0, 0], x[1, 2, 2, 2] = float("inf"), -float("inf")  # channel 2: NaN
        x = _layout(x, fmt)
        got, want = ops.batch_stats(x, 1), reference.batch_stats(x)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin])


# -------------------------------------------------------------------- BatchNorm backward


def _backward_case(shape, dtype, fmt, relu_mode, sample, seed=0):
    """Arguments of bn_backward_reduce/apply as the training backward passes them: stats of y
    from the reference finalize, out the block output (with exact zeros where ReLU clipped)."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    sd = reference.stat_dtype(dtype)
    y = _layout((torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype), fmt)
    mean, invstd, scale, shift = reference.bn_finalize(
        reference.batch_stats(y), torch.rand(c, generator=gen).to(sd) + 0.5,
        torch.randn(c, generator=gen).to(sd), None, None, 0.1, 1e-5,
    )
    sample_scale = torch.tensor([0.0, 2.0, 0.5], dtype=sd)[:n] if sample else None
    r = torch.randn(shape, generator=gen).to(dtype)
    out = reference.bn_add_act(y, scale, shift, r, None, None, sample_scale, True) if relu_mode == "out" else None
    # dout in another layout than y, or a strided view
    dout = torch.randn(shape, generator=gen).to(dtype)
    dout = dout.contiguous(memory_format=CL) if fmt == "nchw" else dout[:, :, :, :]
    relu = relu_mode != "linear"
    return dout, y, mean, invstd, scale, shift, out, relu, sample_scale


def _terms(dout, y, mean, invstd, scale, shift, out, relu, sample_scale):
    g = reference._masked_grad(dout, y, scale, shift, out, relu, sample_scale)
    xhat = (y.to(g.dtype) - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    return g.abs().sum(dim=(0, 2, 3)), (g * xhat).abs().sum(dim=(0, 2, 3))


@pytest.mark.parametrize("dtype", DTYPES4, ids=_dt_id)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "noncontig"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
@pytest.mark.parametrize("relu_mode", ["out", "y", "linear"], ids=["relu-from-out", "relu-from-y", "linear"])
@pytest.mark.parametrize("sample", [False, True], ids=["", "sample"])
def test_bn_backward_reduce_and_apply_match_reference(dtype, fmt, shape, relu_mode, sample):
    args = _backward_case(shape, dtype, fmt, relu_mode, sample)
    sg, sgx = ops.bn_backward_reduce(*args)
    wg, wgx = reference.bn_backward_reduce(*args)
    assert sg.dtype == wg.dtype and sgx.dtype == wgx.dtype and sg.shape == (shape[1],)
    tg, tgx = _terms(*args)
    rel = _stat_rel(dtype)
    _sum_close(sg, wg, tg, rel, "sum_g")
    _sum_close(sgx, wgx, tgx, rel, "sum_gx")
    # the apply from the same sums: one rounding of the same float32 (float64) arithmetic
    dy = ops.bn_backward_apply(*args, wg, wgx)
    want = reference.bn_backward_apply(*args, wg, wgx)
    y = args[1]
    assert dy.dtype == y.dtype and dy.shape == y.shape
    assert dy.is_contiguous(memory_format=_expected_format(y))
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(dy, want, rtol=4 * rel, atol=4 * rel)
    else:
        torch.testing.assert_close(dy, want)


def test_bn_backward_several_blocks_in_parallel_deterministic():
    for fmt in ("nchw", "nhwc"):
        args = _backward_case((3, 5, 110, 110), torch.float32, fmt, "y", True)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = ops.bn_backward_reduce(*args)
            torch.set_num_threads(max(2, threads))
            many = ops.bn_backward_reduce(*args)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(one, many)), "reduce depends on the thread count"
        want = reference.bn_backward_reduce(*args)
        for got, w, t, name in zip(many, want, _terms(*args), ("sum_g", "sum_gx")):
            _sum_close(got, w, t, 2e-6, name)
        dy = ops.bn_backward_apply(*args, *want)
        torch.testing.assert_close(dy, reference.bn_backward_apply(*args, *want), rtol=1e-5, atol=1e-5)


def test_bn_backward_specials_like_reference():
    args = list(_backward_case((2, 4, 3, 3), torch.float32, "nchw", "out", False))
    dout, y, out = args[0].clone(), args[1].clone(), args[6].clone()
    dout[0, 0, 1, 1] = float("nan")  # channel 0: NaN sums
    out[1, 1, 0, 0] = float("nan")  # channel 1: NaN out keeps dout
    y[1, 2, 2, 2], out[1, 2, 2, 2] = float("inf"), 0.0  # channel 2: 0 * Inf xhat = NaN in sum_gx
    args[0], args[1], args[6] = dout, y, out
    got, want = ops.bn_backward_reduce(*args), reference.bn_backward_reduce(*args)
    for a, w in zip(got, want):
        assert torch.equal(a.isnan(), w.isnan()) and a.isnan().any()
        torch.testing.assert_close(a.nan_to_num(), w.nan_to_num(), rtol=1e-5, atol=1e-5)
    dy, wdy = ops.bn_backward_apply(*args, *want), reference.bn_backward_apply(*args, *want)
    assert torch.equal(dy.isnan(), wdy.isnan()) and torch.equal(dy.isinf(), wdy.isinf())
    torch.testing.assert_close(dy.nan_to_num(), wdy.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_bn_backward_empty_batch():
    args = list(_backward_case((2, 3, 4, 4), torch.float32, "nhwc", "y", False))
    args[0], args[1] = args[0][:0], args[1][:0]
    sg, sgx = ops.bn_backward_reduce(*args)
    assert torch.equal(sg, torch.zeros(3)) and torch.equal(sgx, torch.zeros(3))
    assert ops.bn_backward_apply(*args, sg, sgx).shape == (0, 3, 4, 4)


def _apply_relu_case(shape, dtype, fmt, seed=0):
    """bn_apply_relu's arguments as the training backward passes them: dh of the BatchNorm
    output's consumer, y the BatchNorm input, its scale/shift and the coefficients from the
    reduce of dh."""
    dout, y, mean, invstd, scale, shift, _, _, _ = _backward_case(shape, dtype, fmt, "y", False, seed)
    sums = reference.bn_backward_reduce(dout, y, mean, invstd, scale, shift, None, True, None)
    m = max(1, y.numel() // max(1, y.shape[1]))
    coefs = reference.bn_backward_coefs(mean, invstd, scale, *sums, m)
    return dout, y, scale, shift, coefs


@pytest.mark.parametrize("dtype", DTYPES4, ids=_dt_id)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "noncontig"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_apply_relu_matches_reference_bitwise(dtype, fmt, shape):
    args = _apply_relu_case(shape, dtype, fmt)
    got, want = ops.bn_apply_relu(*args), reference.bn_apply_relu(*args)
    y = args[1]
    assert got.dtype == y.dtype and got.shape == y.shape
    assert got.is_contiguous(memory_format=_expected_format(y))
    # the same float32 (float64) arithmetic in the same order, rounded once
    assert torch.equal(got, want)
    # bn_backward_apply with the same sums gives the same dy
    dout, y, scale, shift, _ = args
    _, _, mean, invstd, _, _, _, _, _ = _backward_case(shape, dtype, fmt, "y", False)
    sums = reference.bn_backward_reduce(dout, y, mean, invstd, scale, shift, None, True, None)
    assert torch.equal(got, ops.bn_backward_apply(dout, y, mean, invstd, scale, shift, None, True, None, *sums))


def test_bn_apply_relu_specials_and_empty_batch():
    dh, y, scale, shift, coefs = _apply_relu_case((2, 4, 3, 3), torch.float32, "nhwc")
    dh, y, coefs = dh.clone(), y.clone(), coefs.clone()
    dh[0, 0, 1, 1] = float("nan")
    y[1, 1, 0, 0] = float("nan")  # NaN pre-activation: the mask keeps the gradient, B*y is NaN
    y[1, 2, 2, 2] = float("inf")
    coefs[2, 3] = float("inf")
    got, want = ops.bn_apply_relu(dh, y, scale, shift, coefs), reference.bn_apply_relu(dh, y, scale, shift, coefs)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.isinf(), want.isinf()) and got.isinf().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    empty = ops.bn_apply_relu(dh[:0], y[:0], scale, shift, coefs)
    assert empty.shape == (0, 4, 3, 3)


# ------------------------------------------------------------------------------ act_grad


@pytest.mark.parametrize("dtype", DTYPES4, ids=_dt_id)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "noncontig"])
def test_act_grad_matches_reference_exactly(dtype, fmt):
    out = torch.randn(3, 7, 5, 3)
    out[0, :, 0, 0] = 0.0
    out[1, :, 1, 1] = -0.0
    out[2, 1, 2, 2] = float("nan")
    out = _layout(out.relu().to(dtype), fmt)  # as a block output: >= 0, NaN kept
    dout = torch.randn(3, 7, 5, 3).to(dtype)
    dout[0, 0, 0, 1] = float("nan")
    got, want = ops.act_grad(dout, out), reference.act_grad(dout, out)
    assert got.dtype == dtype and got.is_contiguous(memory_format=_expected_format(dout))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got.signbit(), want.signbit())  # dropped gradients are +0


def test_act_grad_any_shape_and_empty():
    for shape in [(5,), (2, 3), (2, 3, 4, 5, 1), (0, 3, 2, 2)]:
        out, dout = torch.randn(shape), torch.randn(shape)
        assert torch.equal(ops.act_grad(dout, out), reference.act_grad(dout, out))


# ------------------------------------------------------------------------------ relu_


def _same_values(got, want):
    """Equal values element by element: NaN where the other is NaN (payloads may differ),
    every other bit pattern equal (so -0 stays -0)."""
    assert torch.equal(got.isnan(), want.isnan())
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    keep = ~got.isnan()
    assert torch.equal(got.view(ints)[keep], want.view(ints)[keep])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt_id)
def test_relu_every_16bit_pattern_like_torch(dtype):
    """All 65536 bit patterns, in place: torch.relu's values."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    want = torch.relu(x)
    got = x.clone()
    assert ops.relu_(got) is None
    _same_values(got, want)
    assert int((got.view(torch.int16) != x.view(torch.int16)).sum()) == int((x < 0).sum())  # only negatives change


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dt_id)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "noncontig"])
def test_relu_specials_layouts_and_threads_like_torch(dtype, fmt):
    x = torch.randn(3, 37, 41, 33)  # > one parallel grain
    x.view(-1)[::5] = -0.0
    x.view(-1)[1::7] = float("nan")
    x.view(-1)[2::11] = -float("inf")
    x.view(-1)[3::13] = float("inf")
    x = _layout(x.to(dtype), fmt)
    want, got = torch.relu(x), x
    ops.relu_(got)
    assert got.stride() == want.stride()
    _same_values(got, want)


def test_relu_empty_errors_and_opcheck():
    ops.relu_(torch.empty(0, 3, dtype=torch.bfloat16))
    base = torch.randn(4, 6).to(torch.bfloat16)
    view, want = base[:, ::2], base.relu()  # strided: not one dense block
    ops.relu_(view)
    assert torch.equal(base, torch.where(torch.arange(6) % 2 == 0, want, base.clone()))
    with pytest.raises(RuntimeError, match=r"fusedres_ext::relu_: x must be float32, float64, float16 or bfloat16"):
        ops.relu_(torch.ones(3, dtype=torch.int32))
    torch.library.opcheck(ops.relu_, (torch.randn(2, 8, 3, 3).to(torch.bfloat16),))


def test_cpu_backend_relu_after_onednn_keeps_nan_16bit():
    """The cpu backend's inference conv in bfloat16 ReLUs with the native pass: NaN from the
    input stays NaN, exactly where torch.nn's conv + ReLU puts it."""
    from fusedres import backends

    cpu = backends.get("cpu")
    if torch.bfloat16 not in cpu._onednn_dtypes():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    x = torch.randn(2, 16, 6, 6).to(torch.bfloat16).contiguous(memory_format=CL)
    x[0, :, 2, 2] = float("nan")
    w = torch.randn(16, 16, 3, 3).to(torch.bfloat16).contiguous(memory_format=CL)
    got = cpu.conv_bias_act(x, w, None, None, None, None, False, [1, 1], [1, 1], [1, 1], 1, True)
    want = torch.relu(torch.nn.functional.conv2d(x, w, None, 1, 1))
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())
    torch.testing.assert_close(got, want, equal_nan=True)


# --------------------------------------------------------------------- backend wiring


def test_cpu_backend_takes_the_native_ops_and_falls_back_on_other_dtypes():
    from fusedres import backends

    cpu = backends.get("cpu")
    for name in ("batch_stats", "bn_backward_reduce", "bn_backward_apply", "act_grad"):
        assert name in cpu.native
    args = _backward_case((2, 5, 3, 3), torch.float32, "nhwc", "out", True)
    sums = cpu.bn_backward_reduce(*args)
    assert all(torch.equal(a, b) for a, b in zip(sums, ops.bn_backward_reduce(*args)))
    assert torch.equal(cpu.bn_backward_apply(*args, *sums), ops.bn_backward_apply(*args, *sums))
    x = args[1]
    assert torch.equal(cpu.batch_stats(x), ops.batch_stats(x, cpu.stats_tiles(x.shape)))
    # float64 vectors with a float32 y: the reference's type promotion decides (sum g*xhat in
    # float64), so the reference runs
    a64 = list(args)
    a64[2:6] = [v.double() for v in args[2:6]]
    got, want = cpu.bn_backward_reduce(*a64), reference.bn_backward_reduce(*a64)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.float64]
    # conv_stats: the conv through ATen, its statistics natively
    w = torch.randn(4, 5, 3, 3)
    y, part = cpu.conv_stats(x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1)
    yr, pr = reference.conv_stats(x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1)
    assert y.is_contiguous(memory_format=CL) and torch.equal(y, yr)
    assert torch.equal(part, ops.batch_stats(y, 1))
    torch.testing.assert_close(part, pr, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ errors


def _bn_add_act_args(**over):
    args = dict(y=torch.randn(2, 3, 4, 4), scale=torch.randn(3), shift=torch.randn(3), residual=None,
                res_scale=None, res_shift=None, sample_scale=None, relu=True)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        ({"y": torch.randn(2, 3, 4)}, r"bn_add_act: y must be 4-D \(N, C, H, W\), got shape \[2, 3, 4\]"),
        ({"y": torch.ones(2, 3, 4, 4, dtype=torch.long)}, "y must be float32, float64, float16 or bfloat16, got Long"),
        ({"scale": torch.randn(4)}, r"scale must be a 1-D tensor of 3 elements, got shape \[4\]"),
        ({"shift": torch.randn(3, 1)}, r"shift must be a 1-D tensor of 3 elements, got shape \[3, 1\]"),
        ({"scale": torch.randn(3, dtype=torch.float64)}, "scale must be Float, got Double"),
        ({"shift": torch.randn(3).half()}, "shift must be Float, got Half"),
        (
            {"residual": torch.randn(2, 3, 4, 5)},
            r"bn_add_act: residual must have the same shape as y \(\[2, 3, 4, 4\]\), got \[2, 3, 4, 5\]",
        ),
        ({"residual": torch.randn(2, 3, 4, 4, dtype=torch.float64)}, r"residual must have y's dtype \(Float\), got Double"),
        ({"res_scale": torch.randn(3), "res_shift": torch.randn(3)}, "res_scale needs a residual"),
        ({"residual": torch.randn(2, 3, 4, 4), "res_scale": torch.randn(3)}, "res_scale/res_shift must be given together"),
        (
            {"residual": torch.randn(2, 3, 4, 4), "res_scale": torch.randn(3), "res_shift": torch.randn(2)},
            r"res_shift must be a 1-D tensor of 3 elements",
        ),
        ({"sample_scale": torch.randn(3)}, r"sample_scale must be a 1-D tensor of 2 elements, got shape \[3\]"),
        (
            {"y": torch.randn(2, 3, 4, 4, dtype=torch.float64), "scale": torch.randn(3).half()},
            r"scale must be Float or Double \(y is Double\), got Half",
        ),
    ],
)
def test_bn_add_act_errors_name_the_argument(over, match):
    with pytest.raises(RuntimeError, match=match):
        ops.bn_add_act(**_bn_add_act_args(**over))


def test_bn_finalize_errors_name_the_argument():
    p = _partials(torch.randn(2, 3, 2, 2), [8], torch.float32)
    one, zero = torch.ones(3), torch.zeros(3)
    cases = [
        ((torch.zeros(2, 2, 3), one, zero, None, None), r"bn_finalize: partials must have shape \[T, 3, C\], got \[2, 2, 3\]"),
        ((p.half(), one, zero, None, None), "partials must be float32 or float64, got Half"),
        ((p[:0], one, zero, None, None), "partials must hold at least one tile"),
        ((p, torch.ones(4), zero, None, None), r"gamma must be a 1-D tensor of 3 elements, got shape \[4\]"),
        ((p, one, torch.zeros(3, dtype=torch.long), None, None), "beta must be a floating-point tensor, got Long"),
        ((p, one, zero, torch.zeros(3), None), "running_mean/running_var must be given together"),
        ((p, one, zero, torch.zeros(3), torch.ones(2)), r"running_var must be a 1-D tensor of 3 elements"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            ops.bn_finalize(*args, 0.1, 1e-5)


def test_bn_finalize_needs_two_values_per_channel_for_running_stats():
    single = torch.tensor([[[1.0, 4.0], [0.5, 0.0], [0.0, 1.0]]])  # channel 0 has one value
    rm, rv = torch.zeros(2), torch.ones(2)
    with pytest.raises(RuntimeError, match=r"expected more than 1 value per channel .* got n = 1"):
        ops.bn_finalize(single, torch.ones(2), torch.zeros(2), rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))
    # without running statistics a single value is fine (biased variance 0)
    mean, invstd, _, _ = ops.bn_finalize(single, torch.ones(2), torch.zeros(2), None, None, 0.1, 1e-5)
    assert mean[0] == 0.5 and torch.isclose(invstd[0], torch.tensor(1e-5).rsqrt())


def _backward_args(**over):
    y = torch.randn(2, 3, 4, 4)
    args = dict(dout=torch.randn(2, 3, 4, 4), y=y, mean=torch.randn(3), invstd=torch.rand(3), scale=torch.randn(3),
                shift=torch.randn(3), out=None, relu=True, sample_scale=None)
    args.update(over)
    return args


_BACKWARD_ERRORS = [
    ({"y": torch.randn(2, 3, 4)}, r"y must be 4-D \(N, C, H, W\), got shape \[2, 3, 4\]"),
    ({"y": torch.ones(2, 3, 4, 4, dtype=torch.long)}, "y must be float32, float64, float16 or bfloat16, got Long"),
    ({"dout": torch.randn(2, 3, 4, 5)}, r"dout must have the same shape as y \(\[2, 3, 4, 4\]\), got \[2, 3, 4, 5\]"),
    ({"dout": torch.randn(2, 3, 4, 4).double()}, r"dout must have y's dtype \(Float\), got Double"),
    ({"out": torch.randn(2, 3, 4, 4).half()}, r"out must have y's dtype \(Float\), got Half"),
    ({"out": torch.randn(1, 3, 4, 4)}, r"out must have the same shape as y"),
    ({"mean": torch.randn(4)}, r"mean must be a 1-D tensor of 3 elements, got shape \[4\]"),
    ({"invstd": torch.randn(3).double()}, "invstd must be Float, got Double"),
    ({"scale": torch.randn(3, 1)}, r"scale must be a 1-D tensor of 3 elements"),
    ({"shift": torch.randn(3).bfloat16()}, "shift must be Float, got BFloat16"),
    ({"sample_scale": torch.randn(3)}, r"sample_scale must be a 1-D tensor of 2 elements, got shape \[3\]"),
]


@pytest.mark.parametrize("over,match", _BACKWARD_ERRORS)
def test_bn_backward_errors_name_the_argument(over, match):
    with pytest.raises(RuntimeError, match="bn_backward_reduce: " + match):
        ops.bn_backward_reduce(**_backward_args(**over))
    with pytest.raises(RuntimeError, match="bn_backward_apply: " + match):
        ops.bn_backward_apply(**_backward_args(**over), sum_g=torch.randn(3), sum_gx=torch.randn(3))


def test_bn_backward_apply_errors_name_the_sums():
    for over, match in [
        ({"sum_g": torch.randn(2)}, r"bn_backward_apply: sum_g must be a 1-D tensor of 3 elements, got shape \[2\]"),
        ({"sum_gx": torch.randn(3).double()}, "bn_backward_apply: sum_gx must be Float, got Double"),
    ]:
        sums = dict(sum_g=torch.randn(3), sum_gx=torch.randn(3))
        sums.update(over)
        with pytest.raises(RuntimeError, match=match):
            ops.bn_backward_apply(**_backward_args(), **sums)


def test_bn_backward_apply_addend_and_grad_out_errors_name_the_argument():
    sums = dict(sum_g=torch.randn(3), sum_gx=torch.randn(3))
    for over, match in [
        ({"addend": torch.randn(2, 3, 4, 5)}, r"addend must have the same shape as y"),
        ({"addend": torch.randn(2, 3, 4, 4).double()}, r"addend must have y's dtype \(Float\), got Double"),
        ({"grad_out": torch.empty(2, 3, 4, 5)}, r"grad_out must have the same shape as y"),
        ({"grad_out": torch.empty(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)},
         r"grad_out must be dense in y's memory format"),
        ({"grad_out": torch.empty(2, 3, 4, 8)[..., ::2]}, r"grad_out must be dense in y's memory format"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.bn_backward_apply(**_backward_args(), **sums, **over)
    # and the masked gradient it stores is act_grad's, bit for bit
    args = _backward_args(out=torch.randn(2, 3, 4, 4))
    g = torch.empty_like(args["y"])
    ops.bn_backward_apply(**args, **sums, grad_out=g)
    assert torch.equal(g, ops.act_grad(args["dout"], args["out"]))


def test_bn_apply_relu_errors_name_the_argument():
    y = torch.randn(2, 3, 4, 4)
    good = dict(dh=torch.randn(2, 3, 4, 4), y=y, scale=torch.randn(3), shift=torch.randn(3), coefs=torch.randn(3, 3))
    for over, match in [
        ({"y": torch.randn(2, 3, 4)}, r"y must be 4-D \(N, C, H, W\), got shape \[2, 3, 4\]"),
        ({"dh": torch.randn(2, 3, 4, 5)}, r"dh must have the same shape as y \(\[2, 3, 4, 4\]\), got \[2, 3, 4, 5\]"),
        ({"dh": torch.randn(2, 3, 4, 4).half()}, r"dh must have y's dtype \(Float\), got Half"),
        ({"scale": torch.randn(4)}, r"scale must be a 1-D tensor of 3 elements, got shape \[4\]"),
        ({"shift": torch.randn(3).double()}, "shift must be Float, got Double"),
        ({"coefs": torch.randn(2, 3)}, r"coefs must have shape \[3, 3\], got \[2, 3\]"),
        ({"coefs": torch.randn(3, 3).double()}, r"coefs must be Float \(the statistics dtype of Float\), got Double"),
    ]:
        args = dict(good, **over)
        with pytest.raises(RuntimeError, match="bn_apply_relu: " + match):
            ops.bn_apply_relu(**args)


def test_batch_stats_and_act_grad_errors_name_the_argument():
    cases = [
        (lambda: ops.batch_stats(torch.randn(2, 3, 4), 1), r"batch_stats: x must be 4-D \(N, C, H, W\), got shape \[2, 3, 4\]"),
        (lambda: ops.batch_stats(torch.ones(2, 3, 4, 4, dtype=torch.int32), 1), "batch_stats: x must be float32, float64, float16 or bfloat16, got Int"),
        (lambda: ops.batch_stats(torch.randn(2, 3, 4, 4), 0), "batch_stats: tiles must be at least 1, got 0"),
        (lambda: ops.act_grad(torch.randn(2, 3), torch.randn(3, 2)), r"act_grad: out must have the same shape as dout \(\[2, 3\]\), got \[3, 2\]"),
        (lambda: ops.act_grad(torch.randn(2, 3), torch.randn(2, 3).double()), r"act_grad: out must have dout's dtype \(Float\), got Double"),
        (lambda: ops.act_grad(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)), "act_grad: dout must be float32, float64, float16 or bfloat16, got Long"),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


# ------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("fmt", [CF, CL], ids=["nchw", "nhwc"])
def test_opcheck_bn_add_act(fmt):
    y = torch.randn(2, 5, 3, 3).contiguous(memory_format=fmt)
    v = lambda: torch.rand(5) + 0.5  # noqa: E731
    r = torch.randn(2, 5, 3, 3)
    for args in [
        (y, v(), v(), None, None, None, None, True),
        (y, v(), v(), r, None, None, None, False),
        (y, v(), v(), r, v(), v(), torch.rand(2), True),
        (y.double(), v().double(), v().double(), None, None, None, torch.rand(2).double(), True),
    ]:
        torch.library.opcheck(ops.bn_add_act, args)


def test_opcheck_bn_finalize():
    p = _partials(torch.randn(2, 5, 3, 3), [5, 0, 13], torch.float32)
    v = lambda: torch.rand(5) + 0.5  # noqa: E731
    torch.library.opcheck(ops.bn_finalize, (p, v(), v(), torch.zeros(5), torch.ones(5), 0.1, 1e-5))
    torch.library.opcheck(ops.bn_finalize, (p, v(), v(), None, None, 0.1, 1e-5))


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_opcheck_batch_stats_and_act_grad(fmt):
    x = _layout(torch.randn(2, 5, 3, 3), fmt)
    torch.library.opcheck(ops.batch_stats, (x, 1))
    torch.library.opcheck(ops.batch_stats, (x.double(), 4))
    torch.library.opcheck(ops.act_grad, (torch.randn(2, 5, 3, 3), x))
    torch.library.opcheck(ops.act_grad, (_layout(torch.randn(2, 5, 3, 3), fmt).bfloat16(), x.bfloat16()))


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("relu_mode", ["out", "y", "linear"])
def test_opcheck_bn_backward(fmt, relu_mode):
    for dtype, sample in ((torch.float32, True), (torch.float64, False)):
        args = _backward_case((2, 5, 3, 3), dtype, fmt, relu_mode, sample)
        torch.library.opcheck(ops.bn_backward_reduce, args)
        sums = reference.bn_backward_reduce(*args)
        torch.library.opcheck(ops.bn_backward_apply, (*args, *sums))
        torch.library.opcheck(ops.bn_apply_relu, _apply_relu_case((2, 5, 3, 3), dtype, fmt))


# ------------------------------------------------------------------------------ loader


def test_status_reports_the_build():
    st = _ext.status()
    assert st == {"loaded": True, "reason": "", "cuda": st["cuda"]}
    info = _ext.load().build_info()
    assert info in ("cpu", "cpu+cuda") and st["cuda"] == (info == "cpu+cuda")
    assert _ext.ops() is torch.ops.fusedres_ext


def test_disabled_extension_warns_once_and_reports_why():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from fusedres import _ext\n"
        "    a = _ext.load(); b = _ext.load(); st = _ext.status()\n"
        "import torch\n"
        "msgs = [str(x.message) for x in w if 'C++ extension not available' in str(x.message)]\n"
        "assert a is None and b is None and _ext.ops() is None, (a, b)\n"
        "assert len(msgs) == 1, msgs\n"
        "assert \"'reference' and 'triton' still work\" in msgs[0], msgs\n"
        "assert st == {'loaded': False, 'reason': 'disabled by FUSEDRES_DISABLE_EXT=1', 'cuda': False}, st\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = dict(os.environ, FUSEDRES_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
