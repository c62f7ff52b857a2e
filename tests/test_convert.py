"""convert(): real torchvision models in train and eval give identical results when fused."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.testing import assert_close
from helpers import assert_same_step, randomise
from tv import load_torchvision_resnet


@pytest.fixture(scope="module")
def tvr():
    return load_torchvision_resnet()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convert_torchvision_model(tvr, name, train):
    model = randomise(getattr(tvr, name)(num_classes=10)).double().train(train)
    fused, report = fusedres.convert(model, return_report=True)
    n_blocks = sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())
    assert len(report.replaced) == n_blocks
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_step(fused, model, torch.randn(4, 3, 64, 64, dtype=torch.float64), train)


def test_convert_inplace_shares_tensors(tvr):
    model = tvr.resnet18()
    w = model.layer1[0].conv1.weight
    fused = fusedres.convert(model, inplace=True)
    assert fused is model and isinstance(model.layer1[0], fusedres.BasicBlock)
    assert model.layer1[0].conv1.weight is w


def test_convert_copy_leaves_original(tvr):
    model = tvr.resnet18()
    fused = fusedres.convert(model, backend="reference")
    assert type(model.layer1[0]).__name__ == "BasicBlock" and type(model.layer1[0]) is not fusedres.BasicBlock
    assert fused.layer1[0].backend == "reference"


def test_convert_sequential_runs_and_leaves_others():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8),  # conv with bias: left alone
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4),  # no ReLU after
        nn.AdaptiveAvgPool2d(1),
    )
    randomise(model)
    fused, report = fusedres.convert(model, return_report=True)
    assert [r[0] for r in report.replaced] == ["0", "5"]
    assert report.skipped == [("3", "conv has a bias")]
    assert isinstance(fused[0], fusedres.ConvBNAct) and fused[0].act and not fused[5].act
    x = torch.randn(2, 3, 6, 6)
    for train in (True, False):
        m, f = copy.deepcopy(model).train(train), copy.deepcopy(fused).train(train)
        assert_close(f(x), m(x), atol=1e-5, rtol=1e-5, name=f"out train={train}")
    assert "ConvBNAct" in str(report)


def test_subclass_with_own_forward_is_not_converted(tvr):
    class MyBlock(tvr.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(MyBlock(4, 4))
    fused, report = fusedres.convert(m, return_report=True)
    assert report.replaced == [] and type(fused[0]) is MyBlock
