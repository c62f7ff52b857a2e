"""bn_finalize of the triton backend merges the (count, mean, M2) partials with a tree of
fixed shape (levels of programs, ``tl.reduce`` within each): bitwise the same on every run,
within rounding of the reference's serial Chan merge, NaN / +-Inf where the reference has
them, running statistics updated as nn.BatchNorm2d does. The interpreter merges 4 partials
per program, so a few hundred pixels already take several levels."""

import pytest
import torch

import fusedres
from fusedres import backends, reference as R
from fusedres.testing import assert_close

_ST = fusedres.available_backends()["triton"]
if not _ST.available:
    pytest.skip(f"triton backend not available: {_ST.reason}", allow_module_level=True)

from fusedres.triton_kernels import _config  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T = backends.get("triton")


def _levels(t):
    per, n = _config.merge_tiles_per_program(), 0
    while t > per:
        t, n = -(-t // per), n + 1
    return n + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 17, 16), (1, 3, 2, 2)], ids=str)
def test_tree_merge_matches_the_serial_merge(shape, dtype):
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype).to(DEVICE)
    part = T.batch_stats(y)
    c = shape[1]
    sd = R.stat_dtype(dtype)
    gamma = torch.randn(c, generator=g, dtype=torch.float64).to(sd).to(DEVICE)
    beta = torch.randn(c, generator=g, dtype=torch.float64).to(sd).to(DEVICE)
    rm0 = torch.rand(c, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    rv0 = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)
    runs = []
    for _ in range(2):
        rm, rv = rm0.clone(), rv0.clone()
        runs.append((T.bn_finalize(part, gamma, beta, rm, rv, 0.1, 1e-5), rm, rv))
    (a, rma, rva), (b, rmb, rvb) = runs
    for u, v in zip(a + (rma, rva), b + (rmb, rvb)):
        assert torch.equal(u, v), "two identical bn_finalize calls differ"
    rm2, rv2 = rm0.clone(), rv0.clone()
    want = R.bn_finalize(part, gamma, beta, rm2, rv2, 0.1, 1e-5)
    f64 = sd == torch.float64
    for name, u, v in zip(("mean", "invstd", "scale", "shift"), a, want):
        assert_close(u, v, atol=1e-12 if f64 else 1e-6, rtol=1e-12 if f64 else 1e-6, name=name)
    lp = dtype == torch.bfloat16
    assert_close(rma, rm2, atol=1e-2 if lp else 1e-6, rtol=1e-2 if lp else 1e-6, name="running_mean")
    assert_close(rva, rv2, atol=1e-2 if lp else 1e-6, rtol=1e-2 if lp else 1e-6, name="running_var")
    if shape[0] > 1:
        assert _levels(part.shape[0]) >= 3, "the case should exercise a multi-level tree"


def test_specials_survive_the_tree():
    part = T.batch_stats(torch.randn(2, 5, 17, 16, dtype=torch.float64, device=DEVICE))
    assert _levels(part.shape[0]) >= 3
    inf = float("inf")
    part[5, 1, 0] = inf   # channel 0: two tiles of mean +Inf in different subtrees
    part[14, 1, 0] = inf
    part[7, 1, 1] = float("nan")
    part[11, 1, 2] = -inf
    part[0, 1, 3] = inf   # +Inf and -Inf meet: NaN
    part[16, 1, 3] = -inf
    part[16, 2, 4] = inf  # an infinite M2
    one, zero = torch.ones(5, dtype=torch.float64, device=DEVICE), torch.zeros(5, dtype=torch.float64, device=DEVICE)
    got = T.bn_finalize(part, one, zero, None, None, 0.1, 1e-5)
    want = R.bn_finalize(part, one, zero, None, None, 0.1, 1e-5)
    for name, u, v in zip(("mean", "invstd", "scale", "shift"), got, want):
        assert torch.equal(u.isnan(), v.isnan()), f"{name}: NaN at {u.isnan().tolist()}, reference {v.isnan().tolist()}"
        assert torch.equal(u.isinf() & (u > 0), v.isinf() & (v > 0)), f"{name}: +Inf differs"
        assert torch.equal(u.isinf() & (u < 0), v.isinf() & (v < 0)), f"{name}: -Inf differs"
        fin = torch.isfinite(v)
        assert_close(u[fin], v[fin], atol=1e-12, rtol=1e-12, name=name)
