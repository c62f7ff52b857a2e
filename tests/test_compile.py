"""torch.compile traces fused blocks with no graph breaks and gives the same results."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.testing import assert_close


def _block():
    ds = nn.Sequential(nn.Conv2d(6, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return fusedres.BasicBlock(6, 8, 2, ds)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_block_fullgraph_matches_eager(train, compile_backend):
    torch._dynamo.reset()
    eager = _block().train(train)
    comp_mod = copy.deepcopy(eager)
    compiled = torch.compile(comp_mod, fullgraph=True, backend=compile_backend)
    x = torch.randn(2, 6, 8, 8)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    assert_close(yc, ye, atol=1e-5, rtol=1e-5, name="out")
    if train:
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5, name="x.grad")
        for (n, p), (_, q) in zip(comp_mod.named_parameters(), eager.named_parameters()):
            assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, name=n)
        for (n, b), (_, c) in zip(comp_mod.named_buffers(), eager.named_buffers()):
            assert_close(b, c, atol=1e-6, rtol=1e-6, name=n)


@pytest.mark.heavy
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_whole_resnet50_compiles_fullgraph(train):
    # aot_eager traces forward and backward through every fused op exactly as inductor
    # does, without inductor's (slow on CPU) code generation for a model of this size
    torch._dynamo.reset()
    # the backend "auto" resolves to, named: auto itself trains through torch.nn on CPU in
    # eager but keeps the fused ops under torch.compile, and batch 2 at 32² leaves layer4's
    # BatchNorms two values per channel, where the two computations' roundings diverge
    be = fusedres.backends.resolve("auto", torch.device("cpu"))
    eager = fusedres.resnet50(num_classes=10, backend=be).train(train)
    comp_mod = copy.deepcopy(eager)
    compiled = torch.compile(comp_mod, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    ye, yc = eager(x), compiled(x)
    assert_close(yc, ye, atol=1e-4, rtol=1e-4, name="out")
    if train:
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (n, p), (_, q) in zip(comp_mod.named_parameters(), eager.named_parameters()):
            assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, name=n)
        for (n, b), (_, c) in zip(comp_mod.named_buffers(), eager.named_buffers()):
            assert_close(b, c, atol=1e-5, rtol=1e-5, name=n)


def test_export_eval_resnet50():
    model = fusedres.resnet50(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    fused_ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "fusedres" in str(n.target)}
    assert fused_ops, "the exported graph holds no fusedres op: the blocks were not exported fused"
    with torch.no_grad():
        want = model(x)
        got = ep.module()(x)
        x2 = torch.randn(2, 3, 32, 32)
        assert_close(ep.module()(x2), model(x2), atol=1e-5, rtol=1e-5, name="out (new input)")
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="out")
