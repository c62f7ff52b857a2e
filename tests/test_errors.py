"""Bad input gets a clear error naming the argument and the expectation."""

import re

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.backends import BackendUnavailableError


BACKENDS = [
    b for b, st in fusedres.available_backends().items()
    if st.available and fusedres.backends._device_error(b, torch.device("cpu")) is None
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def block(backend):
    return fusedres.BasicBlock(4, 4, backend=backend)


def test_wrong_rank(block):
    with pytest.raises(ValueError, match=r"BasicBlock: expected a 4-D input \(N, C, H, W\), got a 3-D tensor"):
        block(torch.randn(4, 5, 5))


def test_channel_mismatch(block):
    with pytest.raises(ValueError, match="expected an input with 4 channels, got 3"):
        block(torch.randn(2, 3, 5, 5))


def test_integer_input(block):
    with pytest.raises(TypeError, match="input dtype must be one of float16, bfloat16, float32, float64; got torch.int64"):
        block(torch.ones(2, 4, 5, 5, dtype=torch.long))


def test_mixed_dtypes(block):
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match conv weight dtype torch.float32"):
        block(torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_mixed_devices(block):
    # a tensor on the meta device stands in for "another device" on a machine without a GPU
    with pytest.raises(RuntimeError, match="input is on meta but Conv2d.weight is on cpu"):
        block(torch.randn(2, 4, 5, 5, device="meta"))


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (1, 4, 2, 2)])
def test_train_single_value_per_channel(shape, backend):
    ds = nn.Sequential(nn.Conv2d(4, 4, 1, 2, bias=False), nn.BatchNorm2d(4))
    b = fusedres.BasicBlock(4, 4, 2, ds, backend=backend).train()
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        b(torch.randn(shape))
    b.eval()(torch.randn(shape))  # fine in eval, as for nn.BatchNorm2d


def test_identity_shortcut_shape_mismatch(backend):
    b = fusedres.BasicBlock(4, 6, 2, backend=backend)  # no downsample although the shape changes
    with pytest.raises(ValueError, match="identity shortcut needs the output shape to equal the input's"):
        b(torch.randn(2, 4, 6, 6))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('reference', 'triton', 'cuda', 'cpu'\), got 'cudnn'"):
        fusedres.BasicBlock(4, 4, backend="cudnn")


def test_unavailable_backend_says_why():
    st = fusedres.available_backends()["cuda"]
    if st.available:
        pytest.skip("cuda backend is available here")
    b = fusedres.BasicBlock(4, 4, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=re.escape(f"backend 'cuda' is not available: {st.reason}")):
        b(torch.randn(2, 4, 5, 5))


def test_backend_on_wrong_device():
    if not fusedres.available_backends()["cpu"].available:
        pytest.skip("cpu backend not built")
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' runs on cpu tensors, got a tensor on meta"):
        fusedres.backends.resolve("cpu", torch.device("meta"))


def test_drop_path_out_of_range():
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\), got 1.0"):
        fusedres.BasicBlock(4, 4, drop_path=1.0)


def test_cifar_depth():
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        fusedres.cifar_resnet(21)


def test_weights_argument_is_refused_with_guidance():
    with pytest.raises(ValueError, match="load a torchvision state_dict"):
        fusedres.resnet18(weights="IMAGENET1K_V1")


def test_weights_moved_to_another_device_after_construction(backend):
    b = fusedres.BasicBlock(4, 4, backend=backend)
    b.bn2.to("meta")  # one submodule left behind by a partial .to()
    with pytest.raises(RuntimeError, match="input is on cpu but BatchNorm2d.weight is on meta"):
        b(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_gives_an_empty_output_like_torch(backend, train):
    b = fusedres.BasicBlock(4, 4, backend=backend).train(train)
    out = b(torch.randn(0, 4, 5, 5))
    assert out.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("fmt", ["channels_last", "strided"])
def test_any_memory_format_is_accepted_and_kept(backend, fmt):
    b = fusedres.BasicBlock(4, 4, backend=backend).eval()
    if fmt == "channels_last":
        x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 4, 6, 12)[..., ::2]  # neither contiguous nor channels_last
    with torch.no_grad():
        out = b(x)
        with fusedres.functional.unfused():
            want = b(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if fmt == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_functional_api_names_the_argument():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
    with pytest.raises(ValueError, match="expected an input with 3 channels, got 4"):
        fusedres.functional.conv_bn_act(torch.randn(2, 4, 5, 5), conv, bn)
