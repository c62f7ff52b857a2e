"""The case grid the backends are checked on (tests/test_conformance.py, and the triton
backend's own tests): adversarial convolutions (odd and prime channel counts, stride 2,
batch 1-3, groups, 1x1 / 3x3 / 7x7, padding and dilation, every layout) and BatchNorm
shapes, on the test device (CPU tensors without a GPU)."""

import torch

from fusedres import reference as R
from fusedres.testing import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (name, N, C, H, W, K, kernel, stride, padding, dilation, groups)
CONVS = [
    ("3x3-odd", 2, 5, 7, 6, 7, 3, 1, 1, 1, 1),
    ("3x3-s2-g2", 1, 6, 7, 7, 4, 3, 2, 1, 1, 2),
    ("1x1-prime", 3, 3, 5, 5, 11, 1, 1, 0, 1, 1),
    ("1x1-s2", 2, 8, 7, 7, 6, 1, 2, 0, 1, 1),
    ("7x7-s2-stem", 1, 3, 11, 11, 5, 7, 2, 3, 1, 1),
    ("3x3-dil2", 2, 4, 7, 7, 4, 3, 1, 2, 2, 1),
    ("3x3-g4-depthwise-ish", 2, 8, 5, 5, 8, 3, 1, 1, 1, 4),
    ("3x3-1pixel", 3, 7, 1, 1, 5, 3, 1, 1, 1, 1),
]
LAYOUTS = ["contiguous", "channels_last", "noncontig"]
# each conv case runs in one layout (cycling), so every layout meets several geometries
# while the interpreted suite stays small
CONVS = [c + (LAYOUTS[i % 3],) for i, c in enumerate(CONVS)]
CONV_IDS = [f"{c[0]}-{c[-1]}" for c in CONVS]
TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 2e-3),
       torch.bfloat16: (6e-2, 3e-2)}


def layout_as(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        n, c, h, w = t.shape
        big = torch.zeros(n, c, h, 2 * w, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def conv_case(case, dtype, seed=0):
    _, n, c, h, w, k, r, st, pad, dil, g, layout = case
    gen = torch.Generator().manual_seed(seed)
    x = layout_as(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    wt = (torch.randn(k, c // g, r, r, generator=gen, dtype=torch.float64) * 0.3).to(dtype).to(DEVICE)
    sd = R.stat_dtype(dtype)
    s = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(sd).to(DEVICE)
    t = torch.randn(c, generator=gen, dtype=torch.float64).to(sd).to(DEVICE)
    return x, wt, s, t, ([st, st], [pad, pad], [dil, dil], g)


def close(got, want, dtype, name):
    atol, rtol = TOL[dtype]
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert_close(got, want, atol=atol, rtol=rtol, name=name)


def same_layout(got, want, name):
    assert got.stride() == want.stride() or got.numel() <= 1 or min(got.shape[1:]) == 1, (
        f"{name}: strides {got.stride()} != reference {want.stride()}"
    )


BN_SHAPES = [(1, 3, 5, 5), (2, 7, 3, 4), (3, 13, 1, 1), (2, 16, 4, 4)]


def bn_inputs(shape, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    sd = R.stat_dtype(dtype)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    y = layout_as(mk(*shape).to(dtype).to(DEVICE), layout)
    vec = lambda: mk(c).to(sd).to(DEVICE)  # noqa: E731
    return y, vec, sd, n, c


def far_from_zero_bn_case(dtype, mean_over_sigma=64.0, seed=3):
    """A conv input whose previous BatchNorm has |mean/sigma| = ``mean_over_sigma``: x = mean +
    sigma*z stored in ``dtype``; scale = gamma/sigma and shift = beta - mean*scale in float32,
    so x*scale and shift nearly cancel (|shift| ~ 64 for outputs ~ 1)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa: E731
    n, c, hw, k = 2, 16, 6, 8
    sigma = rnd(c).abs() * 0.5 + 0.25
    mean = mean_over_sigma * sigma * torch.sign(rnd(c))
    x = (mean.view(1, -1, 1, 1) + sigma.view(1, -1, 1, 1) * rnd(n, c, hw, hw)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).to(DEVICE)
    gamma, beta = rnd(c).abs() + 0.5, rnd(c) * 0.5
    scale = (gamma / sigma).float()
    shift = (beta - mean * scale.double()).float()
    wt = (rnd(k, c, 3, 3) / (9 * c) ** 0.5).to(dtype).contiguous(memory_format=torch.channels_last).to(DEVICE)
    return x, wt, scale.to(DEVICE), shift.to(DEVICE), ([1, 1], [1, 1], [1, 1], 1)


def within_2x(got, want, want64, dtype, name):
    """README, Numerics: err(fused vs fp64) <= 2 * err(torch same dtype vs fp64) + slack."""
    from fusedres.testing import SLACK, max_rel_err

    err, base = max_rel_err(got, want64), max_rel_err(want, want64)
    assert err <= 2 * base + SLACK[dtype], f"{name}: error {err:.3g} vs torch's {base:.3g}"
