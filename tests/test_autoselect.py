"""backend="auto" with several fast candidates measures them per block configuration and
caches the fastest (on CUDA: cuda vs triton). Here the mechanism is exercised on CPU with
the cpu and reference backends as the candidates."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres import autoselect
from fusedres.testing import assert_close

from helpers import randomise

pytestmark = pytest.mark.skipif(
    not fusedres.available_backends()["cpu"].available, reason="the C++ extension is not built"
)


@pytest.fixture
def race(monkeypatch):
    """cpu and reference raced on CPU tensors; a fake timer handing out the given times.
    (Training blocks race too: auto's torch.nn choice for CPU training is switched off.)"""
    monkeypatch.setitem(autoselect._CANDIDATES, "cpu", ("cpu", "reference"))
    monkeypatch.setattr(autoselect, "torch_nn_reason", lambda device, train, sync_bn: None)
    autoselect.clear()
    calls = []

    def install(times):
        def timer(fn, device):
            fn()
            calls.append(device)
            return times[(len(calls) - 1) % len(times)]
        monkeypatch.setattr(autoselect, "_time", timer)
        return calls

    yield install
    autoselect.clear()


def _block():
    ds = nn.Sequential(nn.Conv2d(6, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return randomise(fusedres.BasicBlock(6, 8, 2, ds))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("times,winner", [((5.0, 1.0), "reference"), ((1.0, 5.0), "cpu")])
def test_fastest_is_picked_cached_and_side_effect_free(race, train, times, winner):
    calls = race(times)
    auto = _block().train(train)
    fixed = copy.deepcopy(auto)
    fixed.backend = winner
    x = torch.randn(3, 6, 9, 9)
    out = auto(x)
    assert len(calls) == 2, "each candidate is measured once"
    (key, (chosen, ms)), = autoselect.choices().items()
    assert chosen == winner and ms == {"cpu": times[0], "reference": times[1]}
    assert_close(out, fixed(x), atol=1e-6, rtol=1e-6, name="out")
    # the timing runs left no trace: one training step's worth of running statistics
    for (n, a), (_, b) in zip(auto.named_buffers(), fixed.named_buffers()):
        assert torch.equal(a, b), n
    auto(x)
    assert len(calls) == 2, "a configuration seen before is not measured again"
    auto(torch.randn(2, 6, 9, 9))
    assert len(calls) == 4, "a new input shape is a new configuration"


def test_measurement_can_be_switched_off(race, monkeypatch):
    calls = race((1.0, 1.0))
    monkeypatch.setenv("FUSEDRES_AUTO_MEASURE", "0")
    _block()(torch.randn(2, 6, 9, 9))
    assert calls == [] and autoselect.choices() == {}


def test_real_timer_measures_both(monkeypatch):
    monkeypatch.setitem(autoselect._CANDIDATES, "cpu", ("cpu", "reference"))
    autoselect.clear()
    try:
        _block().eval()(torch.randn(2, 6, 9, 9))
        (chosen, ms), = autoselect.choices().values()
        assert chosen in ("cpu", "reference") and set(ms) == {"cpu", "reference"} and min(ms.values()) > 0
    finally:
        autoselect.clear()


def test_nothing_is_measured_while_compiling(race):
    calls = race((1.0, 1.0))
    torch._dynamo.reset()
    block = _block().eval()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5, name="out")
    # the eager call measured once; the traced call took the static order
    assert len(calls) == 2


# ------------------------------------------------------------------ auto in training on CPU: torch.nn


def _step(model, x, seed=0, autocast=False):
    """One training forward and backward from a fixed random state: output, input and
    parameter gradients, buffers."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().mean().backward()
    return [y, x.grad] + [p.grad for p in model.parameters()] + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_auto_trains_on_cpu_through_torch_nn_exactly(autocast):
    model = randomise(fusedres.resnet18(num_classes=10)).to(memory_format=torch.channels_last).train()
    for bn in (model.layer1[0].bn1, model.layer2[0].downsample[1]):
        bn.momentum = None  # a cumulative average, too
    model.layer3[0].drop_path = 0.5  # stochastic depth draws the same samples
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    got = _step(model, x, autocast=autocast)
    with fusedres.functional.unfused():
        want = _step(ref, x, autocast=autocast)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert model.layer1[0].bn1.num_batches_tracked.item() == 1

    ex = fusedres.explain(model, x)
    assert not any(u.fused_calls or u.ops for u in ex.units.values()), str(ex)
    assert all(u.reasons == [autoselect.TORCH_NN_CPU_TRAIN] for u in ex.units.values()), str(ex)
    assert "trains on CPU through torch.nn" in str(ex)


_INPLACE_OR_NOT = ("aten::relu", "aten::relu_", "aten::add", "aten::add_")


def _activation_ops(block, x):
    """How many of each ReLU / add op (in place or not) one training forward of ``block``
    runs on activations (the BatchNorm's num_batches_tracked += 1 left out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        block(x)
    return sorted(e.name for e in prof.events() if e.name in _INPLACE_OR_NOT and len(e.input_shapes[0]) == 4)


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_torch_nn_path_works_in_place_as_torchvision_does(kind):
    """backend="auto" trains on CPU through the block's torch.nn modules: its ReLUs and the
    residual add run in place on the BatchNorms' own outputs exactly where torchvision's block
    does, with the same results; a hook that can keep a BatchNorm's output turns that off."""
    from tv import load_torchvision_resnet

    tvr = load_torchvision_resnet()
    theirs = randomise(getattr(tvr, kind)(16, 16 // (4 if kind == "Bottleneck" else 1))).train()
    mine = randomise(getattr(fusedres, kind)(16, 16 // (4 if kind == "Bottleneck" else 1))).train()
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 6, 5)
    assert _activation_ops(mine, x) == _activation_ops(theirs, x)
    assert "aten::relu_" in _activation_ops(mine, x) and "aten::relu" not in _activation_ops(mine, x)
    torch.manual_seed(0)
    assert torch.equal(mine(x), theirs(x))

    kept = []
    mine.bn1.register_forward_hook(lambda m, i, o: kept.append(o))
    mine(x)
    assert (kept[0] < 0).any(), "a hooked BatchNorm's output was overwritten by the ReLU after it"


def test_explicit_cpu_backend_still_trains_fused_and_eval_stays_on_it():
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fixed = fusedres.resnet18(num_classes=10, backend="cpu").to(memory_format=torch.channels_last)
    ex = fusedres.explain(fixed.train(), x)
    assert all(u.ran_fused and u.backends == ["cpu"] for u in ex.units.values()), str(ex)
    auto = fusedres.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    ex = fusedres.explain(auto.eval(), x)
    assert all(u.ran_fused and u.backends == ["cpu"] for u in ex.units.values()), str(ex)


def test_the_torch_nn_choice_is_cpu_training_outside_tracing_and_sync_bn(monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert autoselect.torch_nn_reason(cpu, True, False) == autoselect.TORCH_NN_CPU_TRAIN
    assert autoselect.torch_nn_reason(cpu, False, False) is None  # eval: the cpu backend
    assert autoselect.torch_nn_reason(cpu, True, True) is None  # sync_bn needs the fused statistics
    assert autoselect.torch_nn_reason(meta, True, False) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autoselect.torch_nn_reason(cpu, True, False) is None  # torch.compile keeps the fused ops
