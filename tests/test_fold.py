"""The extension's one-pass BatchNorm fold (``fusedres_ext::fold_scale``): the values of
PyTorch's ``(weight.float() * scale.view(-1, 1, 1, 1)).to(dtype)`` bit for bit for every
pair of 16/32-bit types, both weight layouts and special values; ``fold_bn`` uses it only
where nothing observes the call."""

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres import _ext
from fusedres.functional import fold_bn

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="the C++ extension is not built")

TYPES = [torch.float32, torch.bfloat16, torch.float16]
CL = torch.channels_last


def _weight(shape, dtype, seed=0):
    """Random weights with the values that break conversions: NaN, +-inf, -0, subnormals of
    every type, and magnitudes that overflow float16 or round to its subnormals once scaled."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 3
    flat = w.view(-1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-42, 6e-8,
                             -3e-5, 7e4, -6.55e4, 3e38, 1.0000001, 2.0 ** -126])
    n = min(len(specials), flat.numel())
    flat[torch.randperm(flat.numel(), generator=g)[:n]] = specials[:n]
    return w.to(dtype)


def _scale(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(k, generator=g) * 4 - 1
    s[0] = 1e-30
    if k > 2:
        s[1], s[2] = 3e8, -0.0
    return s


def _same(got, want):
    """Equal bits, except that NaNs need only be NaN at the same places."""
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return False
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    return torch.equal(got[~nan].view(bits), want[~nan].view(bits)) and got.stride() == want.stride()


@pytest.mark.parametrize("w_dtype", TYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("out_dtype", TYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fold_scale_is_pytorchs_expression_bit_for_bit(w_dtype, out_dtype, layout):
    for shape in [(64, 32, 3, 3), (7, 3, 7, 7), (1, 5, 1, 1), (33, 17, 1, 1)]:
        w = _weight(shape, w_dtype)
        if layout == "nhwc":
            w = w.contiguous(memory_format=CL)
        s = _scale(shape[0])
        got = torch.ops.fusedres_ext.fold_scale(w, s, out_dtype)
        want = (w.to(torch.float32) * s.view(-1, 1, 1, 1)).to(out_dtype)
        assert got.dtype == out_dtype and _same(got, want), (shape, layout)


def test_fold_scale_checks_its_arguments():
    w, s = torch.randn(4, 3, 3, 3), torch.ones(4)
    with pytest.raises(RuntimeError, match="fold_scale: weight must be contiguous or channels_last"):
        torch.ops.fusedres_ext.fold_scale(w.transpose(0, 1), torch.ones(3), torch.float32)
    with pytest.raises(RuntimeError, match="fold_scale: scale must be a contiguous float32 vector of 4"):
        torch.ops.fusedres_ext.fold_scale(w, torch.ones(3), torch.float32)
    with pytest.raises(RuntimeError, match="fold_scale: scale must be a contiguous float32"):
        torch.ops.fusedres_ext.fold_scale(w, s.double(), torch.float32)
    with pytest.raises(RuntimeError, match="fold_scale: weight must be float32, float16 or bfloat16"):
        torch.ops.fusedres_ext.fold_scale(w.double(), s, torch.float32)
    with pytest.raises(RuntimeError, match="fold_scale: dtype must be float32, float16 or bfloat16"):
        torch.ops.fusedres_ext.fold_scale(w, s, torch.float64)
    assert torch.ops.fusedres_ext.fold_scale(torch.empty(4, 0, 3, 3), s, torch.bfloat16).shape == (4, 0, 3, 3)


def test_fold_scale_opcheck():
    torch.library.opcheck(torch.ops.fusedres_ext.fold_scale.default, (torch.randn(6, 4, 3, 3), torch.rand(6),
                                                                       torch.bfloat16))


def _ran_native(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == "fusedres_ext::fold_scale" for e in prof.events())


@pytest.mark.parametrize("dtype", TYPES, ids=lambda d: str(d)[6:])
def test_fold_bn_uses_it_only_where_nothing_observes(dtype):
    conv, bn = nn.Conv2d(6, 10, 3, bias=False), nn.BatchNorm2d(10).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    conv = conv.to(memory_format=CL)
    with torch.no_grad():
        (w, b), native = _ran_native(lambda: fold_bn(conv, bn, dtype))
    assert native
    # with autograd on, the fold stays PyTorch ops: its gradient reaches the parameters
    (wg, bg), native = _ran_native(lambda: fold_bn(conv, bn, dtype))
    assert not native and wg.requires_grad
    assert torch.equal(w, wg.detach()) and torch.equal(b, bg.detach())
    assert w.stride() == conv.weight.stride()
    wg.float().sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None


def test_frozen_and_unfrozen_models_fold_alike():
    """A no_grad evaluation folds natively whether or not the model is frozen; both equal the
    fold under autograd, so a frozen model's output is the unfrozen one's bit for bit."""
    torch.manual_seed(0)
    model = fusedres.resnet18(num_classes=5, backend="cpu").eval().to(memory_format=CL)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 40, 36).contiguous(memory_format=CL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        fusedres.freeze(model)
        got = model(x)
    assert torch.equal(got, want)
