"""The triton backend's kernels, one primitive at a time, against the reference backend on
adversarial shapes (odd and prime channel counts, stride 2, batch 1-3, groups, 1x1 / 3x3 /
7x7, padding and dilation, every layout). Without a GPU the kernels run on CPU tensors
through Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one, on the GPU."""

import pytest
import torch

import fusedres
from fusedres import backends, reference
from fusedres.testing import assert_close
from helpers import grid

_ST = fusedres.available_backends()["triton"]
if not _ST.available:
    pytest.skip(f"triton backend not available: {_ST.reason}", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T = backends.get("triton")
R = reference

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


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        n, c, h, w = t.shape
        big = torch.zeros(n, c, h, 2 * w, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def _conv_case(case, dtype, seed=0):
    _, n, c, h, w, k, r, st, pad, dil, g, layout = case
    gen = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    wt = (torch.randn(k, c // g, r, r, generator=gen, dtype=torch.float64) * 0.3).to(dtype).to(DEVICE)
    sd = R.stat_dtype(dtype)
    s = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(sd).to(DEVICE)
    t = torch.randn(c, generator=gen, dtype=torch.float64).to(sd).to(DEVICE)
    return x, wt, s, t, ([st, st], [pad, pad], [dil, dil], g)


def _close(got, want, dtype, name):
    atol, rtol = TOL[dtype]
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert_close(got, want, atol=atol, rtol=rtol, name=name)


def _same_layout(got, want, name):
    assert got.stride() == want.stride() or got.numel() <= 1 or min(got.shape[1:]) == 1, (
        f"{name}: strides {got.stride()} != reference {want.stride()}"
    )


@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 3, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.float16, torch.bfloat16], case=CONVS))
def test_conv_stats_with_prologue(case, dtype):
    x, wt, s, t, geom = _conv_case(case, dtype)
    layout = case[-1]
    for pro in [(None, None, False), (s, t, True), (s, t, False), (None, None, True)]:
        y, part = T.conv_stats(x, wt, *pro, *geom)
        yr, pr = R.conv_stats(x, wt, *pro, *geom)
        _close(y, yr, dtype, "y")
        _same_layout(y, yr, "y")
        assert part.shape == (T.stats_tiles(y.shape), 3, y.shape[1])
        assert part.dtype == R.stat_dtype(dtype)
        n, mean, m2 = R.merge_partials(part)
        nr, meanr, m2r = R.merge_partials(pr)
        assert torch.equal(n, nr)
        # statistics of the stored y: compare against the statistics of the reference's y
        _, mean_y, m2_y = R.merge_partials(R.batch_stats(y))
        f64 = dtype == torch.float64
        assert_close(mean, mean_y, atol=1e-11 if f64 else 1e-5, rtol=1e-9 if f64 else 1e-5, name="mean")
        assert_close(m2, m2_y, atol=1e-9 if f64 else 1e-4, rtol=1e-10 if f64 else 1e-5, name="M2")
        atol, rtol = TOL[dtype]
        assert_close(mean, meanr, atol=atol, rtol=rtol, name="mean vs reference")


def test_stats_use_several_tiles():
    # the merge of several tiles (and a partial last tile) is exercised by the shapes above
    x, wt, s, t, geom = _conv_case(CONVS[0], torch.float64)
    y, part = T.conv_stats(x, wt, None, None, False, *geom)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    assert part.shape[0] > 1
    assert torch.equal(part[:, 0].sum(0), torch.full_like(part[0, 0], m))


@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 3, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.float32, torch.bfloat16], case=CONVS))
def test_conv_bias_act_epilogue(case, dtype):
    x, wt, s, t, geom = _conv_case(case, dtype)
    layout = case[-1]
    yr = R.conv_bias_act(x, wt, None, None, None, None, False, *geom, False)
    bias = torch.randn(wt.shape[0], dtype=dtype, device=DEVICE)
    res = _layout(torch.randn(yr.shape, dtype=dtype, device=DEVICE), "channels_last" if layout == "contiguous"
                  else "contiguous")
    for args in [(None, None, None, None, False, False), (bias, None, None, None, False, True),
                 (bias, res, None, None, False, True), (None, res, s, t, True, False), (bias, res, s, t, True, True)]:
        b, r, sc, sh, in_relu, relu = args
        got = T.conv_bias_act(x, wt, b, r, sc, sh, in_relu, *geom, relu)
        want = R.conv_bias_act(x, wt, b, r, sc, sh, in_relu, *geom, relu)
        _close(got, want, dtype, "out")
        _same_layout(got, want, "out")


@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 3, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.float16, torch.bfloat16], case=CONVS))
def test_conv_dgrad_wgrad(case, dtype):
    x, wt, s, t, geom = _conv_case(case, dtype)
    layout = case[-1]
    y = R.conv_stats(x, wt, None, None, False, *geom)[0]
    dy = _layout(torch.randn(y.shape, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    dx = T.conv_dgrad(dy, wt, list(x.shape), *geom)
    dxr = R.conv_dgrad(dy, wt, list(x.shape), *geom)
    _close(dx, dxr, dtype, "dx")
    _same_layout(dx, dxr, "dx")
    # a shortcut gradient added in the epilogue (in the other layout: the kernel reads strides)
    other = "channels_last" if layout == "contiguous" else "contiguous"
    add = _layout(torch.randn(x.shape, dtype=torch.float64).to(dtype).to(DEVICE), other)
    got, want = T.conv_dgrad(dy, wt, list(x.shape), *geom, add), R.conv_dgrad(dy, wt, list(x.shape), *geom, add)
    _close(got, want, dtype, "dx + dx_add")
    _same_layout(got, dxr, "dx + dx_add")
    if dtype != torch.float64:  # an addend in another dtype: PyTorch's promotion, as the reference
        add32 = add.float()
        got = T.conv_dgrad(dy, wt, list(x.shape), *geom, add32)
        assert got.dtype == torch.float32
        _close(got, R.conv_dgrad(dy, wt, list(x.shape), *geom, add32), dtype, "dx + float32 dx_add")
    for pro in [(None, None, False), (s, t, True), (None, None, True)]:
        dw = T.conv_wgrad(dy, x, *pro, list(wt.shape), *geom)
        dwr = R.conv_wgrad(dy, x, *pro, list(wt.shape), *geom)
        if dtype == torch.float16:
            # ATen's float16 wgrad on CPU accumulates less precisely than float32: judge both
            # against float64 on the same (rounded) operands instead of against each other
            h = R.prologue(x, *pro).double()
            exact = R.conv_wgrad(dy.double(), h, None, None, False, list(wt.shape), *geom)
            err, err_aten = (dw.double() - exact).abs().max(), (dwr.double() - exact).abs().max()
            assert err <= 2 * err_aten + 1e-3 * exact.abs().max(), f"dw: max error {err:.3g}, ATen's {err_aten:.3g}"
        else:
            _close(dw, dwr, dtype, "dw")
        assert dw.is_contiguous()


@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 2, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.bfloat16], case=CONVS))
def test_bn_apply_fused_into_dgrad_and_wgrad(case, dtype):
    x, wt, s, t, geom = _conv_case(case, dtype)
    y = R.conv_stats(x, wt, None, None, False, *geom)[0]
    k = y.shape[1]
    gen = torch.Generator().manual_seed(5)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa: E731
    sd = R.stat_dtype(dtype)
    dh = _layout(rnd(*y.shape).to(dtype).to(DEVICE), "channels_last" if case[-1] == "contiguous" else "contiguous")
    bs, bt = (rnd(k).abs() + 0.5).to(sd).to(DEVICE), rnd(k).to(sd).to(DEVICE)
    coefs = rnd(3, k).to(sd).to(DEVICE)
    for pro, need in [((s, t, True), (True, True)), ((None, None, False), (True, False)), ((s, t, True), (False, True))]:
        args = (dh, y, bs, bt, coefs, wt, x, *pro, *geom, *need)
        add = rnd(*x.shape).to(dtype).to(DEVICE) if need[0] and pro[0] is None else None  # one case with dx_add
        dx, dw = T.bn_apply_conv_backward(*args, add)
        dxr, dwr = R.bn_apply_conv_backward(*args, add)
        if need[0]:
            _close(dx, dxr, dtype, "dx")
            _same_layout(dx, dxr, "dx")
        else:
            assert dx.numel() == 0
        if need[1]:
            _close(dw, dwr, dtype, "dw")
        else:
            assert dw.numel() == 0


def _far_from_zero_bn_case(dtype, mean_over_sigma=64.0, seed=3):
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


def _within_2x(got, want, want64, dtype, name):
    """README, Numerics: err(fused vs fp64) <= 2 * err(torch same dtype vs fp64) + slack."""
    from fusedres.testing import SLACK, max_rel_err

    err, base = max_rel_err(got, want64), max_rel_err(want, want64)
    assert err <= 2 * base + SLACK[dtype], f"{name}: error {err:.3g} vs torch's {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_prologue_keeps_scale_and_shift_in_float32(dtype):
    """relu(x*scale + shift) on load in float32, one rounding to the 16-bit operand: within
    the numerics rule where the BatchNorm before the conv has a large |mean/sigma|. Rounding
    scale and shift to 16 bits instead (emulated) breaks the rule on the same inputs."""
    x, wt, s, t, geom = _far_from_zero_bn_case(dtype)
    x64, w64 = x.double(), wt.double()
    y, _ = T.conv_stats(x, wt, s, t, True, *geom)
    yr, _ = R.conv_stats(x, wt, s, t, True, *geom)
    y64, _ = R.conv_stats(x64, w64, s.double(), t.double(), True, *geom)
    _within_2x(y, yr, y64, dtype, "conv_stats with the prologue")
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last).to(DEVICE)
    dw = T.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom)
    dwr = R.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom)
    dw64 = R.conv_wgrad(dy.double(), x64, s.double(), t.double(), True, list(wt.shape), *geom)
    _within_2x(dw, dwr, dw64, dtype, "conv_wgrad with the prologue")
    # the test can fail: scale and shift rounded to the storage dtype miss the bound
    s16, t16 = s.to(dtype).float(), t.to(dtype).float()
    y16, _ = R.conv_stats(x, wt, s16, t16, True, *geom)
    with pytest.raises(AssertionError, match="error"):
        _within_2x(y16, yr, y64, dtype, "16-bit scale and shift")


def test_wgrad_split_reduction_matches():
    # enough output pixels that the reduction is split in several chunks
    case = ("big-m", 3, 4, 12, 12, 5, 3, 1, 1, 1, 1, "channels_last")
    x, wt, s, t, geom = _conv_case(case, torch.float64)
    dy = torch.randn(3, 5, 12, 12, dtype=torch.float64, device=DEVICE)
    _close(T.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom),
           R.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom), torch.float64, "dw")


BN_SHAPES = [(1, 3, 5, 5), (2, 7, 3, 4), (3, 13, 1, 1), (2, 16, 4, 4)]


def _bn_inputs(shape, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    sd = R.stat_dtype(dtype)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    y = _layout(mk(*shape).to(dtype).to(DEVICE), layout)
    vec = lambda: mk(c).to(sd).to(DEVICE)  # noqa: E731
    return y, vec, sd, n, c


@pytest.mark.parametrize("dtype,shape,layout", grid(lambda dtype, shape, layout: layout == (shape + dtype) % 3,
                                                   dtype=[torch.float64, torch.float32, torch.float16, torch.bfloat16], shape=BN_SHAPES, layout=LAYOUTS))
def test_bn_add_act_every_mode(shape, dtype, layout):
    y, vec, sd, n, c = _bn_inputs(shape, dtype, layout)
    other = "contiguous" if layout == "channels_last" else "channels_last"
    res = _layout(torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE), other)
    sample = torch.tensor([0.0, 2.0, 0.5], dtype=sd, device=DEVICE)[:n]
    s, t, rs, rt = vec(), vec(), vec(), vec()
    for r, dual, smp, relu in [(None, False, None, True), (res, False, None, True), (res, True, None, True),
                               (res, True, sample, False), (None, False, sample, True), (res, False, sample, True)]:
        args = (y, s, t, r, rs if dual else None, rt if dual else None, smp, relu)
        got, want = T.bn_add_act(*args), R.bn_add_act(*args)
        _close(got, want, dtype, "out")
        _same_layout(got, want, "out")


@pytest.mark.parametrize("dtype,shape,layout", grid(lambda dtype, shape, layout: layout == (shape + dtype) % 3,
                                                   dtype=[torch.float64, torch.float32, torch.bfloat16], shape=BN_SHAPES, layout=LAYOUTS))
def test_batch_stats_and_finalize(shape, dtype, layout):
    y, vec, sd, n, c = _bn_inputs(shape, dtype, layout)
    part = T.batch_stats(y)
    assert part.shape == (T.stats_tiles(y.shape), 3, c) and part.dtype == sd
    gamma, beta = vec(), vec()
    for momentum in (0.1, 1.0):
        rm, rv = torch.rand(c, dtype=dtype, device=DEVICE), torch.rand(c, dtype=dtype, device=DEVICE) + 0.5
        rm2, rv2 = rm.clone(), rv.clone()
        got = T.bn_finalize(part, gamma, beta, rm, rv, momentum, 1e-5)
        want = R.bn_finalize(R.batch_stats(y), gamma, beta, rm2, rv2, momentum, 1e-5)
        for name, a, b in zip(("mean", "invstd", "scale", "shift"), got, want):
            assert_close(a, b, atol=1e-10 if sd == torch.float64 else 2e-5, rtol=1e-9 if sd == torch.float64
                         else 2e-5, name=name)
        lp = dtype == torch.bfloat16
        assert_close(rm, rm2, atol=1e-2 if lp else 1e-6, rtol=1e-2 if lp else 1e-6, name="running_mean")
        assert_close(rv, rv2, atol=1e-2 if lp else 1e-6, rtol=1e-2 if lp else 1e-6, name="running_var")
    # no running statistics (track_running_stats=False)
    got = T.bn_finalize(part, gamma, beta, None, None, 0.1, 1e-5)
    assert_close(got[0], want[0], atol=1e-6, rtol=1e-6, name="mean")


def test_finalize_updates_strided_running_stats_in_place():
    y = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=DEVICE)
    base = torch.zeros(12, dtype=torch.float64, device=DEVICE)
    rm = base[::2]  # non-contiguous buffer view
    rv = torch.ones(6, dtype=torch.float64, device=DEVICE)
    T.bn_finalize(T.batch_stats(y), torch.ones(6, dtype=torch.float64, device=DEVICE),
                  torch.zeros(6, dtype=torch.float64, device=DEVICE), rm, rv, 0.5, 1e-5)
    assert_close(base[::2], 0.5 * y.mean(dim=(0, 2, 3)), atol=1e-12, rtol=1e-12, name="running_mean")
    assert torch.all(base[1::2] == 0)


@pytest.mark.parametrize("dtype,shape,layout", grid(lambda dtype, shape, layout: layout == (shape + dtype) % 3,
                                                   dtype=[torch.float64, torch.float32, torch.float16, torch.bfloat16], shape=BN_SHAPES, layout=LAYOUTS))
def test_bn_backward_reduce_apply_and_act_grad(shape, dtype, layout):
    y, vec, sd, n, c = _bn_inputs(shape, dtype, layout)
    gen = torch.Generator().manual_seed(3)
    dout = _layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE),
                   "contiguous" if layout != "contiguous" else "channels_last")
    mean, invstd = vec(), vec().abs() + 0.5
    scale, shift = vec(), vec()
    out = R.bn_add_act(y, scale, shift, None, None, None, None, True)
    sample = torch.tensor([1.0, 0.0, 2.0], dtype=sd, device=DEVICE)[:n]
    for o, relu, smp in [(None, True, None), (out, True, None), (None, False, None), (None, True, sample)]:
        args = (dout, y, mean, invstd, scale, shift, o, relu, smp)
        sg, sgx = T.bn_backward_reduce(*args)
        sgr, sgxr = R.bn_backward_reduce(*args)
        atol = 1e-10 if dtype == torch.float64 else 1e-3
        assert_close(sg, sgr, atol=atol, rtol=1e-5, name="sum_g")
        assert_close(sgx, sgxr, atol=atol, rtol=1e-5, name="sum_gx")
        dy = T.bn_backward_apply(*args, sgr, sgxr)
        dyr = R.bn_backward_apply(*args, sgr, sgxr)
        _close(dy, dyr, dtype, "dy")
        _same_layout(dy, dyr, "dy")
    got, want = T.act_grad(dout, out), R.act_grad(dout, out)
    assert torch.equal(got, want)


def test_results_are_deterministic():
    x, wt, s, t, geom = _conv_case(CONVS[1], torch.float32)
    a = T.conv_stats(x, wt, s, t, True, *geom)
    b = T.conv_stats(x, wt, s, t, True, *geom)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dy = torch.randn_like(a[0])
    assert torch.equal(T.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom),
                       T.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom))


def test_empty_batch():
    x = torch.zeros(0, 3, 5, 5, device=DEVICE)
    wt = torch.randn(4, 3, 3, 3, device=DEVICE)
    y = T.conv_bias_act(x, wt, None, None, None, None, False, [1, 1], [1, 1], [1, 1], 1, True)
    assert y.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_block_on_triton_fullgraph(train):
    import copy

    import torch.nn as nn

    torch._dynamo.reset()
    ds = nn.Sequential(nn.Conv2d(5, 6, 1, 2, bias=False), nn.BatchNorm2d(6))
    eager = fusedres.set_backend(fusedres.BasicBlock(5, 6, 2, ds), "triton").to(DEVICE).train(train)
    comp_mod = copy.deepcopy(eager)
    compiled = torch.compile(comp_mod, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 6, 6, device=DEVICE)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    assert_close(yc, ye, atol=1e-5, rtol=1e-5, name="out")
    if train:
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5, name="x.grad")
        for (n, b), (_, c) in zip(comp_mod.named_buffers(), eager.named_buffers()):
            assert_close(b, c, atol=1e-6, rtol=1e-6, name=n)
