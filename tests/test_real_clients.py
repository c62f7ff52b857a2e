"""fusedres under code its authors did not write: torch.compile, weight edits behind the
version counters (EMA, pruning, parametrisations), torchvision's FrozenBatchNorm2d detection
backbones, hooks, inference_mode, TorchScript, deep torchvision models' numerics."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

import fusedres
from fusedres.testing import assert_close, rel_l2_err
from helpers import cpu_backends, randomise, randomise_frozen_bn
from tv import import_torchvision, load_torchvision_resnet

BACKENDS = cpu_backends()


def _unfused(model, x):
    with fusedres.functional.unfused():
        return model(x)


def _block(backend):
    ds = nn.Sequential(nn.Conv2d(6, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return randomise(fusedres.BasicBlock(6, 8, 2, ds, backend=backend))


# --------------------------------------------------------------------------- 1. torch.compile


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_eval_block_matches_eager(backend, grad):
    # inductor reuses its buffers for the next folded weight: a cache keyed on tensor
    # versions served the previous weight's packing (error 1.5 on outputs of 4.6)
    torch._dynamo.reset()
    block = _block(backend).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.set_grad_enabled(grad):
        want = _unfused(block, x)
        eager = block(x)
        got = torch.compile(block, backend="inductor")(x)
    assert_close(eager, want, atol=1e-5, rtol=1e-5, name="eager vs torch.nn")
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="compiled vs torch.nn")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compiled_eval_resnet18_matches_eager(backend):
    torch._dynamo.reset()
    model = randomise(fusedres.resnet18(num_classes=10, backend=backend)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _unfused(model, x)
        got = torch.compile(model, backend="inductor")(x)
        got2 = torch.compile(model, backend="inductor")(x)
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="compiled resnet18")
    assert_close(got2, want, atol=1e-4, rtol=1e-4, name="compiled resnet18, second call")


# --------------------------------------------------------------------------- 2. stale folds


def _edits():
    def data_scale(m):
        for p in m.parameters():
            p.data.mul_(0.5)

    def running_var_data(m):
        m.bn1.running_var.data.fill_(4.0)

    def copy_in_place(m):
        with torch.no_grad():
            m.conv2.weight.copy_(torch.randn_like(m.conv2.weight))

    def load(m):
        sd = {k: (v * 0.7 if v.is_floating_point() else v) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)

    def to_double(m):
        m.double()

    return [data_scale, running_var_data, copy_in_place, load, to_double]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_sees_every_weight_edit(backend, edit):
    block = _block(backend).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        block(x)  # a first forward that could populate a cache
        edit(block)
        x = x.to(block.conv1.weight.dtype)
        got, want = block(x), _unfused(block, x)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"output after {edit.__name__}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_and_parametrizations(backend):
    block = _block(backend).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        block(x)
        prune.l1_unstructured(block.conv1, "weight", amount=0.5)  # weight = weight_orig * mask
        got, want = block(x), _unfused(block, x)
        assert_close(got, want, atol=1e-5, rtol=1e-5, name="after pruning")
        with torch.no_grad():
            block.conv1.weight_orig.mul_(2.0)
        assert_close(block(x), _unfused(block, x), atol=1e-5, rtol=1e-5, name="pruned weight updated")

    class Half(nn.Module):
        def forward(self, w):
            return w * 0.5

    block2 = _block(backend).eval()
    with torch.no_grad():
        block2(x)
        parametrize.register_parametrization(block2.conv2, "weight", Half())
        assert_close(block2(x), _unfused(block2, x), atol=1e-5, rtol=1e-5, name="parametrized weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_caches_until_a_version_bump_and_train_thaws(backend):
    block = _block(backend).eval()
    x = torch.randn(2, 6, 8, 8).to(memory_format=torch.channels_last)
    fusedres.freeze(block)
    with torch.no_grad():
        first = block(x)
        for p in block.parameters():
            p.data.mul_(0.5)  # behind the version counter: the frozen promise is broken
        assert torch.equal(block(x), first), "a frozen block should keep its folded weights"
        for t in list(block.parameters()) + list(block.buffers()):
            t.mul_(1)  # version bumps are still seen
        assert_close(block(x), _unfused(block, x), atol=1e-5, rtol=1e-5, name="frozen after a version bump")
        block.conv2.weight.data.mul_(2.0)
    block.train()(torch.randn(3, 6, 8, 8))  # a training forward unfreezes
    block.eval()
    with torch.no_grad():
        block.conv2.weight.data.mul_(0.5)
        assert_close(block(x), _unfused(block, x), atol=1e-5, rtol=1e-5, name="after training")
    fusedres.freeze(block)
    fusedres.unfreeze(block)
    with torch.no_grad():
        block.conv1.weight.data.mul_(3.0)
        assert_close(block(x), _unfused(block, x), atol=1e-5, rtol=1e-5, name="after unfreeze")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpu_packs_only_frozen_channels_last_weights():
    from fusedres.backends import CpuBackend

    block = _block("cpu").eval()
    x = torch.randn(2, 6, 8, 8)
    CpuBackend._packed.clear()
    with torch.no_grad():
        block(x), block(x.to(memory_format=torch.channels_last))
    assert len(CpuBackend._packed) == 0, "weights that may be edited were packed"
    fusedres.freeze(block)
    with torch.no_grad():
        block(x)
        assert len(CpuBackend._packed) == 0, "NCHW inputs must keep ATen's NCHW convolution numerics"
        got = block(x.to(memory_format=torch.channels_last))
    assert len(CpuBackend._packed) == 3
    assert_close(got, _unfused(block, x), atol=1e-5, rtol=1e-5, name="frozen packed output")
    fusedres.unfreeze(block)


# --------------------------------------------------------------------------- 5. FrozenBatchNorm2d


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_frozen_batchnorm_detection_backbone_runs_fused(train, op_counter):
    backbone_utils = import_torchvision("models.detection.backbone_utils")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    randomise_frozen_bn(bb).double()
    fused, report = fusedres.convert(bb, return_report=True)
    blocks = [r for r in report.replaced if r[2] not in ("fusedres.FusedStage", "fusedres.MaxPool2d")]
    assert len(blocks) == 8 and len(report.replaced) == 13 and not report.skipped, str(report)
    bb.train(train), fused.train(train)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    counter = op_counter()
    with counter:
        got = fused(xa)
    want = bb(xb)
    assert counter.counts["conv_bias_act"] >= 8 * 2, dict(counter.counts)
    for k in want:
        assert_close(got[k], want[k], atol=1e-9, rtol=1e-9, name=f"feature {k}")
    if train:
        sum(v.square().sum() for v in got.values()).backward()
        sum(v.square().sum() for v in want.values()).backward()
        assert_close(xa.grad, xb.grad, atol=1e-8, rtol=1e-8, name="x.grad")
        for (n, p), (_, q) in zip(fused.named_parameters(), bb.named_parameters()):
            if q.grad is not None:
                assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-8, name=n)
    for (n, b), (_, c) in zip(fused.named_buffers(), bb.named_buffers()):
        assert torch.equal(b, c), n


# --------------------------------------------------------------------------- 7. hooks


def test_hooks_on_submodules_fire_as_in_torch_nn():
    tvr = load_torchvision_resnet()
    model = randomise(tvr.resnet18(num_classes=10)).eval()
    seen = {"tv": [], "fused": []}

    def hook(tag):
        return lambda m, i, o: seen[tag].append(o.detach().clone())

    fused = fusedres.convert(model)
    model.layer1[0].bn1.register_forward_hook(hook("tv"))
    model.layer2[0].conv2.register_forward_pre_hook(lambda m, i: seen["tv"].append(i[0].detach().clone()))
    fused.layer1[0].bn1.register_forward_hook(hook("fused"))
    fused.layer2[0].conv2.register_forward_pre_hook(lambda m, i: seen["fused"].append(i[0].detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5, name="output")
    assert len(seen["fused"]) == len(seen["tv"]) == 2
    for a, b in zip(seen["fused"], seen["tv"]):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name="hooked value")


# --------------------------------------------------------------------------- 8. inference_mode


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_model_built_and_loaded_under_inference_mode(backend):
    ref = randomise(fusedres.resnet18(num_classes=10, backend="reference")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _unfused(ref, x)
    with torch.inference_mode():
        model = fusedres.resnet18(num_classes=10, backend=backend).eval()
        model.load_state_dict(ref.state_dict())
        got = model(x)
        fusedres.freeze(model)
        frozen = model(x.to(memory_format=torch.channels_last))
    with torch.no_grad():
        outside = model(x)
    for name, t in (("inference_mode", got), ("frozen", frozen), ("outside inference_mode", outside)):
        assert_close(t, want, atol=1e-4, rtol=1e-4, name=name)


# --------------------------------------------------------------------------- 9. TorchScript


def test_jit_script_raises_one_clear_error():
    with pytest.raises(TypeError, match="torch.compile"):
        torch.jit.script(fusedres.resnet18(num_classes=10))
    with pytest.raises(TypeError, match="torch.export"):
        torch.jit.script(nn.Sequential(fusedres.BasicBlock(4, 4)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_jit_trace_of_eval_model_follows_parameter_updates(backend):
    model = randomise(fusedres.resnet18(num_classes=10, backend=backend)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        assert_close(traced(x), _unfused(model, x), atol=1e-4, rtol=1e-4, name="traced")
        for p in model.parameters():
            p.mul_(0.5)
        model.layer1[0].bn1.running_var.fill_(3.0)
        assert_close(traced(x), _unfused(model, x), atol=1e-4, rtol=1e-4, name="traced after an update")


def test_jit_trace_in_training_mode_raises():
    model = fusedres.resnet18(num_classes=10).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        torch.jit.trace(model, torch.randn(2, 3, 32, 32))


# --------------------------------------------------------------------------- 10. numerics of deep models


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_cpu_eval_error_within_2x_of_torch_on_deep_models(name, layout):
    tvr = load_torchvision_resnet()
    model = randomise(getattr(tvr, name)(num_classes=10)).eval()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64).to(memory_format=fmt)
    fused = fusedres.convert(model, backend="cpu")
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        err_torch = rel_l2_err(model(x), ref)
        err_fused = rel_l2_err(fused(x), ref)
        fusedres.freeze(fused)
        err_frozen = rel_l2_err(fused(x), ref)
    assert err_fused <= 2 * err_torch + 1e-7, (err_fused, err_torch)
    assert err_frozen <= 2 * err_torch + 1e-7, (err_frozen, err_torch)
