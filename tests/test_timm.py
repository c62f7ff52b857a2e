"""convert() on timm's ResNet family: which blocks fuse, the same numbers as timm in training
and evaluation, checkpoints both ways, configurations left to timm with the reason, and
explain() confirming at run time that every replaced unit ran fused."""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.testing import assert_close, check_against_fp64, step
from helpers import cpu_backends, randomise
from tv import load_timm

timm = load_timm()

# one backend per model keeps the suite short: the cpu backend here, the reference backend on
# ResNeXt and in test_stochastic_depth_draws_like_timm (basic, SE and pre-activation blocks)
_CPU = "cpu" if "cpu" in cpu_backends() else "reference"

# model -> (backend, fused timm blocks, fused Conv2d-BatchNorm2d(-ReLU) runs). ResNet-D:
# two runs in the deep stem and one in each avg-pool shortcut of layers 2-4 (layer1's
# stride-1 shortcut, Identity + conv + BN, is fused into its block as a projection);
# SE-ResNet: the shortcut is called between the attention and the add, so its conv + BN is a run.
MODELS = {
    "resnet18": (_CPU, 8, 0),
    "resnet50": (_CPU, 16, 0),
    "resnext50_32x4d": ("reference", 16, 0),
    "wide_resnet50_2": (_CPU, 16, 0),
    "resnet50d": (_CPU, 16, 5),
    "resnetv2_50": (_CPU, 16, 0),
    "seresnet50": (_CPU, 16, 4),
}


def _timm(name, **kw):
    return randomise(timm.create_model(name, pretrained=False, num_classes=10, **kw))


def _max_pools(model) -> int:
    """nn.MaxPool2d modules, which convert swaps for fusedres.blocks.MaxPool2d."""
    return sum(type(m) is nn.MaxPool2d for m in model.modules())


def _fused_blocks(model):
    return [m for m in model.modules() if isinstance(m, fusedres.blocks._TimmBlock)]


@pytest.fixture(scope="module")
def converted():
    """name -> (timm model, converted copy, report), float32, built once."""
    out = {}
    for name, (backend, _, _) in MODELS.items():
        model = _timm(name)
        fused, report = fusedres.convert(model, backend=backend, return_report=True)
        out[name] = (model, fused, report)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_what_converts(converted, name):
    model, fused, report = converted[name]
    _, n_blocks, n_runs = MODELS[name]
    assert report.skipped == [], str(report)
    assert len(_fused_blocks(fused)) == n_blocks, str(report)
    assert sum(b == "a fused run of fusedres.FusedSequential" for _, _, b in report.replaced) == n_runs, str(report)
    assert len(report.replaced) == n_blocks + n_runs + _max_pools(model)
    # nothing moved: names, order and shapes of parameters and buffers are timm's
    assert [(n, p.shape) for n, p in fused.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]


def _check_step(model, fused, x, train):
    """float32 fused and float32 timm against a float64 timm: output, input and parameter
    gradients, running statistics, num_batches_tracked (err(fused) <= 2 err(torch) + slack)."""
    want64 = step(copy.deepcopy(model).double(), x.double(), train)
    want = step(copy.deepcopy(model), x, train)
    got = step(copy.deepcopy(fused), x, train)
    check_against_fp64(got, want, want64, torch.float32, pool_param_grads=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_matches_timm_within_2x_of_torch(converted, name):
    model, fused, _ = converted[name]
    _check_step(model, fused, torch.randn(2, 3, 32, 32), train=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_matches_timm_within_2x_of_torch(name):
    """The same architecture with stages of 2, 1, 1, 1 blocks (every kind of block of the
    model: identity, stride-1 and stride-2 shortcuts), 64x64 inputs: the deepest
    BatchNorms see 8 values per channel. Full-depth networks at test sizes are too
    ill-conditioned in training for the rule: there torch's own float32 input gradient
    differs from float64 by 5% and more, and which of two float32 runs is closer is chance."""
    backend, _, _ = MODELS[name]
    model = _timm(name, layers=(2, 1, 1, 1))
    fused, report = fusedres.convert(model, backend=backend, return_report=True)
    assert len(_fused_blocks(fused)) == 5 and not report.skipped, str(report)
    # An input whose pre-activations have no value within float32 rounding of zero: the fused
    # kernels round a pre-activation as y*scale + shift, torch as (y - mean)*invstd*gamma + beta;
    # at such a value one of them may zero a ReLU input the other keeps, and one flipped
    # element in layer3 moves the whole input gradient by 1e-2 (a coin toss, not an error).
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _check_step(model, fused, x, train=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_explain_every_replaced_unit_ran_fused(converted, train):
    x = torch.randn(2, 3, 32, 32)
    for name, (_, fused, report) in converted.items():
        fused = fused.train(train)
        before = {k: v.clone() for k, v in fused.state_dict().items()}
        ex = fusedres.explain(fused, x)
        # every replaced unit but the max-pool (no convolution: explain's units are fused convolutions)
        replaced = {p for p, _, to in report.replaced if to != "fusedres.MaxPool2d"}
        assert set(ex.units) == replaced, f"{name}: units {sorted(set(ex.units) ^ replaced)} differ from the report"
        bad = [(p, ex.units[p].status) for p in sorted(replaced) if not ex.units[p].ran_fused]
        assert not bad, f"{name}: replaced but not run fused: {bad}\n{ex}"
        # the stem's BatchNorm stays a torch.nn module (an attribute of timm's ResNet, not a Sequential run)
        assert ex.torch_nn_norms == (["norm"] if name == "resnetv2_50" else ["bn1"]), f"{name}\n{ex}"
        for k, v in fused.state_dict().items():
            assert torch.equal(v, before[k]), f"{name}: explain changed {k}"


@pytest.mark.parametrize("name", ["resnet18", "seresnet18", "resnetv2_18"])
def test_stochastic_depth_draws_like_timm(name):
    """timm's DropPath (scale 1/keep, one draw per sample) is the fused per-sample scale: with
    the same seed the same samples drop, so float64 outputs and running statistics agree to
    rounding (post-activation, attention and pre-activation blocks)."""
    model = _timm(name, drop_path_rate=0.5).double().train()
    fused = fusedres.convert(model, backend="reference")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    outs = []
    with torch.no_grad():
        for m in (fused, model):
            torch.manual_seed(3)
            outs.append(m(x))
        assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-7, name="output")
        for (n, a), (_, b) in zip(fused.named_buffers(), model.named_buffers()):
            assert_close(a, b, atol=1e-12, rtol=1e-9, name=n)
        for m in model.modules():
            if type(m).__name__ == "DropPath":
                m.drop_prob = 0.0
        undropped = model(x)
    assert (undropped - outs[1]).abs().max() > 1e-3, "no sample was dropped: the test proves nothing"


def test_preact_bottleneck_trains_with_stochastic_depth_like_timm():
    """A pre-activation bottleneck widens its last conv's output past the channels of the
    BatchNorm before it; the per-sample scale is per output channel, forward and backward.
    float64 training step against timm with the same draws."""
    model = _timm("resnetv2_50", drop_path_rate=0.5).double().train()
    fused = fusedres.convert(copy.deepcopy(model), backend=_CPU)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for m in (fused, model):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = m(xi)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (out_a, dx_a, pg_a), (out_b, dx_b, pg_b) = grads
    assert_close(out_a, out_b, atol=1e-9, rtol=1e-7, name="output")
    # relative to each gradient's norm: a ReLU input within rounding of zero may gate the
    # other way (the folded y*scale + shift against timm's normalise-then-affine)
    for n, g in [("x.grad", dx_b), *pg_b.items()]:
        a = dx_a if n == "x.grad" else pg_a[n]
        assert float((a - g).norm() / g.norm().clamp_min(1e-300)) < 1e-8, n


@pytest.mark.parametrize(
    "name, kwargs, replaced, reasons",
    [
        ("resnet18", {"act_layer": "silu"}, 3, {"act1 is SiLU, not nn.ReLU"}),
        ("resnetaa50", {}, 16, {"aa is AvgPool2d"}),
        ("resnet50", {"drop_block_rate": 0.1}, 9, {"drop_block is DropBlock2d"}),
        ("resnetv2_50d", {}, 12, {"DownsampleAvg shortcut of the pre-activated input is not a single convolution"}),
        ("resnetv2_50x1_bit", {}, 0, {"conv1 is StdConv2d, not nn.Conv2d"}),
    ],
    ids=["silu", "anti-aliasing", "dropblock", "resnetv2-avg-shortcut", "std-conv"],
)
def test_other_configurations_are_left_to_timm(name, kwargs, replaced, reasons):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    fused, report = fusedres.convert(model, return_report=True)
    assert len(report.replaced) == replaced + _max_pools(model), str(report)
    assert {why for _, why in report.skipped} == reasons, str(report)
    for path, _ in report.skipped:
        assert type(fused.get_submodule(path)) is type(model.get_submodule(path)), path


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50", "resnetv2_50"])
def test_timm_checkpoints_load_both_ways_strict(converted, name):
    model, fused, _ = converted[name]
    model, fused = copy.deepcopy(model), copy.deepcopy(fused)
    with torch.no_grad():
        for t in fused.state_dict().values():
            t.add_(1)  # every fused tensor now differs from timm's
    fused.load_state_dict(model.state_dict(), strict=True)  # timm checkpoint -> fused model
    got = fused.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    with torch.no_grad():
        for t in fused.state_dict().values():
            t.mul_(3)
    model.load_state_dict(fused.state_dict(), strict=True)  # fused checkpoint -> timm model
    got = model.state_dict()
    for k, v in fused.state_dict().items():
        assert torch.equal(got[k], v), k


def test_hooked_block_runs_timm_forward_and_explain_says_so(converted):
    model, fused, _ = converted["resnet18"]
    model, fused = copy.deepcopy(model).eval(), copy.deepcopy(fused).eval()
    seen = {"timm": [], "fused": []}
    model.layer2[1].act1.register_forward_hook(lambda m, i, o: seen["timm"].append(o.clone()))
    fused.layer2[1].act1.register_forward_hook(lambda m, i, o: seen["fused"].append(o.clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5, name="output")
    assert len(seen["fused"]) == len(seen["timm"]) == 1
    assert_close(seen["fused"][0], seen["timm"][0], atol=1e-5, rtol=1e-5, name="hooked act1 output")
    ex = fusedres.explain(fused, x)
    assert [u.path for u in ex.fell_back()] == ["layer2.1"], str(ex)
    assert ex.units["layer2.1"].reasons == ["ReLU carries a forward hook"]
    assert "layer2.1.bn1" in ex.torch_nn_norms


def test_zero_init_last_is_timms(converted):
    _, fused, _ = converted["resnet50"]
    fused = copy.deepcopy(fused)
    fused.init_weights(zero_init_last=True)  # timm's ResNet.init_weights calls each block's zero_init_last
    for b in _fused_blocks(fused):
        assert torch.count_nonzero(b.bn3.weight) == 0


def test_sync_batchnorm_reaches_shortcut_runs(converted):
    _, fused, _ = converted["resnet50d"]
    fused = fusedres.convert_sync_batchnorm(copy.deepcopy(fused))
    assert all(b.sync_bn for b in _fused_blocks(fused))
    ds = fused.layer2[0].downsample
    assert isinstance(ds, fusedres.FusedSequential) and ds.sync_bn
    assert type(ds[2]) is nn.BatchNorm2d  # fused in the run, synchronised there
    assert type(fused.bn1) is fusedres.SyncBatchNorm2d  # the stem BatchNorm outside any fused unit
