"""Identical inputs give bitwise-identical outputs, gradients and running statistics, run
after run, on every backend available here (all reductions are fixed-order: no atomics)."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres

BACKENDS = [
    b for b, st in fusedres.available_backends().items()
    if st.available and fusedres.backends._device_error(b, torch.device("cpu")) is None
]


def _step(model, x, g):
    model.train()
    xi = x.clone().requires_grad_()
    out = model(xi)
    out.backward(g)
    res = [out.detach(), xi.grad]
    res += [p.grad for p in model.parameters()]
    res += [b.clone() for b in model.buffers()]
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_is_bitwise_reproducible(backend, dtype):
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(6, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    base = fusedres.set_backend(fusedres.Bottleneck(6, 2, 2, ds), backend).to(dtype)
    base = base.to(memory_format=torch.channels_last)
    x = torch.randn(3, 6, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 8, 4, 4, dtype=dtype)
    a = _step(copy.deepcopy(base), x, g)
    b = _step(copy.deepcopy(base), x, g)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"entry {i} differs between two identical runs"
