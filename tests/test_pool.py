"""The CPU max-pool (``fusedres_ext::max_pool2d``, ``fusedres.blocks.MaxPool2d``) and the
ResNet stem's ReLU in its pass: PyTorch's values bit for bit (NaN, -0, -inf), every storage
dtype, the window shapes a ResNet and its variants use; nn.MaxPool2d wherever the kernel
does not apply; errors that name the argument."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fusedres
from fusedres import _ext
from fusedres.blocks import MaxPool2d

if not _ext.status()["loaded"]:
    pytest.skip(f"fusedres C++ extension not loaded: {_ext.status()['reason']}", allow_module_level=True)

CL = torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_equal(got, want):
    """Equal bit for bit, except that any NaN matches any NaN (PyTorch's 16-bit kernel may
    canonicalise a payload the native one keeps)."""
    if got.shape != want.shape or got.dtype != want.dtype or got.stride() != want.stride():
        return False
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return False
    it = INT[got.element_size()]
    return torch.equal(got.masked_fill(nan, 0).view(it), want.masked_fill(nan, 0).view(it))


def _specials(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    k = max(1, flat.numel() // 20)
    flat[idx[:k]] = float("nan")
    flat[idx[k:2 * k]] = -0.0
    flat[idx[2 * k:3 * k]] = float("-inf")
    flat[idx[3 * k:4 * k]] = float("inf")
    flat[idx[4 * k:5 * k]] = 0.0
    return x.contiguous(memory_format=CL)


# (kernel, stride, padding): the ResNet stem, 2x2 pooling, stride 1, a 1x1 window, an odd one
WINDOWS = [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0)),
           ((5, 3), (3, 2), (2, 1))]


@pytest.mark.parametrize("relu", [False, True], ids=["pool", "relu-pool"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "k{}s{}p{}".format(*(a[0] for a in w)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_max_pool_matches_torch_bit_for_bit(dtype, window, relu):
    k, s, p = window
    for shape in [(2, 13, 17, 15), (1, 64, 9, 8), (3, 5, 4, 3), (1, 45, 7, 9)]:  # 45: a 32-channel chunk and a tail
        x = _specials(shape, dtype)
        got = torch.ops.fusedres_ext.max_pool2d(x, list(k), list(s), list(p), relu)
        want = F.max_pool2d(torch.relu(x) if relu else x, k, s, p)
        assert _bits_equal(got, want), (shape, got, want)


def test_nan_wins_and_minus_zero_keeps_its_sign_as_in_torch():
    # a window whose only non-negative value is -0: relu leaves it, max-pool keeps the first zero
    x = torch.tensor([-1.0, -0.0, -2.0, -3.0]).view(1, 1, 2, 2).contiguous(memory_format=CL)
    x = x.expand(1, 3, 2, 2).contiguous(memory_format=CL)
    for relu in (False, True):
        got = torch.ops.fusedres_ext.max_pool2d(x, [2, 2], [2, 2], [0, 0], relu)
        want = F.max_pool2d(torch.relu(x) if relu else x, 2, 2, 0)
        assert _bits_equal(got, want) and torch.equal(got.signbit(), want.signbit())
    x = torch.tensor([1.0, float("nan"), 5.0, 2.0]).view(1, 1, 2, 2).expand(1, 2, 2, 2).contiguous(memory_format=CL)
    assert torch.ops.fusedres_ext.max_pool2d(x, [2, 2], [2, 2], [0, 0], True).isnan().all()


def test_max_pool_empty_batch_and_errors():
    e = torch.empty(0, 8, 6, 6).contiguous(memory_format=CL)
    assert torch.ops.fusedres_ext.max_pool2d(e, [3, 3], [2, 2], [1, 1], False).shape == (0, 8, 3, 3)
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(RuntimeError, match="max_pool2d: x must be channels_last-contiguous"):
        torch.ops.fusedres_ext.max_pool2d(x, [3, 3], [2, 2], [1, 1], False)
    xc = x.contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="padding must be between 0 and half the kernel size"):
        torch.ops.fusedres_ext.max_pool2d(xc, [3, 3], [2, 2], [2, 2], False)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        torch.ops.fusedres_ext.max_pool2d(xc, [3, 3], [0, 2], [1, 1], False)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        torch.ops.fusedres_ext.max_pool2d(xc.to(torch.int32), [3, 3], [2, 2], [1, 1], False)
    with pytest.raises(RuntimeError, match="is too small for the window"):
        torch.ops.fusedres_ext.max_pool2d(torch.randn(1, 8, 1, 1).contiguous(memory_format=CL), [5, 5], [1, 1],
                                          [0, 0], False)


def test_max_pool_opcheck():
    x = torch.randn(2, 8, 7, 6).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.fusedres_ext.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], True))


def _ran_native(fn, *args):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, any(e.name == "fusedres_ext::max_pool2d" for e in prof.events())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_module_is_nn_maxpool_everywhere(dtype):
    mine, theirs = MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    assert repr(mine) == repr(theirs) and mine.state_dict() == theirs.state_dict()
    x = _specials((2, 16, 11, 10), dtype)
    with torch.no_grad():
        got, native = _ran_native(mine, x)
        assert native and _bits_equal(got, theirs(x))
        got, native = _ran_native(mine.relu_then_pool, x)
        assert native and _bits_equal(got, theirs(torch.relu(x)))
        # not channels_last, ceil mode, dilation: nn.MaxPool2d itself
        xc = x.contiguous()
        got, native = _ran_native(mine, xc)
        assert not native and _bits_equal(got, theirs(xc))
        for kw in (dict(ceil_mode=True), dict(dilation=2)):
            got, native = _ran_native(MaxPool2d(3, 2, 1, **kw), x)
            assert not native and _bits_equal(got, nn.MaxPool2d(3, 2, 1, **kw)(x))
    # under autograd: nn.MaxPool2d, gradients included
    xg = x.detach().clone().requires_grad_()
    got, native = _ran_native(mine, xg)
    assert not native
    got.float().nan_to_num().sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_resnet_stem_relu_in_the_pool_is_bit_for_bit(dtype):
    torch.manual_seed(0)
    model = fusedres.resnet18(num_classes=10).eval().to(dtype=dtype, memory_format=CL)
    x = _specials((2, 3, 40, 36), dtype)
    with torch.no_grad():
        got, native = _ran_native(model, x)
        assert native
        plain = copy.deepcopy(model)
        plain.maxpool = nn.MaxPool2d(3, 2, 1)
        want, native = _ran_native(plain, x)
        assert not native
        assert _bits_equal(got, want)
        # a hook on the max-pool sees the ReLU's output, as in torchvision: no fusion then
        seen = []
        h = model.maxpool.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        got2 = model(x)
        h.remove()
        assert _bits_equal(got2, want) and (seen[0].nan_to_num() >= 0).all()


def test_convert_swaps_nn_maxpool_in_place():
    """fusedres.convert makes a model's nn.MaxPool2d this module in place (hooks and repr
    kept, no state): its evaluation forward then runs the native pass, with nn.MaxPool2d's
    values bit for bit."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.MaxPool2d(3, 2, 1), nn.ReLU())
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused, report = fusedres.convert(model, return_report=True)
    assert type(fused[1]) is MaxPool2d and repr(fused[1]) == repr(model[1])
    assert ("1", "nn.MaxPool2d", "fusedres.MaxPool2d") in report.replaced
    assert type(model[1]) is nn.MaxPool2d  # the copy was converted, not the original
    x = _specials((2, 3, 13, 12), torch.float32).contiguous(memory_format=CL)
    with torch.no_grad():
        got, native = _ran_native(fused, x)
        want = model(x)
    assert native and _bits_equal(got, want) and len(seen) == 2
