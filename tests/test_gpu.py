"""GPU tier: every GPU backend on ResNet-18/50 layer shapes in fp32/bf16/fp16, forward,
backward and running statistics, against the same modules run through torch.nn in the same
dtype and in float64 (the DESIGN §3 rule), and a 20-step ResNet-18 training run. Skipped
without a CUDA device."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.testing import check_against_fp64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    st = fusedres.available_backends()
    return [b for b in ("triton", "cuda") if st[b].available]


def _proj(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


# every distinct block configuration of ResNet-18 and ResNet-50 at 224x224 (spatial size of
# the block input); batch 32
R18 = [
    ("r18-l1", lambda: fusedres.BasicBlock(64, 64), (32, 64, 56, 56)),
    ("r18-l2-down", lambda: fusedres.BasicBlock(64, 128, 2, _proj(64, 128, 2)), (32, 64, 56, 56)),
    ("r18-l3", lambda: fusedres.BasicBlock(256, 256), (32, 256, 14, 14)),
    ("r18-l4-down", lambda: fusedres.BasicBlock(256, 512, 2, _proj(256, 512, 2)), (32, 256, 14, 14)),
]
R50 = [
    ("r50-l1-first", lambda: fusedres.Bottleneck(64, 64, 1, _proj(64, 256, 1)), (32, 64, 56, 56)),
    ("r50-l1", lambda: fusedres.Bottleneck(256, 64), (32, 256, 56, 56)),
    ("r50-l2-down", lambda: fusedres.Bottleneck(256, 128, 2, _proj(256, 512, 2)), (32, 256, 56, 56)),
    ("r50-l3", lambda: fusedres.Bottleneck(1024, 256), (32, 1024, 14, 14)),
    ("r50-l4-down", lambda: fusedres.Bottleneck(1024, 512, 2, _proj(1024, 2048, 2)), (32, 1024, 14, 14)),
    ("r50-l4", lambda: fusedres.Bottleneck(2048, 512), (32, 2048, 7, 7)),
]
CASES = R18 + R50


def _run(module, x, train, g):
    module.train(train)
    xi = x.detach().clone().requires_grad_(train)
    if train:
        out = module(xi)
        out.backward(g.to(out.dtype))
        res = {"out": out.detach(), "x.grad": xi.grad}
        res.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    else:
        with torch.no_grad():
            res = {"out": module(xi)}
    res.update({n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return res


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", _gpu_backends())
def test_block_on_gpu_within_2x_of_torch(backend, case, dtype, train):
    _, build, shape = case
    torch.manual_seed(0)
    base = build()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(shape, device="cuda")
    fused = fusedres.set_backend(copy.deepcopy(base), backend).to("cuda", dtype).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(base).to("cuda", dtype).to(memory_format=torch.channels_last)
    ref64 = copy.deepcopy(base).to("cuda", torch.float64)
    xl = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out_shape = fusedres.set_backend(copy.deepcopy(base), "reference").to("cuda").eval()(x[:1]).shape
    g = torch.randn((shape[0],) + tuple(out_shape[1:]), device="cuda", dtype=torch.float64)
    with fusedres.functional.unfused():
        want = _run(ref, xl, train, g)
        want64 = _run(ref64, x.double(), train, g)
    got = _run(fused, xl, train, g)
    assert got["out"].is_contiguous(memory_format=torch.channels_last)
    check_against_fp64(got, want, want64, dtype)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_resnet18_training_20_steps_matches_torch(backend):
    """20 SGD steps of ResNet-18 on random data, bf16 autocast-free storage, fused vs torch.nn
    from the same weights and data: per-step losses within the DESIGN §3 rule."""
    torch.manual_seed(0)
    base = fusedres.resnet18(num_classes=10)
    data = [(torch.randn(32, 3, 64, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")) for _ in range(4)]

    def train(model, dtype, fused):
        model = model.to("cuda", dtype).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses = []
        for step in range(20):
            xb, yb = data[step % len(data)]
            xb = xb.to(dtype).contiguous(memory_format=torch.channels_last)
            if fused:
                loss = nn.functional.cross_entropy(model(xb).float(), yb)
            else:
                with fusedres.functional.unfused():
                    loss = nn.functional.cross_entropy(model(xb).float(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64)

    ours = train(fusedres.set_backend(copy.deepcopy(base), backend), torch.bfloat16, True)
    theirs = train(copy.deepcopy(base), torch.bfloat16, False)
    exact = train(copy.deepcopy(base), torch.float64, False)
    err_ours = (ours - exact).abs().max().item()
    err_theirs = (theirs - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs + 0.05, (err_ours, err_theirs)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_more_than_2_31_elements_on_gpu(backend):
    # N*H*W*C = 2**31 + 2**27 in bfloat16 (4.3 GiB per tensor): a 1x1 conv-BN-ReLU in eval
    # (fused conv epilogue) and the BatchNorm kernels; the last samples, whose offsets pass
    # 2**31, are checked against cuDNN on just those samples
    n, c, h, w = 136, 64, 512, 480
    assert n * c * h * w > 2**31
    torch.cuda.empty_cache()
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    m = fusedres.ConvBNAct(c, c, 1, backend=backend).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5), m.bn.running_var.uniform_(0.5, 1.5)
        out = m(x)
        with fusedres.functional.unfused():
            want = m(x[-2:])
        torch.testing.assert_close(out[-2:], want, atol=5e-2, rtol=2e-2)
        del out
        be = fusedres.backends.get(backend)
        part = be.batch_stats(x)
        mean = fusedres.reference.merge_partials(part)[1]
        torch.testing.assert_close(mean.float(), x.float().mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-3)
        s, t = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        y = be.bn_add_act(x, s, t, None, None, None, None, True)
        ref_tail = torch.relu(x[-2:].float() * s[:, None, None] + t[:, None, None]).to(torch.bfloat16)
        torch.testing.assert_close(y[-2:], ref_tail, atol=1e-2, rtol=1e-2)
