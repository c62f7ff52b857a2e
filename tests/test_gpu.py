"""GPU tier: every GPU backend on ResNet-18/50 layer shapes in fp32/bf16/fp16, forward,
backward and running statistics, against the same modules run through torch.nn in the same
dtype and in float64 (the rule of README's Numerics section), and a 20-step ResNet-18 training run. Skipped
without a CUDA device."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.testing import check_against_fp64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    st = fusedres.available_backends()
    return [b for b in ("triton", "cuda") if st[b].available]


def _proj(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


# every distinct block configuration of ResNet-18 and ResNet-50 at 224x224 (spatial size of
# the block input); batch 32
R18 = [
    ("r18-l1", lambda: fusedres.BasicBlock(64, 64), (32, 64, 56, 56)),
    ("r18-l2-down", lambda: fusedres.BasicBlock(64, 128, 2, _proj(64, 128, 2)), (32, 64, 56, 56)),
    ("r18-l3", lambda: fusedres.BasicBlock(256, 256), (32, 256, 14, 14)),
    ("r18-l4-down", lambda: fusedres.BasicBlock(256, 512, 2, _proj(256, 512, 2)), (32, 256, 14, 14)),
]
R50 = [
    ("r50-l1-first", lambda: fusedres.Bottleneck(64, 64, 1, _proj(64, 256, 1)), (32, 64, 56, 56)),
    ("r50-l1", lambda: fusedres.Bottleneck(256, 64), (32, 256, 56, 56)),
    ("r50-l2-down", lambda: fusedres.Bottleneck(256, 128, 2, _proj(256, 512, 2)), (32, 256, 56, 56)),
    ("r50-l3", lambda: fusedres.Bottleneck(1024, 256), (32, 1024, 14, 14)),
    ("r50-l4-down", lambda: fusedres.Bottleneck(1024, 512, 2, _proj(1024, 2048, 2)), (32, 1024, 14, 14)),
    ("r50-l4", lambda: fusedres.Bottleneck(2048, 512), (32, 2048, 7, 7)),
]
CASES = R18 + R50


def _run(module, x, train, g):
    module.train(train)
    xi = x.detach().clone().requires_grad_(train)
    if train:
        out = module(xi)
        out.backward(g.to(out.dtype))
        res = {"out": out.detach(), "x.grad": xi.grad}
        res.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    else:
        with torch.no_grad():
            res = {"out": module(xi)}
    res.update({n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return res


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", _gpu_backends())
def test_block_on_gpu_within_2x_of_torch(backend, case, dtype, train):
    _, build, shape = case
    torch.manual_seed(0)
    base = build()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(shape, device="cuda")
    fused = fusedres.set_backend(copy.deepcopy(base), backend).to("cuda", dtype).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(base).to("cuda", dtype).to(memory_format=torch.channels_last)
    ref64 = copy.deepcopy(base).to("cuda", torch.float64)
    xl = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out_shape = fusedres.set_backend(copy.deepcopy(base), "reference").to("cuda").eval()(x[:1]).shape
    g = torch.randn((shape[0],) + tuple(out_shape[1:]), device="cuda", dtype=torch.float64)
    with fusedres.functional.unfused():
        want = _run(ref, xl, train, g)
        want64 = _run(ref64, x.double(), train, g)
    got = _run(fused, xl, train, g)
    assert got["out"].is_contiguous(memory_format=torch.channels_last)
    check_against_fp64(got, want, want64, dtype)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_resnet18_training_20_steps_matches_torch(backend):
    """20 SGD steps of ResNet-18 on random data, bf16 autocast-free storage, fused vs torch.nn
    from the same weights and data: per-step losses within the rule of README's Numerics section."""
    torch.manual_seed(0)
    base = fusedres.resnet18(num_classes=10)
    data = [(torch.randn(32, 3, 64, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")) for _ in range(4)]

    def train(model, dtype, fused):
        model = model.to("cuda", dtype).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses = []
        for step in range(20):
            xb, yb = data[step % len(data)]
            xb = xb.to(dtype).contiguous(memory_format=torch.channels_last)
            if fused:
                loss = nn.functional.cross_entropy(model(xb).float(), yb)
            else:
                with fusedres.functional.unfused():
                    loss = nn.functional.cross_entropy(model(xb).float(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64)

    ours = train(fusedres.set_backend(copy.deepcopy(base), backend), torch.bfloat16, True)
    theirs = train(copy.deepcopy(base), torch.bfloat16, False)
    exact = train(copy.deepcopy(base), torch.float64, False)
    err_ours = (ours - exact).abs().max().item()
    err_theirs = (theirs - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs + 0.05, (err_ours, err_theirs)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_more_than_2_31_elements_on_gpu(backend):
    # N*H*W*C = 2**31 + 2**27 in bfloat16 (4.3 GiB per tensor): a 1x1 conv-BN-ReLU in eval
    # (fused conv epilogue) and the BatchNorm kernels; the last samples, whose offsets pass
    # 2**31, are checked against cuDNN on just those samples
    n, c, h, w = 136, 64, 512, 480
    assert n * c * h * w > 2**31
    torch.cuda.empty_cache()
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    m = fusedres.ConvBNAct(c, c, 1, backend=backend).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5), m.bn.running_var.uniform_(0.5, 1.5)
        out = m(x)
        with fusedres.functional.unfused():
            want = m(x[-2:])
        torch.testing.assert_close(out[-2:], want, atol=5e-2, rtol=2e-2)
        del out
        be = fusedres.backends.get(backend)
        part = be.batch_stats(x)
        mean = fusedres.reference.merge_partials(part)[1]
        torch.testing.assert_close(mean.float(), x.float().mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-3)
        s, t = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        y = be.bn_add_act(x, s, t, None, None, None, None, True)
        ref_tail = torch.relu(x[-2:].float() * s[:, None, None] + t[:, None, None]).to(torch.bfloat16)
        torch.testing.assert_close(y[-2:], ref_tail, atol=1e-2, rtol=1e-2)


# --------------------------------------------------- the cuda backend's CUTLASS convolutions


def _cutlass_backend():
    if "cuda" not in _gpu_backends():
        pytest.skip("cuda backend not available")
    be = fusedres.backends.get("cuda")
    if be._cutlass() is None:
        pytest.skip("extension built without the CUTLASS kernels")
    return be


def _within_2x(got, want, want64, dtype, name):
    """README, Numerics: err(fused vs fp64) <= 2 * err(torch same dtype vs fp64) + slack * max|fp64|."""
    from fusedres.testing import SLACK, max_rel_err

    err, base = max_rel_err(got, want64), max_rel_err(want, want64)
    assert err <= 2 * base + SLACK[dtype], f"{name}: error {err:.3g} vs torch's {base:.3g}"


# (input [N, C, H, W], weight [K, C, R, S], stride, padding): ResNet layer shapes at batch 8,
# and small odd ones (stride 2, K not a multiple of the tile, 1x1 stride-2 shortcut)
CUTLASS_CONVS = [
    ((8, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ((8, 256, 56, 56), (128, 256, 1, 1), 1, 0),
    ((8, 128, 56, 56), (128, 128, 3, 3), 2, 1),
    ((8, 256, 56, 56), (512, 256, 1, 1), 2, 0),
    ((8, 512, 7, 7), (2048, 512, 1, 1), 1, 0),
    ((3, 16, 13, 11), (24, 16, 3, 3), 2, 1),
    ((2, 64, 9, 9), (64, 64, 1, 1), 2, 0),
    ((2, 24, 11, 11), (40, 24, 5, 5), 1, 2),
]


@pytest.mark.parametrize("prologue", ["exact", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("conv", CUTLASS_CONVS, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1][0]}-{c[1][2]}x{c[1][3]}-s{c[2]}")
def test_cutlass_conv_primitives_within_2x_of_torch(conv, dtype, prologue, monkeypatch):
    """The BatchNorm prologue by default as a native pass before the CUTLASS kernel, and with
    FUSEDRES_CUDA_PROLOGUE=fused in its mainloop (16-bit scale and shift: |shift| ~ 0.5 here,
    where the rule holds; far larger shifts break it, see the cuda backend)."""
    monkeypatch.setenv("FUSEDRES_CUDA_PROLOGUE", prologue)
    be = _cutlass_backend()
    from fusedres import reference as ref

    x_shape, w_shape, stride, pad = conv
    geo = ([stride] * 2, [pad] * 2, [1, 1], 1)
    cl = torch.channels_last
    x = torch.randn(x_shape, device="cuda", dtype=torch.float64)
    w = torch.randn(w_shape, device="cuda", dtype=torch.float64) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5
    bias = torch.randn(w_shape[0], device="cuda")
    scale = torch.rand(x_shape[1], device="cuda") + 0.5
    shift = torch.randn(x_shape[1], device="cuda") * 0.5
    y64 = ref.conv_bias_act(x, w, None, None, None, None, False, *geo, False)
    res = torch.randn_like(y64)
    dy = torch.randn_like(y64)
    lo = lambda t: t.to(dtype).contiguous(memory_format=cl)  # noqa: E731
    xl, wl, rl, dyl = lo(x), lo(w), lo(res), lo(dy)
    x64, w64, r64, dy64 = xl.double(), wl.double(), rl.double(), dyl.double()  # the same rounded inputs

    for pro in (False, True):
        s, t = (scale, shift) if pro else (None, None)
        assert be._cutlass().fprop_reason(xl, wl, None if pro else bias, rl, s, pro, *geo) == ""
        b = None if pro else bias
        got = be.conv_bias_act(xl, wl, b, rl, s, t, pro, *geo, True)
        want = ref.conv_bias_act(xl, wl, b, rl, s, t, pro, *geo, True)
        want64 = ref.conv_bias_act(x64, w64, b, r64, s, t, pro, *geo, True)
        assert got.is_contiguous(memory_format=cl) and got.dtype == dtype
        _within_2x(got, want, want64, dtype, f"conv_bias_act prologue={pro}")

        y, part = be.conv_stats(xl, wl, s, t, pro, *geo)
        want = ref.conv_stats(xl, wl, s, t, pro, *geo)[0]
        want64 = ref.conv_stats(x64, w64, s, t, pro, *geo)[0]
        _within_2x(y, want, want64, dtype, f"conv_stats prologue={pro}")
        own = ref.batch_stats(y)  # statistics of the kernel's own y, float32
        assert part.shape == own.shape == (1, 3, w_shape[0])
        torch.testing.assert_close(part, own, rtol=1e-4, atol=1e-4)

        dw = be.conv_wgrad(dyl, xl, s, t, pro, list(w_shape), *geo)
        want = ref.conv_wgrad(dyl, xl, s, t, pro, list(w_shape), *geo)
        want64 = ref.conv_wgrad(dy64, x64, s, t, pro, list(w_shape), *geo)
        assert dw.is_contiguous() and dw.dtype == dtype
        _within_2x(dw, want, want64, dtype, f"conv_wgrad prologue={pro}")

    dx = be.conv_dgrad(dyl, wl, list(x_shape), *geo)
    want = ref.conv_dgrad(dyl, wl, list(x_shape), *geo)
    want64 = ref.conv_dgrad(dy64, w64, list(x_shape), *geo)
    assert dx.is_contiguous(memory_format=cl)
    _within_2x(dx, want, want64, dtype, "conv_dgrad")

    # with a shortcut gradient added where dx is written (1x1 stride-2 shapes: phases no tap
    # reaches hold the addend alone)
    add = lo(torch.randn(x_shape, device="cuda", dtype=torch.float64))
    assert be._cutlass().dgrad_reason(dyl, wl, list(x_shape), *geo, add) == ""
    dx = be.conv_dgrad(dyl, wl, list(x_shape), *geo, add)
    want = ref.conv_dgrad(dyl, wl, list(x_shape), *geo, add)
    want64 = ref.conv_dgrad(dy64, w64, list(x_shape), *geo, add.double())
    assert dx.is_contiguous(memory_format=cl) and dx.dtype == dtype
    _within_2x(dx, want, want64, dtype, "conv_dgrad with dx_add")


@pytest.mark.parametrize("conv", CUTLASS_CONVS, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1][0]}-{c[1][2]}x{c[1][3]}-s{c[2]}")
def test_hopper_forward_within_2x_of_torch(conv, monkeypatch):
    """FUSEDRES_CUDA_HOPPER=1: the forward convolutions on the CUTLASS 3.x kernel (TMA + wgmma,
    visitor-tree epilogue) on an sm_90 device, bfloat16; elsewhere the Sm80 kernel runs the
    same calls. Every epilogue combination, NaN in the bias kept through the ReLU."""
    monkeypatch.setenv("FUSEDRES_CUDA_HOPPER", "1")
    be = _cutlass_backend()
    from fusedres import reference as ref

    dtype, cl = torch.bfloat16, torch.channels_last
    x_shape, w_shape, stride, pad = conv
    geo = ([stride] * 2, [pad] * 2, [1, 1], 1)
    x = torch.randn(x_shape, device="cuda", dtype=torch.float64)
    w = torch.randn(w_shape, device="cuda", dtype=torch.float64) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5
    bias = torch.randn(w_shape[0], device="cuda")
    bias[1] = float("nan")
    y64 = ref.conv_bias_act(x, w, None, None, None, None, False, *geo, False)
    lo = lambda t: t.to(dtype).contiguous(memory_format=cl)  # noqa: E731
    xl, wl, rl = lo(x), lo(w), lo(torch.randn_like(y64))
    x64, w64, r64 = xl.double(), wl.double(), rl.double()
    for b in (None, bias):
        for r, r_64 in ((None, None), (rl, r64)):
            for relu in (False, True):
                got = be.conv_bias_act(xl, wl, b, r, None, None, False, *geo, relu)
                want = ref.conv_bias_act(xl, wl, b, r, None, None, False, *geo, relu)
                want64 = ref.conv_bias_act(x64, w64, b, r_64, None, None, False, *geo, relu)
                assert got.is_contiguous(memory_format=cl) and got.dtype == dtype
                assert torch.equal(got.isnan(), want64.isnan()), "NaN where the reference has it"
                keep = ~want64.isnan()
                _within_2x(got[keep], want[keep], want64[keep], dtype,
                           f"conv_bias_act bias={b is not None} residual={r is not None} relu={relu}")
    y, part = be.conv_stats(xl, wl, None, None, False, *geo)
    _within_2x(y, ref.conv_stats(xl, wl, None, None, False, *geo)[0],
               ref.conv_stats(x64, w64, None, None, False, *geo)[0], dtype, "conv_stats")
    torch.testing.assert_close(part, ref.batch_stats(y), rtol=1e-4, atol=1e-4)


# ResNeXt's grouped convolutions (input, weight [K, C/groups, R, S], stride, groups), and an
# odd small one with 8 output channels per group
CUTLASS_GROUPED = [
    ((8, 1024, 28, 28), (1024, 32, 3, 3), 2, 32),
    ((8, 1024, 7, 7), (1024, 32, 3, 3), 1, 32),
    ((4, 2048, 14, 14), (2048, 64, 3, 3), 2, 32),
    ((3, 64, 9, 7), (16, 32, 3, 3), 1, 2),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("conv", CUTLASS_GROUPED, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[3]}-s{c[2]}")
def test_cutlass_grouped_forward_within_2x_of_torch(conv, dtype):
    be = _cutlass_backend()
    from fusedres import reference as ref

    x_shape, w_shape, stride, groups = conv
    geo = ([stride] * 2, [1, 1], [1, 1], groups)
    cl = torch.channels_last
    x = torch.randn(x_shape, device="cuda", dtype=torch.float64)
    w = torch.randn(w_shape, device="cuda", dtype=torch.float64) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5
    lo = lambda t: t.to(dtype).contiguous(memory_format=cl)  # noqa: E731
    xl, wl = lo(x), lo(w)
    x64, w64 = xl.double(), wl.double()
    # the bias of the grouped kernel is held in the storage dtype: the reference gets it so
    bias = torch.randn(w_shape[0], device="cuda").to(dtype).float()
    for b, relu in ((bias, True), (None, False)):
        assert be._cutlass().fprop_reason(xl, wl, b, None, None, False, *geo) == ""
        got = be.conv_bias_act(xl, wl, b, None, None, None, False, *geo, relu)
        want = ref.conv_bias_act(xl, wl, b, None, None, None, False, *geo, relu)
        want64 = ref.conv_bias_act(x64, w64, b, None, None, None, False, *geo, relu)
        assert got.is_contiguous(memory_format=cl) and got.dtype == dtype
        _within_2x(got, want, want64, dtype, f"grouped conv_bias_act bias={b is not None}")
    y, part = be.conv_stats(xl, wl, None, None, False, *geo)
    _within_2x(y, ref.conv_stats(xl, wl, None, None, False, *geo)[0], ref.conv_stats(x64, w64, None, None, False, *geo)[0],
               dtype, "grouped conv_stats")
    torch.testing.assert_close(part, ref.batch_stats(y), rtol=1e-4, atol=1e-4)
    # an Inf in the last group's input channel stays in that group's outputs
    xi = xl.clone()
    xi[:, -1] = float("inf")
    got = be.conv_bias_act(xi, wl, None, None, None, None, False, *geo, False)
    kpg = w_shape[0] // groups
    assert torch.isfinite(got[:, : w_shape[0] - kpg]).all()


def test_cutlass_fallback_shapes_run_the_reference_on_gpu():
    be = _cutlass_backend()
    from fusedres import reference as ref

    cl = torch.channels_last
    cases = [
        (torch.randn(2, 3, 15, 15, device="cuda", dtype=torch.bfloat16), torch.randn(16, 3, 7, 7, device="cuda",
                                                                                     dtype=torch.bfloat16), 1),
        (torch.randn(2, 16, 9, 9, device="cuda"), torch.randn(16, 16, 3, 3, device="cuda"), 1),  # float32
        (torch.randn(2, 32, 9, 9, device="cuda", dtype=torch.float16), torch.randn(32, 8, 3, 3, device="cuda",
                                                                                   dtype=torch.float16), 4),
    ]
    for x, w, groups in cases:
        x = x.contiguous(memory_format=cl)
        geo = ([1, 1], [1, 1], [1, 1], groups)
        assert be._cutlass().fprop_reason(x, w, None, None, None, False, *geo) != ""
        got = be.conv_bias_act(x, w, None, None, None, None, False, *geo, True)
        torch.testing.assert_close(got, ref.conv_bias_act(x, w, None, None, None, None, False, *geo, True),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("hopper", ["0", "1"], ids=["sm80", "hopper"])
def test_cutlass_conv_is_cuda_graph_safe(hopper, monkeypatch):
    monkeypatch.setenv("FUSEDRES_CUDA_HOPPER", hopper)
    be = _cutlass_backend()
    cl = torch.channels_last
    x = torch.randn(4, 64, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    b = torch.randn(64, device="cuda")
    geo = ([1, 1], [1, 1], [1, 1], 1)
    want = be.conv_bias_act(x, w, b, x, None, None, False, *geo, True)
    dw_want = be.conv_wgrad(want, x, None, None, False, list(w.shape), *geo)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        be.conv_bias_act(x, w, b, x, None, None, False, *geo, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = be.conv_bias_act(x, w, b, x, None, None, False, *geo, True)
        dw = be.conv_wgrad(out, x, None, None, False, list(w.shape), *geo)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want) and torch.equal(dw, dw_want)
