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
from fusedres import _conv_cutlass, _ext, backends, ops, reference

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
    """Stands in for ``fusedres._conv_cutlass`` on CPU tensors: the real support predicate,
    the reference convolution as the kernel, a count per kernel kind."""

    fprop_reason = staticmethod(_conv_cutlass.fprop_reason)
    dgrad_reason = staticmethod(_conv_cutlass.dgrad_reason)
    wgrad_reason = staticmethod(_conv_cutlass.wgrad_reason)

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
        with self._kernel("fprop"):
            return reference.conv_bias_act(x, w, bias, residual, s, t, s is not None, stride, padding, dilation, 1,
                                           relu)

    def conv_stats(self, x, w, s, t, stride, padding, dilation):
        with self._kernel("conv_stats"):
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
        monkeypatch.setattr(ops, name, lambda *a, _n=name: getattr(backends.get(a[-1]), _n)(*a[:-1]))
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


@pytest.mark.parametrize("arch,blocks,projections,convs", MODELS, ids=[m[0] for m in MODELS])
def test_training_step_runs_no_eager_pass_in_the_supported_cases(cuda_tables_on_cpu, arch, blocks, projections,
                                                                 convs):
    rec, fake = cuda_tables_on_cpu
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
    # every convolution on the (faked) CUTLASS kernels: forward with the statistics, the
    # BatchNorm+ReLU of the previous conv applied while loading (prologue) in the forward
    # and the weight gradient, each block's shortcut gradient added where dx is written
    assert fake.calls["conv_stats"] == n_convs and fake.calls["fprop"] == 0
    assert fake.calls["wgrad"] + fake.calls["wgrad+prologue"] == n_convs
    assert fake.calls["wgrad+prologue"] == blocks * (convs - 1)
    assert fake.calls["dgrad+shortcut"] == blocks
    assert fake.calls["dgrad"] == n_convs - blocks
    # the BatchNorm kernels: statistics merge, output apply with the residual, the backward
    # reduce/apply, the inner applies once each (bn_apply_relu) and the ReLU of the output
    assert rec.ext["bn_finalize"] == n_convs and rec.ext["bn_add_act"] == blocks
    assert rec.ext["bn_backward_reduce"] == n_convs
    assert rec.ext["bn_apply_relu"] == blocks * (convs - 1)
    assert rec.ext["bn_backward_apply"] == blocks + projections
    assert rec.ext["act_grad"] == blocks - projections  # identity shortcuts: the gradient through the ReLU


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
    assert why in _conv_cutlass.fprop_reason(x, w, None, None, None, False, *geo)
    x = x.clone().requires_grad_()
    with rec:
        _step(block, x, torch.randn(BATCH, c, 6, 6).to(dtype, memory_format=fmt))
    assert sum(fake.calls.values()) == 0  # every convolution through ATen
    assert rec.aten["convolution"] + rec.aten["convolution_backward"] > 0
