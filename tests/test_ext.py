"""The C++ extension's ops (torch.ops.fusedres_ext) called directly on CPU: results vs the
formulas written in plain torch, layouts, errors that name the argument, and opcheck."""

import os
import subprocess
import sys

import pytest
import torch

from fusedres import _ext

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
