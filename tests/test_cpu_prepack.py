"""The cpu backend's inference convolutions: frozen models (fusedres.freeze) use weights
pre-packed into oneDNN's blocked layout for channels_last inputs, cached per input shape;
results equal the reference, and a version bump is still seen."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.backends import CpuBackend
from fusedres.testing import assert_close

from helpers import randomise

pytestmark = pytest.mark.skipif(
    not fusedres.available_backends()["cpu"].available, reason="the C++ extension is not built"
)


def _pair(block):
    model = randomise(block).eval()
    ref = copy.deepcopy(model)
    model.backend, ref.backend = "cpu", "reference"
    return model, ref


def _bottleneck():
    ds = nn.Sequential(nn.Conv2d(12, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return fusedres.Bottleneck(12, 4, 2, ds)


@pytest.mark.parametrize("make", [lambda: fusedres.BasicBlock(6, 6), _bottleneck], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_prepacked_inference_matches_reference(make, channels_last):
    model, ref = _pair(make())
    fusedres.freeze(model)
    CpuBackend._packed.clear()
    for shape in [(2, 0, 9, 9), (3, 0, 9, 9), (2, 0, 9, 9), (1, 0, 6, 7)]:
        x = torch.randn(shape[0], model.conv1.in_channels, *shape[2:])
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            got, want = model(x), ref(x)
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"output {list(x.shape)}")
    assert (len(CpuBackend._packed) > 0) == channels_last, "packing should happen for channels_last only"


def test_one_pixel_activations_are_packed_too():
    """A small image leaves layer4 with 1x1 activations, which are NCHW- and NHWC-contiguous at
    once; with NHWC strides every frozen convolution still gets its packed weight (unpacked,
    such a conv ran ten times slower) and the result is the unfrozen model's bit for bit."""
    model = _small_resnet("resnet18")
    want_model = copy.deepcopy(model)
    fusedres.freeze(model)
    CpuBackend._packed.clear()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # layer4: 1x1
    with torch.no_grad():
        got, want = model(x), want_model(x)
    assert torch.equal(got, want)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(CpuBackend._packed) == len(convs), "a frozen convolution ran on an unpacked weight"


def test_frozen_16bit_forward_casts_no_bias():
    """The folded float32 bias in the activations' dtype is kept with the packed weight: a
    frozen bfloat16 forward casts no per-channel vector, and equals an unfrozen one."""
    if torch.bfloat16 not in CpuBackend._onednn_dtypes():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    from torch.profiler import ProfilerActivity, profile

    model = _small_resnet("resnet18")
    want_model = copy.deepcopy(model)
    fusedres.freeze(model)
    x = torch.randn(2, 3, 40, 36).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            got = model(x)
        want = want_model(x)
    casts = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy" and len(e.input_shapes[0]) == 1]
    assert casts == []
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_channels_last_strides_rule_is_atens(fmt):
    """The backend's reading of an ambiguous tensor's layout is Tensor.suggest_memory_format's."""
    from torch._prims_common import suggest_memory_format

    from fusedres.backends.cpu import _nhwc_strides

    seen = 0
    for shape in [(n, c, h, w) for n in (1, 2) for c in (1, 2, 5) for h in (1, 3) for w in (1, 3)]:
        t = torch.empty(shape).contiguous(memory_format=fmt)
        for v in (t, t[:, :, :, :1], t[:, :, :1, :]):
            if v.is_contiguous(memory_format=torch.channels_last):
                seen += 1
                assert _nhwc_strides(v) == (suggest_memory_format(v) == torch.channels_last), (shape, v.stride())
    assert seen > 20


def test_weight_update_invalidates_the_packed_copy():
    model, ref = _pair(fusedres.BasicBlock(6, 6))
    fusedres.freeze(model)
    x = torch.randn(2, 6, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        before = model(x)
        for m in (model, ref):
            m.conv2.weight.mul_(-2.0)  # in place: same tensor, new version
            m.bn1.running_var.add_(1.0)
        after, want = model(x), ref(x)
    assert not torch.allclose(before, after)
    assert_close(after, want, atol=1e-5, rtol=1e-5, name="output after the weight update")


def test_a_round_trip_through_to_is_seen():
    """.to(bfloat16).to(float32) leaves the weights rounded, at the same version, in a new
    storage that could take the address the fold was made from: the frozen cache keeps its
    storages alive, so the data pointer still tells the round trip apart."""
    torch.manual_seed(0)
    model, ref = _pair(fusedres.BasicBlock(6, 6))
    fusedres.freeze(model)
    x = torch.randn(2, 6, 8, 8).to(memory_format=torch.channels_last)
    for _ in range(3):
        with torch.no_grad():
            model(x)
        for m in (model, ref):
            for p in m.parameters():
                p.data.mul_(1.0 + 2.0 ** -5)  # off the bfloat16 grid again
            m.to(torch.bfloat16).to(torch.float32)
        with torch.no_grad():
            assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5, name="output after the round trip")


def test_no_packing_when_gradients_are_needed():
    model, ref = _pair(fusedres.BasicBlock(6, 6))
    fusedres.freeze(model)
    CpuBackend._packed.clear()
    x = torch.randn(2, 6, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    out = model(x)  # eval mode, autograd on: weights stay differentiable
    out.sum().backward()
    assert len(CpuBackend._packed) == 0
    xr = x.detach().clone().requires_grad_()
    ref(xr).sum().backward()
    assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5, name="x.grad")
    assert_close(model.conv1.weight.grad, ref.conv1.weight.grad, atol=1e-4, rtol=1e-4, name="conv1.weight.grad")


@pytest.mark.parametrize("res_layout", ["nchw", "nhwc", "strided", "float64"])
@pytest.mark.parametrize("relu", [False, True])
def test_residual_is_accumulated_into_a_copy(res_layout, relu):
    # the residual add runs as oneDNN's in-place sum post-op: it must write a copy, never
    # the caller's residual, whatever its layout or dtype
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6).to(memory_format=torch.channels_last)
    w = torch.randn(7, 5, 3, 3)
    b = torch.randn(7)
    res = torch.randn(2, 7, 4, 8)
    if res_layout == "nhwc":
        res = res.to(memory_format=torch.channels_last)
    elif res_layout == "strided":
        res = torch.randn(2, 7, 4, 16)[..., ::2]
    elif res_layout == "float64":
        res = res.double()
    keep = res.clone()
    geom = ([2, 1], [1, 2], [1, 1], 1)
    with torch.no_grad():
        got = CpuBackend.conv_bias_act(x, w, b, res, None, None, False, *geom, relu)
    want = fusedres.reference.conv_bias_act(x, w, b, res, None, None, False, *geom, relu)
    assert torch.equal(res, keep), "the caller's residual was modified"
    assert got.dtype == x.dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="conv + bias + residual")



def test_an_owned_residual_is_accumulated_in_place():
    # residual_owned=True (a block's own projection output): no copy, same values
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6).to(memory_format=torch.channels_last)
    w, b = torch.randn(7, 5, 1, 1), torch.randn(7)
    res = torch.randn(2, 7, 7, 6).to(memory_format=torch.channels_last)
    want = fusedres.reference.conv_bias_act(x, w, b, res, None, None, False, [1, 1], [0, 0], [1, 1], 1, True)
    with torch.no_grad():
        got = CpuBackend.conv_bias_act(x, w, b, res, None, None, False, [1, 1], [0, 0], [1, 1], 1, True,
                                       residual_owned=True)
    assert got.data_ptr() == res.data_ptr(), "an owned residual should be reused as the output"
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="conv + bias + owned residual")

class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_inference_calls_skip_the_dispatcher_only_when_nothing_observes_them():
    # under no_grad the blocks call the backend directly (no custom-op dispatch per conv);
    # an active dispatch mode, autograd or tracing still sees the fusedres ops
    model, ref = _pair(fusedres.BasicBlock(6, 6))
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        direct = model(x)
        log = _OpLog()
        with log:
            observed = model(x)
    assert any("fusedres.conv_bias_act" in op for op in log.ops), log.ops
    assert torch.equal(direct, observed)
    graded = model(x)  # eval, autograd on: the custom op and its autograd formula
    assert graded.requires_grad
    assert_close(direct, graded.detach(), atol=1e-5, rtol=1e-5, name="no_grad vs grad-enabled output")
    assert_close(direct, ref(x).detach(), atol=1e-5, rtol=1e-5, name="output")


# ----------------------------------------------------------------- stages hand outputs on


def _owned_log(monkeypatch):
    """Every cpu conv_bias_act call's residual_owned and residual data pointer."""
    log = []
    real = CpuBackend.conv_bias_act.__func__

    def spy(cls, *args, residual_owned=False):
        log.append((residual_owned, None if args[3] is None else args[3].data_ptr()))
        return real(cls, *args, residual_owned=residual_owned)

    monkeypatch.setattr(CpuBackend, "conv_bias_act", classmethod(spy))
    return log


def _small_resnet(builder="resnet50"):
    torch.manual_seed(0)
    m = randomise(getattr(fusedres, builder)(num_classes=7, backend="cpu")).eval()
    return m.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("builder", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("frozen", [False, True], ids=["", "frozen"])
def test_stage_hands_each_output_to_the_next_identity_block_bitwise(monkeypatch, builder, dtype, frozen):
    """In a no_grad forward each identity block after the first of a stage accumulates into
    its input (the block before's output) instead of a copy; the result is nn.Sequential's
    bit for bit and the model's input is never written."""
    if dtype == "bfloat16" and torch.bfloat16 not in CpuBackend._onednn_dtypes():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    model = _small_resnet(builder)
    if frozen:
        fusedres.freeze(model)
    x = torch.randn(2, 3, 40, 36).contiguous(memory_format=torch.channels_last)
    x0 = x.clone()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad(), amp:
        monkeypatch.setattr(fusedres.FusedStage, "forward", nn.Sequential.forward)
        want = model(x)
        monkeypatch.undo()
        log = _owned_log(monkeypatch)
        got = model(x)
    assert torch.equal(got, want)
    assert torch.equal(x, x0)
    identity_after_first = sum(
        1 for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in list(stage)[1:]
    )
    assert sum(1 for owned, _ in log if owned) == identity_after_first + 4 * (builder == "resnet50") + 3 * (
        builder == "resnet18"
    )  # + each stage's projection output (owned by its own block)


def _handed_on(monkeypatch, model, x, grad=False):
    """How many more convolutions accumulate into an owned residual with the stages handing
    outputs on than as nn.Sequential (the projections' own outputs are owned in both)."""
    counts = []
    for forward in (nn.Sequential.forward, fusedres.FusedStage.forward):
        with monkeypatch.context() as mp:
            mp.setattr(fusedres.FusedStage, "forward", forward)
            log = _owned_log(mp)
            with torch.set_grad_enabled(grad):
                model(x)
        counts.append(sum(1 for owned, _ in log if owned))
    return counts[1] - counts[0]


def test_stage_hands_nothing_on_when_a_hook_could_hold_an_output(monkeypatch):
    model = _small_resnet()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert _handed_on(monkeypatch, model, x) == 12  # every identity block after a stage's first
    kept = []
    handle = model.layer1[0].register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    assert _handed_on(monkeypatch, model, x) == 11  # layer1[1] gets a copy of the hooked output
    for out, copy_then in kept:
        assert torch.equal(out, copy_then), "a hooked block's output was overwritten by the block after it"
    handle.remove()
    g = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert _handed_on(monkeypatch, model, x) == 0
    finally:
        g.remove()
    assert _handed_on(monkeypatch, model, x, grad=True) == 0
