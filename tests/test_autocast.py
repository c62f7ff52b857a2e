"""Fused modules under torch.autocast behave like the torch.nn modules under autocast: the
convolutions run in the autocast dtype, outputs come out in it, BatchNorm statistics and
parameter gradients stay float32, values follow README's low-precision rule (Numerics), and GradScaler
drives a training step the same way."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.functional import unfused
from fusedres.testing import check_against_fp64, step

from helpers import grid, randomise

BACKENDS = [
    b for b, st in fusedres.available_backends().items()
    if st.available and fusedres.backends._device_error(b, torch.device("cpu")) is None
]
DTYPES = [torch.bfloat16, torch.float16]


def _blocks():
    return {
        "basic": lambda be: fusedres.BasicBlock(6, 6, backend=be),
        "bottleneck-project": lambda be: fusedres.Bottleneck(
            8, 3, 2, nn.Sequential(nn.Conv2d(8, 12, 1, 2, bias=False), nn.BatchNorm2d(12)), backend=be
        ),
    }


def _autocast_step(model, x, train, dtype, fused=True):
    with torch.autocast("cpu", dtype=dtype):
        if fused:
            return step(model, x, train)
        with unfused():
            return step(model, x, train)


# default tier: each (backend, block) in one (dtype, mode), turning with both
@pytest.mark.parametrize("backend,block,dtype,train", grid(
    lambda backend, block, dtype, train: dtype * 2 + train == (backend + 2 * block) % 4,
    ids={"dtype": [str(d) for d in DTYPES], "train": ["eval", "train"]},
    backend=BACKENDS, block=list(_blocks()), dtype=DTYPES, train=[False, True]))
def test_block_under_autocast_like_torch(backend, block, dtype, train):
    model = randomise(_blocks()[block](backend))
    torch_model, fp64_model = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(3, model.conv1.in_channels, 9, 9)

    got = _autocast_step(model, x, train, dtype)
    want = _autocast_step(torch_model, x, train, dtype, fused=False)
    with unfused():
        exact = step(fp64_model, x.double(), train)

    # dtypes: what autocast gives the torch.nn modules, entry by entry
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{k}: dtype {got[k].dtype}, torch under autocast gives {want[k].dtype}"
    assert model.bn1.running_mean.dtype == torch.float32 and model.conv1.weight.dtype == torch.float32
    check_against_fp64(got, want, exact, dtype, pool_param_grads=True)


# several interpreted training steps: triton in the heavy tier
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.heavy) if b == "triton" else b for b in BACKENDS])
def test_gradscaler_training_steps_like_torch(backend):
    torch.manual_seed(0)
    model = randomise(nn.Sequential(
        fusedres.ConvBNAct(3, 8, 3, backend=backend), fusedres.BasicBlock(8, 8, backend=backend),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ))
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))

    def run(m, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        # a scale large enough that the first float16 backward overflows: the step is skipped
        # and the scale backs off, so the inf/NaN check on fused gradients is exercised
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
        losses, scales = [], []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                if fused:
                    loss = nn.functional.cross_entropy(m(x), y)
                else:
                    with unfused():
                        loss = nn.functional.cross_entropy(m(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss))
            scales.append(scaler.get_scale())
        return losses, scales

    l_f, s_f = run(model.train(), True)
    l_t, s_t = run(ref.train(), False)
    assert s_f == s_t, f"loss scale {s_f} vs torch {s_t}: an inf/NaN gradient check differs"
    assert s_t[0] < 2.0**24, "the first step was expected to overflow and back off"
    for a, b in zip(l_f, l_t):
        assert abs(a - b) <= 2e-2 * max(1.0, abs(b)), f"losses {l_f} vs torch {l_t}"
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), n
