"""The C++ extension's ops called directly: vs the reference math, errors, opcheck."""

import pytest
import torch

from fusedres import _ext, reference
from fusedres.testing import assert_close

if not _ext.status()["loaded"]:
    pytest.skip(f"C++ extension not loaded: {_ext.status()['reason']}", allow_module_level=True)

ops = torch.ops.fusedres_ext
LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 7, 3, 4), (3, 13, 1, 6), (2, 16, 4, 4)])
@pytest.mark.parametrize("mode", ["plain", "identity", "dual", "dual+sample", "identity+sample"])
@pytest.mark.parametrize("relu", [True, False])
def test_bn_add_act_matches_reference(shape, dtype, fmt, mode, relu):
    y = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    c = shape[1]
    s, t, rs, rt = (torch.randn(c, dtype=dtype) for _ in range(4))
    r = k = None
    if mode != "plain":
        # residual in the other layout than y: the op must handle it
        other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
        r = torch.randn(shape, dtype=dtype).contiguous(memory_format=other)
    if "sample" in mode:
        k = torch.tensor([0.0, 2.0, 0.5][: shape[0]], dtype=dtype)
    dual = mode.startswith("dual")
    args = (y, s, t, r, rs if dual else None, rt if dual else None, k, relu)
    got, want = ops.bn_add_act(*args), reference.bn_add_act(*args)
    assert got.stride() == want.stride()
    assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-14, rtol=1e-6, name="out")


def test_bn_add_act_propagates_nan():
    y = torch.tensor([float("nan"), -1.0, 2.0, float("inf")]).view(1, 1, 2, 2)
    one, zero = torch.ones(1), torch.zeros(1)
    out = ops.bn_add_act(y, one, zero, None, None, None, None, True)
    assert torch.equal(out.isnan(), torch.relu(y).isnan())
    assert out.view(-1)[1:].tolist() == [0.0, 2.0, float("inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tiles", [[75], [10, 0, 31, 1, 33]])
def test_bn_finalize_matches_reference(dtype, tiles):
    y = torch.randn(3, 6, 5, 5, dtype=torch.float64) * 2 + 3
    flat = y.permute(0, 2, 3, 1).reshape(-1, 6)
    parts, start = [], 0
    for n in tiles:
        chunk = flat[start : start + n]
        start += n
        if n == 0:
            parts.append(torch.zeros(3, 6, dtype=torch.float64))
            continue
        mean = chunk.mean(0)
        parts.append(torch.stack([torch.full_like(mean, n), mean, ((chunk - mean) ** 2).sum(0)]))
    p = torch.stack(parts).to(dtype)
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    rm1, rv1, rm2, rv2 = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    got = ops.bn_finalize(p, gamma, beta, rm1, rv1, 0.3, 1e-5)
    want = reference.bn_finalize(p, gamma, beta, rm2, rv2, 0.3, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(("mean", "invstd", "scale", "shift"), got, want):
        assert a.dtype == dtype
        assert_close(a, b, atol=tol, rtol=tol, name=name)
    assert_close(rm1, rm2, atol=1e-6, rtol=1e-6, name="running_mean")
    assert_close(rv1, rv2, atol=1e-6, rtol=1e-6, name="running_var")


def test_bn_finalize_running_stats_in_other_dtype_updated_in_place():
    p = reference.batch_stats(torch.randn(4, 3, 2, 2))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ptr = rm.data_ptr()
    ops.bn_finalize(p, torch.ones(3), torch.zeros(3), rm, rv, 0.5, 1e-5)
    assert rm.data_ptr() == ptr and rm.abs().sum() > 0 and not torch.equal(rv, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"y": torch.randn(2, 3, 4)}, r"y must be 4-D \(N, C, H, W\)"),
        ({"scale": torch.randn(4)}, "scale must be a 1-D tensor of 3 elements"),
        ({"scale": torch.randn(3, dtype=torch.float64)}, "scale must be Float, got Double"),
        ({"residual": torch.randn(2, 3, 4, 5)}, r"residual must have the same shape as y \(\[2, 3, 4, 4\]\), got \[2, 3, 4, 5\]"),
        ({"res_scale": torch.randn(3), "res_shift": torch.randn(3)}, "res_scale needs a residual"),
        ({"res_scale": torch.randn(3)}, "res_scale/res_shift must be given together"),
        ({"sample_scale": torch.randn(3)}, "sample_scale must be a 1-D tensor of 2 elements"),
        ({"y": torch.randn(2, 3, 4, 4).half()}, "y must be float32 or float64 on CPU"),
    ],
)
def test_bn_add_act_errors_name_the_argument(kwargs, match):
    args = dict(y=torch.randn(2, 3, 4, 4), scale=torch.randn(3), shift=torch.randn(3), residual=None, res_scale=None,
                res_shift=None, sample_scale=None, relu=True)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        ops.bn_add_act(**args)


def test_bn_finalize_errors():
    with pytest.raises(RuntimeError, match=r"partials must have shape \[T, 3, C\]"):
        ops.bn_finalize(torch.zeros(2, 2, 3), torch.ones(3), torch.zeros(3), None, None, 0.1, 1e-5)
    one = torch.tensor([[[1.0], [0.5], [0.0]]])
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel"):
        ops.bn_finalize(one, torch.ones(1), torch.zeros(1), torch.zeros(1), torch.ones(1), 0.1, 1e-5)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck(fmt):
    y = torch.randn(2, 5, 3, 3).contiguous(memory_format=fmt)
    v = lambda: torch.rand(5) + 0.5  # noqa: E731
    torch.library.opcheck(ops.bn_add_act, (y, v(), v(), torch.randn(2, 5, 3, 3), v(), v(), torch.rand(2), True))
    torch.library.opcheck(ops.bn_add_act, (y, v(), v(), None, None, None, None, False))
    p = reference.batch_stats(torch.randn(2, 5, 3, 3))
    torch.library.opcheck(ops.bn_finalize, (p, v(), v(), torch.zeros(5), torch.ones(5), 0.1, 1e-5))
    torch.library.opcheck(ops.bn_finalize, (p, v(), v(), None, None, 0.1, 1e-5))
