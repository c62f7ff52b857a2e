"""pytest-benchmark suite: every distinct ResNet-18 / ResNet-50 block configuration, eager
PyTorch (the same modules run unfused) against each fusedres backend usable on the device.

    pytest benchmarks/ --benchmark-json=out.json [--benchmark-group-by=param:block]

CPU defaults are small (batch 2, spatial sizes divided by 4); on CUDA set
FUSEDRES_BENCH_BATCH=256 FUSEDRES_BENCH_SCALE=1 for the real shapes.
"""

import contextlib
import os

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.blocks import conv1x1
from fusedres.functional import unfused

BATCH = int(os.environ.get("FUSEDRES_BENCH_BATCH", "2"))
SCALE = int(os.environ.get("FUSEDRES_BENCH_SCALE", "4"))


def _ds(cin, cout, stride):
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# (name, builder, channels, spatial at 224x224 input)
BLOCKS = [
    ("r18.basic.64", lambda: fusedres.BasicBlock(64, 64), 64, 56),
    ("r18.basic.128/2", lambda: fusedres.BasicBlock(64, 128, 2, _ds(64, 128, 2)), 64, 56),
    ("r18.basic.256", lambda: fusedres.BasicBlock(256, 256), 256, 14),
    ("r50.bottleneck.64-proj", lambda: fusedres.Bottleneck(64, 64, 1, _ds(64, 256, 1)), 64, 56),
    ("r50.bottleneck.64", lambda: fusedres.Bottleneck(256, 64), 256, 56),
    ("r50.bottleneck.128/2", lambda: fusedres.Bottleneck(256, 128, 2, _ds(256, 512, 2)), 256, 56),
    ("r50.bottleneck.256", lambda: fusedres.Bottleneck(1024, 256), 1024, 14),
    ("r50.bottleneck.512", lambda: fusedres.Bottleneck(2048, 512), 2048, 7),
]


def _providers():
    out = ["eager"]
    dev = torch.device(os.environ.get("FUSEDRES_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    for name, st in fusedres.available_backends().items():
        if st.available and fusedres.backends._device_error(name, dev) is None:
            out.append(f"fusedres-{name}")
    return out


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("block", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block(benchmark, timed, device, block, provider, mode):
    name, build, cin, hw = block
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = build().to(device, dtype).to(memory_format=torch.channels_last).train(mode == "train")
    if provider != "eager":
        fusedres.set_backend(m, provider.split("-", 1)[1])
    size = max(hw // SCALE, 2)
    x = torch.randn(BATCH, cin, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    ctx = unfused if provider == "eager" else contextlib.nullcontext
    benchmark.extra_info.update(block=name, provider=provider, mode=mode, batch=BATCH, hw=size, dtype=str(dtype))

    if mode == "infer":
        def fn():
            with ctx(), torch.no_grad():
                m(x)
    else:
        xg = x.detach().requires_grad_()

        def fn():
            with ctx():
                m(xg).sum().backward()

    timed(fn)
