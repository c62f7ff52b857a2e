"""Fused blocks vs plain torch.nn, forward and backward, train and eval, adversarial shapes."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.autograd import ChainSpec, ConvGeom, PostActBlock, PreActBlock
from fusedres.blocks import conv1x1
from fusedres.testing import assert_close, check_against_fp64
from helpers import grid, randomise
from nn_reference import reference_for


def proj(cin, cout, stride, bn=True):
    return nn.Sequential(conv1x1(cin, cout, stride), *([nn.BatchNorm2d(cout)] if bn else []))


# (id, builder, input shape); odd and prime channel counts, stride 2, 7x7, groups, dilation
BLOCKS = [
    ("cba-7x7s2-prime", lambda: fusedres.ConvBNAct(3, 5, 7, stride=2), (2, 3, 11, 11)),
    ("cba-3x3-noact", lambda: fusedres.ConvBNAct(7, 13, 3, act=False), (3, 7, 5, 6)),
    ("cba-groups3-dil2-s2", lambda: fusedres.ConvBNAct(6, 9, 3, stride=2, dilation=2, groups=3), (2, 6, 9, 8)),
    ("cba-1x1s2", lambda: fusedres.ConvBNAct(5, 3, 1, stride=2), (1, 5, 7, 7)),
    ("basic-identity", lambda: fusedres.BasicBlock(5, 5), (2, 5, 6, 7)),
    ("basic-proj-s2", lambda: fusedres.BasicBlock(7, 11, 2, proj(7, 11, 2)), (3, 7, 9, 9)),
    ("basic-batch1", lambda: fusedres.BasicBlock(3, 3), (1, 3, 5, 5)),
    ("basic-plain", lambda: fusedres.BasicBlock(4, 6, 2, residual=False), (2, 4, 8, 8)),
    ("basic-padA", lambda: fusedres.BasicBlock(4, 6, 2, fusedres.PadShortcut(4, 6, 2)), (2, 4, 7, 7)),
    ("bottleneck-identity", lambda: fusedres.Bottleneck(12, 3), (2, 12, 5, 5)),
    ("bottleneck-proj-s2", lambda: fusedres.Bottleneck(13, 3, 2, proj(13, 12, 2)), (3, 13, 7, 7)),
    ("resnext-g4-s2", lambda: fusedres.Bottleneck(16, 8, 2, proj(16, 32, 2), groups=4, base_width=16), (2, 16, 6, 6)),
    ("bottleneck-dil2", lambda: fusedres.Bottleneck(16, 4, 1, None, dilation=2), (2, 16, 7, 7)),
    ("preact-identity", lambda: fusedres.PreActBasicBlock(5, 5), (2, 5, 6, 6)),
    ("preact-proj-s2", lambda: fusedres.PreActBasicBlock(5, 7, 2, proj(5, 7, 2, bn=False)), (3, 5, 7, 7)),
    ("preact-padA", lambda: fusedres.PreActBasicBlock(4, 6, 2, fusedres.PadShortcut(4, 6, 2)), (2, 4, 6, 6)),
    ("preact-plain", lambda: fusedres.PreActBasicBlock(3, 3, residual=False), (2, 3, 5, 5)),
]
IDS = [b[0] for b in BLOCKS]
CPU_BACKENDS = [
    n for n, st in fusedres.available_backends().items()
    if st.available and fusedres.backends._device_error(n, torch.device("cpu")) is None
]


def make_input(shape, dtype, layout, seed=1):
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontig":
        n, c, h, w = shape
        return torch.randn(n, c, h, 2 * w, generator=g, dtype=torch.float64)[..., ::2].to(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def run(module, fn, x, train, seed=2):
    """Forward (+ backward of a seeded random gradient) collecting everything comparable."""
    module.train(train)
    xi = x.detach().clone().requires_grad_(train)
    if train:
        xi.retain_grad()
    out = fn(xi)
    res = {"out": out.detach()}
    if train:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out.backward(g.to(out.dtype))
        res["x.grad"] = xi.grad
        res.update({f"{n}.grad": p.grad for n, p in module.named_parameters() if p.grad is not None})
    res.update({n: b.detach().clone() for n, b in module.named_buffers()})
    return res, out


def fused_and_ref(build, shape, dtype, layout, train, seed=0, backend="auto"):
    m = fusedres.set_backend(randomise(build(), seed).to(dtype), backend)
    if layout == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(m)
    x = make_input(shape, dtype, layout)
    got, out = run(m, m, x, train)
    want, _ = run(ref, lambda t: reference_for(ref)(ref, t), x, train)
    return got, want, out


LAYOUTS = ["contiguous", "channels_last", "noncontig"]
MODES = [True, False]
MODE_IDS = ["train", "eval"]
LOW = [torch.float32, torch.bfloat16, torch.float16]


# default tier: each (backend, block, mode) in one layout, the layout turning with the block;
# the interpreted triton backend in one mode per block, alternating
_TRITON = CPU_BACKENDS.index("triton") if "triton" in CPU_BACKENDS else -1


@pytest.mark.parametrize("backend,case,layout,train", grid(
    lambda backend, case, layout, train: layout == (case + train) % 3 and (backend != _TRITON or train == case % 2),
    ids={"case": IDS, "train": MODE_IDS}, backend=CPU_BACKENDS, case=BLOCKS, layout=LAYOUTS, train=MODES))
def test_block_matches_torch_nn_float64(backend, case, layout, train):
    _, build, shape = case
    got, want, out = fused_and_ref(build, shape, torch.float64, layout, train, backend=backend)
    assert set(got) == set(want)
    for k in want:
        if want[k].is_floating_point():
            assert_close(got[k], want[k], atol=1e-10, rtol=1e-8, name=k)
        else:
            assert torch.equal(got[k], want[k]), k
    if layout == "channels_last" and out.shape[2] * out.shape[3] > 1 and out.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


# default tier: each (backend, block) in one (mode, dtype), turning with the block and backend
@pytest.mark.parametrize("backend,case,train,dtype", grid(
    lambda backend, case, train, dtype: train * 3 + dtype == (case + backend) % 6,
    ids={"case": IDS, "train": MODE_IDS}, backend=CPU_BACKENDS, case=BLOCKS, train=MODES, dtype=LOW))
def test_block_low_precision_within_2x_of_torch(backend, case, train, dtype):
    """err(fused vs fp64) <= 2 * err(torch in the same dtype vs fp64) + slack."""
    _, build, shape = case
    got, want, _ = fused_and_ref(build, shape, dtype, "channels_last", train, backend=backend)
    want64, _ = fused_and_ref_ref64(build, shape, train)
    check_against_fp64(got, want, want64, dtype)


def fused_and_ref_ref64(build, shape, train):
    m = randomise(build(), 0)
    ref = copy.deepcopy(m).double()
    x = make_input(shape, torch.float64, "contiguous")
    return run(ref, lambda t: reference_for(ref)(ref, t), x, train)


def test_fused_path_is_taken(op_counter):
    # the backend "auto" resolves to, named: auto itself trains through torch.nn on CPU
    be = fusedres.backends.resolve("auto", torch.device("cpu"))
    b = randomise(fusedres.Bottleneck(8, 2, 2, proj(8, 8, 2), backend=be))
    x = torch.randn(2, 8, 6, 6)
    with op_counter() as c:
        b.train()(x).sum().backward()
    assert c.counts["conv_stats"] == 4 and c.counts["bn_finalize"] == 4 and c.counts["bn_add_act"] == 1
    # the two inner BatchNorm applies run inside the next conv's dgrad/wgrad
    assert c.counts["conv_wgrad"] == 2 and c.counts["bn_apply_conv_backward"] == 2
    assert c.counts["bn_backward_reduce"] == 4 and c.counts["bn_backward_apply"] == 2
    with op_counter() as c, torch.no_grad():
        b.eval()(x)
    assert dict(c.counts) == {"conv_bias_act": 4}


def test_train_output_saves_no_normalised_activations():
    b = randomise(fusedres.BasicBlock(4, 4, backend=fusedres.backends.resolve("auto", torch.device("cpu"))))
    out = b.train()(torch.randn(2, 4, 5, 5, requires_grad=True))
    assert type(out.grad_fn).__name__ == "PostActBlockBackward"


@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
def test_running_stats_over_steps(momentum):
    b = randomise(fusedres.Bottleneck(6, 3, 2, proj(6, 12, 2)))
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    ref = copy.deepcopy(b)
    for step in range(3):
        x = torch.randn(2 + step, 6, 5, 5)
        b.train()(x)
        reference_for(ref)(ref.train(), x)
    for (n, t), (_, u) in zip(b.named_buffers(), ref.named_buffers()):
        if t.is_floating_point():
            assert_close(t, u, atol=1e-6, rtol=1e-5, name=n)
        else:
            assert torch.equal(t, u), n
    assert int(b.bn1.num_batches_tracked) == 3


def test_bn_without_affine_or_tracking():
    norm = lambda c: nn.BatchNorm2d(c, affine=False, track_running_stats=False)  # noqa: E731
    b = fusedres.BasicBlock(4, 4, norm_layer=norm)
    ref = copy.deepcopy(b)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float32)
    for train in (True, False):
        got, _ = run(b, b, x, train)
        want, _ = run(ref, lambda t: reference_for(ref)(ref, t), x, train)
        for k in want:
            assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, name=k)


def test_mixed_bn_modes_fall_back_to_modules():
    b = randomise(fusedres.BasicBlock(4, 4)).train()
    b.bn1.eval()  # a frozen BatchNorm inside a training block
    ref = copy.deepcopy(b)
    x = torch.randn(2, 4, 5, 5)
    out = b(x)
    want = reference_for(ref)(ref, x)
    assert_close(out, want, atol=1e-5, rtol=1e-5, name="out")


def test_non_batchnorm_norm_layer_runs_unfused():
    b = fusedres.BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c))
    x = torch.randn(2, 4, 5, 5)
    assert_close(b(x), reference_for(b)(b, x), atol=1e-6, rtol=1e-6, name="out")


def test_drop_path_matches_scaled_reference():
    b = randomise(fusedres.BasicBlock(4, 4, drop_path=0.5)).double()
    ref = copy.deepcopy(b)
    sample = torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64)
    b._sample_scale = lambda x: sample
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    got, _ = run(b, b, x, True)
    want, _ = run(ref, lambda t: reference_for(ref)(ref, t, sample), x, True)
    for k in want:
        assert_close(got[k], want[k], atol=1e-10, rtol=1e-8, name=k)


def test_drop_path_sampling_and_eval_identity():
    b = fusedres.BasicBlock(4, 4, drop_path=0.25).train()
    s = torch.stack([b._sample_scale(torch.empty(64, 4, 1, 1)) for _ in range(50)])
    assert set(s.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs(s.mean().item() - 1.0) < 0.05
    assert b.eval()._sample_scale(torch.empty(4, 4, 1, 1)) is None


def test_eval_fold_cache_invalidation():
    b = randomise(fusedres.BasicBlock(4, 4)).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        b(x)
        b.bn1.weight.mul_(2.0)  # in-place parameter edit
        assert_close(b(x), reference_for(b)(b, x), atol=1e-6, rtol=1e-6, name="after in-place edit")
        b.bn2.running_var.fill_(3.0)  # buffer edit
        assert_close(b(x), reference_for(b)(b, x), atol=1e-6, rtol=1e-6, name="after buffer edit")
        other = randomise(fusedres.BasicBlock(4, 4), seed=5)
        b.load_state_dict(other.state_dict())
        assert_close(b(x), reference_for(b)(b, x), atol=1e-6, rtol=1e-6, name="after load_state_dict")
        b.conv2.weight = nn.Parameter(torch.randn_like(b.conv2.weight))  # replaced parameter
        assert_close(b(x), reference_for(b)(b, x), atol=1e-6, rtol=1e-6, name="after replacing a parameter")
        b.double()
        xd = x.double()
        assert_close(b(xd), reference_for(b)(b, xd), atol=1e-10, rtol=1e-8, name="after .double()")


def test_eval_mode_gradients_flow_to_weights():
    """Frozen-BN fine-tuning: eval mode with gradients w.r.t. input, conv weights and BN affine."""
    b = randomise(fusedres.Bottleneck(8, 2, 2, proj(8, 8, 2))).double().eval()
    ref = copy.deepcopy(b)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    got, _ = run(b, lambda t: b.train(False)(t), x, False)
    xi, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    b(xi).square().sum().backward()
    reference_for(ref)(ref, xr).square().sum().backward()
    assert_close(xi.grad, xr.grad, atol=1e-10, rtol=1e-8, name="x.grad")
    for (n, p), (_, q) in zip(b.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-8, name=n)


def test_empty_batch_matches_torch():
    b = randomise(fusedres.BasicBlock(4, 4))
    x = torch.randn(0, 4, 5, 5)
    for train in (False, True):
        b.train(train)
        assert b(x).shape == (0, 4, 5, 5)


# ---------------------------------------------------------------- gradcheck of the Functions


def _spec(preact, n, shortcut, ds=None, relu=True, groups=1):
    g1 = ConvGeom((1, 1), (1, 1), (1, 1), groups)
    return ChainSpec(preact, (g1,) * n, (1e-5,) * n, (0.0,) * n, shortcut, ds, 1e-5, 0.0, relu, "reference")


def _params(cs, preact, ds_out=None, ds_bn=True):
    ps = []
    for cin, cout in cs:
        c_bn = cin if preact else cout
        ps += [
            torch.randn(cout, cin, 3, 3, dtype=torch.float64, requires_grad=True),
            (torch.rand(c_bn, dtype=torch.float64) + 0.5).requires_grad_(),
            (torch.rand(c_bn, dtype=torch.float64) - 0.5).requires_grad_(),
            None,
            None,
        ]
    if ds_out is not None:
        cin = cs[0][0]
        w = torch.randn(ds_out, cin, 1, 1, dtype=torch.float64, requires_grad=True)
        if ds_bn:
            ps += [w, (torch.rand(ds_out, dtype=torch.float64) + 0.5).requires_grad_(),
                   (torch.rand(ds_out, dtype=torch.float64) - 0.5).requires_grad_(), None, None]
        else:
            ps += [w, None, None, None, None]
    return ps


GC = [
    ("post-identity", False, [(3, 3), (3, 3)], "identity", None),
    ("post-project", False, [(3, 4), (4, 4)], "project", ConvGeom((2, 2), (0, 0), (1, 1), 1)),
    ("post-none-1unit", False, [(3, 4)], "none", None),
    ("post-tensor", False, [(3, 3), (3, 3)], "tensor", None),
    ("pre-identity", True, [(3, 3), (3, 3)], "identity", None),
    ("pre-project", True, [(3, 4), (4, 4)], "project", ConvGeom((1, 1), (0, 0), (1, 1), 1)),
]


# fast gradcheck (a random projection of the Jacobian) by default, the full one in the heavy tier
@pytest.mark.parametrize("fast", [pytest.param(True, id="fast"), pytest.param(False, id="full", marks=pytest.mark.heavy)])
@pytest.mark.parametrize("with_sample", [False, True], ids=["", "drop_path"])
@pytest.mark.parametrize("case", GC, ids=[c[0] for c in GC])
def test_gradcheck_block_functions(case, with_sample, fast):
    _, preact, cs, shortcut, ds = case
    spec = _spec(preact, len(cs), shortcut, ds, relu=not preact)
    if ds is not None and ds.stride == (2, 2):
        spec = ChainSpec(False, (ConvGeom((2, 2), (1, 1), (1, 1), 1), spec.convs[1]), spec.eps, spec.factors,
                         shortcut, ds, 1e-5, 0.0, True, "reference")
    params = _params(cs, preact, cs[-1][1] if ds is not None else None, ds_bn=not preact)
    x = torch.randn(2, cs[0][0], 4, 4, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) if shortcut == "tensor" else None
    sample = torch.tensor([0.0, 1.5], dtype=torch.float64) if with_sample else None
    fn = PreActBlock if preact else PostActBlock
    tensors = [x, res] + [p for p in params if p is not None]

    def f(x, res, *flat):
        it = iter(flat)
        full = [next(it) if p is not None else None for p in params]
        return fn.apply(spec, x, res, sample, *full)

    inputs = tuple(t for t in tensors if t is not None) if res is not None else (x,) + tuple(p for p in params if p is not None)
    if res is None:
        assert torch.autograd.gradcheck(lambda x, *flat: f(x, None, *flat), inputs, atol=1e-6, rtol=1e-5,
                                        fast_mode=fast)
    else:
        assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5, fast_mode=fast)


def test_gradcheck_conv_bias_act_with_prologue():
    from fusedres import ops

    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, r, s, t):
        return ops.conv_bias_act(x, w, b, r, s, t, True, [2, 2], [1, 1], [1, 1], 1, True, "reference")

    assert torch.autograd.gradcheck(f, (x, w, b, r, s, t), atol=1e-6, rtol=1e-5)
