"""What a training step on the ``cuda`` backend runs, checked without a GPU.

The cuda backend's tables run on CPU tensors here: its extension ops (BatchNorm kernels) take
their CPU implementations, which share the CUDA kernels' operands and math, and the CUTLASS
convolutions are replaced by recording fakes that compute the reference convolution where
the support predicate (the real one, ``conv_support.h``) takes the call. The fusedres custom
ops are bypassed (each primitive calls the backend table directly) so that a dispatch mode
sees every ATen op the table runs, including those inside a reference fallback. The step
must then run every primitive natively in the supported cases (16-bit, channels_last,
channels a multiple of 8) and no ATen op that moves data on an activation-sized tensor.
"""

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusedres
from fusedres import _ext, backends, ops, reference
from fusedres.backends import _cutlass

from helpers import randomise

if not _ext.status()["loaded"]:
    pytest.skip(f"fusedres C++ extension not loaded: {_ext.status()['reason']}", allow_module_level=True)

BATCH = 3  # no weight, bias or statistics tensor of these models has 3 as its first size

# ATen ops that allocate or change metadata only: no pass over an activation's data
NO_DATA_PASS = {
    "detach", "view", "_unsafe_view", "alias", "as_strided", "expand", "permute", "t", "transpose", "unsqueeze",
    "squeeze", "select", "slice", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
}


class _Recorder(TorchDispatchMode):
    """ATen ops touching an activation-shaped tensor ([BATCH, C, H, W]) outside the fakes'
    reference convolutions, and every fusedres_ext op."""

    def __init__(self):
        super().__init__()
        self.inside_fake = 0
        self.aten = collections.Counter()
        self.ext = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace == "fusedres_ext":
            self.ext[name] += 1
        elif func.namespace == "aten" and not self.inside_fake and name not in NO_DATA_PASS:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(t.dim() == 4 and t.shape[0] == BATCH for t in tensors):
                self.aten[name] += 1
        return out


class _FakeCutlass:
    """Stands in for ``fusedres.backends._cutlass`` on CPU tensors: the real support predicate,
    the reference convolution as the kernel, a count per kernel kind."""

    fprop_reason = staticmethod(_cutlass.fprop_reason)
    dgrad_reason = staticmethod(_cutlass.dgrad_reason)
    wgrad_reason = staticmethod(_cutlass.wgrad_reason)

    def __init__(self, recorder):
        self.rec = recorder
        self.calls = collections.Counter()

    @contextlib.contextmanager
    def _kernel(self, kind):
        self.calls[kind] += 1
        self.rec.inside_fake += 1
        try:
            yield
        finally:
            self.rec.inside_fake -= 1

    def conv_bias_act(self, x, w, bias, residual, s, t, stride, padding, dilation, relu):
        with self._kernel("fprop" if s is None else "fprop+prologue"):
            return reference.conv_bias_act(x, w, bias, residual, s, t, s is not None, stride, padding, dilation, 1,
                                           relu)

    def conv_stats(self, x, w, s, t, stride, padding, dilation):
        with self._kernel("conv_stats" if s is None else "conv_stats+prologue"):
            y, _ = reference.conv_stats(x, w, s, t, s is not None, stride, padding, dilation, 1)
            return y, reference.batch_stats(y)

    def conv_dgrad(self, dy, w, input_shape, stride, padding, dilation, addend=None):
        with self._kernel("dgrad" if addend is None else "dgrad+shortcut"):
            return reference.conv_dgrad(dy, w, input_shape, stride, padding, dilation, 1, addend)

    def conv_wgrad(self, dy, x, s, t, weight_shape, stride, padding, dilation):
        with self._kernel("wgrad" if s is None else "wgrad+prologue"):
            return reference.conv_wgrad(dy, x, s, t, s is not None, weight_shape, stride, padding, dilation, 1)


@pytest.fixture
def cuda_tables_on_cpu(monkeypatch):
    """(recorder, fake CUTLASS): the cuda backend resolvable for CPU tensors, its CUTLASS
    kernels faked, every fusedres primitive calling its backend table directly."""
    rec = _Recorder()
    fake = _FakeCutlass(rec)
    monkeypatch.setattr(backends.CudaBackend, "_cutlass", staticmethod(lambda: fake))
    real_resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda b, d: "cuda" if b == "cuda" else real_resolve(b, d))
    for name in backends.PRIMITIVES:
        call = (lambda *a, _n=name: getattr(backends.get(a[-1]), _n)(*a[:-1]))
        monkeypatch.setattr(ops, name, call)
        monkeypatch.setattr(ops.direct, name, call)
    return rec, fake


def _body(arch, backend, dtype, channels_last, seed=0):
    torch.manual_seed(seed)
    m = randomise(getattr(fusedres, arch)(backend=backend), seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    body = torch.nn.Sequential(m.layer1, m.layer2, m.layer3, m.layer4)
    return body.to(dtype=dtype, memory_format=fmt).train()


def _step(body, x, dout):
    """Forward and backward of ``body`` on a leaf copy of x made before any recording."""
    out = body(x)
    torch.autograd.backward(out, dout)
    return out, x.grad


# (model, blocks, projection shortcuts, convolutions per block)
MODELS = [("resnet18", 8, 3, 2), ("resnet50", 16, 4, 3)]


@pytest.mark.parametrize("prologue", ["exact", "fused"])
@pytest.mark.parametrize("arch,blocks,projections,convs", MODELS, ids=[m[0] for m in MODELS])
def test_training_step_runs_no_eager_pass_in_the_supported_cases(cuda_tables_on_cpu, monkeypatch, arch, blocks,
                                                                 projections, convs, prologue):
    rec, fake = cuda_tables_on_cpu
    monkeypatch.setenv("FUSEDRES_CUDA_PROLOGUE", prologue)
    dt, cl = torch.bfloat16, torch.channels_last
    body = _body(arch, "cuda", dt, True)
    x = torch.randn(BATCH, 64, 16, 16).to(dt, memory_format=cl)
    dout = torch.randn_like(body(x.clone())).contiguous(memory_format=cl)
    x = x.clone().requires_grad_()
    fake.calls.clear()
    with rec:
        _step(body, x, dout)
    assert dict(rec.aten) == {}, f"ATen passes over activations: {dict(rec.aten)}"
    n_convs = blocks * convs + projections
    inner = blocks * (convs - 1)  # convolutions whose input is the previous BatchNorm+ReLU
    fused = prologue == "fused"
    # every convolution on the (faked) CUTLASS kernels: forward with the statistics, the
    # inner convolutions' BatchNorm+ReLU input applied while loading (fused) or by one
    # native pass before the forward and the weight gradient (exact), each block's shortcut
    # gradient added where dx is written
    assert fake.calls["conv_stats"] + fake.calls["conv_stats+prologue"] == n_convs
    assert fake.calls["conv_stats+prologue"] == (inner if fused else 0)
    assert fake.calls["fprop"] + fake.calls["fprop+prologue"] == 0
    assert fake.calls["wgrad"] + fake.calls["wgrad+prologue"] == n_convs
    assert fake.calls["wgrad+prologue"] == (inner if fused else 0)
    assert fake.calls["dgrad+shortcut"] == blocks
    assert fake.calls["dgrad"] == n_convs - blocks
    # the BatchNorm kernels: statistics merge, output apply with the residual (and the
    # exact prologues), the backward reduce/apply, the inner applies once each
    # (bn_apply_relu) and the ReLU of the output
    assert rec.ext["bn_finalize"] == n_convs
    assert rec.ext["bn_add_act"] == blocks + (0 if fused else 2 * inner)
    assert rec.ext["bn_backward_reduce"] == n_convs
    assert rec.ext["bn_apply_relu"] == inner
    assert rec.ext["bn_backward_apply"] == blocks + projections
    # identity shortcuts: the gradient through the ReLU is stored by the last BatchNorm's apply
    assert rec.ext["act_grad"] == 0


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.heavy)])
def test_the_faked_step_matches_the_reference_backend(cuda_tables_on_cpu, arch):
    """The composition the cuda backend runs (native applies, the shortcut gradient added in
    the dgrad) computes what the reference backend computes."""
    dt, cl = torch.bfloat16, torch.channels_last
    ours, ref = _body(arch, "cuda", dt, True), _body(arch, "reference", dt, True)
    x = torch.randn(BATCH, 64, 16, 16).to(dt, memory_format=cl)
    dout = torch.randn(BATCH, ours[-1][-1].bn2.num_features if arch == "resnet18" else 2048, 2, 2)
    dout = dout.to(dt, memory_format=cl)
    out_a, dx_a = _step(ours, x.clone().requires_grad_(), dout)
    out_b, dx_b = _step(ref, x.clone().requires_grad_(), dout)
    assert dx_a.is_contiguous(memory_format=cl) and dx_a.dtype == dt

    # bfloat16 through 16 blocks: the two differ by rounding (the BatchNorm kernels merge
    # statistics in another order), so compare relative to each tensor's norm
    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    assert rel(out_a, out_b) < 0.02, "output"
    assert rel(dx_a, dx_b) < 0.05, "x.grad"
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) < 0.05, n


# the supported cases' edges: (what, dtype, channels_last, first block's channels, reason)
UNSUPPORTED = [
    ("float32", torch.float32, True, 64, "dtype"),
    ("NCHW", torch.bfloat16, False, 64, "channels_last"),
    ("12 channels", torch.bfloat16, True, 12, "multiple of 8"),
]


@pytest.mark.parametrize("what,dtype,channels_last,c,why", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_outside_the_supported_cases_convolutions_fall_back_with_a_reason(cuda_tables_on_cpu, what, dtype,
                                                                          channels_last, c, why):
    rec, fake = cuda_tables_on_cpu
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = randomise(fusedres.BasicBlock(c, c, backend="cuda")).to(dtype=dtype, memory_format=fmt).train()
    x = torch.randn(BATCH, c, 6, 6).to(dtype, memory_format=fmt)
    w = block.conv1.weight
    geo = ([1, 1], [1, 1], [1, 1], 1)
    assert why in _cutlass.fprop_reason(x, w, None, None, None, False, *geo)
    x = x.clone().requires_grad_()
    fusedres.backends.reset_fallbacks()
    with rec:
        _step(block, x, torch.randn(BATCH, c, 6, 6).to(dtype, memory_format=fmt))
    assert sum(fake.calls.values()) == 0  # every convolution through ATen
    # and each is on the record, with the predicate's reason
    recorded = fusedres.backends.fallbacks()
    convs = {p for (b, p, r) in recorded if b == "cuda" and p.startswith("conv_") and why in r}
    assert convs >= {"conv_stats", "conv_dgrad", "conv_wgrad"}, recorded
    assert rec.aten["convolution"] + rec.aten["convolution_backward"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_default_prologue_has_the_reference_numerics_far_from_zero(cuda_tables_on_cpu, dtype):
    """A BatchNorm with |mean/sigma| = 64 before the conv: |shift| ~ 64 for normalised values
    ~ 1. The default (exact) prologue gives the reference's input to the conv bit for bit,
    float32 scale and shift; the CUTLASS mainloop fusion would round them to 16 bits (see
    tests/test_triton.py for what that costs)."""
    _, fake = cuda_tables_on_cpu
    gen = torch.Generator().manual_seed(0)
    c = 16
    sigma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.25
    mean = 64 * sigma
    x = (mean.view(1, -1, 1, 1) + sigma.view(1, -1, 1, 1) * torch.randn(BATCH, c, 6, 6, generator=gen,
                                                                         dtype=torch.float64))
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    scale = (1 / sigma).float()
    shift = (-mean * scale.double()).float()
    w = (torch.randn(8, c, 3, 3, generator=gen) / 12).to(dtype).contiguous(memory_format=torch.channels_last)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    cuda = backends.get("cuda")
    y, _ = cuda.conv_stats(x, w, scale, shift, True, *geo)
    want, _ = reference.conv_stats(x, w, scale, shift, True, *geo)
    assert torch.equal(y, want)
    dy = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(cuda.conv_wgrad(dy, x, scale, shift, True, list(w.shape), *geo),
                       reference.conv_wgrad(dy, x, scale, shift, True, list(w.shape), *geo))
    assert fake.calls["conv_stats"] == 1 and fake.calls["wgrad"] == 1 and "conv_stats+prologue" not in fake.calls


def _preact_body(backend, drop_path, seed=0):
    torch.manual_seed(seed)
    m = randomise(fusedres.cifar_resnet(20, "B", preact=True, drop_path=drop_path, backend=backend), seed)
    body = torch.nn.Sequential(m.layer1, m.layer2, m.layer3)
    return body.to(dtype=torch.bfloat16, memory_format=torch.channels_last).train()


@pytest.mark.parametrize("drop_path", [0.0, 0.5], ids=["plain", "stochastic-depth"])
def test_preact_training_step_runs_no_eager_pass(cuda_tables_on_cpu, drop_path):
    """Pre-activation blocks (CIFAR ResNet-20, projections where the shape changes): the
    identity shortcut's gradient is added where the first BatchNorm's backward apply writes
    dx, and with stochastic depth the main branch's per-sample scale is one native pass."""
    rec, fake = cuda_tables_on_cpu
    dt, cl = torch.bfloat16, torch.channels_last
    body = _preact_body("cuda", drop_path)
    x = torch.randn(BATCH, 16, 16, 16).to(dt, memory_format=cl)
    dout = torch.randn_like(body(x.clone())).contiguous(memory_format=cl)
    x = x.clone().requires_grad_()
    fake.calls.clear()
    torch.manual_seed(1)
    with rec:
        _step(body, x, dout)
    assert dict(rec.aten) == {}, f"ATen passes over activations: {dict(rec.aten)}"
    blocks, projections = 9, 2
    convs = 2 * blocks + projections
    # the block's second conv adds the shortcut in its epilogue (fprop), the projection
    # shortcut's dgrad adds the main branch's dx
    assert fake.calls["conv_stats"] == blocks and fake.calls["fprop"] == blocks + projections
    assert fake.calls["wgrad"] == convs
    assert fake.calls["dgrad+shortcut"] == projections and fake.calls["dgrad"] == 2 * blocks
    # every BatchNorm's backward apply is one native pass, the identity shortcut's gradient
    # added in the first one's; the exact prologue's BatchNorm+ReLU apply before the forward
    # and the weight gradient of each conv, and the per-sample scale forward and backward
    assert rec.ext["bn_backward_apply"] == 2 * blocks and rec.ext["bn_backward_reduce"] == 2 * blocks
    assert rec.ext["bn_add_act"] == 2 * convs + (2 * blocks if drop_path else 0)
