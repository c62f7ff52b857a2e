"""Every backend present against the reference, on one case grid (tests/cases.py), one
primitive at a time: its own kernels where it has them, and what it hands to another
implementation otherwise. The backends present: every available one that runs on the test
device (without a GPU: cpu, and triton through Triton's interpreter; with one: cuda and
triton). Backend-specific behaviour (tiles, tuning, extension details) is in each backend's
own test file."""

import pytest
import torch

import fusedres
from cases import (BN_SHAPES, CONV_IDS, CONVS, DEVICE, LAYOUTS, TOL, bn_inputs, close, conv_case,
                   far_from_zero_bn_case, layout_as, same_layout, within_2x)
from fusedres import backends
from fusedres import reference as R
from fusedres.testing import assert_close
from helpers import grid

PRESENT = [name for name, st in fusedres.available_backends().items()
           if name != "reference" and st.available and backends._device_error(name, DEVICE) is None]
BACKENDS = pytest.mark.parametrize("backend", PRESENT)


def test_the_backends_of_this_machine_are_present():
    # without a GPU: the C++ extension's cpu backend and triton's interpreter (conftest);
    # a backend missing here would silently leave the grid
    want = {"cuda", "triton"} if DEVICE.type == "cuda" else {"cpu", "triton"}
    assert want <= set(PRESENT), fusedres.available_backends()


@BACKENDS
@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 3, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.float16, torch.bfloat16], case=CONVS))
def test_conv_stats_with_prologue(backend, case, dtype):
    B = backends.get(backend)
    x, wt, s, t, geom = conv_case(case, dtype)
    for pro in [(None, None, False), (s, t, True), (s, t, False), (None, None, True)]:
        y, part = B.conv_stats(x, wt, *pro, *geom)
        yr, pr = R.conv_stats(x, wt, *pro, *geom)
        close(y, yr, dtype, "y")
        same_layout(y, yr, "y")
        assert part.shape == (B.stats_tiles(y.shape), 3, y.shape[1])
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


@BACKENDS
@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 3, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.float32, torch.bfloat16], case=CONVS))
def test_conv_bias_act_epilogue(backend, case, dtype):
    B = backends.get(backend)
    x, wt, s, t, geom = conv_case(case, dtype)
    layout = case[-1]
    yr = R.conv_bias_act(x, wt, None, None, None, None, False, *geom, False)
    bias = torch.randn(wt.shape[0], dtype=dtype, device=DEVICE)
    res = layout_as(torch.randn(yr.shape, dtype=dtype, device=DEVICE), "channels_last" if layout == "contiguous"
                  else "contiguous")
    for args in [(None, None, None, None, False, False), (bias, None, None, None, False, True),
                 (bias, res, None, None, False, True), (None, res, s, t, True, False), (bias, res, s, t, True, True)]:
        b, r, sc, sh, in_relu, relu = args
        got = B.conv_bias_act(x, wt, b, r, sc, sh, in_relu, *geom, relu)
        want = R.conv_bias_act(x, wt, b, r, sc, sh, in_relu, *geom, relu)
        close(got, want, dtype, "out")
        same_layout(got, want, "out")


@BACKENDS
@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 3, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.float16, torch.bfloat16], case=CONVS))
def test_conv_dgrad_wgrad(backend, case, dtype):
    B = backends.get(backend)
    x, wt, s, t, geom = conv_case(case, dtype)
    layout = case[-1]
    y = R.conv_stats(x, wt, None, None, False, *geom)[0]
    dy = layout_as(torch.randn(y.shape, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    dx = B.conv_dgrad(dy, wt, list(x.shape), *geom)
    dxr = R.conv_dgrad(dy, wt, list(x.shape), *geom)
    close(dx, dxr, dtype, "dx")
    same_layout(dx, dxr, "dx")
    # a shortcut gradient added in the epilogue (in the other layout: the kernel reads strides)
    other = "channels_last" if layout == "contiguous" else "contiguous"
    add = layout_as(torch.randn(x.shape, dtype=torch.float64).to(dtype).to(DEVICE), other)
    got, want = B.conv_dgrad(dy, wt, list(x.shape), *geom, add), R.conv_dgrad(dy, wt, list(x.shape), *geom, add)
    close(got, want, dtype, "dx + dx_add")
    same_layout(got, dxr, "dx + dx_add")
    if dtype != torch.float64:  # an addend in another dtype: PyTorch's promotion, as the reference
        add32 = add.float()
        got = B.conv_dgrad(dy, wt, list(x.shape), *geom, add32)
        assert got.dtype == torch.float32
        close(got, R.conv_dgrad(dy, wt, list(x.shape), *geom, add32), dtype, "dx + float32 dx_add")
    for pro in [(None, None, False), (s, t, True), (None, None, True)]:
        dw = B.conv_wgrad(dy, x, *pro, list(wt.shape), *geom)
        dwr = R.conv_wgrad(dy, x, *pro, list(wt.shape), *geom)
        if dtype == torch.float16:
            # ATen's float16 wgrad on CPU accumulates less precisely than float32: judge both
            # against float64 on the same (rounded) operands instead of against each other
            h = R.prologue(x, *pro).double()
            exact = R.conv_wgrad(dy.double(), h, None, None, False, list(wt.shape), *geom)
            err, err_aten = (dw.double() - exact).abs().max(), (dwr.double() - exact).abs().max()
            assert err <= 2 * err_aten + 1e-3 * exact.abs().max(), f"dw: max error {err:.3g}, ATen's {err_aten:.3g}"
        else:
            close(dw, dwr, dtype, "dw")
        assert dw.is_contiguous()


@BACKENDS
@pytest.mark.parametrize("dtype,case", grid(lambda dtype, case: dtype == case % 2, ids={"case": CONV_IDS},
                                            dtype=[torch.float64, torch.bfloat16], case=CONVS))
def test_bn_apply_fused_into_dgrad_and_wgrad(backend, case, dtype):
    B = backends.get(backend)
    x, wt, s, t, geom = conv_case(case, dtype)
    y = R.conv_stats(x, wt, None, None, False, *geom)[0]
    k = y.shape[1]
    gen = torch.Generator().manual_seed(5)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa: E731
    sd = R.stat_dtype(dtype)
    dh = layout_as(rnd(*y.shape).to(dtype).to(DEVICE), "channels_last" if case[-1] == "contiguous" else "contiguous")
    bs, bt = (rnd(k).abs() + 0.5).to(sd).to(DEVICE), rnd(k).to(sd).to(DEVICE)
    coefs = rnd(3, k).to(sd).to(DEVICE)
    for pro, need in [((s, t, True), (True, True)), ((None, None, False), (True, False)), ((s, t, True), (False, True))]:
        args = (dh, y, bs, bt, coefs, wt, x, *pro, *geom, *need)
        add = rnd(*x.shape).to(dtype).to(DEVICE) if need[0] and pro[0] is None else None  # one case with dx_add
        dx, dw = B.bn_apply_conv_backward(*args, add)
        dxr, dwr = R.bn_apply_conv_backward(*args, add)
        if need[0]:
            close(dx, dxr, dtype, "dx")
            same_layout(dx, dxr, "dx")
        else:
            assert dx.numel() == 0
        if need[1]:
            close(dw, dwr, dtype, "dw")
        else:
            assert dw.numel() == 0


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_prologue_keeps_scale_and_shift_in_float32(backend, dtype):
    B = backends.get(backend)
    """relu(x*scale + shift) on load in float32, one rounding to the 16-bit operand: within
    the numerics rule where the BatchNorm before the conv has a large |mean/sigma|. Rounding
    scale and shift to 16 bits instead (emulated) breaks the rule on the same inputs."""
    x, wt, s, t, geom = far_from_zero_bn_case(dtype)
    x64, w64 = x.double(), wt.double()
    y, _ = B.conv_stats(x, wt, s, t, True, *geom)
    yr, _ = R.conv_stats(x, wt, s, t, True, *geom)
    y64, _ = R.conv_stats(x64, w64, s.double(), t.double(), True, *geom)
    within_2x(y, yr, y64, dtype, "conv_stats with the prologue")
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last).to(DEVICE)
    dw = B.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom)
    dwr = R.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom)
    dw64 = R.conv_wgrad(dy.double(), x64, s.double(), t.double(), True, list(wt.shape), *geom)
    within_2x(dw, dwr, dw64, dtype, "conv_wgrad with the prologue")
    # the test can fail: scale and shift rounded to the storage dtype miss the bound
    s16, t16 = s.to(dtype).float(), t.to(dtype).float()
    y16, _ = R.conv_stats(x, wt, s16, t16, True, *geom)
    with pytest.raises(AssertionError, match="error"):
        within_2x(y16, yr, y64, dtype, "16-bit scale and shift")


@BACKENDS
@pytest.mark.parametrize("dtype,shape,layout", grid(lambda dtype, shape, layout: layout == (shape + dtype) % 3,
                                                   dtype=[torch.float64, torch.float32, torch.float16, torch.bfloat16], shape=BN_SHAPES, layout=LAYOUTS))
def test_bn_add_act_every_mode(backend, shape, dtype, layout):
    B = backends.get(backend)
    y, vec, sd, n, c = bn_inputs(shape, dtype, layout)
    other = "contiguous" if layout == "channels_last" else "channels_last"
    res = layout_as(torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE), other)
    sample = torch.tensor([0.0, 2.0, 0.5], dtype=sd, device=DEVICE)[:n]
    s, t, rs, rt = vec(), vec(), vec(), vec()
    for r, dual, smp, relu in [(None, False, None, True), (res, False, None, True), (res, True, None, True),
                               (res, True, sample, False), (None, False, sample, True), (res, False, sample, True)]:
        args = (y, s, t, r, rs if dual else None, rt if dual else None, smp, relu)
        got, want = B.bn_add_act(*args), R.bn_add_act(*args)
        close(got, want, dtype, "out")
        same_layout(got, want, "out")


@BACKENDS
@pytest.mark.parametrize("dtype,shape,layout", grid(lambda dtype, shape, layout: layout == (shape + dtype) % 3,
                                                   dtype=[torch.float64, torch.float32, torch.bfloat16], shape=BN_SHAPES, layout=LAYOUTS))
def test_batch_stats_and_finalize(backend, shape, dtype, layout):
    B = backends.get(backend)
    y, vec, sd, n, c = bn_inputs(shape, dtype, layout)
    part = B.batch_stats(y)
    assert part.shape == (B.stats_tiles(y.shape), 3, c) and part.dtype == sd
    gamma, beta = vec(), vec()
    for momentum in (0.1, 1.0):
        rm, rv = torch.rand(c, dtype=dtype, device=DEVICE), torch.rand(c, dtype=dtype, device=DEVICE) + 0.5
        rm2, rv2 = rm.clone(), rv.clone()
        got = B.bn_finalize(part, gamma, beta, rm, rv, momentum, 1e-5)
        want = R.bn_finalize(R.batch_stats(y), gamma, beta, rm2, rv2, momentum, 1e-5)
        for name, a, b in zip(("mean", "invstd", "scale", "shift"), got, want):
            assert_close(a, b, atol=1e-10 if sd == torch.float64 else 2e-5, rtol=1e-9 if sd == torch.float64
                         else 2e-5, name=name)
        lp = dtype == torch.bfloat16
        assert_close(rm, rm2, atol=1e-2 if lp else 1e-6, rtol=1e-2 if lp else 1e-6, name="running_mean")
        assert_close(rv, rv2, atol=1e-2 if lp else 1e-6, rtol=1e-2 if lp else 1e-6, name="running_var")
    # no running statistics (track_running_stats=False)
    got = B.bn_finalize(part, gamma, beta, None, None, 0.1, 1e-5)
    assert_close(got[0], want[0], atol=1e-6, rtol=1e-6, name="mean")


@BACKENDS
def test_finalize_updates_strided_running_stats_in_place(backend):
    B = backends.get(backend)
    y = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=DEVICE)
    base = torch.zeros(12, dtype=torch.float64, device=DEVICE)
    rm = base[::2]  # non-contiguous buffer view
    rv = torch.ones(6, dtype=torch.float64, device=DEVICE)
    B.bn_finalize(B.batch_stats(y), torch.ones(6, dtype=torch.float64, device=DEVICE),
                  torch.zeros(6, dtype=torch.float64, device=DEVICE), rm, rv, 0.5, 1e-5)
    assert_close(base[::2], 0.5 * y.mean(dim=(0, 2, 3)), atol=1e-12, rtol=1e-12, name="running_mean")
    assert torch.all(base[1::2] == 0)


@BACKENDS
@pytest.mark.parametrize("dtype,shape,layout", grid(lambda dtype, shape, layout: layout == (shape + dtype) % 3,
                                                   dtype=[torch.float64, torch.float32, torch.float16, torch.bfloat16], shape=BN_SHAPES, layout=LAYOUTS))
def test_bn_backward_reduce_apply_and_act_grad(backend, shape, dtype, layout):
    B = backends.get(backend)
    y, vec, sd, n, c = bn_inputs(shape, dtype, layout)
    gen = torch.Generator().manual_seed(3)
    dout = layout_as(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE),
                   "contiguous" if layout != "contiguous" else "channels_last")
    mean, invstd = vec(), vec().abs() + 0.5
    scale, shift = vec(), vec()
    out = R.bn_add_act(y, scale, shift, None, None, None, None, True)
    sample = torch.tensor([1.0, 0.0, 2.0], dtype=sd, device=DEVICE)[:n]
    for o, relu, smp in [(None, True, None), (out, True, None), (None, False, None), (None, True, sample)]:
        args = (dout, y, mean, invstd, scale, shift, o, relu, smp)
        sg, sgx = B.bn_backward_reduce(*args)
        sgr, sgxr = R.bn_backward_reduce(*args)
        atol = 1e-10 if dtype == torch.float64 else 1e-3
        assert_close(sg, sgr, atol=atol, rtol=1e-5, name="sum_g")
        assert_close(sgx, sgxr, atol=atol, rtol=1e-5, name="sum_gx")
        dy = B.bn_backward_apply(*args, sgr, sgxr, None)
        dyr = R.bn_backward_apply(*args, sgr, sgxr, None)
        close(dy, dyr, dtype, "dy")
        same_layout(dy, dyr, "dy")
        # plus an addend (a pre-activation block's shortcut gradient), in another layout
        add = dout.contiguous(memory_format=torch.channels_last if dout.is_contiguous() else torch.contiguous_format)
        dya = B.bn_backward_apply(*args, sgr, sgxr, add)
        dyar = R.bn_backward_apply(*args, sgr, sgxr, add)
        close(dya, dyar, dtype, "dy + addend")
        same_layout(dya, dyar, "dy + addend")
        # storing the masked gradient before the sample scale (a post-activation block's
        # identity-shortcut gradient): dout's values or zeros, bit for bit the reference's
        gout, goutr = torch.empty_like(y), torch.empty_like(y)
        dyg = B.bn_backward_apply(*args, sgr, sgxr, None, gout)
        R.bn_backward_apply(*args, sgr, sgxr, None, goutr)
        assert torch.equal(gout, goutr), "grad_out"
        assert torch.equal(dyg, dy), "dy with grad_out"
        if o is not None:
            assert torch.equal(gout, R.act_grad(dout, o)), "grad_out is act_grad's result"
    got, want = B.act_grad(dout, out), R.act_grad(dout, out)
    assert torch.equal(got, want)


@BACKENDS
def test_results_are_deterministic(backend):
    B = backends.get(backend)
    x, wt, s, t, geom = conv_case(CONVS[1], torch.float32)
    a = B.conv_stats(x, wt, s, t, True, *geom)
    b = B.conv_stats(x, wt, s, t, True, *geom)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dy = torch.randn_like(a[0])
    assert torch.equal(B.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom),
                       B.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom))


@BACKENDS
def test_empty_batch(backend):
    B = backends.get(backend)
    x = torch.zeros(0, 3, 5, 5, device=DEVICE)
    wt = torch.randn(4, 3, 3, 3, device=DEVICE)
    y = B.conv_bias_act(x, wt, None, None, None, None, False, [1, 1], [1, 1], [1, 1], 1, True)
    assert y.shape == (0, 4, 5, 5)
