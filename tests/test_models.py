"""Builders: torchvision-identical state_dicts and outputs; CIFAR networks of the papers."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.testing import assert_close
from helpers import assert_same_step, randomise
from tv import load_torchvision_resnet

BUILDERS = [n for n in fusedres.models.__all__ if n[0].islower() and n != "cifar_resnet"]


@pytest.fixture(scope="module")
def tvr():
    return load_torchvision_resnet()


def _meta_state(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_keys_and_shapes_equal_torchvision(tvr, name):
    with torch.device("meta"):
        ours, theirs = getattr(fusedres, name)(), getattr(tvr, name)()
    a, b = _meta_state(ours), _meta_state(theirs)
    assert list(a) == list(b)
    assert a == b


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet18", {"num_classes": 7}),
        ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
        pytest.param("resnext50_32x4d", {}, marks=pytest.mark.heavy),
        pytest.param("wide_resnet50_2", {"zero_init_residual": True}, marks=pytest.mark.heavy),
        pytest.param("resnet34", {"groups": 1, "width_per_group": 64}, marks=pytest.mark.heavy),
    ],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_outputs_equal_torchvision_after_loading_its_state_dict(tvr, name, kwargs, train):
    theirs = randomise(getattr(tvr, name)(**kwargs)).double()
    ours = getattr(fusedres, name)(**kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    assert_same_step(ours, theirs, torch.randn(4, 3, 64, 64, dtype=torch.float64), train)
    # and back: torchvision loads what fusedres holds
    theirs2 = getattr(tvr, name)(**kwargs).double()
    theirs2.load_state_dict(ours.state_dict())


def test_zero_init_residual_matches_torchvision(tvr):
    ours, theirs = fusedres.resnet50(zero_init_residual=True), tvr.resnet50(zero_init_residual=True)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        if n.endswith("bn3.weight"):
            assert torch.all(a == 0) and torch.all(b == 0)


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_parameter_counts_match_the_paper(depth, params):
    n = sum(p.numel() for p in fusedres.cifar_resnet(depth).parameters())
    assert abs(n - params) / params < 0.02, n


def test_cifar_1202_builds():
    with torch.device("meta"):
        m = fusedres.cifar_resnet(1202)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(19.4e6, rel=0.01)


def test_cifar_shortcut_options():
    a, b, c = (fusedres.cifar_resnet(20, s) for s in "ABC")
    count = lambda m, t: sum(isinstance(x, t) for x in m.modules())  # noqa: E731
    assert count(a, fusedres.PadShortcut) == 2 and count(b, fusedres.PadShortcut) == 0
    projections = lambda m: sum(isinstance(x, fusedres.BasicBlock) and x.downsample is not None for x in m.modules())  # noqa: E731
    assert projections(b) == 2 and projections(c) == 9
    plain = fusedres.cifar_resnet(20, plain=True)
    assert all(not blk.residual and blk.downsample is None for blk in plain.modules() if isinstance(blk, fusedres.BasicBlock))


def test_cifar_stochastic_depth_linear_decay():
    m = fusedres.cifar_resnet(20, drop_path=0.5)
    rates = [b.drop_path for b in m.modules() if isinstance(b, fusedres.BasicBlock)]
    assert rates == pytest.approx([0.5 * (i + 1) / 9 for i in range(9)])


@pytest.mark.parametrize("kwargs", [{}, {"preact": True}, {"preact": True, "shortcut": "B"}, {"plain": True}, {"shortcut": "C"}])
def test_cifar_variants_train_and_eval(kwargs):
    m = randomise(fusedres.cifar_resnet(8, **kwargs))
    x = torch.randn(2, 3, 16, 16)
    out = m.train()(x)
    out.sum().backward()
    assert out.shape == (2, 10) and all(p.grad is not None for p in m.parameters())
    with torch.no_grad():
        assert m.eval()(x).shape == (2, 10)


def test_preact_net_matches_unfused_modules():
    from fusedres.functional import unfused

    m = randomise(fusedres.cifar_resnet(8, preact=True, shortcut="B")).double()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for train in (True, False):
        y = m.train(train)(x)
        with unfused():
            yr = ref.train(train)(x)
        assert_close(y, yr, atol=1e-10, rtol=1e-8, name=f"logits train={train}")
