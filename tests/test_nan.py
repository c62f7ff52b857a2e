"""NaN and Inf propagate exactly as through the unfused torch.nn modules: the same elements
are NaN, the same are +Inf / -Inf, and the finite ones agree, for outputs, gradients and
running statistics, on every backend available here."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.functional import unfused

from helpers import randomise

BACKENDS = [
    b for b, st in fusedres.available_backends().items()
    if st.available and fusedres.backends._device_error(b, torch.device("cpu")) is None
]


def _blocks():
    ds = nn.Sequential(nn.Conv2d(5, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return {
        "basic": lambda be: fusedres.BasicBlock(5, 5, backend=be),
        "bottleneck-project": lambda be: fusedres.Bottleneck(5, 2, 2, copy.deepcopy(ds), backend=be),
        "conv-bn-relu": lambda be: fusedres.ConvBNAct(5, 7, 3, padding=1, backend=be),
    }


def assert_same_specials(got, want, name, atol=1e-4, rtol=1e-4):
    got, want = got.detach().double(), want.detach().double()
    nan_g, nan_w = got.isnan(), want.isnan()
    assert torch.equal(nan_g, nan_w), (
        f"{name}: NaN at {int((nan_g & ~nan_w).sum())} elements where the reference is not NaN, "
        f"and missing at {int((nan_w & ~nan_g).sum())} (reference has {int(nan_w.sum())} NaN)"
    )
    for sign in (1, -1):
        inf_g, inf_w = got == sign * float("inf"), want == sign * float("inf")
        assert torch.equal(inf_g, inf_w), (
            f"{name}: {'+' if sign > 0 else '-'}Inf differs at {int((inf_g ^ inf_w).sum())} elements "
            f"(reference has {int(inf_w.sum())})"
        )
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _poisoned_input(kind, shape=(2, 5, 7, 7)):
    x = torch.randn(shape)
    if kind == "nan":
        x[0, 1, 3, 3] = float("nan")
    elif kind == "inf":
        x[0, 2, 1, 5] = float("inf")
        x[1, 0, 4, 2] = -float("inf")
    return x


def _run(model, x, train):
    model.train(train)
    xi = x.clone().requires_grad_(train)
    out = model(xi)
    res = {"out": out}
    if train:
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        res["x.grad"] = xi.grad
        res.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
        res.update(dict(model.named_buffers()))
    return res


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("block", list(_blocks()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_specials_propagate_like_torch(backend, block, kind, train):
    model = randomise(_blocks()[block](backend))
    ref_model = copy.deepcopy(model)
    x = _poisoned_input(kind)
    got = _run(model, x, train)
    with unfused():
        want = _run(ref_model, x, train)
    assert want["out"].isnan().any() or torch.isinf(want["out"]).any(), "the test input must poison the output"
    for name in want:
        assert_same_specials(got[name], want[name], f"{backend}/{block}/{kind}: {name}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_nan_from_the_residual(backend, train):
    # the NaN reaches the ReLU only through the residual, so the fused add + ReLU alone
    # decides whether it survives (a plain max(v, 0) returns 0 for NaN on most hardware)
    model = randomise(fusedres.ConvBNAct(4, 4, 3, backend=backend)).train(train)
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    r[1, 3, 2, 4] = float("nan")
    with torch.no_grad():
        out = model(x, r)
    assert out[1, 3, 2, 4].isnan(), "NaN from the residual was lost in the fused add + ReLU"
    assert int(out.isnan().sum()) == 1
