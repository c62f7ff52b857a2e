"""The triton backend's own behaviour: partial statistics over several tiles, the split
wgrad reduction, and a compiled block on its kernels. Its numerics against the reference,
primitive by primitive, are tests/test_conformance.py's. Without a GPU the kernels run on
CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one, on
the GPU."""

import pytest
import torch

import fusedres
from cases import CONVS, DEVICE, close, conv_case
from fusedres import backends
from fusedres import reference as R
from fusedres.testing import assert_close

_ST = fusedres.available_backends()["triton"]
if not _ST.available:
    pytest.skip(f"triton backend not available: {_ST.reason}", allow_module_level=True)

T = backends.get("triton")


def test_stats_use_several_tiles():
    # the merge of several tiles (and a partial last tile) is exercised by the shapes above
    x, wt, s, t, geom = conv_case(CONVS[0], torch.float64)
    y, part = T.conv_stats(x, wt, None, None, False, *geom)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    assert part.shape[0] > 1
    assert torch.equal(part[:, 0].sum(0), torch.full_like(part[0, 0], m))


def test_wgrad_split_reduction_matches():
    # enough output pixels that the reduction is split in several chunks
    case = ("big-m", 3, 4, 12, 12, 5, 3, 1, 1, 1, 1, "channels_last")
    x, wt, s, t, geom = conv_case(case, torch.float64)
    dy = torch.randn(3, 5, 12, 12, dtype=torch.float64, device=DEVICE)
    close(T.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom),
          R.conv_wgrad(dy, x, s, t, True, list(wt.shape), *geom), torch.float64, "dw")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_block_on_triton_fullgraph(train):
    import copy

    import torch.nn as nn

    torch._dynamo.reset()
    ds = nn.Sequential(nn.Conv2d(5, 6, 1, 2, bias=False), nn.BatchNorm2d(6))
    eager = fusedres.set_backend(fusedres.BasicBlock(5, 6, 2, ds), "triton").to(DEVICE).train(train)
    comp_mod = copy.deepcopy(eager)
    compiled = torch.compile(comp_mod, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 6, 6, device=DEVICE)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    assert_close(yc, ye, atol=1e-5, rtol=1e-5, name="out")
    if train:
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5, name="x.grad")
        for (n, b), (_, c) in zip(comp_mod.named_buffers(), eager.named_buffers()):
            assert_close(b, c, atol=1e-6, rtol=1e-6, name=n)
