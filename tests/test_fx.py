"""torch.fx: fused modules are leaves of symbolic tracing, so torchvision's feature extraction
(create_feature_extractor, get_graph_node_names) works on fused and converted models and the
extracted graph runs the fused modules."""

import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

import fusedres
from fusedres.testing import assert_close
from helpers import randomise
from tv import import_feature_extraction, load_timm, load_torchvision_resnet

tvr = load_torchvision_resnet()
fe = import_feature_extraction()

RETURN = {"layer1": "f1", "layer3": "f3", "layer4": "f4"}


CASES = [("built", "resnet18"), ("built", "resnet50"), ("converted", "resnet18")]


def _pair(how, name):
    """(fused model, torchvision model with the same state), float64: a fusedres builder
    loaded from torchvision's state_dict, or fusedres.convert of the torchvision model."""
    tv = randomise(getattr(tvr, name)(num_classes=10)).double()
    if how == "converted":
        return fusedres.convert(tv, backend="reference"), tv
    fused = getattr(fusedres, name)(num_classes=10, backend="reference").double()
    fused.load_state_dict(tv.state_dict())
    return fused, tv


@pytest.mark.parametrize("how, name", CASES)
def test_graph_node_names_are_module_paths(how, name):
    fused, tv = _pair(how, name)
    train_nodes, eval_nodes = fe.get_graph_node_names(fused)
    assert train_nodes == eval_nodes
    _, tv_nodes = fe.get_graph_node_names(tv)
    blocks = [n for n, m in fused.named_modules() if isinstance(m, (fusedres.BasicBlock, fusedres.Bottleneck))]
    # torchvision's nodes with each block's inner nodes (layer1.0.conv1, ..., layer1.0.relu_2)
    # collapsed into one node named by the block's path
    want = []
    for n in tv_nodes:
        block = next((b for b in blocks if n == b or n.startswith(b + ".")), None)
        if block is None:
            want.append(n)
        elif block not in want:
            want.append(block)
    assert eval_nodes == want


@pytest.mark.parametrize(
    "how, name, train",
    [("built", "resnet18", False), ("built", "resnet18", True), ("converted", "resnet18", True),
     ("built", "resnet50", False)],
    ids=["built-resnet18-eval", "built-resnet18-train", "converted-resnet18-train", "built-resnet50-eval"],
)
def test_feature_extractor_matches_torchvision(how, name, train, op_counter):
    """Features, input and parameter gradients (ResNet-18; the backward of a float64
    ResNet-50 costs seconds on a CPU) and the running statistics of the fused model's
    extractor equal those of torchvision's, in float64."""
    fused, tv = _pair(how, name)
    ext_f = fe.create_feature_extractor(fused, RETURN).train(train)
    ext_t = fe.create_feature_extractor(tv, RETURN).train(train)
    # the extracted graph calls the fused blocks themselves
    targets = [n.target for n in ext_f.graph.nodes if n.op == "call_module"]
    assert "layer1.0" in targets and "layer4.1" in targets and not any(t.startswith("layer1.0.") for t in targets)
    # four samples in training: layer4's BatchNorms normalise 1x1 maps, and with two samples
    # float64 rounding alone moves the gradients of a ResNet by 1e-5
    x = torch.randn(4 if train else 2, 3, 32, 32, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(name == "resnet18"), x.clone().requires_grad_(name == "resnet18")
    counter = op_counter()
    with counter:
        got = ext_f(xa)
    want = ext_t(xb)
    assert sum(counter.counts.values()) > 0, "the extracted graph did not run the fused ops"
    assert list(got) == list(want) == list(RETURN.values())
    for k in want:
        assert_close(got[k], want[k], atol=1e-10, rtol=1e-8, name=f"feature {k}")
    gen = torch.Generator().manual_seed(1)
    w = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in want.items()}
    if name == "resnet18":
        sum((got[k] * w[k]).sum() for k in w).backward()
        sum((want[k] * w[k]).sum() for k in w).backward()
        assert_close(xa.grad, xb.grad, atol=1e-9, rtol=1e-6, name="x.grad")
        for (n, p), (_, q) in zip(fused.named_parameters(), tv.named_parameters()):
            if q.grad is not None:
                assert_close(p.grad, q.grad, atol=1e-8, rtol=1e-6, name=n)
    for (n, b), (_, c) in zip(fused.named_buffers(), tv.named_buffers()):
        assert_close(b.double(), c.double(), atol=1e-12, rtol=1e-10, name=n)


def test_symbolic_trace_keeps_fused_modules_as_leaves():
    model = randomise(fusedres.resnet18(num_classes=10, backend="reference")).eval()
    gm = torch.fx.symbolic_trace(model)
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv1", "bn1", "relu", "layer1.0", "layer4.1", "fc"} <= leaves
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # the traced stem runs as torch.nn modules, the model's own stem fused: float32 rounding
        assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5, name="traced output")


def test_conv_bn_act_with_residual_and_fused_sequential_are_leaves():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            self.cba = fusedres.ConvBNAct(4, 4, 3, backend="reference")

        def forward(self, x):
            h = self.seq(x)
            return self.cba(h, h) + self.cba(h)

    model = fusedres.convert(randomise(Net()), backend="reference").eval()
    assert isinstance(model.seq, fusedres.FusedSequential)
    gm = torch.fx.symbolic_trace(model)
    calls = [(n.target, len(n.args)) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == [("seq", 1), ("cba", 2), ("cba", 1)]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6, name="traced output")


def test_trace_roots():
    with pytest.raises(TypeError, match="cannot be the root"):
        torch.fx.symbolic_trace(fusedres.BasicBlock(4, 4))
    # a converted nn.Sequential as the root traces as nn.Sequential does, child by child
    seq = fusedres.convert(randomise(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())))
    gm = torch.fx.symbolic_trace(seq.eval())
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(gm(x), seq(x), atol=1e-5, rtol=1e-5, name="traced output")


def test_feature_extractor_of_converted_timm_resnet_d():
    timm = load_timm()
    model = randomise(timm.create_model("resnet50d", pretrained=False, num_classes=10)).double().eval()
    fused = fusedres.convert(model, backend="reference")
    _, nodes = fe.get_graph_node_names(fused)
    # the deep stem (a FusedSequential) and every block are one node each
    assert nodes[:3] == ["x", "conv1", "bn1"] and "layer2.0" in nodes and "layer2.0.conv1" not in nodes
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = fe.create_feature_extractor(fused, {"conv1": "stem", "layer2": "f2"})(x)
        want = fe.create_feature_extractor(model, {"conv1.6": "stem", "layer2": "f2"})(x)
    for k in want:
        assert_close(got[k], want[k], atol=1e-10, rtol=1e-8, name=k)
