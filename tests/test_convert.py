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


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "resnext50_32x4d", pytest.param("wide_resnet50_2", marks=pytest.mark.heavy)]
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convert_torchvision_model(tvr, name, train):
    model = randomise(getattr(tvr, name)(num_classes=10)).double().train(train)
    fused, report = fusedres.convert(model, return_report=True)
    n_blocks = sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())
    stages = [r for r in report.replaced if r[2] == "fusedres.FusedStage"]
    pools = [r for r in report.replaced if r[2] == "fusedres.MaxPool2d"]
    assert [p for p, _, _ in pools] == ["maxpool"] and type(fused.maxpool) is fusedres.blocks.MaxPool2d
    assert len(report.replaced) - len(stages) - len(pools) == n_blocks
    assert [p for p, _, _ in stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(type(getattr(fused, p)) is fusedres.FusedStage for p, _, _ in stages)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_step(fused, model, torch.randn(4, 3, 32, 32, dtype=torch.float64), train)


@pytest.mark.skipif(not fusedres.available_backends()["cpu"].available, reason="the C++ extension is not built")
def test_converted_stages_hand_outputs_on_in_a_no_grad_forward(tvr):
    """torchvision's ResNet-50 converted for the cpu backend: a no_grad channels_last forward
    (where each stage hands block outputs on) gives torchvision's result, and the input is
    left as it was."""
    model = randomise(tvr.resnet50(num_classes=10)).eval().to(memory_format=torch.channels_last)
    fused = fusedres.convert(model, backend="cpu")
    x = torch.randn(2, 3, 48, 40).contiguous(memory_format=torch.channels_last)
    x0 = x.clone()
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert torch.equal(x, x0)
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="converted resnet50, no_grad")


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


def _sequential():
    return randomise(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8),  # conv with bias: left alone
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4),  # no ReLU after
        nn.AdaptiveAvgPool2d(1),
    ))


def test_convert_sequential_runs_and_leaves_others(op_counter):
    model = _sequential()
    # the backend "auto" resolves to, named: auto itself trains through torch.nn on CPU
    be = fusedres.backends.resolve("auto", torch.device("cpu"))
    fused, report = fusedres.convert(model, backend=be, return_report=True)
    assert [r[0] for r in report.replaced] == ["0", "5"]
    assert report.skipped == [("3", "conv has a bias")]
    # the Sequential itself becomes a FusedSequential; its children stay where they were
    assert type(fused) is fusedres.FusedSequential
    assert [type(m) for m in fused] == [type(m) for m in model]
    x = torch.randn(2, 3, 6, 6)
    for train in (True, False):
        m, f = copy.deepcopy(model).train(train), copy.deepcopy(fused).train(train)
        counter = op_counter()
        with counter:
            got = f(x)
        assert counter.counts["conv_bias_act"] + counter.counts["conv_stats"] == 2, dict(counter.counts)
        assert_close(got, m(x), atol=1e-5, rtol=1e-5, name=f"out train={train}")
        for (n, b), (_, c) in zip(f.named_buffers(), m.named_buffers()):
            assert_close(b.double(), c.double(), atol=1e-6, rtol=1e-6, name=n)
    assert "FusedSequential" in str(report)


def test_convert_inplace_keeps_the_sequential_object():
    model = _sequential()
    weight = model[0].weight
    fused = fusedres.convert(model, inplace=True)
    assert fused is model and type(model) is fusedres.FusedSequential and model[0].weight is weight


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "sequential"])
def test_converted_keys_are_the_originals_and_load_both_ways(tvr, name):
    """state_dict (keys, order, shapes, values), named_parameters / named_buffers (what
    optimizers, DDP and weight-decay filters read) and named_modules are unchanged, and
    checkpoints load both ways with strict=True."""
    model = _sequential() if name == "sequential" else randomise(getattr(tvr, name)(num_classes=10))
    fused = fusedres.convert(model)
    for what in ("named_parameters", "named_buffers", "named_modules"):
        assert [n for n, _ in getattr(fused, what)()] == [n for n, _ in getattr(model, what)()], what
    sd, fsd = model.state_dict(), fused.state_dict()
    assert list(fsd) == list(sd)
    for k in sd:
        assert torch.equal(fsd[k], sd[k]), k
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            t.add_(1)
    fused.load_state_dict(other.state_dict(), strict=True)  # original -> converted
    got = fused.state_dict()
    for k, v in other.state_dict().items():
        assert torch.equal(got[k], v), k
    model.load_state_dict(fusedres.convert(other).state_dict(), strict=True)  # converted -> original
    got = model.state_dict()
    for k, v in other.state_dict().items():
        assert torch.equal(got[k], v), k
    # an optimizer's state follows the same parameters in the same order
    opt_a = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert [p.shape for g in opt_a.param_groups for p in g["params"]] == [
        p.shape for g in opt_b.param_groups for p in g["params"]
    ]


def test_hooks_on_a_fused_run_see_torch_nn_values():
    model = _sequential().eval()
    fused = fusedres.convert(model)
    seen = {"nn": [], "fused": []}
    model[1].register_forward_hook(lambda m, i, o: seen["nn"].append(o.clone()))
    model[2].register_forward_hook(lambda m, i, o: seen["nn"].append(o.clone()))
    fused[1].register_forward_hook(lambda m, i, o: seen["fused"].append(o.clone()))
    fused[2].register_forward_hook(lambda m, i, o: seen["fused"].append(o.clone()))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5, name="output")
    assert len(seen["fused"]) == len(seen["nn"]) == 2
    for a, b in zip(seen["fused"], seen["nn"]):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name="hooked value")
    ex = fusedres.explain(fused, x)
    assert ex.units["0"].reasons == ["BatchNorm2d carries a forward hook"] and ex.units["5"].ran_fused, str(ex)


def test_subclass_with_own_forward_is_not_converted(tvr):
    class MyBlock(tvr.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(MyBlock(4, 4))
    fused, report = fusedres.convert(m, return_report=True)
    assert report.replaced == [] and type(fused[0]) is MyBlock
