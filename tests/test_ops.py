"""Primitives: reference semantics vs PyTorch, every registered op through opcheck on every
backend available here."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import ops, reference
from fusedres.testing import assert_close

BACKENDS = [n for n, s in fusedres.available_backends().items() if s.available and n != "cuda"]
GEOM = ([2, 2], [1, 1], [1, 1], 1)


def cpu_backends():
    return [b for b in BACKENDS if fusedres.backends._device_error(b, torch.device("cpu")) is None]


def test_conv_stats_partials_are_batch_statistics():
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    y, p = reference.conv_stats(x, w, None, None, False, *GEOM)
    assert_close(y, F.conv2d(x, w, None, *GEOM), atol=1e-12, rtol=1e-12, name="y")
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    m = y.numel() // y.shape[1]
    assert p.shape == (1, 3, 7)
    assert torch.all(p[0, 0] == m)
    assert_close(p[0, 1], mean, atol=1e-12, rtol=1e-12, name="mean")
    assert_close(p[0, 2], var * m, atol=1e-10, rtol=1e-12, name="M2")


def test_conv_prologue_applies_previous_bn_and_relu_before_padding():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    s, t = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    y, _ = reference.conv_stats(x, w, s, t, True, [1, 1], [1, 1], [1, 1], 1)
    want = F.conv2d(F.relu(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)), w, None, 1, 1)
    assert_close(y, want, atol=1e-12, rtol=1e-12, name="y")


def _tiles(y, sizes):
    """Uneven tiles of rows of the (M, C) matrix of y, as [T, 3, C] partials."""
    flat = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    out, start = [], 0
    for n in sizes:
        chunk = flat[start : start + n]
        start += n
        if n == 0:
            out.append(torch.zeros(3, y.shape[1], dtype=torch.float32))
            continue
        mean = chunk.mean(0)
        out.append(torch.stack([torch.full_like(mean, n), mean, ((chunk - mean) ** 2).sum(0)]).float())
    return torch.stack(out)


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_bn_finalize_chan_merge_matches_batchnorm(momentum):
    y = torch.randn(3, 6, 5, 5, dtype=torch.float64) * 3 + 7
    parts = _tiles(y, [10, 0, 31, 1, 33])
    bn = nn.BatchNorm2d(6, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
    rm, rv = bn.running_mean.float().clone(), bn.running_var.float().clone()
    mean, invstd, scale, shift = reference.bn_finalize(parts, bn.weight.float(), bn.bias.float(), rm, rv, momentum, bn.eps)
    want = bn.train()(y)
    got = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="normalised")
    assert_close(rm, bn.running_mean, atol=1e-6, rtol=1e-6, name="running_mean")
    assert_close(rv, bn.running_var, atol=1e-5, rtol=1e-6, name="running_var")


def test_bn_add_act_dual_and_sample_scale():
    y, r = torch.randn(3, 5, 4, 4, dtype=torch.float64), torch.randn(3, 5, 4, 4, dtype=torch.float64)
    s, t, rs, rt = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    k = torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)
    c, n = (lambda v: v.view(1, -1, 1, 1)), (lambda v: v.view(-1, 1, 1, 1))
    got = reference.bn_add_act(y, s, t, r, rs, rt, k, True)
    assert_close(got, F.relu((y * c(s) + c(t)) * n(k) + r * c(rs) + c(rt)), atol=1e-12, rtol=1e-12, name="out")


def test_bn_backward_primitives_match_autograd():
    y = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    out = F.relu(bn(y))
    dout = torch.randn_like(out)
    out.backward(dout)
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + bn.eps)
    scale, shift = bn.weight.detach() * invstd, bn.bias.detach() - mean * bn.weight.detach() * invstd
    for out_arg in (out.detach(), None):  # mask from the output, or recomputed from y
        sg, sgx = reference.bn_backward_reduce(dout, y.detach(), mean, invstd, scale, shift, out_arg, True, None)
        assert_close(sg, bn.bias.grad, atol=1e-10, rtol=1e-10, name="dbeta")
        assert_close(sgx, bn.weight.grad, atol=1e-10, rtol=1e-10, name="dgamma")
        dy = reference.bn_backward_apply(dout, y.detach(), mean, invstd, scale, shift, out_arg, True, None, sg, sgx)
        assert_close(dy, y.grad, atol=1e-10, rtol=1e-10, name="dy")


def test_conv_grads_match_autograd():
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    geom = ([2, 2], [2, 2], [2, 2], 3)
    y = F.conv2d(x, w, None, *geom)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(reference.conv_dgrad(dy, w.detach(), list(x.shape), *geom), x.grad, atol=1e-10, rtol=1e-10, name="dx")
    assert_close(
        reference.conv_wgrad(dy, x.detach(), None, None, False, list(w.shape), *geom), w.grad, atol=1e-10, rtol=1e-10,
        name="dw",
    )


def test_act_grad_uses_threshold_backward_semantics():
    out = torch.tensor([0.0, 1.0, float("nan"), -0.0])
    dout = torch.tensor([1.0, 2.0, 3.0, 4.0])
    want = torch.ops.aten.threshold_backward(dout, out, 0.0)
    assert torch.equal(reference.act_grad(dout, out), want)


# ---------------------------------------------------------------------------- opcheck


def _samples(dtype, fmt):
    def t(*shape, **kw):
        v = torch.randn(*shape, dtype=dtype)
        return v.contiguous(memory_format=fmt) if v.dim() == 4 else v

    sd = reference.stat_dtype(dtype)
    c = lambda n: torch.rand(n, dtype=sd) + 0.5  # noqa: E731
    x, w = t(2, 5, 7, 7), torch.randn(6, 5, 3, 3, dtype=dtype)
    y = t(2, 6, 4, 4)
    parts = torch.cat([reference.batch_stats(y)] * 2)
    s, sh = c(6), c(6) - 1
    mean, invstd = c(6), c(6)
    return {
        ops.conv_bias_act: [
            (x, w, c(6), t(2, 6, 4, 4), c(5), c(5), True, *GEOM, True),
            (x, w, None, None, None, None, False, *GEOM, False),
        ],
        ops.conv_stats: [(x, w, c(5), c(5), True, *GEOM), (x, w, None, None, False, *GEOM)],
        ops.batch_stats: [(x,)],
        ops.bn_finalize: [(parts, c(6), c(6), torch.zeros(6), torch.ones(6), 0.1, 1e-5), (parts, c(6), c(6), None, None, 0.0, 1e-3)],
        ops.bn_add_act: [
            (y, s, sh, t(2, 6, 4, 4), c(6), c(6), torch.tensor([0.0, 2.0], dtype=sd), True),
            (y, s, sh, None, None, None, None, False),
            (y, s, sh, t(2, 6, 4, 4), None, None, None, True),
        ],
        ops.bn_backward_reduce: [(t(2, 6, 4, 4), y, mean, invstd, s, sh, y.relu(), True, None), (t(2, 6, 4, 4), y, mean, invstd, s, sh, None, True, c(2))],
        ops.bn_backward_apply: [(t(2, 6, 4, 4), y, mean, invstd, s, sh, None, True, None, c(6), c(6), None),
                                (t(2, 6, 4, 4), y, mean, invstd, s, sh, None, True, None, c(6), c(6), t(2, 6, 4, 4))],
        ops.act_grad: [(t(2, 6, 4, 4), y)],
        ops.conv_dgrad: [(y, w, list(x.shape), *GEOM, None), (y, w, list(x.shape), *GEOM, t(*x.shape))],
        ops.conv_wgrad: [(y, x, c(5), c(5), True, list(w.shape), *GEOM), (y, x, None, None, False, list(w.shape), *GEOM)],
        ops.bn_apply_conv_backward: [
            (t(2, 6, 4, 4), y, s, sh, torch.stack([c(6), c(6) - 1, c(6)]), w, x, c(5), c(5), True, *GEOM, True, True,
             None),
            (t(2, 6, 4, 4), y, s, sh, torch.stack([c(6), c(6) - 1, c(6)]), w, x, None, None, False, *GEOM, False, True,
             None),
            (t(2, 6, 4, 4), y, s, sh, torch.stack([c(6), c(6) - 1, c(6)]), w, x, None, None, False, *GEOM, True, False,
             t(*x.shape)),
        ],
    }


def _opcheck_params():
    """Default tier: each backend but triton in one (dtype, layout), turning with the backend;
    the rest, and triton (an opcheck calls each interpreted op several times), heavy."""
    out = []
    for i, b in enumerate(cpu_backends()):
        for j, (dtype, fmt, fid) in enumerate([(torch.float32, torch.contiguous_format, "nchw"),
                                               (torch.float32, torch.channels_last, "nhwc"),
                                               (torch.float64, torch.contiguous_format, "nchw"),
                                               (torch.float64, torch.channels_last, "nhwc")]):
            core = b != "triton" and j == i % 4
            out.append(pytest.param(b, dtype, fmt, id=f"{b}-{dtype}-{fid}", marks=() if core else pytest.mark.heavy))
    return out


@pytest.mark.parametrize("backend,dtype,fmt", _opcheck_params())
def test_opcheck_every_op(backend, dtype, fmt):
    samples = _samples(dtype, fmt)
    assert set(samples) == set(ops.ALL_OPS)
    for op, cases in samples.items():
        for args in cases:
            torch.library.opcheck(op, (*args, backend))


CONV_CASES = [  # (N, C, H, W, K, kernel, stride, padding, dilation, groups)
    (1, 3, 11, 11, 5, 7, 2, 3, 1, 1),
    (2, 7, 5, 6, 13, 3, 1, 1, 1, 1),
    (3, 6, 9, 8, 9, 3, 2, 2, 2, 3),
    (2, 5, 7, 7, 3, 1, 2, 0, 1, 1),
    (2, 16, 6, 6, 16, 3, 1, 1, 1, 16),
]


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="cpu backend not built")
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue", ["bias", "bias+relu", "residual+relu", "residual", "none"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_cpu_conv_bias_act_matches_reference(case, epilogue, dtype, layout):
    n, c, h, w, k, r, s, p, d, g = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, 2 * w if layout == "noncontig" else w, generator=gen)
    x = (x[..., ::2] if layout == "noncontig" else x).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(k, c // g, r, r, generator=gen).to(dtype)
    bias = torch.randn(k, generator=gen) if "bias" in epilogue else None
    ho = (h + 2 * p - d * (r - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (r - 1) - 1) // s + 1
    res = torch.randn(n, k, ho, wo, generator=gen).to(dtype) if "residual" in epilogue else None
    args = (x, wt, bias, res, None, None, False, [s, s], [p, p], [d, d], g, "relu" in epilogue)
    got = fusedres.backends.CpuBackend.conv_bias_act(*args)
    want = reference.conv_bias_act(*args)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(got, want, atol=tol * (c * r * r) ** 0.5, rtol=tol, name="out")


class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing but makes every call observed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_training_step_crosses_the_dispatcher_once_per_primitive(backend):
    """In a training step nothing observes, the block's Functions call each backend
    implementation directly (the kernel's own op is the one crossing): no fusedres:: op
    runs, and the results are bit for bit those of the custom ops (forced by a dispatch
    mode)."""
    if not fusedres.available_backends()[backend].available:
        pytest.skip(f"{backend} not available")
    from torch.profiler import ProfilerActivity, profile

    def step(model, x):
        x = x.clone().requires_grad_()
        y = model(x)
        y.square().sum().backward()
        return [y, x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())

    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 6, 1, 2, bias=False), nn.BatchNorm2d(6))
    make = lambda: fusedres.BasicBlock(4, 6, 2, ds, backend=backend).train()  # noqa: E731
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 6, 6)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = step(a, x)
    names = {e.name for e in prof.events()}
    assert not {n for n in names if n.startswith("fusedres::")}, sorted(names)
    if backend == "cpu":
        assert "fusedres_ext::bn_add_act" in names and "fusedres_ext::bn_backward_reduce" in names
    with _Passthrough():
        want = step(b, x)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), i
