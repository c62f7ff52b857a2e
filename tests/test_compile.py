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
